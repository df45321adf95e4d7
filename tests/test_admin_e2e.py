"""Admin API end to end: health, readiness, metrics, role-checked read-only audit SQL, and admin
tokens that are for the admin API only."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway, Keys, Upstream, http


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream) -> Gateway:
    return gateway_factory({"routes": {"plain": {"upstream": upstream.url}}}, name="admin")


def sql(gw: Gateway, token: str | None, body: dict) -> tuple[int, dict]:
    resp = gw.call_admin("POST", "/v1/audit/sql", token, body)
    assert resp.headers.get("x-agentgate-call-id")
    return resp.status, resp.json()


def test_health_and_readiness(gw: Gateway) -> None:
    assert http("GET", f"http://{gw.admin}/healthz").json() == {"status": "ok"}
    ready = http("GET", f"http://{gw.admin}/readyz")
    assert ready.status == 200
    doc = ready.json()
    assert doc["ready"] is True and doc["checks"] == {"policy": True, "audit": True, "store": True}
    assert doc["audit"]["depth"] >= 0 and doc["audit"]["spool_writable"] is True
    assert doc["policy_revision"]
    assert doc["event_loop"] == "uvloop"  # the default event_loop setting
    assert doc["python_optimized"] is True  # started as shipped: PYTHONOPTIMIZE=1
    cache = doc["decision_cache"]
    assert cache["enabled"] is True and cache["size"] == 4096 and cache["hits"] >= 0


def test_metrics_count_outcomes_and_decisions(gw: Gateway, keys: Keys) -> None:
    http("GET", gw.route_url("plain", "/ok"), headers={"Authorization": f"Bearer {keys.token()}"})
    http("GET", gw.route_url("plain", "/admin"), headers={"Authorization": f"Bearer {keys.token()}"})
    text = http("GET", f"http://{gw.admin}/metrics").body.decode()
    assert 'agentgate_requests_total{mode="route",outcome="allowed"}' in text
    assert 'agentgate_requests_total{mode="route",outcome="denied"}' in text
    assert 'agentgate_decision_seconds_bucket{engine="embedded"' in text
    assert "agentgate_audit_queue_depth" in text


def test_audit_sql_requires_responder_or_admin(gw: Gateway, keys: Keys) -> None:
    status, body = sql(gw, None, {"sql": "SELECT 1"})
    assert (status, body["error"]["code"], body["error"]["message"]) == (401, "missing_token", "no admin token presented")
    status, body = sql(gw, keys.admin_token("op", roles=["operator"]), {"sql": "SELECT 1"})
    assert (status, body["error"]["code"]) == (403, "forbidden_role")
    for role in ("responder", "admin"):
        status, body = sql(gw, keys.admin_token("r", roles=[role]), {"sql": "SELECT 1 AS one"})
        assert status == 200 and body["columns"] == ["one"] and body["rows"] == [[1]]


def test_agent_tokens_have_no_admin_powers(gw: Gateway, keys: Keys) -> None:
    """Found by review: the admin API took agent tokens, so an agent whose roles claim named an
    admin role (roles are policy data too) could flip kill-switches, approve and read the audit.
    Admin tokens are for their own audience (identity.admin_audience); refusals are recorded."""
    agent = keys.token("sneaky-bot", roles=["reader", "admin", "operator", "approver", "responder"])
    attempts = [("POST", "/v1/killswitches", {"scope": "all", "reason": "takeover"}, "killswitch.create"),
                ("GET", "/v1/killswitches?all=1", None, "killswitch.list"),
                ("GET", "/v1/approvals", None, "approval.list"),
                ("POST", "/v1/approvals/apr_0123456789abcdef/approve", {"reason": "mine"}, "approval.approve"),
                ("POST", "/v1/audit/sql", {"sql": "SELECT 1"}, "audit.sql"),
                ("GET", "/v1/audit/denied?since=1h", None, "audit.denied")]
    for method, path, body, _ in attempts:
        resp = gw.call_admin(method, path, agent, body)
        assert resp.status == 401, (path, resp.status, resp.body[:200])
        err = resp.json()["error"]
        assert err["code"] == "wrong_audience" and "'agentgate-admin'" in err["message"], (path, err)
    assert http("GET", gw.route_url("plain", "/ok"), headers={"Authorization": f"Bearer {agent}"}).status == 200
    operator = keys.admin_token("op-check", roles=["operator"])
    assert gw.call_admin("GET", "/v1/killswitches?all=1", operator).json() == {"killswitches": []}
    rows = gw.sql("SELECT action, actor, result FROM agentgate.admin_events WHERE detail = 'wrong_audience'")
    assert sorted((r["action"], r["actor"], r["result"]) for r in rows) == sorted(
        (action, "", "unauthenticated") for *_, action in attempts)


def test_admin_tokens_have_a_maximum_lifetime(gw: Gateway, keys: Keys) -> None:
    """Found by review: a token valid for a century was accepted."""
    forever = keys.admin_token("old-timer", roles=["responder"], ttl=100 * 365 * 86400)
    status, body = sql(gw, forever, {"sql": "SELECT 1"})
    assert (status, body["error"]["code"]) == (401, "token_lifetime_too_long")
    assert "86400 seconds" in body["error"]["message"]
    day = keys.admin_token("day-shift", roles=["responder"], ttl=86400)
    assert sql(gw, day, {"sql": "SELECT 1 AS one"})[0] == 200
    rows = gw.sql("SELECT action, result FROM agentgate.admin_events WHERE detail = 'token_lifetime_too_long'")
    assert rows == [{"action": "audit.sql", "result": "unauthenticated"}]


@pytest.mark.parametrize("statement", [
    "DROP TABLE agentgate.calls",
    "INSERT INTO agentgate.calls (agent_id) VALUES ('x')",
    "SELECT 1; DROP TABLE agentgate.calls",
    "ALTER TABLE agentgate.calls DELETE WHERE 1",
])
def test_audit_sql_is_read_only(gw: Gateway, statement: str) -> None:
    status, body = sql(gw, gw.admin_token, {"sql": statement})
    assert status == 400 and body["error"]["code"] == "query_not_allowed"
    assert gw.sql("SELECT count() AS n FROM system.tables WHERE database = 'agentgate' AND name = 'calls'")[0]["n"] == 1


def test_audit_sql_row_limit_and_bad_input(gw: Gateway) -> None:
    status, body = sql(gw, gw.admin_token, {"sql": "SELECT number FROM system.numbers LIMIT 100", "limit": 7})
    assert status == 200 and body["row_count"] == 7
    status, body = sql(gw, gw.admin_token, {"sql": ""})
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, body = sql(gw, gw.admin_token, {"sql": "SELECT no_such_column FROM agentgate.calls"})
    assert (status, body["error"]["code"]) == (400, "query_error")


def test_unknown_admin_path_is_json_404(gw: Gateway) -> None:
    resp = http("GET", f"http://{gw.admin}/nope")
    assert resp.status == 404 and resp.json()["error"]["code"] == "not_found"


def test_repeated_calls_reuse_the_decision(gw: Gateway, keys: Keys) -> None:
    def cache() -> dict:
        return http("GET", f"http://{gw.admin}/readyz").json()["decision_cache"]

    before = cache()
    auth = {"Authorization": f"Bearer {keys.token()}"}
    for _ in range(3):
        assert http("GET", gw.route_url("plain", "/reused/decision"), headers=auth).status == 200
    after = cache()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2


def test_the_asyncio_event_loop_can_be_chosen(gateway_factory, upstream: Upstream, keys: Keys) -> None:
    gw = gateway_factory({"event_loop": "asyncio", "routes": {"plain": {"upstream": upstream.url}}},
                         name="asyncio-loop")
    assert http("GET", f"http://{gw.admin}/readyz").json()["event_loop"] == "asyncio"
    auth = {"Authorization": f"Bearer {keys.token()}"}
    assert http("GET", gw.route_url("plain", "/ok"), headers=auth).status == 200
