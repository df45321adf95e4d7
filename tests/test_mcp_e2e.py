"""MCP through a real gateway with the shipped example bundle: the real ``mcp`` SDK on both sides
(an MCP server behind the gateway, the SDK's streamable-HTTP client as the agent), in route mode
and through the forward proxy (HTTPS, interception CA)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.client import HTTPConnection, IncompleteRead
from pathlib import Path
from typing import Any

import pytest

from gateway import mcp
from tests.conftest import ROOT, Gateway, Keys, http, wait_until
from tests.mcp_harness.harness import (McpServer, run_mcp_client, run_mcp_raw, start_mcp_server,
                                       step_ok)

POLICIES = ROOT / "policies"
ROUTE = "support-mcp"
VISIBLE = {"search_tickets", "get_ticket", "refund_order"}  # delete_customer is never allowed
DENIED, APPROVAL_DENIED = -32001, -32004


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(mcp_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpServer]:
    """Answers POSTs with SSE (legacy protocol) or JSON (modern protocol)."""
    srv = start_mcp_server(tmp_path_factory.mktemp("mcp-sse"), response="sse")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gw(gateway_factory, server: McpServer, tls_server: tuple[McpServer, Path]) -> Gateway:
    return gateway_factory({"policy": {"dir": str(POLICIES)},
                            "routes": {ROUTE: {"upstream": server.base_url}},
                            "proxy": {"upstream_ca_file": str(tls_server[1])},
                            "approval": {"hold_seconds": 20}}, name="mcp-e2e")


@pytest.fixture(scope="module")
def lead(keys: Keys) -> str:
    return keys.admin_token("lead-sam", roles=["support-lead", "approver"])


# -- helpers -------------------------------------------------------------------------------
def session() -> str:
    return f"mcp-{uuid.uuid4().hex[:12]}"


def support(keys: Keys, agent: str = "helpdesk-bot") -> str:
    return keys.token(agent, roles=["support"])


class Agent:
    """The SDK client, in route mode or through the forward proxy, tagged with a trace id."""

    def __init__(self, gw: Gateway, token: str, *, forward: tuple[McpServer, Path] | None = None,
                 mode: str = "legacy") -> None:
        self.gw, self.token, self.forward, self.mode = gw, token, forward, mode
        self.trace = session()

    @property
    def url(self) -> str:
        return self.forward[0].url if self.forward else self.gw.route_url(ROUTE, "/mcp")

    def _transport(self) -> dict[str, Any]:
        if self.forward:
            return {"proxy": f"http://{self.gw.proxy}", "proxy_bearer": self.token, "ca": self.gw.ca_file}
        return {"bearer": self.token}

    def run(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        return run_mcp_client(self.url, steps, mode=self.mode, headers={"X-Agent-Session": self.trace},
                              **self._transport())

    def raw(self, payload: Any, tmp: Path) -> dict[str, Any]:
        return run_mcp_raw(self.url, payload, tmp, headers={"X-Agent-Session": self.trace}, **self._transport())

    def rows(self, where: str = "1") -> list[dict[str, Any]]:
        return self.gw.sql("SELECT call_id, tool_kind, tool_name, rpc_method, rpc_id, tool_arguments, tool_error, "
                           "outcome, status, error_code, reasons, approval_id, approver FROM agentgate.calls FINAL "
                           f"WHERE trace_id = '{self.trace}' AND {where} ORDER BY ts_start")

    def wait_rows(self, where: str, count: int) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.rows(where)) >= count, what=f"{count} audit row(s) where {where}")
        return self.rows(where)


def call(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"op": "call", "tool": tool, "arguments": arguments}


def rpc_error(doc: dict[str, Any], i: int) -> dict[str, Any]:
    step = doc["steps"][i]
    assert not step["ok"], step
    return step["error"]


def pending(gw: Gateway, lead: str) -> list[dict[str, Any]]:
    resp = http("GET", f"http://{gw.admin}/v1/approvals?state=pending", headers={"Authorization": f"Bearer {lead}"})
    assert resp.status == 200, resp.body
    return resp.json()["approvals"]


def decide(gw: Gateway, lead: str, agent: str, tool: str, verdict: str) -> dict[str, Any]:
    """Wait for ``agent``'s pending approval of ``tool`` and approve or deny it."""
    wait_until(lambda: any(a["agent_id"] == agent and a["tool_name"] == tool for a in pending(gw, lead)),
               what=f"a pending approval of {tool}")
    (approval,) = [a for a in pending(gw, lead) if a["agent_id"] == agent and a["tool_name"] == tool]
    resp = http("POST", f"http://{gw.admin}/v1/approvals/{approval['id']}/{verdict}",
                headers={"Authorization": f"Bearer {lead}", "Content-Type": "application/json"},
                body=json.dumps({"reason": f"{verdict} in test"}).encode())
    assert resp.status == 200, resp.body
    return approval


