"""The request body as policy and MCP recognition read it.

The gateway forwards a body exactly as the agent sent it. When the body carries a
``Content-Encoding`` (gzip, deflate, br, zstd, at most two), the upstream inflates it, so
policy and MCP recognition judge the inflated content, never the compressed bytes: a gzipped
JSON-RPC ``tools/call`` is still an MCP call, and a gzipped body a rule reads is still read.
Decoding stops at ``policy.inspect_body_bytes`` (a decompression bomb is cut there, not
inflated first, and is ``too_large``). A body with a coding the gateway does not know, or one
that does not inflate, is judged as sent: an upstream may ignore the coding and read the bytes.
"""

from __future__ import annotations

from gateway.models import GatewayRequest
from gateway.redaction.codec import decode, parse_encodings
from gateway.redaction.settings import NotRedactable

TOO_LARGE = "too_large"


def _codings(request: GatewayRequest) -> str:
    """Every Content-Encoding value, in order: a second header is a second coding."""
    return ", ".join(v for k, v in request.headers if k.lower() == "content-encoding")


def inspected_body(request: GatewayRequest, limit: int) -> tuple[bytes, str | None]:
    """``(content, None)``, or ``(b"", "too_large")`` when the content is over ``limit``, as
    sent or once inflated. Worked out once per request and limit."""
    kept = request.inspected
    if kept is not None and kept[0] == limit:
        return kept[1], kept[2]
    content, problem = _inspect(request, limit)
    request.inspected = (limit, content, problem)
    return content, problem


def known_content(request: GatewayRequest) -> bytes:
    """The content already inspected (decoded when it was encoded), else the body as sent."""
    kept = request.inspected
    return kept[1] if kept is not None and kept[2] is None else request.body


def _inspect(request: GatewayRequest, limit: int) -> tuple[bytes, str | None]:
    body = request.body
    if not body:
        return body, None
    try:
        codings = parse_encodings(_codings(request))
        if codings:
            return decode(body, codings, limit)[0], None
    except NotRedactable as exc:
        if exc.reason == "decompression_limit":
            return b"", TOO_LARGE
        # An unknown coding, or data that does not inflate: an upstream may well ignore the
        # coding and read the bytes as they are, so policy judges them as they are.
    return (b"", TOO_LARGE) if len(body) > limit else (body, None)
