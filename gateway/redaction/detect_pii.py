"""Personal-data detectors.

Each finder is called as ``find(s, nd, low)`` (the string, its count of ASCII digits and its
lower-cased form, computed once per string by the scanner) and returns
``[(start, end, canonical)]``. Finders with a ``min_digits`` attribute are skipped by the
scanner for strings with fewer digits. Patterns are ASCII-only (``\\d`` is ``[0-9]``).

Candidates are found by precompiled patterns and then validated (phonenumbers, Luhn + card
prefix table, IBAN mod-97, SSN area rules), with cheap pre-checks before the expensive parts.
``canonical`` is what a pseudonym is computed from (so ``(415) 555-2671`` and ``+14155552671``
get the same pseudonym); it is never reported.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

import phonenumbers
from phonenumbers import Leniency, PhoneNumberFormat, PhoneNumberMatcher
from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.us import ssn as _ssn

Span = tuple[int, int, str]
Finder = Callable[[str, int, str], list[Span]]

# --- email -----------------------------------------------------------------------------------
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
# ``logo@2x.png`` is an asset name, not an address.
_FILE_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "css", "js", "map"})


def find_email(s: str, nd: int = 0, low: str = "") -> list[Span]:
    if "@" not in s:
        return []
    out = []
    for m in _EMAIL.finditer(s):
        text = m.group()
        if text.rsplit(".", 1)[1].lower() in _FILE_TLDS:
            continue
        out.append((m.start(), m.end(), text.lower()))
    return out


# --- phone -----------------------------------------------------------------------------------
# A run of >= 7 digits with phone-style separators (the matcher itself rejects numbers glued
# to a Latin letter, so runs starting right after one are skipped).
_DIGIT_RUN = re.compile(r"(?<![A-Za-z])\d[\d\s().\-/]{5,}\d", re.ASCII)
# Removed from a run before counting its digits: dates and dotted quads (IPs, versions), so
# ISO timestamps and IPs, common in API bodies, never reach the (slow) matcher.
_NOT_PHONE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4}|\d{1,3}(?:\.\d{1,3}){3,}", re.ASCII)
_NON_DIGIT = re.compile(r"\D+", re.ASCII)
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}", re.ASCII)
_BEFORE, _AFTER = 8, 16  # context kept around a run: "+", "(" before; "ext. 1234" after


def _phone_windows(s: str) -> list[tuple[int, int]]:
    """Slices of ``s`` worth giving to the matcher: around runs of >= 7 digits that are not
    dates, dotted quads or parts of UUIDs. The matcher costs 1-2 µs per character it scans
    (~60 µs minimum per call), so it sees these windows instead of the whole string."""
    masked = _UUID.sub(lambda m: " " * len(m.group()), s) if s.count("-") >= 4 else s
    windows: list[tuple[int, int]] = []
    for m in _DIGIT_RUN.finditer(masked):
        run = m.group()
        if "-" in run or "/" in run or "." in run:
            run = _NOT_PHONE.sub(" ", run)
        if len(_NON_DIGIT.sub("", run)) < 7:
            continue
        lo, hi = max(0, m.start() - _BEFORE), min(len(s), m.end() + _AFTER)
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    return windows


class PhoneFinder:
    """libphonenumber's matcher at leniency VALID, with a default region."""

    min_digits = 7

    def __init__(self, region: str = "US") -> None:
        self.region = region

    def __call__(self, s: str, nd: int = 99, low: str = "") -> list[Span]:
        out = []
        for lo, hi in _phone_windows(s):
            for m in PhoneNumberMatcher(s[lo:hi], self.region, leniency=Leniency.VALID):
                start, end = lo + m.start, lo + m.end
                # ``ORD-4155552671`` is an identifier with a number in it, not a phone.
                if start >= 2 and s[start - 1] in "-_" and s[start - 2].isalnum():
                    continue
                out.append((start, end, phonenumbers.format_number(m.number, PhoneNumberFormat.E164)))
        return out


# --- US SSN ----------------------------------------------------------------------------------
# Only the written forms 123-45-6789 / 123 45 6789: a bare 9-digit number is any other ID.
_SSN = re.compile(r"(?<![\d\-])(\d{3})([\- ])(\d{2})\2(\d{4})(?![\d\-])", re.ASCII)


def find_us_ssn(s: str, nd: int = 99, low: str = "") -> list[Span]:
    out = []
    for m in _SSN.finditer(s):
        compact = m.group(1) + m.group(3) + m.group(4)
        if _ssn.is_valid(compact):
            out.append((m.start(), m.end(), compact))
    return out


# --- payment cards ---------------------------------------------------------------------------
_CARD = re.compile(r"(?<!\d)\d(?:[ \-]?\d){12,}(?!\d)", re.ASCII)
_GROUP = re.compile(r"\d+", re.ASCII)


