"""One copy-on-write walk over a JSON value: field paths, detectors and secret-named members.

The input is never mutated; containers are copied only where something changed, so an
unchanged value comes back as the very same object. Depth is checked before recursing.
"""

from __future__ import annotations

import json
from typing import Any

from .detect_pii import card_number_ok
from .detect_secrets import is_secret_name
from .fieldpaths import END, FieldMatcher, State
from .replace import Replacer
from .report import RedactionReport, format_path
from .scanner import TextScanner
from .settings import NotRedactable

_CARD_MIN = 10**12  # 13 digits
_MEMO_MAX_LEN = 256
_MEMO_MAX_ENTRIES = 65536


def _canonical(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class JsonWalk:
    """Redacts one JSON value into ``report``; ``prefix`` labels paths (``line[3]:``)."""

    __slots__ = ("_scanner", "_fields", "_replace", "_max_depth", "_report", "_prefix", "_parts",
                 "_key_names", "_card_ints", "_scrub_key", "_memo")

    def __init__(self, *, scanner: TextScanner | None, fields: FieldMatcher | None, replacer: Replacer,
                 max_depth: int, report: RedactionReport, prefix: str = "", scrub_key=None) -> None:
        self._scanner = scanner
        self._fields = fields
        self._replace = replacer
        self._max_depth = max_depth
        self._report = report
        self._prefix = prefix
        self._parts: list[str | int] = []
        self._key_names = scanner is not None and scanner.key_names
        self._card_ints = scanner is not None and "payment_card" in scanner.names
        self._scrub_key = scrub_key
        self._memo: dict[str, tuple[str | None, dict[str, int]]] = {}

    def run(self, value: Any) -> Any:
        fields = self._fields
        state = fields.initial if fields is not None else None
        trie = None
        if fields is not None and fields.has_slow:
            _check_depth(value, self._max_depth)
            trie = fields.slow_trie(value)
        if (state is not None and fields.is_final(state)) or (trie is not None and END in trie):
            return self._field(value)
        return self._walk(value, state, trie, 0)

    def _scan(self, s: str) -> str | None:
        """scanner.redact with a per-walk memo: repeated values (statuses, tags...) scan once."""
        if len(s) > _MEMO_MAX_LEN:
            return self._scanner.redact(s, self._report.counts)  # type: ignore[union-attr]
        hit = self._memo.get(s)
        if hit is None:
            local: dict[str, int] = {}
            hit = (self._scanner.redact(s, local), local)  # type: ignore[union-attr]
            if len(self._memo) < _MEMO_MAX_ENTRIES:
                self._memo[s] = hit
        r, local = hit
        if local:
            counts = self._report.counts
            for k, n in local.items():
                counts[k] = counts.get(k, 0) + n
        return r

    # -- hits -----------------------------------------------------------------------------------
    def _hit(self) -> None:
        report = self._report
        if len(report.paths) < report.max_paths:
            report.paths.append(format_path(self._parts, self._scrub_key, self._prefix))
        else:
            report.paths_dropped += 1

    def _field(self, value: Any) -> str:
        self._report.count("field")
        self._hit()
        return self._replace("field", _canonical(value))

    def _whole(self, kind: str, canonical: str) -> str:
        self._report.count(kind)
        self._hit()
        return self._replace(kind, canonical)

    # -- walk -----------------------------------------------------------------------------------
    def _walk(self, v: Any, state: State | None, trie: dict | None, depth: int) -> Any:
        t = type(v)
        if t is str:
            if self._scanner is None:
                return v
            r = self._scan(v)
            if r is None:
                return v
            self._hit()
            return r
        if t is dict or t is list or t is tuple:
            if state is None and trie is None and self._scanner is None:
                return v
            if depth >= self._max_depth:
                raise NotRedactable("json_too_deep", f"JSON nesting deeper than {self._max_depth}")
            if t is dict:
                return self._dict(v, state, trie, depth + 1)
            return self._list(v, state, trie, depth + 1)
        if t is int and self._card_ints and (v >= _CARD_MIN or v <= -_CARD_MIN):
            digits = str(abs(v))
            if card_number_ok(digits):
                return self._whole("payment_card", digits)
        return v

    def _dict(self, v: dict, state: State | None, trie: dict | None, depth: int) -> dict:
        out = None
        parts = self._parts
        fields = self._fields
        scanner = self._scanner
        for k, child in v.items():
            cs = fields.step(state, k) if state is not None else None  # type: ignore[union-attr]
            ct = trie.get(k) if trie is not None else None
            parts.append(k)
            tc = type(child)
            if (cs is not None and fields.is_final(cs)) or (ct is not None and END in ct):  # type: ignore[union-attr]
                new = self._field(child)
            elif tc is str:
                if self._key_names and child and is_secret_name(k) and not child.startswith("[REDACTED"):
                    new = self._whole("api_key", child)
                elif scanner is not None:
                    r = self._scan(child)
                    if r is None:
                        new = child
                    else:
                        self._hit()
                        new = r
                else:
                    new = child
            elif tc is dict or tc is list or tc is tuple or (tc is int and self._card_ints):
                new = self._walk(child, cs, ct, depth)
            else:
                new = child
            parts.pop()
            if new is not child:
                if out is None:
                    out = dict(v)
                out[k] = new
        return v if out is None else out

    def _list(self, v: list | tuple, state: State | None, trie: dict | None, depth: int) -> list | tuple:
        out = None
        parts = self._parts
        fields = self._fields
        if state is not None:
            default, special = fields.step_list(state, len(v))  # type: ignore[union-attr]
            final_default = default is not None and fields.is_final(default)  # type: ignore[union-attr]
        else:
            default, special, final_default = None, {}, False
        scanning = self._scanner is not None
        for i, child in enumerate(v):
            cs = special.get(i, default) if special else default
            ct = trie.get(i) if trie is not None else None
            tc = type(child)
            if cs is None and ct is None and not (tc is str and scanning) and tc is not dict \
                    and tc is not list and tc is not tuple and not (tc is int and self._card_ints):
                continue  # nothing can match here: skip the call
            parts.append(i)
            if (cs is not None and (final_default if cs is default else fields.is_final(cs))) \
                    or (ct is not None and END in ct):  # type: ignore[union-attr]
                new = self._field(child)
            else:
                new = self._walk(child, cs, ct, depth)
            parts.pop()
            if new is not child:
                if out is None:
                    out = list(v)
                out[i] = new
        if out is None:
            return v
        return tuple(out) if type(v) is tuple else out


def _check_depth(value: Any, max_depth: int) -> None:
    """Iterative depth bound, run before python-jsonpath (which recurses) sees the value."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if d >= max_depth:
            raise NotRedactable("json_too_deep", f"JSON nesting deeper than {max_depth}")
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list, tuple)))
