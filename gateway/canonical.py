"""Canonical host, port, path and query, so a policy allow-list cannot be bypassed by spelling.

Policy only ever sees these canonical forms. Anything whose meaning could differ between the
gateway and an upstream (encoded slashes, leftover dot-segments, NULs, backslashes, ``;`` path
parameters and query separators, Unicode that normalises to a dot-segment or a separator) is
refused with ``BadRequest`` rather than guessed at. Front ends should forward the canonical
path, so the upstream receives exactly what policy judged.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from urllib.parse import parse_qs, unquote_to_bytes

import idna

from gateway.errors import BadRequest

__all__ = ["canonical_host", "canonical_port", "canonical_path", "check_query", "parse_query",
           "DEFAULT_PORTS"]

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_MAX_HOST = 253
_MAX_LABEL = 63
_HOST_FORBIDDEN = set(" @/\\%?#[]<>\"'`^{}|")
_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_NUMERIC_PART = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that may appear raw in a path: unreserved, sub-delims, ":", "@", "/" (RFC 3986 §3.3).
_PATH_RAW = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_MAX_DECODE_ROUNDS = 8
# Both canonical forms are pure functions of their input and agents call the same few hosts and
# endpoints again and again: results are memoised (refusals are not: they raise). Only short
# inputs are kept, so the caches stay a few MB whatever agents send.
_MEMO_ENTRIES = 4096
_MEMO_MAX_LEN = 256
# C0 controls, DEL and, in UTF-8, the C1 controls U+0080..U+009F (U+0085 NEL is a line break to
# some parsers). 0xC2 is only ever a lead byte, so "\xc2[\x80-\x9f]" matches nothing else.
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]")


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


# Host ---------------------------------------------------------------------------------------

def _invalid_host(host: str, why: str) -> BadRequest:
    return BadRequest(f"invalid host {host[:80]!r}: {why}", code="invalid_host")


def _ipv4(host: str) -> str | None:
    """Parse a numeric host the way URL parsers and ``inet_aton`` do (WHATWG IPv4 parser).

    ``2130706433``, ``0x7f.1`` and ``0177.0.0.1`` all reach 127.0.0.1, so they are rewritten
    to dotted-quad. Returns None when the host is not numeric (its last label is not a number).
    """
    parts = host.split(".")
    if not _NUMERIC_PART.fullmatch(parts[-1]):
        return None
    if len(parts) > 4:
        raise _invalid_host(host, "not a valid IPv4 address")
    numbers: list[int] = []
    for part in parts:
        if not _NUMERIC_PART.fullmatch(part):
            raise _invalid_host(host, "not a valid IPv4 address")
        try:
            if part[:2] in ("0x", "0X"):
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            else:
                numbers.append(int(part))
        except ValueError:
            raise _invalid_host(host, "not a valid IPv4 address") from None
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise _invalid_host(host, "IPv4 address out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return str(ipaddress.IPv4Address(value))


def _ipv6(host: str, inner: str) -> str:
    if "%" in inner:
        raise _invalid_host(host, "IPv6 zone identifiers are not allowed")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        raise _invalid_host(host, "':' is only allowed in a valid IPv6 address") from None
    # ::ffff:127.0.0.1 reaches 127.0.0.1: give policy the one spelling it can match.
    return str(address.ipv4_mapped) if address.ipv4_mapped else address.compressed


def _label(host: str, label: str) -> str:
    if not label:
        raise _invalid_host(host, "empty label")
    if label.isascii():
        label = label.lower()
        if label.startswith("xn--"):
            try:
                if idna.alabel(idna.ulabel(label)).decode("ascii") != label:
                    raise _invalid_host(host, f"non-canonical IDNA label {label!r}")
            except idna.IDNAError as exc:
                raise _invalid_host(host, f"invalid IDNA label {label!r}: {exc}") from None
        elif not _ASCII_LABEL.fullmatch(label):
            raise _invalid_host(host, f"invalid label {label!r}")
    else:
        try:
            label = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise _invalid_host(host, f"invalid IDNA label: {exc}") from None
    if len(label) > _MAX_LABEL:
        raise _invalid_host(host, f"label longer than {_MAX_LABEL} characters")
    return label


def _canonical_host(host: str) -> str:
    """The uncached computation of :func:`canonical_host`."""
    if not isinstance(host, str) or not host:
        raise BadRequest("missing host", code="invalid_host")
    if len(host) > 1024:
        raise _invalid_host(host, "too long")
    if any(_is_control(c) for c in host):
        raise _invalid_host(host, "control character")
    if host.startswith("["):
        if not host.endswith("]"):
            raise _invalid_host(host, "unterminated IPv6 literal")
        return _ipv6(host, host[1:-1])
    if ":" in host:
        return _ipv6(host, host)
    bad = sorted(set(host) & _HOST_FORBIDDEN)
    if bad:
        raise _invalid_host(host, f"forbidden character(s) {''.join(bad)!r}")
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError) as exc:
        raise _invalid_host(host, f"not a valid host name: {exc}") from None
    # UTS-46 mapping can produce characters that were not visible before (fullwidth "／" -> "/").
    if set(mapped) & _HOST_FORBIDDEN or ":" in mapped or any(_is_control(c) for c in mapped):
        raise _invalid_host(host, "forbidden character after IDNA mapping")
    if mapped.endswith("."):
        mapped = mapped[:-1]
    if not mapped:
        raise _invalid_host(host, "empty")
    ipv4 = _ipv4(mapped)
    if ipv4 is not None:
        return ipv4
    result = ".".join(_label(host, label) for label in mapped.split("."))
    if len(result) > _MAX_HOST:
        raise _invalid_host(host, f"longer than {_MAX_HOST} characters")
    return result


# Port ---------------------------------------------------------------------------------------

def canonical_port(scheme: str, port: int | str | None) -> int | None:
    """The port as an int, or None when absent or the scheme's default (80 http, 443 https)."""
    if port is None or port == "":
        return None
    if isinstance(port, bool):
        raise BadRequest(f"invalid port {port!r}", code="invalid_port")
    if isinstance(port, str):
        if not port.isascii() or not port.isdigit():
            raise BadRequest(f"invalid port {port[:20]!r}", code="invalid_port")
        port = int(port)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise BadRequest(f"invalid port {port!r}", code="invalid_port")
    if DEFAULT_PORTS.get(scheme.lower()) == port:
        return None
    return port