def tool_names(result: dict[str, Any]) -> set[str]:
    return {t["name"] for t in result["tools"]}


# -- route mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_listing_shows_only_what_policy_allows(gw: Gateway, keys: Keys, server: McpServer, mode: str) -> None:
    agent = Agent(gw, support(keys), mode=mode)
    doc = agent.run([{"op": "list_tools"}, {"op": "list_resources"}, {"op": "list_prompts"},
                     call("get_ticket", id=404)])
    assert tool_names(step_ok(doc, 0)) == VISIBLE
    assert [r["uri"] for r in step_ok(doc, 1)["resources"]] == ["helpdesk://policies/refunds"]
    assert [p["name"] for p in step_ok(doc, 2)["prompts"]] == ["summarize_ticket"]
    assert step_ok(doc, 3)["isError"] is True
    (row,) = agent.wait_rows("rpc_method = 'tools/list'", 1)
    assert (row["tool_kind"], row["outcome"], row["status"]) == ("mcp", "allowed", 200)
    assert "tools/list: hid 1 of 4 (delete_customer)" in row["reasons"]
    # isError is recorded from a streamed (legacy: SSE) and a buffered (modern: JSON) answer alike.
    (failed,) = agent.wait_rows("rpc_method = 'tools/call'", 1)
    assert (failed["tool_name"], failed["tool_error"], failed["outcome"]) == ("get_ticket", 1, "allowed")
    if mode == "legacy":  # sessions work through the gateway: ids pass both ways untouched
        assert all(h["session_id"] for h in doc["http"] if h["rpc"] != "initialize" or h["method"] != "POST")
        assert {h["content_type"] for h in doc["http"] if h["rpc"] == "tools/list"} == {"text/event-stream"}


def test_role_without_grant_sees_nothing(gw: Gateway, keys: Keys) -> None:
    agent = Agent(gw, keys.token("sales-helper", roles=["sales"]), mode="auto")
    doc = agent.run([{"op": "list_tools"}])
    # The modern protocol's first request (server/discover) is already refused, as a JSON-RPC error.
    assert doc["connect_error"]["code"] == DENIED, doc
    assert "role sales may not POST demo" in doc["connect_error"]["message"]


