"""Incident-responder questions against a real gateway running the example policy bundle.

One scripted scenario (several agents; allowed, denied, shadow, approved, approval-denied,
killed and unauthenticated calls, two traces) is played once; each question is then checked
against the answer the scenario implies. A few in-process checks cover what a single small
scenario cannot: paging a large export, the FINAL rule on a ReplacingMergeTree, the grant
data extractor and the OCSF mapping of edge rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from gateway import cli
from storage import ocsf, schema
from storage import queries as q
from storage.store import Store
from tests.conftest import ROOT, Gateway, Keys, Upstream, http, wait_until

CALL_ID = "x-agentgate-call-id"
TRACE_HEX = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_HEX}-00f067aa0ba902b7-01"
OPS_SESSION = "ops-session-7"
PUBLIC_REPLY = json.dumps({"ticket": {"comment": {"body": "Refund issued", "public": True}}}).encode()


def ask(gw: Gateway, path: str, token: str | None = None, **params: Any) -> dict[str, Any]:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    resp = gw.call_admin("GET", path + (f"?{query}" if query else ""), token or gw.admin_token)
    assert resp.status == 200, resp.body
    return resp.json()


class Scenario:
    """Plays the calls and remembers their ids."""

    def __init__(self, gw: Gateway, keys: Keys, upstream: Upstream) -> None:
        self.gw, self.keys, self.upstream = gw, keys, upstream
        self.ids: dict[str, str] = {}
        self.lead = keys.admin_token("lead-bob", roles=["approver", "support-lead"])
        self.finance = keys.admin_token("lead-fin", roles=["approver", "finance"])
        self.operator = keys.admin_token("oncall-olga", roles=["operator"])

    def call(self, name: str, agent: str | None, roles: list[str], team: str, method: str, route: str, path: str,
             *, body: bytes | None = None, headers: dict[str, str] | None = None, expect: int = 200):
        hdrs = dict(headers or {})
        if agent is not None:
            hdrs["Authorization"] = f"Bearer {self.keys.token(agent, roles=roles, team=team)}"
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        resp = http(method, self.gw.route_url(route, path), headers=hdrs, body=body)
        assert resp.status == expect, (name, resp.status, resp.body)
        self.ids[name] = resp.headers[CALL_ID]
        return resp

    def held(self, name: str, approver: str, approve: bool, reason: str, *args: Any, **kw: Any) -> str:
        """Send a call the policy holds for approval, decide it through the admin API."""
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(self.call, name, *args, **kw)
            wait_until(lambda: bool(self.pending(approver)), what=f"the approval for {name}")
            (approval,) = self.pending(approver)
            verb = "approve" if approve else "deny"
            assert self.gw.call_admin("POST", f"/v1/approvals/{approval['id']}/{verb}", approver,
                                      {"reason": reason}).status == 200
            fut.result(timeout=30)
        return approval["id"]

    def pending(self, token: str) -> list[dict]:
        return self.gw.call_admin("GET", "/v1/approvals?state=pending", token).json()["approvals"]

    def forward(self, name: str, agent: str, roles: list[str], team: str, url: str, expect: int) -> None:
        host, port = self.gw.proxy.split(":")
        conn = HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("GET", url, headers={
                "Proxy-Authorization": f"Bearer {self.keys.token(agent, roles=roles, team=team)}"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == expect, (name, resp.status)
            self.ids[name] = resp.headers[CALL_ID]
        finally:
            conn.close()

    def play(self) -> None:
        sup = ("support-bot", ["support"], "support")
        ops = ("ops-bot", ["ops"], "ops")
        sales = ("sales-bot", ["sales"], "sales")
        trace = {"traceparent": TRACEPARENT}
        session = {"X-Agent-Session": OPS_SESSION}
        # support-bot: read a ticket and a customer, then post a public reply a lead approves.
        self.call("s_read_ticket", *sup, "GET", "zendesk", "/api/v2/tickets/1042.json", headers=trace)
        self.call("s_read_customer", *sup, "GET", "demo", "/customers/42", headers=trace)
        self.ids["approval_reply"] = self.held("s_reply", self.lead, True, "reply checked", *sup, "PUT", "zendesk",
                                               "/api/v2/tickets/1042.json", body=PUBLIC_REPLY, headers=trace)
        # ... then reaches outside its policy.
        self.call("s_delete", *sup, "DELETE", "zendesk", "/api/v2/tickets/1042.json", expect=403)
        self.call("s_stripe", *sup, "GET", "stripe", "/v1/charges", expect=403)
        self.call("s_mystery", *sup, "GET", "mystery", "/export", expect=403)
        self.forward("s_exfil", *sup, "http://exfil.invalid/upload", expect=403)
        self.call("s_jira", *sup, "GET", "jira", "/rest/api/2/issue/OPS-1")
        # ops-bot, one session: a read, a refund a finance lead refuses, then a kill-switch.
        self.call("o_read_charge", *ops, "GET", "stripe", "/v1/charges/ch_1", headers=session)
        self.ids["approval_refund"] = self.held("o_refund", self.finance, False, "amount not verified", *ops, "POST",
                                                "stripe", "/v1/refunds", body=b'{"charge": "ch_1", "amount": 500}',
                                                headers=session, expect=403)
        switch = self.gw.call_admin("POST", "/v1/killswitches", self.operator,
                                    {"scope": "agent", "target": "ops-bot", "reason": "incident 7"})
        assert switch.status == 201
        self.ids["killswitch"] = switch.json()["id"]
        self.call("o_killed", *ops, "GET", "stripe", "/v1/charges/ch_1", headers=session, expect=403)
        # sales-bot on the shadow route: refused by policy, let through.
        self.call("x_shadow", *sales, "GET", "jira", "/rest/api/2/issue/OPS-1")
        self.call("x_demo", *sales, "GET", "demo", "/leads")
        # no token at all
        self.call("anon", None, [], "", "GET", "demo", "/x", expect=401)


@pytest.fixture(scope="module")
def world(gateway_factory, keys: Keys, upstream: Upstream, tmp_path_factory) -> Scenario:
    reg = tmp_path_factory.mktemp("investigate-reg") / "agents.toml"
    reg.write_text('[agents.support-bot]\nowner = "alice@example.com"\nteam = "support"\n'
                   'systems = ["zendesk", "jira", "demo"]\n')
    routes = {name: {"upstream": upstream.url} for name in ("zendesk", "stripe", "demo", "mystery")}
    routes["jira"] = {"upstream": upstream.url, "enforce": False}
    gw = gateway_factory({
        "identity": {"registry_file": str(reg)},
        "policy": {"dir": str(ROOT / "policies"), "hot_reload": False},
        "approval": {"hold_seconds": 20},
        "routes": routes,
    }, name="investigate")
    world = Scenario(gw, keys, upstream)
    world.play()
    return world


def by_id(rows: list[dict], key: str = "call_id") -> dict[str, dict]:
    return {r[key]: r for r in rows}


# ---------------------------------------------------------------------------------------- timeline
def test_timeline_in_order_with_outcomes_and_reasons(world: Scenario) -> None:
    doc = ask(world.gw, "/v1/audit/timeline", agent="support-bot", since="1h")
    ids = world.ids
    names = ["s_read_ticket", "s_read_customer", "s_reply", "s_delete", "s_stripe", "s_mystery", "s_exfil", "s_jira"]
    assert [c["call_id"] for c in doc["calls"]] == [ids[n] for n in names]
    assert doc["truncated"] is False and doc["row_count"] == 8
    got = [(c["method"], c["route"] or c["host"], c["outcome"], c["status"]) for c in doc["calls"]]
    assert got == [("GET", "zendesk", "allowed", 200), ("GET", "demo", "allowed", 200),
                   ("PUT", "zendesk", "approved", 200), ("DELETE", "zendesk", "denied", 403),
                   ("GET", "stripe", "denied", 403), ("GET", "mystery", "denied", 403),
                   ("GET", "exfil.invalid", "denied", 403), ("GET", "jira", "allowed", 200)]
    calls = by_id(doc["calls"])
    assert calls[ids["s_read_ticket"]]["reasons"][0] == "role support may GET zendesk"
    assert calls[ids["s_delete"]]["reasons"] == ["DELETE on zendesk is never allowed: it is a system of record",
                                                "role support may not DELETE zendesk"]
    assert calls[ids["s_exfil"]]["reasons"] == ["host exfil.invalid is not an approved system"]
    reply = calls[ids["s_reply"]]
    assert (reply["approval_id"], reply["approver"]) == (ids["approval_reply"], "lead-bob")
    assert reply["decided_at"].endswith("Z") and reply["trace_id"] == TRACE_HEX
    # a bounded answer says so
    small = ask(world.gw, "/v1/audit/timeline", agent="support-bot", since="1h", limit=3)
    assert small["row_count"] == 3 and small["truncated"] is True
    assert [c["call_id"] for c in small["calls"]] == [ids[n] for n in names[:3]]
    # the window excludes everything before it
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).isoformat()
    assert ask(world.gw, "/v1/audit/timeline", agent="support-bot", since=future)["calls"] == []


# ---------------------------------------------------------------------------------------- trace
def test_trace_reads_before_the_action_and_who_approved(world: Scenario) -> None:
    ids = world.ids
    doc = ask(world.gw, f"/v1/audit/trace/{TRACE_HEX}")
    assert [c["call_id"] for c in doc["calls"]] == [ids["s_read_ticket"], ids["s_read_customer"], ids["s_reply"]]
    assert doc["summary"]["agents"] == ["support-bot"]
    assert doc["summary"]["outcomes"] == {"allowed": 2, "approved": 1}
    (action,) = doc["actions"]
    assert (action["call_id"], action["method"], action["approver"]) == (ids["s_reply"], "PUT", "lead-bob")
    assert [r["call_id"] for r in action["reads_before"]] == [ids["s_read_ticket"], ids["s_read_customer"]]
    assert all(r["response_bytes"] > 0 for r in action["reads_before"])
    (approval,) = doc["approvals"]
    assert approval == {"call_id": ids["s_reply"], "approval_id": ids["approval_reply"], "approver": "lead-bob",
                        "decided_at": approval["decided_at"], "outcome": "approved", "reason": "reply checked"}
    assert doc["killswitches"] == []
    assert doc["redactions"] is None or doc["redactions"] == []


def test_trace_of_a_session_with_refused_approval_and_kill(world: Scenario) -> None:
    ids = world.ids
    doc = ask(world.gw, f"/v1/audit/trace/{OPS_SESSION}")
    assert [(c["call_id"], c["outcome"]) for c in doc["calls"]] == [
        (ids["o_read_charge"], "allowed"), (ids["o_refund"], "approval_denied"), (ids["o_killed"], "killed")]
    (action,) = doc["actions"]
    assert action["call_id"] == ids["o_refund"]
    assert [r["call_id"] for r in action["reads_before"]] == [ids["o_read_charge"]]
    assert doc["approvals"] == [{"call_id": ids["o_refund"], "approval_id": ids["approval_refund"],
                                 "approver": "lead-fin", "decided_at": doc["approvals"][0]["decided_at"],
                                 "outcome": "approval_denied", "reason": "amount not verified"}]
    assert doc["killswitches"] == [{"call_id": ids["o_killed"], "killswitch_id": ids["killswitch"],
                                    "reason": "incident 7"}]
    assert ask(world.gw, "/v1/audit/trace/no-such-trace")["calls"] == []


# ---------------------------------------------------------------------------------------- denied
def test_denied_grouped_by_agent_and_reason(world: Scenario) -> None:
    doc = ask(world.gw, "/v1/audit/denied", since="1h")
    got = {(g["agent_id"], g["outcome"], g["error_code"], tuple(g["reasons"])): g["calls"] for g in doc["groups"]}
    support = {k: v for k, v in got.items() if k[0] == "support-bot"}
    assert support == {
        ("support-bot", "denied", "policy_denied",
         ("DELETE on zendesk is never allowed: it is a system of record", "role support may not DELETE zendesk")): 1,
        ("support-bot", "denied", "policy_denied",
         ("agent support-bot is not registered for stripe", "role support may not GET stripe")): 1,
        ("support-bot", "denied", "policy_denied", ("route mystery is not mapped to an approved system",)): 1,
        ("support-bot", "denied", "policy_denied", ("host exfil.invalid is not an approved system",)): 1,
    }
    assert {k[1:3]: v for k, v in got.items() if k[0] == "ops-bot"} == {
        ("approval_denied", "approval_denied"): 1, ("killed", "agent_suspended"): 1}
    assert {k[1] for k in got if k[0] == "sales-bot"} == {"would_deny"}
    assert [k[1] for k in got if k[0] == ""] == ["unauthenticated"]
    assert sum(got.values()) == 8
    strict = ask(world.gw, "/v1/audit/denied", since="1h", shadow="0")
    assert "sales-bot" not in {g["agent_id"] for g in strict["groups"]} and len(strict["groups"]) == 7
    only_ops = ask(world.gw, "/v1/audit/denied", since="1h", agent="ops-bot")
    assert {g["agent_id"] for g in only_ops["groups"]} == {"ops-bot"}
    killed = next(g for g in only_ops["groups"] if g["outcome"] == "killed")
    assert killed["last_call_id"] == world.ids["o_killed"] and killed["traces"] == 1


# ---------------------------------------------------------------------------------------- outside policy
def test_outside_policy_names_hosts_and_routes_tried(world: Scenario) -> None:
    doc = ask(world.gw, "/v1/audit/outside-policy", since="7d")
    got = {(g["agent_id"], g["mode"], g["route"] or g["host"]): (g["calls"], g["shadow_calls"], g["methods"])
           for g in doc["groups"]}
    assert got == {
        ("support-bot", "route", "zendesk"): (1, 0, ["DELETE"]),
        ("support-bot", "route", "stripe"): (1, 0, ["GET"]),
        ("support-bot", "route", "mystery"): (1, 0, ["GET"]),
        ("support-bot", "forward", "exfil.invalid"): (1, 0, ["GET"]),
        ("sales-bot", "route", "jira"): (1, 1, ["GET"]),
    }
    shadow = next(g for g in doc["groups"] if g["agent_id"] == "sales-bot")
    assert shadow["reasons"] == ["role sales may not GET jira"] and shadow["paths"] == ["/rest/api/2/issue/OPS-1"]


# ---------------------------------------------------------------------------------------- grants
def test_grants_versus_use(world: Scenario) -> None:
    doc = ask(world.gw, "/v1/audit/grants", agent="support-bot", since="30d")
    assert doc["roles"] == ["support"] and doc["roles_source"] == "latest call"
    assert "registry systems demo, jira, zendesk" in doc["grant_source"]
    status = {(g["system"], g["method"]): g["status"] for g in doc["grants"]}
    assert status == {
        ("demo", "GET"): "used", ("demo", "POST"): "unused",
        ("jira", "GET"): "used", ("jira", "POST"): "unused",
        ("zendesk", "GET"): "used", ("zendesk", "POST"): "unused", ("zendesk", "PUT"): "used",
        ("zendesk", "DELETE"): "not_granted", ("stripe", "GET"): "not_granted",
        ("route:mystery", "GET"): "not_granted", ("exfil.invalid", "GET"): "not_granted",
    }, "slack is granted to the role but not to this registered agent"
    put = next(g for g in doc["grants"] if (g["system"], g["method"]) == ("zendesk", "PUT"))
    assert (put["calls"], put["allowed_calls"]) == (1, 1) and put["last_used"].endswith("Z")
    unused = next(g for g in doc["grants"] if g["status"] == "unused")
    assert (unused["calls"], unused["last_used"]) == (0, None)
    assert doc["summary"]["unused"] == ["demo POST", "jira POST", "zendesk POST"]
    # other roles on request; an unregistered agent keeps everything its role grants
    other = ask(world.gw, "/v1/audit/grants", agent="sales-bot", since="30d")
    assert {(g["system"], g["method"]): g["status"] for g in other["grants"]} == {
        ("salesforce", "GET"): "unused", ("salesforce", "POST"): "unused", ("salesforce", "PATCH"): "unused",
        ("sendgrid", "POST"): "unused", ("slack", "GET"): "unused", ("slack", "POST"): "unused",
        ("demo", "GET"): "used", ("jira", "GET"): "not_granted"}
    as_ops = ask(world.gw, "/v1/audit/grants", agent="sales-bot", since="30d", roles="ops")
    assert as_ops["roles_source"] == "query" and ("stripe", "POST") in {
        (g["system"], g["method"]) for g in as_ops["grants"] if g["status"] == "unused"}


# ---------------------------------------------------------------------------------------- export
def export(gw: Gateway, fmt: str, **params: Any):
    resp = gw.call_admin("GET", "/v1/audit/export?" + urlencode({"since": "1h", "format": fmt, **params}), gw.admin_token)
    assert resp.status == 200, resp.body
    return resp


OCSF_REQUIRED = ("activity_id", "category_uid", "class_uid", "type_uid", "time", "severity_id", "metadata",
                 "actor", "api", "src_endpoint")


def test_export_ocsf_api_activity(world: Scenario) -> None:
    ids = world.ids
    resp = export(world.gw, "ocsf")
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in resp.body.decode().splitlines()]
    assert len(events) == 14
    for ev in events:
        assert all(ev.get(k) not in (None, "", {}) for k in OCSF_REQUIRED), ev
        assert (ev["class_uid"], ev["category_uid"]) == (6003, 6)
        assert ev["type_uid"] == 600300 + ev["activity_id"]
        assert ev["metadata"]["version"] == ocsf.OCSF_VERSION and ev["metadata"]["product"]["name"] == "agentgate"
        assert ev["api"]["operation"] and ev["api"]["request"]["uid"] == ev["metadata"]["uid"]
        assert ev["status_id"] in (1, 2) and isinstance(ev["time"], int)
        assert ocsf.missing_required(ev) == []
    ev = {e["metadata"]["uid"]: e for e in events}
    expected_activity = {"s_read_ticket": 2, "s_reply": 3, "s_delete": 4, "o_refund": 1}
    assert {n: ev[ids[n]]["activity_id"] for n in expected_activity} == expected_activity
    reply = ev[ids["s_reply"]]
    assert reply["status_id"] == 1 and reply["metadata"]["correlation_uid"] == TRACE_HEX
    assert reply["actor"]["user"]["uid"] == "support-bot"
    assert reply["actor"]["user"]["groups"] == [{"name": "support", "type": "role"}]
    assert reply["actor"]["user"]["org"] == {"ou_name": "support"}
    policy, approval = reply["actor"]["authorizations"]
    assert policy["decision"] == "allowed" and policy["policy"]["name"] == "agentgate/decision"
    revision = http("GET", f"http://{world.gw.admin}/readyz").json()["policy_revision"]
    assert policy["policy"]["uid"] == policy["policy"]["version"] == revision != ""
    assert approval == {"decision": "approved", "policy": {"uid": ids["approval_reply"], "name": "agentgate/approval",
                                                           "desc": "decided by lead-bob", "is_applied": True}}
    assert reply["api"]["service"] == {"name": "zendesk"} and reply["http_response"] == {"code": 200}
    assert reply["http_request"]["http_method"] == "PUT"
    assert reply["http_request"]["url"]["path"] == "/api/v2/tickets/1042.json"
    assert reply["src_endpoint"]["ip"] == "127.0.0.1"
    denied = ev[ids["s_delete"]]
    assert denied["status_id"] == 2 and denied["actor"]["authorizations"][0]["decision"] == "denied"
    assert denied["api"]["response"]["error"] == "policy_denied" and denied["severity_id"] == 3
    shadow = ev[ids["x_shadow"]]["actor"]["authorizations"][0]
    assert shadow["decision"] == "denied" and shadow["policy"]["is_applied"] is False
    assert ev[ids["x_shadow"]]["status_id"] == 1
    killed = ev[ids["o_killed"]]
    assert killed["actor"]["authorizations"] == [{"decision": "denied", "policy": {
        "uid": ids["killswitch"], "name": "agentgate/killswitch", "is_applied": True}}]
    assert killed["severity_id"] == 4 and killed["metadata"]["correlation_uid"] == OPS_SESSION
    assert ev[ids["anon"]]["actor"]["user"]["name"] == "(unauthenticated)"
    exfil = ev[ids["s_exfil"]]
    assert exfil["dst_endpoint"] == {"hostname": "exfil.invalid", "port": 80}
    assert exfil["api"]["service"] == {"name": "exfil.invalid"}


def test_export_jsonl_and_csv_parse_back(world: Scenario, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in export(world.gw, "jsonl").body.decode().splitlines()]
    assert len(rows) == 14 and set(world.ids[n] for n in ("s_reply", "o_killed", "anon")) <= {r["call_id"] for r in rows}
    assert set(schema.COLUMN_NAMES) <= set(rows[0])
    stamps = [r["ts_start"] for r in rows]
    assert stamps == sorted(stamps) and all(s.endswith("Z") for s in stamps)
    text = export(world.gw, "csv").body.decode()
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["call_id"] for r in table] == [r["call_id"] for r in rows]
    reply = next(r for r in table if r["call_id"] == world.ids["s_reply"])
    assert json.loads(reply["roles"]) == ["support"] and reply["approver"] == "lead-bob" and reply["status"] == "200"
    assert len(export(world.gw, "jsonl", limit=5).body.decode().splitlines()) == 5
    only = export(world.gw, "jsonl", agent="ops-bot").body.decode().splitlines()
    assert {json.loads(line)["agent_id"] for line in only} == {"ops-bot"} and len(only) == 3


# ---------------------------------------------------------------------------------------- access and the CLI
def test_roles_refusals_and_admin_events(world: Scenario) -> None:
    gw = world.gw
    for path in ("/v1/audit/timeline?agent=x", "/v1/audit/export?since=1h", "/v1/audit/trace/t"):
        resp = gw.call_admin("GET", path, world.operator)
        assert resp.status == 403 and resp.json()["error"]["code"] == "forbidden_role", path
    assert http("GET", f"http://{gw.admin}/v1/audit/denied").status == 401
    for path in ("/v1/audit/timeline?agent=x&since=yesterday", "/v1/audit/timeline?since=1h",
                 "/v1/audit/export?since=1h&format=xml", "/v1/audit/export", "/v1/audit/denied?limit=0"):
        resp = gw.call_admin("GET", path, gw.admin_token)
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request", path
    admin_token = world.keys.admin_token("chief", roles=["admin"])
    assert gw.call_admin("GET", "/v1/audit/denied?since=1h", admin_token).status == 200
    events = gw.sql("SELECT actor, action, target, result FROM agentgate.admin_events "
                    "WHERE action LIKE 'audit.%' AND action != 'audit.sql'")
    actions = {(e["actor"], e["action"], e["result"]) for e in events}
    assert {("responder-1", a, "ok") for a in ("audit.timeline", "audit.trace", "audit.denied",
                                               "audit.outside_policy", "audit.grants", "audit.export")} <= actions
    assert ("oncall-olga", "audit.export", "forbidden") in actions
    assert ("responder-1", "audit.timeline", "refused") in actions and ("chief", "audit.denied", "ok") in actions


def run_cli(capsys: pytest.CaptureFixture[str], gw: Gateway, *argv: str) -> str:
    code = cli.main(["audit", *argv, "--admin-url", f"http://{gw.admin}", "--token", gw.admin_token])
    assert code == 0
    return capsys.readouterr().out


def test_cli_tables_json_and_export(world: Scenario, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    gw = world.gw
    out = run_cli(capsys, gw, "timeline", "--agent", "support-bot", "--since", "1h")
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["ts_start", "outcome", "method", "target", "path", "status"]
    assert lines[-1] == "(8 rows)" and "route:zendesk" in out and "exfil.invalid" in out and "lead-bob" in out
    out = run_cli(capsys, gw, "trace", OPS_SESSION)
    assert "POST route:stripe /v1/refunds -> approval_denied by lead-fin" in out
    assert "GET route:stripe /v1/charges/ch_1 (200," in out and "incident 7" in out
    doc = json.loads(run_cli(capsys, gw, "denied", "--since", "1h", "--json"))
    assert sum(g["calls"] for g in doc["groups"]) == 8
    out = run_cli(capsys, gw, "outside-policy", "--since", "7d")
    assert "(5 rows)" in out and "route:mystery" in out
    out = run_cli(capsys, gw, "grants", "--agent", "support-bot", "--since", "30d")
    assert "roles support (from latest call)" in out and "unused" in out
    target = tmp_path / "calls.csv"
    run_cli(capsys, gw, "export", "--since", "1h", "--format", "csv", "--output", str(target))
    assert len(list(csv.DictReader(target.open()))) == 14
    ocsf_lines = run_cli(capsys, gw, "export", "--since", "1h", "--format", "ocsf", "--agent", "sales-bot")
    assert [json.loads(line)["class_uid"] for line in ocsf_lines.splitlines()] == [6003, 6003]


# ---------------------------------------------------------------------------------------- in process
def test_parse_since() -> None:
    now = dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc)
    assert q.parse_since("2h", now=now) == now - dt.timedelta(hours=2)
    assert q.parse_since("30d", now=now) == now - dt.timedelta(days=30)
    assert q.parse_since("2024-04-30T10:00:00Z") == dt.datetime(2024, 4, 30, 10, tzinfo=dt.timezone.utc)
    assert q.parse_since("2024-04-30T12:00:00+02:00") == dt.datetime(2024, 4, 30, 10, tzinfo=dt.timezone.utc)
    assert q.parse_since("2024-04-30") == dt.datetime(2024, 4, 30, tzinfo=dt.timezone.utc)
    for bad in ("", "yesterday", "2x", "-1h", "99999999d"):
        with pytest.raises(ValueError):
            q.parse_since(bad, now=now)
    with pytest.raises(ValueError):
        q.Window.parse("1h", "2h")


def test_grant_model_shapes() -> None:
    data = json.loads((ROOT / "policies" / "data.json").read_text())
    model = q.grant_model(data, "ops-bot", ["ops", "nonexistent"])
    assert model is not None and ("stripe", "POST") in model.granted and ("zendesk", "GET") not in model.granted
    assert next(s for s in model.systems if s.name == "stripe").routes == ("stripe",)
    data["agents"] = {"ops-bot": {"systems": ["jira"]}}
    assert {s for s, _ in q.grant_model(data, "ops-bot", ["ops"]).granted} == {"jira"}
    assert q.grant_model({"test": {}}, "a", ["r"]) is None and q.grant_model(None, "a", []) is None

    def custom(doc: Any, agent: str, roles: Any) -> q.GrantModel | None:
        perms = doc.get("perms")
        return q.GrantModel((q.System("api", hosts=("api.test",)),), tuple((("api", m) for m in perms)), "perms") \
            if perms else None
    assert q.grant_model({"perms": ["GET"]}, "a", [], extractors=[custom, q.gateway_roles_extractor]).granted == (
        ("api", "GET"),)


def test_ocsf_activity_and_edges() -> None:
    assert [ocsf.activity_id(m) for m in ("POST", "get", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "")] == \
        [1, 2, 2, 3, 3, 4, 99, 99]
    row = {"call_id": str(uuid.uuid4()), "trace_id": "", "ts_start": dt.datetime(2024, 1, 1),
           "ts_end": dt.datetime(2024, 1, 1, 0, 0, 1), "agent_id": "", "method": "OPTIONS", "status": 0,
           "outcome": "rejected", "client_ip": "", "policy_revision": ""}
    event = ocsf.to_ocsf(row)
    assert ocsf.missing_required(event) == [] and event["type_uid"] == 600399 and event["status_id"] == 2
    assert event["time"] == 1704067200000 and event["duration"] == 1000 and "http_response" not in event
    assert "authorizations" not in event["actor"] and event["src_endpoint"] == {"name": "unknown"}
    fail_open = ocsf.to_ocsf({**row, "outcome": "fail_open", "status": 200, "method": "GET", "policy_revision": "r1"})
    assert fail_open["actor"]["authorizations"][0]["decision"] == "allowed"
    assert fail_open["actor"]["authorizations"][0]["policy"]["is_applied"] is False
    assert fail_open["status_id"] == 1 and fail_open["severity_id"] == 3


def _zero(ch_type: str) -> Any:
    if ch_type.startswith("Nullable"):
        return None
    if ch_type.startswith("Array"):
        return []
    if ch_type.startswith("Map"):
        return {}
    if ch_type.startswith(("UInt", "Int")):
        return 0
    if ch_type.startswith("Float"):
        return 0.0
    return ""


def _row(**kw: Any) -> tuple[Any, ...]:
    now = dt.datetime.now(dt.timezone.utc)
    base: dict[str, Any] = {n: _zero(t) for n, t in zip(schema.COLUMN_NAMES, schema.COLUMN_TYPES)}
    base.update(call_id=uuid.uuid4(), ts_start=now, ts_end=now, reasons=["r"], port=443, status=200,
                outcome="allowed", method="GET", agent_id="bulk-bot", mode="route", route="demo")
    base.update(kw)
    return tuple(base[n] for n in schema.COLUMN_NAMES)


async def test_export_pages_and_final_rule(tmp_path: Path) -> None:
    store = Store(f"chdb://{(tmp_path / 'ch').resolve()}")
    await store.open()
    try:
        t0 = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
        # 25 rows, several sharing a timestamp: the (ts_start, call_id) key must not skip or repeat one.
        rows = [_row(ts_start=t0 + dt.timedelta(seconds=i // 3)) for i in range(25)]

        def insert(client: Any, database: str, table: str) -> None:
            client.insert(table, rows, database=database, column_names=schema.COLUMN_NAMES,
                          column_type_names=schema.COLUMN_TYPES)
        await store.run(insert, "agentgate", "calls")
        table = await store.run(q.describe_calls, "agentgate")
        window = q.Window(t0 - dt.timedelta(seconds=1))
        seen: list[str] = []
        after = None
        while True:
            _, page = await store.run(q.export_page, table, window, after=after, limit=4)
            seen += [r["call_id"] for r in page]
            if len(page) < 4:
                break
            after = (page[-1]["ts_start"], page[-1]["call_id"])
        assert sorted(seen) == sorted(str(r[0]) for r in rows) and len(seen) == 25

        # The same rows inserted twice into a ReplacingMergeTree copy: read FINAL, each appears once.
        # (A plain MergeTree refuses FINAL: the engine decides.)
        def create(client: Any, database: str, engine: str) -> None:
            client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            client.command(re.sub(r"ENGINE = \w+", f"ENGINE = {engine}", schema.calls_ddl(database, 30)))
        await store.run(create, "dedup", "ReplacingMergeTree")
        await store.run(create, "plain", "MergeTree")
        await store.run(insert, "plain", "calls")
        plain = await store.run(q.describe_calls, "plain")
        assert not plain.final and len((await store.run(q.timeline, plain, "bulk-bot", window, limit=100)).rows) == 25
        await store.run(lambda c: c.command("SYSTEM STOP MERGES dedup.calls"))
        await store.run(insert, "dedup", "calls")
        rows.reverse()  # another block: not dropped by insert deduplication
        await store.run(insert, "dedup", "calls")
        raw = await store.run(lambda c: c.query("SELECT count() FROM dedup.calls").result_rows[0][0])
        assert raw == 50
        dedup = await store.run(q.describe_calls, "dedup")
        assert dedup.final
        page = await store.run(q.timeline, dedup, "bulk-bot", window, limit=100)
        assert len(page.rows) == 25 and not page.truncated
        grants = await store.run(q.grants, dedup, "bulk-bot", window, None, limit=10)
        assert [(g.system, g.method, g.status, g.calls) for g in grants.rows] == [("route:demo", "GET", "used", 25)]
    finally:
        await store.close()
