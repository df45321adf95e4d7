"""The request body as policy sees it: one definition of a JSON body (UTF-8), shared with MCP
recognition, so no call is judged as JSON that the gateway did not recognise the same way."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from gateway import mcp
from gateway.models import Call, GatewayRequest
from gateway.policy.input import parse_body
from gateway.request_body import inspected_body

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_customer", "arguments": {}}}


def test_utf8_json_is_parsed_with_or_without_a_bom() -> None:
    raw = json.dumps(CALL).encode()
    assert parse_body(raw, "application/json", 1 << 16) == (CALL, False, None)
    assert parse_body(b"\xef\xbb\xbf" + raw, "application/json", 1 << 16) == (CALL, False, None)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_json_in_another_encoding_is_not_parsed(encoding: str) -> None:
    """json.loads(bytes) would read these; MCP recognition does not, so policy must not either."""
    raw = json.dumps(CALL).encode(encoding)
    body, truncated, error = parse_body(raw, "application/json", 1 << 16)
    assert body is None and not truncated and error.startswith(("invalid_utf8", "invalid_json"))
    assert mcp._load_json(raw, 1 << 16) is None


def test_limits_and_types() -> None:
    assert parse_body(b'{"a": 1}', "application/json", 4) == (None, True, "too_large")
    assert parse_body(b"<a/>", "application/xml", 1 << 16) == (None, False, "unsupported_content_type")
    assert parse_body(b'{"a": 1}', "", 1 << 16) == ({"a": 1}, False, None)  # untyped JSON is read


# -- compressed bodies (gateway/request_body.py) -----------------------------------------------
def _request(body: bytes, *codings: str) -> GatewayRequest:
    headers = [("Content-Type", "application/json")] + [("Content-Encoding", c) for c in codings]
    return GatewayRequest(mode="route", method="POST", scheme="http", host="h", port=80, path="/mcp", query="",
                          headers=headers, body=body, route="demo")


def test_a_compressed_body_is_inspected_inflated_and_mcp_is_recognised_in_it() -> None:
    raw = json.dumps(CALL).encode()
    req = _request(zstandard.ZstdCompressor().compress(gzip.compress(raw)), "gzip", "zstd")  # two headers
    assert inspected_body(req, 1 << 16) == (raw, None)
    call = Call(request=req)
    mcp.classify(call, 1 << 16)
    assert (call.tool_kind, call.tool_name) == ("mcp", "delete_customer")
    assert req.body != raw  # what goes upstream is untouched


def test_a_bomb_is_too_large_and_a_body_that_does_not_inflate_is_judged_as_sent() -> None:
    bomb = gzip.compress(b" " * (1 << 20))  # ~1 KB that inflates to 1 MiB
    assert len(bomb) < 1 << 12
    assert inspected_body(_request(bomb, "gzip"), 1 << 16) == (b"", "too_large")
    # An upstream that ignores a coding it does not know (or data that is not what it claims)
    # reads the bytes as they are: so does policy.
    assert inspected_body(_request(b"{}", "gzip"), 1 << 16) == (b"{}", None)
    assert inspected_body(_request(b"{}", "quopri"), 1 << 16) == (b"{}", None)
    assert inspected_body(_request(b"{}", "gzip", "gzip", "gzip"), 1 << 16) == (b"{}", None)
    assert inspected_body(_request(b"{}", "identity"), 1 << 16) == (b"{}", None)
    assert inspected_body(_request(b'{"a": 1}'), 4) == (b"", "too_large")