def test_allowed_denied_and_failing_tool_calls(gw: Gateway, keys: Keys, server: McpServer) -> None:
    before = len(server.calls())
    agent = Agent(gw, support(keys))
    doc = agent.run([call("search_tickets", query="refund dana@example.com"),
                     call("delete_customer", customer_id="c-42"),
                     call("refund_order", order_id="A-17", amount=900),
                     call("get_ticket", id=999),
                     call("get_ticket", id=1001)])
    assert step_ok(doc, 0)["isError"] is False
    denied = rpc_error(doc, 1)
    assert denied["code"] == DENIED and "delete_customer is never allowed" in denied["message"]
    assert denied["data"]["code"] == "policy_denied" and denied["data"]["call_id"]
    over = rpc_error(doc, 2)
    assert over["code"] == DENIED and "amount must be a number up to 500" in over["message"]
    assert step_ok(doc, 3)["isError"] is True  # a tool failure is a result, not a refusal
    ticket = step_ok(doc, 4)
    assert "dana@example.com" not in json.dumps(ticket), "the policy redacts contact details from tool results"
    assert ticket["structuredContent"]["subject"] == "Refund for order A-17"
    # The server saw the allowed calls only.
    assert [c["tool"] for c in server.calls()[before:]] == ["search_tickets", "get_ticket", "get_ticket"]

    rows = {r["call_id"]: r for r in agent.wait_rows("rpc_method = 'tools/call'", 5)}
    refused = rows[denied["data"]["call_id"]]
    assert (refused["outcome"], refused["status"], refused["error_code"], refused["tool_name"]) == \
        ("denied", 200, "policy_denied", "delete_customer")
    assert json.loads(refused["tool_arguments"]) == {"customer_id": "c-42"}
    by_tool = [(r["tool_name"], r["outcome"], r["tool_error"]) for r in rows.values()]
    assert by_tool == [("search_tickets", "allowed", 0), ("delete_customer", "denied", 0),
                       ("refund_order", "denied", 0), ("get_ticket", "allowed", 1), ("get_ticket", "allowed", 0)]
    search = next(r for r in rows.values() if r["tool_name"] == "search_tickets")
    assert search["tool_kind"] == "mcp" and search["rpc_id"].isdigit()
    assert "dana@example.com" not in search["tool_arguments"] and "refund" in search["tool_arguments"]


def test_tool_needing_approval(gw: Gateway, keys: Keys, lead: str, server: McpServer) -> None:
    before = len(server.calls())
    agent = Agent(gw, support(keys, "refund-helper"))
    with ThreadPoolExecutor(1) as pool:
        held: Future = pool.submit(agent.run, [call("refund_order", order_id="A-17", amount=12.5),
                                               call("refund_order", order_id="B-2", amount=40)])
        approval = decide(gw, lead, "refund-helper", "refund_order", "approve")
        assert json.loads(json.dumps(approval["arguments"]))["params"]["arguments"] == \
            {"order_id": "A-17", "amount": 12.5}
        decide(gw, lead, "refund-helper", "refund_order", "deny")
        doc = held.result(timeout=60)
    assert step_ok(doc, 0)["structuredContent"]["refunded"] == 12.5
    refused = rpc_error(doc, 1)
    assert refused["code"] == APPROVAL_DENIED and refused["data"]["approval_id"]
    assert server.calls()[before:] == [{"tool": "refund_order", "arguments": {"order_id": "A-17", "amount": 12.5}}]
    rows = agent.wait_rows("rpc_method = 'tools/call'", 2)
    assert [(r["outcome"], r["approver"]) for r in rows] == [("approved", "lead-sam"), ("approval_denied", "lead-sam")]


