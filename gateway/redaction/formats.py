"""Body formats: which content types are redactable and how each is taken apart and rebuilt."""

from __future__ import annotations

import codecs
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, unquote_plus

from .report import RedactionReport
from .settings import NotRedactable

if TYPE_CHECKING:
    from .plan import Plan

JSON, NDJSON, SSE, TEXT, FORM = "json", "ndjson", "sse", "text", "form"

_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonl", "application/jsonlines", "application/x-jsonlines"})
_TEXTUAL_APP = frozenset({"application/xml", "application/javascript", "application/x-javascript",
                          "application/ecmascript", "application/yaml", "application/x-yaml",
                          "application/graphql", "application/sql", "application/csv"})


def classify(content_type: str | None) -> tuple[str | None, str | None]:
    """(format, declared charset); format None = not redactable. An empty type is sniffed later."""
    raw = (content_type or "").strip()
    mime, _, params = raw.partition(";")
    mime = mime.strip().lower()
    charset = None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"').strip("'").lower()
    if not mime:
        return "", charset
    if mime == "application/json" or mime.endswith("+json") or mime in ("text/json", "text/x-json"):
        return JSON, charset
    if mime in _NDJSON_TYPES:
        return NDJSON, charset
    if mime == "text/event-stream":
        return SSE, charset
    if mime == "application/x-www-form-urlencoded":
        return FORM, charset
    if mime.startswith("text/") or mime in _TEXTUAL_APP or mime.endswith("+xml"):
        return TEXT, charset
    return None, charset


def _decoder_for(charset: str | None) -> str:
    if charset is None:
        return "utf-8"
    try:
        return codecs.lookup(charset).name
    except LookupError:
        raise NotRedactable("undecodable", f"unknown charset {charset!r}") from None


# -- JSON ---------------------------------------------------------------------------------------
def parse_json_text(text: str) -> Any:
    """json.loads with RecursionError turned into NotRedactable (C decoder depth ~ recursion limit)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise NotRedactable("json_too_deep", "JSON nesting too deep to parse") from None


def dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _redact_json_bytes(plan: Plan, raw: bytes, enc: str, report: RedactionReport, where: str,
                       prefix: str = "") -> bytes | None:
    """One JSON document (a body or an NDJSON line): redacted bytes, or None if unchanged.

    A document that does not parse is redacted as text by the detectors, unless field paths
    are asked for: those cannot be applied, so it is refused.
    """
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError:
        raise NotRedactable("invalid_utf8" if enc == "utf-8" else "undecodable",
                            f"{where} is not valid {enc}") from None
    try:
        value = parse_json_text(text)
    except ValueError:
        if plan.fields:
            raise NotRedactable("invalid_json", f"{where} does not parse; field paths cannot be applied") from None
        new_text = plan.redact_text(text, report)
        return None if new_text is None else new_text.encode(enc, "surrogatepass")
    new = plan.walk(value, report, prefix=prefix)
    return None if new is value else _encode_json(new, enc)


def redact_json(plan: Plan, data: bytes, charset: str | None, report: RedactionReport) -> bytes | None:
    enc = _decoder_for(charset)
    bom = b""
    if enc == "utf-8" and data.startswith(codecs.BOM_UTF8):
        bom, data = codecs.BOM_UTF8, data[3:]
    new = _redact_json_bytes(plan, data, enc, report, "JSON body")
    return None if new is None else bom + new


def _encode_json(value: Any, enc: str) -> bytes:
    try:
        return dump_json(value).encode(enc)
    except UnicodeEncodeError:  # lone surrogates (from "\ud800" escapes): keep them as escapes
        return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode(enc)


def redact_ndjson(plan: Plan, data: bytes, charset: str | None, report: RedactionReport) -> bytes | None:
    enc = _decoder_for(charset)
    lines = data.split(b"\n")
    changed = False
    for i, line in enumerate(lines):
        body, cr = (line[:-1], b"\r") if line.endswith(b"\r") else (line, b"")
        if not body.strip():
            continue
        new = _redact_json_bytes(plan, body, enc, report, f"NDJSON line {i}", prefix=f"line[{i}]:")
        if new is not None:
            lines[i] = new + cr
            changed = True
    return b"\n".join(lines) if changed else None


# -- text ---------------------------------------------------------------------------------------
def decode_text(data: bytes, charset: str | None) -> tuple[str, str, str]:
    """(text, codec, errors). Undeclared charsets are read as UTF-8 with surrogateescape so any
    bytes round-trip exactly; a declared charset must decode."""
    if charset is None:
        return data.decode("utf-8", "surrogateescape"), "utf-8", "surrogateescape"
    enc = _decoder_for(charset)
    try:
        return data.decode(enc), enc, "strict"
    except UnicodeDecodeError:
        raise NotRedactable("undecodable", f"body is not valid {enc}") from None


_NOT_JSON = object()


def _looks_like_json(text: str) -> bool:
    head = text.lstrip()[:1]
    return head in ("{", "[")


def redact_text_body(plan: Plan, data: bytes, charset: str | None, report: RedactionReport) -> bytes | None:
    text, enc, errors = decode_text(data, charset)
    if plan.fields:
        # Field paths name JSON members: they apply to mislabelled JSON (text/plain), and a body
        # that is not JSON cannot be checked for them at all: an XML or CSV rendering of the same
        # record (an agent can ask for one with Accept) would carry those fields in clear.
        try:
            value = parse_json_text(text) if _looks_like_json(text) else _NOT_JSON
        except ValueError:
            value = _NOT_JSON
        if value is _NOT_JSON:
            raise NotRedactable("fields_not_applicable", "field paths are asked for and the body is not JSON")
        new = plan.walk(value, report)
        return None if new is value else _encode_json(new, enc)
    new_text = plan.redact_text(text, report)
    return None if new_text is None else new_text.encode(enc, errors)


# -- form ---------------------------------------------------------------------------------------
def redact_form(plan: Plan, data: bytes, charset: str | None, report: RedactionReport) -> bytes | None:
    """Fields are redacted as the JSON object {name: value} (a repeated name: a list), so
    ``$.password`` works; unchanged pairs keep their exact original encoding."""
    raw = data.decode("latin-1")  # byte-transparent; names/values are percent-decoded as UTF-8
    pieces = raw.split("&")
    pairs: list[tuple[str, str] | None] = []
    doc: dict[str, Any] = {}
    for piece in pieces:
        if not piece:
            pairs.append(None)
            continue
        name, _, value = piece.partition("=")
        n = unquote_plus(name, encoding="utf-8", errors="surrogateescape")
        v = unquote_plus(value, encoding="utf-8", errors="surrogateescape")
        pairs.append((n, v))
        cur = doc.get(n)
        if cur is None:
            doc[n] = v
        elif isinstance(cur, list):
            cur.append(v)
        else:
            doc[n] = [cur, v]
    new = plan.walk(doc, report)
    if new is doc:
        return None
    seen: dict[str, int] = {}
    out = []
    for piece, pair in zip(pieces, pairs):
        if pair is None:
            out.append(piece)
            continue
        n, v = pair
        nv = new.get(n, v)
        if isinstance(doc[n], list):
            idx = seen.get(n, 0)
            seen[n] = idx + 1
            nv = nv[idx] if isinstance(nv, list) and idx < len(nv) else nv
        if nv is v:
            out.append(piece)
        else:
            text = nv if isinstance(nv, str) else dump_json(nv)
            out.append(piece.partition("=")[0] + "=" + quote_plus(text, safe="", encoding="utf-8",
                                                                   errors="surrogateescape"))
    return "&".join(out).encode("latin-1")
