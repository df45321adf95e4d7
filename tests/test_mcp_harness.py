"""The MCP harness itself: the real ``mcp`` SDK server and client (own venv, subprocesses), first
directly, then through the gateway (not MCP-aware yet: plain HTTP forwarding) as a smoke test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, Keys
from tests.mcp_harness.harness import (McpServer, run_mcp_client, run_mcp_raw, start_mcp_server,
                                       step_ok)

TOOLS = {"search_tickets", "get_ticket", "refund_order", "delete_customer"}
EVERYTHING = [
    {"op": "list_tools"},
    {"op": "call", "tool": "search_tickets", "arguments": {"query": "refund"}},
    {"op": "call", "tool": "get_ticket", "arguments": {"id": 1002}},
    {"op": "call", "tool": "refund_order", "arguments": {"order_id": "A-17", "amount": 12.5}},
    {"op": "call", "tool": "delete_customer", "arguments": {"customer_id": "c-42"}},
    {"op": "call", "tool": "get_ticket", "arguments": {"id": 999}},
    {"op": "list_resources"},
    {"op": "read_resource", "uri": "helpdesk://policies/refunds"},
    {"op": "list_prompts"},
    {"op": "get_prompt", "name": "summarize_ticket", "arguments": {"ticket_id": "1001"}},
]
PROTOCOL = {"legacy": "2025-11-25", "auto": "2026-07-28"}
"""What the SDK negotiates: ``legacy`` = initialize handshake with Mcp-Session-Id (and SSE when the
server streams); ``auto`` = the 2026-07-28 single-exchange protocol (no session, JSON answers)."""


@pytest.fixture(scope="module")
def servers(mcp_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, McpServer]]:
    started = {r: start_mcp_server(tmp_path_factory.mktemp(f"mcp-{r}"), response=r) for r in ("sse", "json")}
    yield started
    for s in started.values():
        s.stop()


def tool_text(result: dict[str, Any]) -> str:
    return " ".join(c.get("text", "") for c in result["content"])


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("response", ["sse", "json"])
def test_sdk_client_against_sdk_server(servers: dict[str, McpServer], response: str, mode: str) -> None:
    server = servers[response]
    before = len(server.calls())
    doc = run_mcp_client(server.url, EVERYTHING, mode=mode)
    assert doc["connect_error"] is None and doc["protocol_version"] == PROTOCOL[mode], doc
    assert doc["server"] == "agentgate-test-helpdesk"

    assert {t["name"] for t in step_ok(doc, 0)["tools"]} == TOOLS
    found = step_ok(doc, 1)
    assert not found["isError"] and found["structuredContent"]["result"] == \
        [{"id": 1001, "subject": "Refund for order A-17", "status": "open"}]
    ticket = step_ok(doc, 2)
    assert ticket["structuredContent"]["requester"]["email"] == "lee.sample@example.org"
    assert ticket["structuredContent"]["requester"]["phone"] == "+44 20 7946 0958"
    assert step_ok(doc, 3)["structuredContent"]["refunded"] == 12.5
    assert step_ok(doc, 4)["structuredContent"] == {"customer_id": "c-42", "deleted": True}
    missing = step_ok(doc, 5)  # a tool error is a result with isError, not a JSON-RPC error
    assert missing["isError"] is True and "ticket 999 not found" in tool_text(missing)
    assert [r["uri"] for r in step_ok(doc, 6)["resources"]] == ["helpdesk://policies/refunds"]
    assert "support lead" in step_ok(doc, 7)["contents"][0]["text"]
    assert [p["name"] for p in step_ok(doc, 8)["prompts"]] == ["summarize_ticket"]
    assert "ticket 1001" in step_ok(doc, 9)["messages"][0]["content"]["text"]

    assert server.calls()[before:] == [
        {"tool": "search_tickets", "arguments": {"query": "refund"}},
        {"tool": "get_ticket", "arguments": {"id": 1002}},
        {"tool": "refund_order", "arguments": {"order_id": "A-17", "amount": 12.5}},
        {"tool": "delete_customer", "arguments": {"customer_id": "c-42"}},
        {"tool": "get_ticket", "arguments": {"id": 999}},
    ]
    calls = [h for h in doc["http"] if h["rpc"] == "tools/call"]
    assert len(calls) == 5 and all(h["status"] == 200 for h in calls)
    # Legacy mode on the SSE server streams each answer; JSON mode and the modern protocol don't.
    streamed = response == "sse" and mode == "legacy"
    assert {h["content_type"] for h in calls} == {"text/event-stream" if streamed else "application/json"}
    assert all(h["session_id"] is (mode == "legacy") for h in calls)


def test_unknown_tool_and_bad_arguments_reach_the_server_as_error_results(servers: dict[str, McpServer]) -> None:
    server = servers["json"]
    before = len(server.calls())
    doc = run_mcp_client(server.url, [{"op": "call", "tool": "drop_database", "arguments": {}},
                                      {"op": "call", "tool": "get_ticket", "arguments": {"id": "x"}},
                                      {"op": "no_such_op"}], mode="legacy")
    assert step_ok(doc, 0)["isError"] and "Unknown tool" in tool_text(step_ok(doc, 0))
    assert step_ok(doc, 1)["isError"] and "validation error" in tool_text(step_ok(doc, 1))
    assert doc["steps"][2] == {"op": "no_such_op", "ok": False,
                               "error": {"code": None, "message": "unknown op 'no_such_op'", "type": "ValueError"}}
    assert [c["tool"] for c in server.calls()[before:]] == ["drop_database", "get_ticket"]


def test_raw_batch_is_refused_by_the_sdk_server_and_runs_nothing(servers: dict[str, McpServer], tmp_path: Path) -> None:
    server = servers["sse"]
    before = len(server.calls())
    single = run_mcp_raw(server.url, {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                      "params": {"name": "delete_customer", "arguments": {"customer_id": "raw-1"}}},
                         tmp_path / "single")
    assert single["error"] is None and single["init"]["session_id"], single
    assert single["response"]["events"][0]["result"]["structuredContent"]["customer_id"] == "raw-1"

    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "delete_customer", "arguments": {"customer_id": "batched"}}}]
    doc = run_mcp_raw(server.url, batch, tmp_path / "batch")
    # mcp 2.x dropped JSON-RPC batching (protocol 2025-06-18): the whole batch is a parse-level error.
    assert doc["response"]["status"] == 400 and doc["response"]["json"]["error"]["code"] == -32602, doc
    assert server.calls()[before:] == [{"tool": "delete_customer", "arguments": {"customer_id": "raw-1"}}]


def test_stateless_server_headers_and_bearer(mcp_venv: Path, tmp_path: Path) -> None:
    server = start_mcp_server(tmp_path, response="json", stateless=True)
    try:
        doc = run_mcp_client(server.url, [{"op": "call", "tool": "search_tickets", "arguments": {"query": "log"}}],
                             mode="legacy", headers={"X-Trace": "t-1"}, bearer="not-a-real-token")
        assert step_ok(doc, 0)["structuredContent"]["result"][0]["id"] == 1002
        assert not any(h["session_id"] for h in doc["http"])
        posts = [r for r in server.http_requests() if r["method"] == "POST"]
        assert posts and all(r["headers"]["x-trace"] == "t-1" for r in posts)
        assert all(r["headers"]["authorization"] == "<redacted>" for r in posts)
        assert "not-a-real-token" not in server.http_log.read_text()
    finally:
        server.stop()


# -- through the gateway (an allow-all policy: the harness itself, not MCP policy, is under test) --
@pytest.fixture(scope="module")
def gw(gateway_factory, servers: dict[str, McpServer], tls_server: tuple[McpServer, Path],
       tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    bundle = tmp_path_factory.mktemp("allow-all")
    (bundle / "agentgate").mkdir()
    (bundle / "agentgate" / "decision.rego").write_text(
        'package agentgate\n\nimport rego.v1\n\ndecision := {"allow": true, "reasons": ["test"]}\n')
    return gateway_factory({"policy": {"dir": str(bundle)},
                            "routes": {"mcp": {"upstream": servers["sse"].base_url}},
                            "proxy": {"upstream_ca_file": str(tls_server[1])}}, name="mcp-gw")


SMOKE = [{"op": "list_tools"}, {"op": "call", "tool": "get_ticket", "arguments": {"id": 1001}}]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_sdk_through_gateway_route_mode(gw: Gateway, keys: Keys, servers: dict[str, McpServer], mode: str) -> None:
    server = servers["sse"]
    before_calls, before_http = len(server.calls()), len(server.http_requests())
    token = keys.token("mcp-bot", roles=["reader"])
    doc = run_mcp_client(gw.route_url("mcp", "/mcp"), SMOKE, mode=mode, bearer=token)
    assert doc["protocol_version"] == PROTOCOL[mode], doc
    assert {t["name"] for t in step_ok(doc, 0)["tools"]} == TOOLS
    assert step_ok(doc, 1)["structuredContent"]["requester"]["email"] == "dana@example.com"
    assert server.calls()[before_calls:] == [{"tool": "get_ticket", "arguments": {"id": 1001}}]
    seen = server.http_requests()[before_http:]
    assert seen and all("authorization" not in r["headers"] for r in seen)  # the agent's JWT stays at the gateway
    if mode == "legacy":  # session id, GET stream and DELETE all made it through
        assert {r["method"] for r in seen} == {"POST", "GET", "DELETE"}
        assert all("mcp-session-id" in r["headers"] for r in seen if r["method"] != "POST"
                   or json.loads(r["body"]).get("method") != "initialize")
    assert token not in gw.logs()


def test_sdk_through_gateway_forward_proxy_https(gw: Gateway, keys: Keys, tls_server: tuple[McpServer, Path]) -> None:
    server, _ = tls_server
    before = len(server.calls())
    token = keys.token("mcp-bot", roles=["reader"])
    doc = run_mcp_client(server.url, SMOKE, mode="legacy", proxy=f"http://{gw.proxy}", proxy_bearer=token,
                         ca=gw.ca_file)
    assert {t["name"] for t in step_ok(doc, 0)["tools"]} == TOOLS, doc
    assert step_ok(doc, 1)["structuredContent"]["id"] == 1001
    assert server.calls()[before:] == [{"tool": "get_ticket", "arguments": {"id": 1001}}]
    assert any(h["content_type"] == "text/event-stream" for h in doc["http"])