def test_batch_mixing_allowed_denied_and_held_calls(gw: Gateway, keys: Keys, lead: str, server: McpServer,
                                                    tmp_path: Path) -> None:
    before = len(server.calls())
    agent = Agent(gw, support(keys, "batch-bot"))
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "search_tickets", "arguments": {"query": "log"}}},
             {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
              "params": {"name": "delete_customer", "arguments": {"customer_id": "batched"}}},
             {"jsonrpc": "2.0", "method": "notifications/progress",
              "params": {"progressToken": "t", "progress": 1}},
             {"jsonrpc": "2.0", "id": "r-4", "method": "tools/call",
              "params": {"name": "refund_order", "arguments": {"order_id": "A-17", "amount": 5}}},
             {"jsonrpc": "2.0", "id": 5, "method": 42},
             {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "get_ticket", "arguments": {"id": 1001}}}]
    with ThreadPoolExecutor(1) as pool:
        held: Future = pool.submit(agent.raw, batch, tmp_path)
        decide(gw, lead, "batch-bot", "refund_order", "approve")
        doc = held.result(timeout=60)
    assert doc["error"] is None and doc["init"]["session_id"], doc
    resp = doc["response"]
    assert (resp["status"], resp["content_type"]) == (200, "application/json"), resp
    answers = resp["json"]
    assert [a["id"] for a in answers] == [1, 2, 3, "r-4", 5, 6]
    assert tool_names(answers[0]["result"]) == VISIBLE
    assert answers[1]["result"]["structuredContent"]["result"][0]["id"] == 1002
    assert answers[2]["error"]["code"] == DENIED and answers[2]["error"]["data"]["code"] == "policy_denied"
    assert answers[3]["result"]["structuredContent"]["refunded"] == 5
    assert answers[4]["error"]["code"] == -32600
    ticket = answers[5]["result"]
    assert ticket["structuredContent"]["id"] == 1001 and "dana@example.com" not in json.dumps(ticket)  # redacted
    assert [c["tool"] for c in server.calls()[before:]] == ["search_tickets", "refund_order", "get_ticket"]
    # One audit row per element (the initialize handshake has its own), sharing the trace id.
    rows = agent.wait_rows("rpc_method != 'initialize' AND rpc_method != 'notifications/initialized'", 7)
    assert [(r["rpc_method"], r["tool_name"], r["outcome"]) for r in rows] == [
        ("tools/list", "", "allowed"), ("tools/call", "search_tickets", "allowed"),
        ("tools/call", "delete_customer", "denied"), ("notifications/progress", "", "allowed"),
        ("tools/call", "refund_order", "approved"), ("", "", "rejected"), ("tools/call", "get_ticket", "allowed")]
    assert answers[2]["error"]["data"]["call_id"] == rows[2]["call_id"]


