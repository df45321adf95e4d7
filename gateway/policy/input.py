"""Build the Rego input document from a call (the contract documented in policies/README.md)."""

from __future__ import annotations

import json
from typing import Any

from gateway.canonical import parse_query
from gateway.models import Call
from gateway.request_body import TOO_LARGE, inspected_body

# Credentials never reach policy input (nor the audit): policy decides on who the agent is
# (input.agent), not on the secret it presented.
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "x-api-key", "x-auth-token",
    "x-amz-security-token",
})


def _content_type(call: Call) -> str:
    return (call.request.header("content-type") or "").split(";", 1)[0].strip().lower()


def _is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def parse_body(body: bytes, content_type: str, limit: int) -> tuple[Any, bool, str | None]:
    """Return (parsed body or None, truncated, error) without ever raising.

    Only JSON is parsed; other types give ``body_error = "unsupported_content_type"`` so a
    policy can refuse what it cannot see.
    """
    if not body:
        return None, False, None
    if len(body) > limit:
        return None, True, "too_large"
    if not _is_json_type(content_type):
        if content_type in ("", "text/plain") and body[:1] in (b"{", b"["):
            pass  # agents often omit the content type on JSON bodies
        else:
            return None, False, "unsupported_content_type"
    try:
        # UTF-8 only (RFC 8259), as MCP recognition reads it: json.loads(bytes) would also take
        # UTF-16/32, and policy would judge a JSON-RPC call the gateway had not recognised as one.
        return json.loads(body.decode("utf-8-sig")), False, None
    except UnicodeDecodeError:
        return None, False, "invalid_utf8"
    except RecursionError:
        return None, False, "too_deep"
    except ValueError as exc:
        return None, False, f"invalid_json: {exc}"


def build_input(call: Call, *, port: int | None, segments: list[str], inspect_limit: int,
                registration: dict[str, Any] | None = None) -> dict[str, Any]:
    """``registration``: the agent's registry entry (gateway/registry.py), None if unregistered."""
    req = call.request
    ident = call.identity
    assert ident is not None
    content_type = _content_type(call)
    content, problem = inspected_body(req, inspect_limit)  # decoded when it carries a Content-Encoding
    if problem is not None:
        body, truncated, body_error = None, problem == TOO_LARGE, problem
    else:
        body, truncated, body_error = parse_body(content, content_type, inspect_limit)
    headers: dict[str, str] = {}
    for name, value in req.headers:
        lname = name.lower()
        if lname in CREDENTIAL_HEADERS:
            continue
        headers[lname] = f"{headers[lname]}, {value}" if lname in headers else value
    return {
        "agent": {
            "id": ident.agent_id,
            "team": ident.team,
            "roles": list(ident.roles),
            "claims": ident.claims,
            "registration": registration,
        },
        "request": {
            "method": req.method,
            "scheme": req.scheme,
            "host": call.canonical_host,
            "port": port,
            "path": call.canonical_path,
            "path_segments": segments,
            "query": parse_query(req.query),
            "headers": headers,
            "body": body,
            "body_size": len(req.body),
            "body_truncated": truncated,
            "body_error": body_error,
            "content_type": content_type,
        },
        "route": req.route,
        "tool": call.tool_input or {"kind": call.tool_kind},  # MCP: see gateway/mcp.py
        "context": {
            "time_ns": call.ts_start_ns,
            "mode": req.mode,
            "client_ip": req.client_ip,
            "trace_id": call.trace_id,
        },
    }
