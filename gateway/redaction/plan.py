"""Redactor (settings, key, plan cache) and Plan (one compiled fields+detectors combination)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Sequence

from . import codec, formats
from .fieldpaths import FieldMatcher
from .offload import redact_in_process
from .replace import Replacer, load_pseudonym_key
from .report import RedactionReport
from .scanner import TextScanner, normalize_detectors
from .scrub import scrub_text
from .settings import InvalidFieldPath, NotRedactable, RedactionSettings
from .sse import SseRedactor
from .walk import JsonWalk

_PLAN_CACHE_MAX = 1024


class Plan:
    """What to redact (compiled once) and how; safe to share between threads."""

    def __init__(self, settings: RedactionSettings, fields: tuple[str, ...], detectors: tuple[str, ...],
                 replacer: Replacer) -> None:
        self.settings = settings
        self.fields = fields
        self.detectors = detectors
        self._matcher = FieldMatcher(fields) if fields else None
        self._scanner = TextScanner(detectors, replacer, settings.phone_region) if detectors else None
        self._replacer = replacer

    def __repr__(self) -> str:
        return f"Plan(fields={list(self.fields)!r}, detectors={list(self.detectors)!r})"

    def _report(self) -> RedactionReport:
        return RedactionReport(max_paths=self.settings.max_report_paths)

    # -- building blocks (used by formats / sse) --------------------------------------------------
    def walk(self, value: Any, report: RedactionReport, prefix: str = "") -> Any:
        return JsonWalk(scanner=self._scanner, fields=self._matcher, replacer=self._replacer,
                        max_depth=self.settings.max_json_depth, report=report, prefix=prefix,
                        scrub_key=scrub_text).run(value)

    def redact_text(self, text: str, report: RedactionReport) -> str | None:
        if self._scanner is None:
            return None
        return self._scanner.redact(text, report.counts)

    # -- public -----------------------------------------------------------------------------------
    def redact_json_value(self, value: Any) -> tuple[Any, RedactionReport]:
        """Redact an already-parsed JSON value (MCP ``result.content``). The input is not mutated."""
        report = self._report()
        try:
            return self.walk(value, report), report
        except RecursionError:  # pragma: no cover - the walk bounds depth first
            raise NotRedactable("json_too_deep", "JSON nesting too deep") from None

    def redact_body(self, body: bytes, *, content_type: str, content_encoding: str | None) -> tuple[bytes, RedactionReport]:
        """The redacted body (the same object when nothing changed) and what was redacted.

        Compressed bodies come back re-encoded with the same Content-Encoding; the caller sets
        Content-Length. Raises NotRedactable when the body cannot be redacted safely.
        """
        report = self._report()
        if not body:
            return body, report
        limits = self.settings
        kind, charset = formats.classify(content_type)
        if kind is None:
            raise NotRedactable("unsupported_content_type",
                                f"cannot redact {content_type.split(';')[0].strip() or 'untyped'} bodies")
        encodings = codec.parse_encodings(content_encoding)
        if len(body) > limits.max_inspect_bytes:
            raise NotRedactable("too_large", f"body exceeds {limits.max_inspect_bytes} bytes")
        raws: list[bool] = []
        data = body
        if encodings:
            # Stop inflating as soon as the output passes either limit (reason: decompression_limit).
            data, raws = codec.decode(body, encodings, min(limits.max_decoded_bytes, limits.max_inspect_bytes))
            if len(data) > limits.max_inspect_bytes:
                raise NotRedactable("too_large", f"decoded body exceeds {limits.max_inspect_bytes} bytes")
        try:
            new = self._dispatch(kind, data, charset, report)
        except RecursionError:  # pragma: no cover - parse and walk bound depth first
            raise NotRedactable("json_too_deep", "JSON nesting too deep") from None
        if new is None:
            return body, report
        return (codec.encode(new, encodings, raws) if encodings else new), report

    async def redact_body_async(self, body: bytes, *, content_type: str,
                                content_encoding: str | None) -> tuple[bytes, RedactionReport]:
        """``redact_body`` off the event loop: in a worker process from ``thread_threshold_bytes``
        (pure-Python work in a thread would still hold the GIL and stall the loop), in a thread
        for small compressed bodies (a few KiB may inflate to megabytes), inline otherwise."""
        if len(body) >= self.settings.thread_threshold_bytes:
            return await redact_in_process(self.settings, self.fields, self.detectors, body,
                                           content_type, content_encoding)
        compressed = bool(content_encoding) and content_encoding.strip().lower() not in ("", "identity")
        if compressed and body:
            return await asyncio.to_thread(self.redact_body, body, content_type=content_type,
                                           content_encoding=content_encoding)
        return self.redact_body(body, content_type=content_type, content_encoding=content_encoding)

    def sse(self, content_encoding: str | None = None) -> SseRedactor:
        """An incremental redactor for one ``text/event-stream`` response."""
        return SseRedactor(self, content_encoding)

    def _dispatch(self, kind: str, data: bytes, charset: str | None, report: RedactionReport) -> bytes | None:
        if kind == formats.JSON:
            return formats.redact_json(self, data, charset, report)
        if kind == formats.NDJSON:
            return formats.redact_ndjson(self, data, charset, report)
        if kind == formats.TEXT:
            return formats.redact_text_body(self, data, charset, report)
        if kind == formats.FORM:
            return formats.redact_form(self, data, charset, report)
        if kind == formats.SSE:
            sse = SseRedactor(self)
            out = sse.feed(data) + sse.close()
            report.merge(sse.report)
            return out if sse.report.counts else None
        return self._sniff(data, charset, report)

    def _sniff(self, data: bytes, charset: str | None, report: RedactionReport) -> bytes | None:
        """No Content-Type: JSON if it parses, else UTF-8 text; anything else is refused."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NotRedactable("unsupported_content_type", "untyped body is not UTF-8 text") from None
        if text.lstrip()[:1] in ("{", "["):
            try:
                formats.parse_json_text(text)
            except ValueError:
                pass
            else:
                return formats.redact_json(self, data, charset, report)
        return formats.redact_text_body(self, data, charset, report)


class Redactor:
    """Holds the settings and pseudonym key, and compiles plans once per (fields, detectors)."""

    def __init__(self, settings: RedactionSettings) -> None:
        self.settings = settings
        self._replacer = Replacer(load_pseudonym_key(settings))
        self._plans: dict[tuple[tuple[Any, ...], tuple[Any, ...]], Plan | None] = {}
        self._lock = threading.Lock()

    def plan(self, fields: Sequence[str], detectors: Sequence[str]) -> Plan | None:
        """The plan for a decision's ``redact``; None when there is nothing to redact.

        Raises UnknownDetector or InvalidFieldPath (both ValueError) with a clear message.
        """
        if isinstance(fields, (str, bytes)) or isinstance(detectors, (str, bytes)):
            raise InvalidFieldPath("redact.fields and redact.detectors must be lists of strings")
        key = (tuple(fields), tuple(detectors))
        try:
            return self._plans[key]
        except KeyError:
            pass
        except TypeError:  # unhashable entries: a policy bug
            raise InvalidFieldPath("redact.fields and redact.detectors must be lists of strings") from None
        names = normalize_detectors(detectors)
        paths = tuple(dict.fromkeys(fields))
        plan = Plan(self.settings, paths, names, self._replacer) if (paths or names) else None
        with self._lock:
            if len(self._plans) >= _PLAN_CACHE_MAX:
                self._plans.clear()
            self._plans[key] = plan
        return plan
