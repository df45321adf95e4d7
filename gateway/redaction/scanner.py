"""The detector registry and the text scanner that applies a set of detectors to one string."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from . import detect_pii, detect_secrets
from .replace import Replacer
from .settings import UnknownDetector

Span = tuple[int, int, str]
Finder = Callable[[str], list[Span]]

# Priority order: on overlapping hits of equal length the earlier name wins.
DETECTORS: tuple[str, ...] = (
    "private_key", "jwt", "aws_access_key", "bearer_token", "api_key",
    "iban", "payment_card", "us_ssn", "email", "phone", "ip_address",
)
SECRET_DETECTORS: tuple[str, ...] = ("jwt", "bearer_token", "aws_access_key", "private_key", "api_key")
SCRUB_DETECTORS: tuple[str, ...] = SECRET_DETECTORS + ("email", "phone", "payment_card", "us_ssn", "iban")

_STATIC: dict[str, Finder] = {
    "private_key": detect_secrets.find_private_key,
    "jwt": detect_secrets.find_jwt,
    "aws_access_key": detect_secrets.find_aws_access_key,
    "bearer_token": detect_secrets.find_bearer_token,
    "api_key": detect_secrets.find_api_key,
    "iban": detect_pii.find_iban,
    "payment_card": detect_pii.find_payment_card,
    "us_ssn": detect_pii.find_us_ssn,
    "email": detect_pii.find_email,
    "ip_address": detect_pii.find_ip_address,
}


_DIGITS = b"0123456789"
_INERT = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
    r"|[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}", re.ASCII)
_DIGIT_DETECTORS = frozenset({"phone", "us_ssn", "payment_card", "iban", "ip_address"})
_LOWER_DETECTORS = frozenset({"api_key", "aws_access_key", "bearer_token"})
# A literal every hit contains (checked inline, saving a call): (literal, in lower-cased text).
_LITERALS: dict[str, tuple[str, bool]] = {
    "email": ("@", False), "jwt": ("eyJ", False), "private_key": ("PRIVATE KEY", False),
    "bearer_token": ("bearer", True),
}


def normalize_detectors(names: Iterable[str]) -> tuple[str, ...]:
    """Validated detector names in priority order; ``all`` means every detector."""
    wanted: set[str] = set()
    for raw in names:
        name = str(raw).strip().lower()
        if name == "all":
            wanted.update(DETECTORS)
        elif name in DETECTORS:
            wanted.add(name)
        else:
            raise UnknownDetector(
                f"unknown redaction detector {raw!r} (known: all, {', '.join(sorted(DETECTORS))})")
    return tuple(d for d in DETECTORS if d in wanted)


class TextScanner:
    """Finds hits of several detectors in one string and rewrites it in a single pass."""

    __slots__ = ("names", "_finders", "_replace", "key_names", "_digits", "_low")

    def __init__(self, names: Sequence[str], replacer: Replacer, phone_region: str = "US") -> None:
        self.names = tuple(names)
        finders = []
        for i, n in enumerate(self.names):
            find = detect_pii.PhoneFinder(phone_region) if n == "phone" else _STATIC[n]
            lit, lit_low = _LITERALS.get(n, (None, False))
            finders.append((i, n, find, getattr(find, "min_digits", 0), lit, lit_low))
        self._finders = tuple(finders)
        self._digits = any(n in _DIGIT_DETECTORS for n in self.names)
        self._low = any(n in _LOWER_DETECTORS for n in self.names)
        self._replace = replacer
        self.key_names = "api_key" in self.names
        """Whether JSON members / form fields named like secrets are redacted whole."""

    def redact(self, s: str, counts: dict[str, int]) -> str | None:
        """The rewritten string, or None when nothing was found. Adds to ``counts``."""
        if len(s) < 6:  # shorter than any detectable value ("a@b.co")
            return None
        # Per-string features shared by the finders' pre-checks (C-speed, no regex).
        if self._digits:
            b = s.encode("utf-8", "surrogatepass")
            nd = len(b) - len(b.translate(None, _DIGITS))
            if nd >= 8 and len(s) <= 40 and _INERT.fullmatch(s):
                return None  # a bare timestamp or UUID: very common, never sensitive
        else:
            nd = 0
        low = s.lower() if self._low else ""
        hits: list[tuple[int, int, int, str, str]] = []
        for prio, name, find, min_digits, lit, lit_low in self._finders:
            if nd < min_digits or (lit is not None and lit not in (low if lit_low else s)):
                continue
            for start, end, canon in find(s, nd, low):
                hits.append((start, end, prio, name, canon))
        if not hits:
            return None
        if len(hits) > 1:
            hits = _resolve(s, hits)
        parts = []
        pos = 0
        for start, end, _prio, name, canon in hits:
            parts.append(s[pos:start])
            parts.append(self._replace(name, canon))
            counts[name] = counts.get(name, 0) + 1
            pos = end
        parts.append(s[pos:])
        return "".join(parts)

    def replace_whole(self, kind: str, canonical: str) -> str:
        return self._replace(kind, canonical)


def _resolve(s: str, hits: list[tuple[int, int, int, str, str]]) -> list[tuple[int, int, int, str, str]]:
    """Non-overlapping hits. Overlapping hits merge into their union (nothing found stays in
    clear), labelled with the longer hit's kind, then the higher-priority one."""
    hits.sort(key=lambda h: (h[0], -(h[1] - h[0]), h[2]))
    out = [hits[0]]
    for h in hits[1:]:
        last = out[-1]
        if h[0] >= last[1]:
            out.append(h)
            continue
        if h[1] <= last[1]:
            continue  # contained
        win = h if (h[1] - h[0], -h[2]) > (last[1] - last[0], -last[2]) else last
        start, end = last[0], h[1]
        out[-1] = (start, end, win[2], win[3], s[start:end])
    return out