# Path ---------------------------------------------------------------------------------------

def _ambiguous(raw: str, why: str) -> BadRequest:
    return BadRequest(f"ambiguous path {raw[:200]!r}: {why}", code="ambiguous_path")


def _normalise_escapes(raw: str) -> str:
    """Decode escaped unreserved characters, upper-case other escapes, escape stray raw bytes."""
    try:
        # Front ends may hand over undecodable bytes as surrogate escapes; they become %XX here
        # and are refused as "not UTF-8" once the segments are decoded.
        data = raw.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        raise BadRequest(f"invalid path {raw[:200]!r}: not encodable", code="invalid_path") from None
    if _CONTROL_BYTES.search(data):  # raw ones: escapes are still "%XX" here
        raise BadRequest(f"invalid path {raw[:200]!r}: control character", code="invalid_path")
    out: list[str] = []
    i = 0
    while i < len(data):
        b = data[i]
        if b == 0x25:  # "%"
            hex2 = data[i + 1:i + 3]
            if len(hex2) != 2 or not all(h in _HEX for h in hex2):
                raise BadRequest(f"invalid path {raw[:200]!r}: malformed percent-escape",
                                 code="invalid_path")
            value = int(hex2, 16)
            out.append(chr(value) if value in _UNRESERVED else "%" + hex2.decode().upper())
            i += 3
            continue
        out.append(chr(b) if b in _PATH_RAW else f"%{b:02X}")
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path, segment-wise (equivalent to the buffer algorithm)."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _fully_decoded(raw: str, segment: str | bytes) -> bytes:
    """Decode repeatedly, as a double-decoding upstream might, until nothing changes."""
    data = segment.encode("ascii") if isinstance(segment, str) else segment
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote_to_bytes(data)
        if decoded == data:
            return decoded
        data = decoded
    raise _ambiguous(raw, "too many nested percent-encodings")


def _why_ambiguous(segment: str, decoded: bytes) -> str | None:
    """Why a server could read this fully decoded segment as a separator or dot-segment, if so."""
    if b"/" in decoded:
        return "encoded '/' (%2F) in a segment"
    if b"\\" in decoded:
        return "encoded '\\' (%5C) in a segment"
    if b"\x00" in decoded:
        return "encoded NUL (%00)"
    if _CONTROL_BYTES.search(decoded):
        return "encoded control character"
    # "..;x" (Tomcat path parameters), "%252e%252e" (double encoding), ".. " (IIS trimming):
    # all of these are a parent reference for some server, so none may reach an upstream.
    stem = decoded.split(b";", 1)[0].strip()
    if stem and not stem.strip(b"."):
        return f"dot-segment in disguise ({segment!r})"
    return None


def _check_segment(raw: str, segment: str) -> bool:
    """Refuse an ambiguous segment; True when it holds a ``;`` (raw or encoded at any depth).

    Servers that normalise Unicode (NFKC: IIS and .NET, some Java and Python frameworks) read
    fullwidth "．．" as "..", "／" and "＼" as separators and "％２ｆ" as "%2f": a non-ASCII
    segment is checked again in its NFKC form. ASCII segments (nearly all) skip that.
    """
    decoded = _fully_decoded(raw, segment)
    why = _why_ambiguous(segment, decoded)
    if why is not None:
        raise _ambiguous(raw, why)
    if not decoded.isascii():
        text = decoded.decode("utf-8", errors="replace")  # not UTF-8: refused by the caller
        if not unicodedata.is_normalized("NFKC", text):
            folded = unicodedata.normalize("NFKC", text)
            if _why_ambiguous(segment, _fully_decoded(raw, folded.encode("utf-8"))) is not None:
                raise _ambiguous(raw, f"{text!r} normalises (NFKC) to {folded!r}: a separator or "
                                      "dot-segment to servers that normalise Unicode")
    return b";" in decoded


