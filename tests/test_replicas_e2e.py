"""Two gateway replicas sharing one ClickHouse store (the chDB-backed server fixture, since no
ClickHouse server can be installed here): kill-switches and approval decisions made through one
replica's admin API take effect on the other."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.clickhouse_fixture import ClickHouseFixture
from tests.conftest import Gateway, Keys, Response, Upstream, hold_refund, http, wait_until

CALL_ID = "x-agentgate-call-id"
APPROVAL_ID = "x-agentgate-approval-id"


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory) -> ClickHouseFixture:
    fixture = ClickHouseFixture(tmp_path_factory.mktemp("ch") / "data")
    fixture.start()
    yield fixture
    fixture.stop()


@pytest.fixture(scope="module")
def replicas(gateway_factory, upstream: Upstream, clickhouse: ClickHouseFixture) -> tuple[Gateway, Gateway]:
    overrides = {"audit": {"dsn": clickhouse.dsn}, "approval": {"hold_seconds": 30},
                 "routes": {"plain": {"upstream": upstream.url}}}
    return gateway_factory(overrides, name="replica-a"), gateway_factory(overrides, name="replica-b")


def status_of(gw: Gateway, keys: Keys, agent: str) -> int:
    return http("GET", gw.route_url("plain", "/x"), headers={"Authorization": f"Bearer {keys.token(agent)}"}).status


def test_killswitch_on_one_replica_applies_to_the_other(replicas, keys: Keys) -> None:
    a, b = replicas
    operator = keys.admin_token("oncall", roles=["operator"])
    assert status_of(a, keys, "shared-bot") == 200
    created = b.call_admin("POST", "/v1/killswitches", operator, {"scope": "agent", "target": "shared-bot", "reason": "drill"})
    assert created.status == 201
    flipped = time.monotonic()
    wait_until(lambda: status_of(a, keys, "shared-bot") == 403, timeout=5, what="replica A to see the kill-switch")
    assert time.monotonic() - flipped < 2.5, "poll interval is 0.25 s: the switch should apply well within a second"
    assert status_of(a, keys, "other-bot") == 200
    assert a.call_admin("DELETE", f"/v1/killswitches/{created.json()['id']}", operator).status == 200
    wait_until(lambda: status_of(b, keys, "shared-bot") == 200, timeout=5, what="replica B to see the revive")


def test_call_held_on_a_is_released_by_approval_on_b(replicas, keys: Keys, upstream: Upstream) -> None:
    a, b = replicas
    lead = keys.admin_token("lead", roles=["approver", "support-lead"])
    before = sum(1 for s in upstream.seen if s.path == "/refunds")
    with ThreadPoolExecutor(1) as pool:
        held, approval = hold_refund(pool, a, keys.token("payer", roles=["writer"]), agent="payer", lead=lead,
                                     body=b'{"id": "r1"}', seen_on=b, timeout=10)
        assert b.call_admin("POST", f"/v1/approvals/{approval['id']}/approve", lead, {"reason": "ok"}).status == 200
        resp = held.result(timeout=30)
    assert resp.status == 200
    assert sum(1 for s in upstream.seen if s.path == "/refunds") == before + 1
    # Both replicas write to the one store: B reads A's audit row once A has shipped it.
    call_id = resp.headers[CALL_ID]
    wait_until(lambda: len(b.sql(f"SELECT 1 FROM agentgate.calls WHERE call_id = '{call_id}'")) == 1,
               what="A's audit row in the shared store")
    row = b.audit_row(call_id)
    assert (row["outcome"], row["approval_id"], row["approver"]) == ("approved", approval["id"], "lead")
    assert row["gateway_instance"] != ""


@pytest.fixture(scope="module")
def quick_replicas(gateway_factory, upstream: Upstream, clickhouse: ClickHouseFixture) -> tuple[Gateway, Gateway]:
    """Replicas that answer a held call at once (approval_pending), so that retries decide."""
    overrides = {"audit": {"dsn": clickhouse.dsn}, "approval": {"hold_seconds": 0},
                 "routes": {"plain": {"upstream": upstream.url}}}
    return gateway_factory(overrides, name="quick-a"), gateway_factory(overrides, name="quick-b")


def _refund(gw: Gateway, keys: Keys, agent: str, body: bytes) -> Response:
    return http("POST", gw.route_url("plain", "/refunds"), body=body,
                headers={"Authorization": f"Bearer {keys.token(agent, roles=['writer'])}",
                         "Content-Type": "application/json"})


def _pending_on_both(a: Gateway, b: Gateway, lead: str, agent: str) -> str:
    def ids(gw: Gateway) -> list[str]:
        return [x["id"] for x in gw.call_admin("GET", "/v1/approvals?state=pending", lead).json()["approvals"]
                if x["agent_id"] == agent]
    wait_until(lambda: len(ids(a)) == 1 and ids(a) == ids(b), timeout=10, what="both replicas to see the hold")
    return ids(a)[0]


def test_one_request_held_on_both_replicas_at_once_opens_one_approval(quick_replicas, keys: Keys) -> None:
    a, b = quick_replicas
    lead = keys.admin_token("lead", roles=["approver", "support-lead"])
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(_refund, gw, keys, "both-bot", b'{"id": "b1"}') for gw in (a, b)]
        responses = [r.result(30) for r in held]
    assert [(r.status, r.json()["error"]["code"]) for r in responses] == [(403, "approval_pending")] * 2
    ids = {r.headers[APPROVAL_ID] for r in responses}
    assert len(ids) == 1, ids  # both callers were told the one approval to wait on
    assert _pending_on_both(a, b, lead, "both-bot") == ids.pop()


def test_approve_on_one_and_deny_on_the_other_at_once(quick_replicas, keys: Keys) -> None:
    a, b = quick_replicas
    lead = keys.admin_token("lead", roles=["approver", "support-lead"])
    assert _refund(a, keys, "torn-bot", b'{"id": "t1"}').status == 403
    approval_id = _pending_on_both(a, b, lead, "torn-bot")
    with ThreadPoolExecutor(2) as pool:
        approve = pool.submit(a.call_admin, "POST", f"/v1/approvals/{approval_id}/approve", lead, {"reason": "ok"})
        deny = pool.submit(b.call_admin, "POST", f"/v1/approvals/{approval_id}/deny", lead, {"reason": "no"})
        statuses = sorted([approve.result(30).status, deny.result(30).status])
    assert statuses == [200, 409], statuses  # a decision is final, across replicas too

    def state(gw: Gateway) -> str:
        return gw.call_admin("GET", f"/v1/approvals/{approval_id}", lead).json()["state"]
    wait_until(lambda: state(a) == state(b), timeout=5, what="both replicas to agree")


def test_one_approval_lets_one_retry_through_across_replicas(quick_replicas, keys: Keys, upstream: Upstream) -> None:
    a, b = quick_replicas
    lead = keys.admin_token("lead", roles=["approver", "support-lead"])
    body = b'{"id": "twice"}'
    assert _refund(a, keys, "twice-bot", body).status == 403
    approval_id = _pending_on_both(a, b, lead, "twice-bot")
    assert a.call_admin("POST", f"/v1/approvals/{approval_id}/approve", lead, {"reason": "ok"}).status == 200
    wait_until(lambda: all(gw.call_admin("GET", f"/v1/approvals/{approval_id}", lead).json()["state"] == "approved"
                           for gw in (a, b)), timeout=5, what="both replicas to see the approval")
    before = sum(1 for s in upstream.seen if s.path == "/refunds" and s.body == body)
    with ThreadPoolExecutor(2) as pool:
        retries = [pool.submit(_refund, gw, keys, "twice-bot", body) for gw in (a, b)]
        statuses = sorted(r.result(30).status for r in retries)
    assert statuses == [200, 403], statuses
    assert sum(1 for s in upstream.seen if s.path == "/refunds" and s.body == body) == before + 1