def test_refusals_outside_json_rpc_stay_http(gw: Gateway, keys: Keys, server: McpServer) -> None:
    url = gw.route_url(ROUTE, "/mcp")
    body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                       "params": {"name": "delete_customer", "arguments": {"customer_id": "x"}}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    before = len(server.http_requests())
    assert http("POST", url, headers=headers, body=body).status == 401  # identity: transport level
    smuggled = http("POST", url, body=body, headers={**headers, "Authorization": f"Bearer {support(keys)}",
                                                     "Mcp-Method": "tools/call", "Mcp-Name": "get_ticket"})
    assert smuggled.status == 400 and smuggled.json()["error"]["code"] == "mcp_header_mismatch"
    note = http("POST", url, headers={**headers, "Authorization": f"Bearer {keys.token('s', roles=['sales'])}"},
                body=b'{"jsonrpc": "2.0", "method": "notifications/initialized"}')
    assert note.status == 403 and note.json()["error"]["code"] == "policy_denied"  # no id to answer
    agent = {**headers, "Authorization": f"Bearer {support(keys)}"}
    twice = http("POST", url, headers=agent, body=b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", '
                                                   b'"method": "tools/call", "params": {"name": "delete_customer"}}')
    assert twice.status == 400 and twice.json()["error"]["code"] == "ambiguous_json"
    listed = http("POST", url, headers=agent, body=json.dumps(
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_ticket", "arguments": [1001]}}).encode())
    assert listed.status == 400 and listed.json()["error"]["code"] == "invalid_mcp_params"
    # Escaped member names are still JSON-RPC to the gateway (as to the server): judged as a tool call.
    escaped = http("POST", url, headers=agent, body=b'{"\\u006asonrpc": "2.0", "id": 3, "method": "tools\\u002fcall", '
                                                     b'"params": {"name": "delete_customer", "arguments": {}}}')
    assert escaped.status == 200 and escaped.json()["error"]["code"] == DENIED, escaped.body
    assert len(server.http_requests()) == before


def test_killswitch_cuts_an_open_mcp_stream(gw: Gateway, keys: Keys, server: McpServer) -> None:
    agent = "stream-bot"
    token = support(keys, agent)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    init = http("POST", gw.route_url(ROUTE, "/mcp"), headers=headers, body=json.dumps(
        {"jsonrpc": "2.0", "id": 0, "method": "initialize",
         "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"}}}).encode())
    assert init.status == 200, init.body
    sid = init.headers["mcp-session-id"]
    host, port = gw.routes.split(":")
    conn = HTTPConnection(host, int(port), timeout=30)

    def listen() -> int:
        conn.request("GET", f"/r/{ROUTE}/mcp", headers={"Authorization": f"Bearer {token}", "Mcp-Session-Id": sid,
                                                        "Mcp-Protocol-Version": "2025-11-25",
                                                        "Accept": "text/event-stream"})
        resp = conn.getresponse()
        try:
            while resp.read1(1024):
                pass
        except (IncompleteRead, ConnectionError, OSError):
            pass
        return resp.status

    operator = keys.admin_token("oncall", roles=["operator"])
    with ThreadPoolExecutor(1) as pool:
        stream: Future = pool.submit(listen)
        wait_until(lambda: any(r["method"] == "GET" and r["headers"].get("mcp-session-id") == sid
                               for r in server.http_requests()), what="the MCP GET stream to open")
        assert not stream.done()
        kill = http("POST", f"http://{gw.admin}/v1/killswitches",
                    headers={"Authorization": f"Bearer {operator}", "Content-Type": "application/json"},
                    body=json.dumps({"scope": "agent", "target": agent, "reason": "test"}).encode())
        assert kill.status == 201, kill.body
        assert stream.result(timeout=10) == 200
    conn.close()
    wait_until(lambda: gw.sql(f"SELECT 1 FROM agentgate.calls FINAL WHERE agent_id = '{agent}' AND method = 'GET'"),
               what="the cut stream's audit row")
    (row,) = gw.sql(f"SELECT tool_kind, outcome, error_code FROM agentgate.calls FINAL "
                    f"WHERE agent_id = '{agent}' AND method = 'GET'")
    assert row == {"tool_kind": "mcp", "outcome": "killed", "error_code": "agent_suspended"}
    http("DELETE", f"http://{gw.admin}/v1/killswitches/{kill.json()['id']}",
         headers={"Authorization": f"Bearer {operator}"})


# -- forward-proxy mode --------------------------------------------------------------------
def test_forward_proxy_mode(gw: Gateway, keys: Keys, lead: str, tls_server: tuple[McpServer, Path],
                            tmp_path: Path) -> None:
    srv, _ = tls_server
    before = len(srv.calls())
    agent = Agent(gw, support(keys, "proxy-bot"), forward=tls_server)
    with ThreadPoolExecutor(1) as pool:
        held: Future = pool.submit(agent.run, [{"op": "list_tools"}, call("get_ticket", id=1002),
                                               call("delete_customer", customer_id="c-1"),
                                               call("refund_order", order_id="A-17", amount=1)])
        decide(gw, lead, "proxy-bot", "refund_order", "approve")
        doc = held.result(timeout=60)
    assert tool_names(step_ok(doc, 0)) == VISIBLE
    assert step_ok(doc, 1)["structuredContent"]["id"] == 1002
    assert rpc_error(doc, 2)["code"] == DENIED
    assert step_ok(doc, 3)["structuredContent"]["refunded"] == 1
    assert any(h["content_type"] == "text/event-stream" for h in doc["http"])  # tool answers streamed

    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
              "params": {"name": "delete_customer", "arguments": {"customer_id": "fwd"}}},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "search_tickets", "arguments": {"query": "account"}}},
             {"jsonrpc": "2.0", "id": 3, "method": "prompts/list"}]
    raw = agent.raw(batch, tmp_path)
    answers = raw["response"]["json"]
    assert [a["id"] for a in answers] == [1, 2, 3], raw
    assert answers[0]["error"]["code"] == DENIED
    assert answers[1]["result"]["structuredContent"]["result"][0]["id"] == 1003
    assert [p["name"] for p in answers[2]["result"]["prompts"]] == ["summarize_ticket"]
    assert [c["tool"] for c in srv.calls()[before:]] == ["get_ticket", "refund_order", "search_tickets"]
    rows = agent.wait_rows("rpc_method IN ('tools/call', 'tools/list')", 6)
    assert [(r["rpc_method"], r["tool_name"], r["outcome"]) for r in rows] == [
        ("tools/list", "", "allowed"), ("tools/call", "get_ticket", "allowed"),
        ("tools/call", "delete_customer", "denied"), ("tools/call", "refund_order", "approved"),
        ("tools/call", "delete_customer", "denied"), ("tools/call", "search_tickets", "allowed")]


