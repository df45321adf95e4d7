"""Admin API hardening (found by review). Read-only audit SQL cannot reach past the audit tables:
no files, no URLs, no other servers (DESCRIBE file(...) read the gateway's JWT secret, enough to
mint an admin token). Every attempt is recorded, refused and failed ones included; bad input gets
a JSON error."""

from __future__ import annotations


import pytest

from tests.conftest import Gateway, Keys, Upstream, http


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream) -> Gateway:
    return gateway_factory({"routes": {"plain": {"upstream": upstream.url}}}, name="admin-hardening")


@pytest.mark.parametrize("sql", [
    "DESCRIBE file('{secret}', 'JSONEachRow')",
    "DESC file('/etc/passwd', 'TSVWithNames')",
    "SELECT * FROM `file`('{secret}', 'LineAsString')",
    "SELECT * FROM agentgate.calls, file /* a comment */ ('{secret}', 'LineAsString')",
    "WITH (SELECT 1) AS x SELECT * FROM executable('cat {secret}', 'LineAsString', 'l String')",
])
def test_table_functions_are_refused(gw: Gateway, keys: Keys, sql: str) -> None:
    responder = keys.admin_token("resp", roles=["responder"])
    r = gw.call_admin("POST", "/v1/audit/sql", responder, {"sql": sql.format(secret=keys.hmac_file)})
    assert r.status == 400 and r.json()["error"]["code"] == "query_not_allowed", r.body[:300]
    assert keys.hmac_file.read_text().strip()[:12] not in r.body.decode()


def test_no_request_leaves_the_gateway(gw: Gateway, upstream: Upstream) -> None:
    before = len(upstream.seen)
    r = gw.call_admin("POST", "/v1/audit/sql", gw.admin_token,
                      {"sql": f"DESCRIBE url('{upstream.url}/ssrf', 'JSONEachRow')"})
    assert r.status == 400 and upstream.seen[before:] == []


def test_failed_queries_are_recorded(gw: Gateway, keys: Keys) -> None:
    prober = keys.admin_token("prober", roles=["responder"])
    r = gw.call_admin("POST", "/v1/audit/sql", prober, {"sql": "SELECT * FROM agentgate.probe_marker_1234"})
    assert r.status == 400 and r.json()["error"]["code"] == "query_error"
    rows = gw.sql("SELECT action, result FROM agentgate.admin_events "
                  "WHERE actor = 'prober' AND position(detail, 'probe_marker_1234') > 0")
    assert rows == [{"action": "audit.sql", "result": "error"}]


def test_an_impossible_date_is_a_json_400(gw: Gateway) -> None:
    r = http("GET", f"http://{gw.admin}/v1/audit/timeline?agent=x&since=0001-01-01T00:00:00%2B01:00",
             headers={"Authorization": f"Bearer {gw.admin_token}"})
    assert r.status == 400 and r.headers["content-type"].startswith("application/json"), r.body[:200]
    assert "0001-01-01" in r.json()["error"]["message"]


# Refused kill-switch requests are admin actions too (found by review: none left an event).
def test_refused_killswitch_requests_are_recorded(gw: Gateway, keys: Keys) -> None:
    anonymous = http("POST", f"http://{gw.admin}/v1/killswitches", headers={"Content-Type": "application/json"},
                     body=b"not json")
    assert anonymous.status == 401  # who asks is checked before the body is read
    op = keys.admin_token("op-refused", roles=["operator"])
    assert gw.call_admin("POST", "/v1/killswitches", op, {"scope": "planet", "target": "x", "reason": "r"}).status == 400
    assert gw.call_admin("DELETE", "/v1/killswitches/ks_doesnotexist", op).status == 404
    rows = gw.sql("SELECT actor, action, result, target FROM agentgate.admin_events "
                  "WHERE action LIKE 'killswitch.%' ORDER BY ts")
    assert [(r["actor"], r["action"], r["result"]) for r in rows] == [
        ("", "killswitch.create", "unauthenticated"),
        ("op-refused", "killswitch.create", "refused"),
        ("op-refused", "killswitch.revoke", "refused"),
    ]


# Reads of approvals (previews of held calls) and kill-switches are recorded too.
def test_reads_are_recorded(gw: Gateway, keys: Keys) -> None:
    reader = keys.admin_token("reader-ops", roles=["operator", "approver"])
    assert gw.call_admin("GET", "/v1/killswitches?all=1", reader).status == 200
    assert gw.call_admin("GET", "/v1/approvals?state=pending", reader).status == 200
    assert gw.call_admin("GET", "/v1/approvals/ap_nope", reader).status == 404
    rows = gw.sql("SELECT action, result, target, detail FROM agentgate.admin_events "
                  "WHERE actor = 'reader-ops' ORDER BY ts")
    assert [(r["action"], r["result"]) for r in rows] == [
        ("killswitch.list", "ok"), ("approval.list", "ok"), ("approval.get", "refused")]
    assert rows[0]["detail"] == "all=1" and rows[2]["target"] == "ap_nope"
