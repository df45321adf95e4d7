"""Audit hygiene: strip secrets and personal data from strings before they are stored.

``scrub_text`` runs per request on query strings, tool arguments and body previews, so it uses
the same precompiled detectors (label replacement, phone region US) with their cheap
pre-checks; a typical query string costs a few microseconds.
"""

from __future__ import annotations

from typing import Any

from .detect_secrets import is_secret_name
from .replace import LABEL
from .scanner import SCRUB_DETECTORS, TextScanner

_SCANNER = TextScanner(SCRUB_DETECTORS, LABEL, "US")
MAX_DEPTH = 64
_TOO_DEEP = "[REDACTED:too_deep]"


def scrub_text(s: str) -> str:
    """``s`` with secrets (JWT, bearer, AWS, PEM, API keys) and e-mail/phone/card/SSN/IBAN labelled."""
    if not s:
        return s
    r = _SCANNER.redact(s, {})
    return s if r is None else r


def scrub_value(obj: Any) -> Any:
    """``scrub_text`` over every string in a JSON-like value; secret-named members are replaced
    whole. Never raises on depth: nesting past 64 levels becomes ``[REDACTED:too_deep]``.
    The input is not mutated; unchanged parts are returned as the same objects."""
    return _scrub(obj, 0)


def _scrub(v: Any, depth: int) -> Any:
    t = type(v)
    if t is str:
        return scrub_text(v)
    if t is dict or t is list or t is tuple:
        if depth >= MAX_DEPTH:
            return _TOO_DEEP
        if t is dict:
            out = None
            for k, child in v.items():
                if type(child) is str and child and isinstance(k, str) and is_secret_name(k):
                    new: Any = "[REDACTED:api_key]"
                else:
                    new = _scrub(child, depth + 1)
                if new is not child:
                    if out is None:
                        out = dict(v)
                    out[k] = new
            return v if out is None else out
        items = None
        for i, child in enumerate(v):
            new = _scrub(child, depth + 1)
            if new is not child:
                if items is None:
                    items = list(v)
                items[i] = new
        if items is None:
            return v
        return tuple(items) if t is tuple else items
    return v
