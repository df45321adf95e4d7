"""What an approval is bound to: the exact request, or for an MCP tool call the tool and its
arguments (clients send a new JSON-RPC id with every retry)."""

from __future__ import annotations

import json

from gateway.approvals import request_hash
from gateway.models import Call, GatewayRequest, Identity


def call(body: dict, *, agent: str = "bot", path: str = "/mcp") -> Call:
    raw = json.dumps(body).encode()
    c = Call(request=GatewayRequest(mode="route", method="POST", scheme="http", host="127.0.0.1", port=9,
                                    path=path, query="", headers=[], body=raw, route="mcp"))
    c.identity = Identity(agent_id=agent)
    c.canonical_host, c.canonical_path = "127.0.0.1", path
    params = body.get("params", {})
    if body.get("method") == "tools/call":
        c.rpc_method = "tools/call"
        c.tool_input = {"kind": "mcp", "method": "tools/call", "server": "mcp", "name": params["name"],
                        "arguments": params["arguments"]}
    return c


def rpc(id_: int, args: dict, name: str = "refund_order") -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": args}}


def test_mcp_retry_with_new_id_matches_its_approval() -> None:
    assert request_hash(call(rpc(1, {"order_id": "A", "amount": 5}))) == \
        request_hash(call(rpc(2, {"amount": 5, "order_id": "A"})))


def test_mcp_changed_arguments_tool_or_agent_need_their_own_approval() -> None:
    base = request_hash(call(rpc(1, {"order_id": "A", "amount": 5})))
    assert request_hash(call(rpc(1, {"order_id": "A", "amount": 500}))) != base
    assert request_hash(call(rpc(1, {"order_id": "A", "amount": 5}, name="delete_customer"))) != base
    assert request_hash(call(rpc(1, {"order_id": "A", "amount": 5}), agent="other")) != base


def test_plain_http_is_bound_to_the_exact_body() -> None:
    a = call({"order": 1}, path="/refunds")
    b = call({"order": 2}, path="/refunds")
    assert request_hash(a) != request_hash(b)
    assert request_hash(a) == request_hash(call({"order": 1}, path="/refunds"))
