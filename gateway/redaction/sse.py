"""Incremental redaction of ``text/event-stream``: one event at a time, as the stream flows.

``feed(chunk)`` returns the redacted bytes of every event completed by the chunk (possibly
none); an event is held only until its terminating blank line arrives. Events without
anything to redact pass through byte for byte. A ``data`` payload (multi-line data joined with
``\\n``) is redacted as JSON when it parses, else as text. Invalid UTF-8 bytes round-trip
unchanged (surrogateescape). An optional Content-Encoding is decoded and re-encoded with a
flush after each batch of events, so the client still receives events as they happen.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .codec import Decoder, Encoder, parse_encodings
from .formats import dump_json, parse_json_text
from .report import RedactionReport
from .settings import NotRedactable

if TYPE_CHECKING:
    from .plan import Plan

# A line terminator followed by another one: the blank line that ends an event. A lone CR
# is a terminator only when not followed by LF (so a CRLF split across chunks waits).
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_LINES = re.compile(r"(\r\n|\n|\r)")


class SseRedactor:
    def __init__(self, plan: Plan, content_encoding: str | None = None) -> None:
        self._plan = plan
        self.report = RedactionReport(max_paths=plan.settings.max_report_paths)
        self._buf = bytearray()
        self._scan_from = 0
        self._events = 0
        self._max_event = plan.settings.max_inspect_bytes
        self._closed = False
        encs = parse_encodings(content_encoding)
        if len(encs) > 1:
            raise NotRedactable("unsupported_encoding", "an event stream with more than one content coding")
        self._decoder = Decoder(encs[0]) if encs else None
        self._encoder: Encoder | None = None
        self._encoding = encs[0] if encs else None

    def feed(self, chunk: bytes) -> bytes:
        """Redacted bytes for the events completed by ``chunk``. Raises NotRedactable."""
        if self._closed:
            raise RuntimeError("SseRedactor.feed after close")
        if self._decoder is None:
            return self._ingest(chunk, final=False)
        out = bytearray()
        limit = self._plan.settings.max_decoded_bytes
        for piece in self._decoder.feed(chunk):
            out += self._ingest(piece, final=False)
            if len(out) > limit:  # one chunk inflating to a flood of events
                raise NotRedactable("decompression_limit", f"one chunk decodes to more than {limit} bytes")
        return self._encode(bytes(out), final=False)

    def close(self) -> bytes:
        """Flush: a trailing event without its blank line is redacted and passed on too."""
        if self._closed:
            return b""
        self._closed = True
        if self._decoder is not None:
            self._decoder.finish()
        out = self._ingest(b"", final=True)
        return self._encode(out, final=True) if self._decoder is not None else out

    # -----------------------------------------------------------------------------------------
    def _encode(self, data: bytes, *, final: bool) -> bytes:
        if self._encoder is None:
            if not data and not final:
                return b""
            self._encoder = Encoder(self._encoding,  # type: ignore[arg-type]
                                    raw_deflate=self._decoder.raw_deflate if self._decoder else False)
        body = self._encoder.compress(data) if data else b""
        return body + (self._encoder.finish() if final else self._encoder.flush() if data else b"")

    def _ingest(self, data: bytes, *, final: bool) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        start = 0
        while True:
            m = _EVENT_END.search(buf, max(start, self._scan_from))
            if m is None:
                break
            end = m.end()
            if end == len(buf) and buf[-1:] == b"\r" and not final:
                break  # maybe the first half of a CRLF: wait for the next byte
            out += self._event(bytes(buf[start:end]))
            start = end
            self._scan_from = end
        if start:
            del buf[:start]
            self._scan_from -= start
        if final and buf:
            out += self._event(bytes(buf))
            buf.clear()
        self._scan_from = max(0, len(buf) - 3)
        if len(buf) > self._max_event:
            raise NotRedactable("sse_event_too_large", f"an event exceeds {self._max_event} bytes")
        return bytes(out)

    def _event(self, raw: bytes) -> bytes:
        index = self._events
        self._events += 1
        text = raw.decode("utf-8", "surrogateescape")
        bom = ""
        if index == 0 and text.startswith("\ufeff"):  # a stream may start with a BOM (ignored by clients)
            bom, text = "\ufeff", text[1:]
        parts = _LINES.split(text)  # line, term, line, term, ..., rest
        lines = parts[0::2]
        terms = parts[1::2]
        data_idx = [i for i, ln in enumerate(lines) if ln == "data" or ln.startswith("data:")]
        is_data = set(data_idx)
        # id, event and comment lines reach the agent too: the detectors read them as text.
        changed = False
        for i, ln in enumerate(lines):
            if ln and i not in is_data and (new_line := self._plan.redact_text(ln, self.report)) is not None:
                lines[i] = new_line
                changed = True
        new = self._redact_data("\n".join(_field_value(lines[i]) for i in data_idx), index) if data_idx else None
        if new is None and not changed:
            return raw
        drop: set[int] = set()
        if new is not None:
            first, last = data_idx[0], data_idx[-1]
            sep = " " if lines[first].startswith("data: ") or lines[first] == "data" else ""
            nl = terms[first] if first < len(terms) else "\n"
            lines[first] = nl.join(f"data:{sep}{ln}" for ln in new.split("\n"))
            if last != first:  # the data lines become one run ending with the last one's terminator
                terms[first] = terms[last] if last < len(terms) else ""
            drop = set(data_idx[1:])
        out: list[str] = []
        for i, ln in enumerate(lines):
            if i in drop:
                continue
            out.append(ln)
            if i < len(terms):
                out.append(terms[i])
        return (bom + "".join(out)).encode("utf-8", "surrogateescape")

    def _redact_data(self, data: str, index: int) -> str | None:
        plan = self._plan
        head = data.lstrip()[:1]
        if head in ("{", "[", '"'):
            try:
                value = parse_json_text(data)
            except (ValueError, UnicodeError):
                pass
            else:
                new = plan.walk(value, self.report, prefix=f"event[{index}]:")
                if new is value:
                    return None
                try:
                    return dump_json(new)
                except RecursionError:  # a subtree the walk had no reason to enter
                    raise NotRedactable("json_too_deep", f"event {index} is nested too deeply") from None
        return plan.redact_text(data, self.report)


def _field_value(line: str) -> str:
    value = line[5:]
    return value[1:] if value.startswith(" ") else value