# -- the JSON-RPC and event-stream plumbing on its own ---------------------------------------
def test_json_rpc_messages_are_recognised_strictly() -> None:
    assert mcp.as_message({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).answerable
    note = mcp.as_message({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert note is not None and not note.answerable and mcp.rpc_id_text(note) == ""
    reply = mcp.as_message({"jsonrpc": "2.0", "id": "s-1", "result": {}})
    assert reply is not None and reply.method is None and not reply.answerable
    for bad in ({"jsonrpc": "1.0", "id": 1, "method": "x"}, {"id": 1, "method": "x"},
                {"jsonrpc": "2.0", "id": {"x": 1}, "method": "x"}, {"jsonrpc": "2.0", "id": True, "method": "x"},
                {"jsonrpc": "2.0", "method": 7}, [1]):
        assert mcp.as_message(bad) is None, bad
    assert mcp.rpc_id_text(mcp.as_message({"jsonrpc": "2.0", "id": 7, "method": "x"})) == "7"
    assert mcp.rpc_id_text(mcp.as_message({"jsonrpc": "2.0", "id": None, "method": "x"})) == "null"


def test_event_stream_is_split_on_blank_lines_across_chunks() -> None:
    events, rest = mcp.split_events(b"event: message\r\ndata: {\"a\":1}\r\n\r", final=False)
    assert events == [] and rest.endswith(b"\r"), "a CR at the end may be half of a CRLF"
    events, rest = mcp.split_events(rest + b"\ndata: x\n\ndata: tail", final=False)
    assert events == [b"event: message\r\ndata: {\"a\":1}\r\n\r\n", b"data: x\n\n"] and rest == b"data: tail"
    assert mcp.event_data(events[0]) == '{"a":1}'
    assert mcp.event_data(b"data: line1\ndata:line2\n\n") == "line1\nline2"
    assert mcp.event_data(b": keep-alive\n\n") is None
    assert mcp.with_data(b"id: 3\r\nevent: message\r\ndata: {}\r\n\r\n", '{"b":2}') == \
        b'id: 3\nevent: message\ndata: {"b":2}\n\n'
    answer = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n' \
             b'event: message\ndata: {"jsonrpc":"2.0","id":4,"result":{"isError":true}}\n\n'
    assert mcp.response_message(answer, "text/event-stream", 4) == \
        {"jsonrpc": "2.0", "id": 4, "result": {"isError": True}}
    assert mcp.response_message(answer, "text/event-stream", 5) is None


def test_audit_arguments_are_scrubbed_and_bounded() -> None:
    text = mcp.arguments_text({"query": "mail dana@example.com", "api_key": "sk-live-0123456789abcdef"})
    assert "dana@example.com" not in text and "sk-live-0123456789abcdef" not in text and "query" in text
    long = mcp.arguments_text({"blob": "x" * 10_000})
    assert len(long) <= mcp.MAX_ARGUMENTS_CHARS and json.loads(long).endswith("…")
    quotes = mcp.arguments_text({"q": "\"" * 5000})
    assert len(quotes) <= mcp.MAX_ARGUMENTS_CHARS and json.loads(quotes).startswith("{")