def _canonical_path(raw: str) -> tuple[str, tuple[str, ...], str | None]:
    """The uncached computation of :func:`canonical_path`; also the first segment holding a
    ``;`` (refused or not by the caller, so one memo serves both settings), or None."""
    if not isinstance(raw, str) or not raw.startswith("/"):
        shown = raw[:200] if isinstance(raw, str) else raw
        raise BadRequest(f"invalid path {shown!r}: must start with '/'", code="invalid_path")
    if "\\" in raw:
        raise _ambiguous(raw, "backslash")
    path = _normalise_escapes(raw)
    path = re.sub(r"/{2,}", "/", path)
    path = _remove_dot_segments(path)
    raw_segments = [s for s in path.split("/") if s]
    segments: list[str] = []
    semicolon: str | None = None
    for seg in raw_segments:
        if _check_segment(raw, seg) and semicolon is None:
            semicolon = seg
        try:
            segments.append(unquote_to_bytes(seg).decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"invalid path {raw[:200]!r}: not UTF-8 after percent-decoding",
                             code="invalid_path") from None
    return path, tuple(segments), semicolon


_host_memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_canonical_host)
_path_memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_canonical_path)


def canonical_host(host: str) -> str:
    """Lower-case, IDNA (UTS-46, non-transitional) A-label form without a trailing dot.

    IPv6 literals come back without brackets in compressed form (``[::1]`` -> ``::1``);
    numeric IPv4 spellings and IPv4-mapped IPv6 addresses come back as dotted-quad.
    Raises ``BadRequest(code="invalid_host")``.
    """
    if isinstance(host, str) and len(host) <= _MEMO_MAX_LEN:
        return _host_memo(host)
    return _canonical_host(host)


def canonical_path(raw: str, *, literal_semicolons: bool = False) -> tuple[str, list[str]]:
    """Canonical form of a raw request path (no query) and its decoded, non-empty segments.

    Unreserved escapes are decoded and other escapes upper-cased (RFC 3986 §6.2.2), slashes
    collapsed, dot-segments resolved (§5.2.4), a trailing slash kept. Raises
    ``BadRequest`` with ``invalid_path`` (not an absolute path, malformed escape, control
    character, not UTF-8) or ``ambiguous_path`` (encoded ``/`` ``\\``, NUL or other C0 or C1
    control, backslash, a disguised ``..``, a segment whose NFKC form is one of these, and,
    unless ``literal_semicolons``, a ``;`` in a segment).

    ``;`` starts path parameters for Tomcat, Jetty and Spring, which route ``/admin;x=1/users``
    as ``/admin/users``. ``%3B`` is refused too, as ``%2F`` is: a proxy or framework that
    decodes before the container strips parameters turns it into a raw ``;``.
    ``literal_semicolons`` is for upstreams that read ``;`` as an ordinary character.
    """
    if isinstance(raw, str) and len(raw) <= _MEMO_MAX_LEN:
        path, segments, semicolon = _path_memo(raw)
    else:
        path, segments, semicolon = _canonical_path(raw)
    if semicolon is not None and not literal_semicolons:
        raise _ambiguous(raw, f"';' in segment {semicolon!r} (a path parameter for Tomcat, Jetty "
                              "and Spring, which route /a;x=1/b as /a/b)")
    return path, list(segments)  # a list of its own: callers may change it


# Query --------------------------------------------------------------------------------------

def check_query(qs: str, *, literal_semicolons: bool = False) -> None:
    """Refuse (400 ``ambiguous_query``) an unencoded ``;`` in a query string.

    Policy splits the query on ``&`` only (:func:`parse_query`); Rack, older Go and Python and
    many frameworks also split on ``;``, so ``a=1;b=2`` would be one parameter for policy and
    two upstream. ``%3B`` is a literal ``;`` everywhere and passes. ``literal_semicolons`` is for
    upstreams that split on ``&`` only.
    """
    if not literal_semicolons and ";" in qs:
        raise BadRequest("ambiguous query: unencoded ';' (some servers split parameters on it, "
                         "policy does not); send it as %3B", code="ambiguous_query")


def parse_query(qs: str) -> dict[str, list[str]]:
    """``a=1&a=2&b&c=`` -> ``{"a": ["1", "2"], "b": [""], "c": [""]}``; ``+`` is a space.

    Like Go's ``url.ParseQuery`` (OPA Envoy's ``parsed_query``): only ``&`` separates; the
    front ends refuse a raw ``;`` first (:func:`check_query`) unless the upstream agrees.
    Bytes that are not UTF-8 are refused rather than replaced, so two different queries
    cannot look alike to policy.
    """
    if not qs:
        return {}
    if any(_is_control(c) for c in qs):
        raise BadRequest("invalid query: control character", code="invalid_query")
    try:
        return parse_qs(qs, keep_blank_values=True, errors="strict", separator="&")
    except UnicodeDecodeError:
        raise BadRequest("invalid query: not UTF-8 after percent-decoding",
                         code="invalid_query") from None