def card_number_ok(d: str) -> bool:
    """Known issuer prefix and length (so epoch-ms timestamps are not cards), then Luhn."""
    n = len(d)
    if n < 13 or n > 19:
        return False
    p2, p3, p4 = int(d[:2]), int(d[:3]), int(d[:4])
    if d[0] == "4":
        ok = n in (13, 16, 19)  # Visa
    elif 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        ok = n == 16  # Mastercard
    elif p2 in (34, 37):
        ok = n == 15  # Amex
    elif 2200 <= p4 <= 2204:
        ok = n >= 16  # Mir
    elif p2 in (36, 38, 39) or 300 <= p3 <= 305 or p4 == 3095:
        ok = n >= 14  # Diners
    elif 3528 <= p4 <= 3589:
        ok = n >= 16  # JCB
    elif d[0] == "6" or p2 in (50, 56, 57, 58):
        ok = True  # Discover, UnionPay, Maestro, RuPay
    else:
        ok = False
    return ok and _luhn.is_valid(d)


def _grouping_ok(lengths: list[int]) -> bool:
    """Card layouts: unseparated, 4-4-4-4(-1..4) or Amex/Diners 4-6-5 / 4-6-4 (not a UUID's 8-4-4)."""
    if len(lengths) == 1:
        return True
    if all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4:
        return True
    return lengths in ([4, 6, 5], [4, 6, 4])


def find_payment_card(s: str, nd: int = 99, low: str = "") -> list[Span]:
    out: list[Span] = []
    for m in _CARD.finditer(s):
        text = m.group()
        groups = [(g.start(), g.end()) for g in _GROUP.finditer(text)]
        digits = _NON_DIGIT.sub("", text)
        if len(digits) <= 19 and _grouping_ok([b - a for a, b in groups]) and card_number_ok(digits):
            out.append((m.start(), m.end(), digits))
            continue
        if len(groups) == 1:
            continue
        # Card among other numbers ("12 4111 1111 1111 1111 2026"): try the card layouts
        # starting at each group (a constant number of checks per group: linear).
        lengths = [b - a for a, b in groups]
        i = 0
        while i < len(groups):
            for k in _layout_ends(lengths, i):
                cand = _NON_DIGIT.sub("", text[groups[i][0]:groups[k][1]])
                if card_number_ok(cand):
                    out.append((m.start() + groups[i][0], m.start() + groups[k][1], cand))
                    i = k
                    break
            i += 1
    return out


def _layout_ends(lengths: list[int], i: int) -> list[int]:
    """Last-group indexes of the card layouts (see ``_grouping_ok``) that start at group i."""
    n, first = len(lengths), lengths[i]
    if 13 <= first <= 19:
        return [i]
    if first != 4:
        return []
    ends = []
    if i + 4 < n and lengths[i + 1] == lengths[i + 2] == lengths[i + 3] == 4 and 1 <= lengths[i + 4] <= 3:
        ends.append(i + 4)
    if i + 3 < n and lengths[i + 1] == lengths[i + 2] == 4 and 1 <= lengths[i + 3] <= 4:
        ends.append(i + 3)
    if i + 2 < n and lengths[i + 1] == 6 and lengths[i + 2] in (4, 5):
        ends.append(i + 2)
    return ends


find_us_ssn.min_digits = 9  # type: ignore[attr-defined]
find_payment_card.min_digits = 13  # type: ignore[attr-defined]


# --- IBAN ------------------------------------------------------------------------------------
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])", re.ASCII)


def find_iban(s: str, nd: int = 99, low: str = "") -> list[Span]:
    if len(s) < 15:
        return []
    out = []
    for m in _IBAN.finditer(s):
        text = m.group()
        # Cut only at the end or before a space, longest first ("DE89 ... 00 AND" -> "DE89 ... 00").
        for end in range(len(text), 14, -1):
            if end < len(text) and text[end] != " ":
                continue
            compact = text[:end].replace(" ", "")
            if len(compact) >= 15 and _iban.is_valid(compact):
                out.append((m.start(), m.start() + end, compact))
                break
    return out


find_iban.min_digits = 4  # type: ignore[attr-defined]


# --- IP addresses ----------------------------------------------------------------------------
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not part of a longer dotted sequence: ``1.2.3.4.5`` and ``v1.2.3.4`` are versions, not IPs.
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)", re.ASCII)
# Possessive quantifiers keep this linear on long hex/colon runs.
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f.]*+:[0-9A-Fa-f:.]*+(?:%[0-9A-Za-z_.\-]+)?(?![\w:])", re.ASCII)


def find_ip_address(s: str, nd: int = 99, low: str = "") -> list[Span]:
    out: list[Span] = []
    if nd >= 4 and s.count(".") >= 3:
        out.extend((m.start(), m.end(), m.group()) for m in _IPV4.finditer(s))
    if s.count(":") >= 2:
        for m in _IPV6.finditer(s):
            text = m.group().rstrip(".")
            if text.count(":") < 2 or not any(c not in ":." for c in text):
                continue
            try:
                addr = ipaddress.IPv6Address(text)
            except ValueError:
                continue
            out.append((m.start(), m.start() + len(text), str(addr)))
    return out
