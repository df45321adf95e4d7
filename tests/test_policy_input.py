"""The request body as policy sees it: one definition of a JSON body (UTF-8), shared with MCP
recognition, so no call is judged as JSON that the gateway did not recognise the same way."""

from __future__ import annotations

import json

import pytest

from gateway import mcp
from gateway.policy.input import parse_body

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
