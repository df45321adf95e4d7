"""Approval holds through a real gateway: approve while held, deny, hold timeout then retry,
approver rules, webhooks, and approvals surviving a restart."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import Gateway, Keys, Upstream, http, start_upstream, wait_until

CALL_ID = "x-agentgate-call-id"
APPROVAL_ID = "x-agentgate-approval-id"
REFUND = b'{"order": "1042", "amount": 30}'


def registry(tmp: Path) -> Path:
    path = tmp / "agents.toml"
    path.write_text('[agents.refund-bot]\nowner = "lead-alice"\nteam = "support"\n')
    return path


def refund(gw: Gateway, keys: Keys, body: bytes = REFUND, agent: str = "refund-bot"):
    return http("POST", gw.route_url("plain", "/refunds"), body=body,
                headers={"Authorization": f"Bearer {keys.token(agent, roles=['writer'])}",
                         "Content-Type": "application/json"})


def pending(gw: Gateway, token: str) -> list[dict]:
    return gw.call_admin("GET", "/v1/approvals?state=pending", token).json()["approvals"]


def wait_for_pending(gw: Gateway, token: str, count: int = 1) -> list[dict]:
    wait_until(lambda: len(pending(gw, token)) >= count, what=f"{count} pending approval(s)")
    return pending(gw, token)


@pytest.fixture(scope="module")
def lead(keys: Keys) -> str:
    return keys.admin_token("lead-bob", roles=["support-lead", "approver"])


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream, tmp_path_factory) -> Gateway:
    return gateway_factory({
        "identity": {"registry_file": str(registry(tmp_path_factory.mktemp("reg")))},
        "approval": {"hold_seconds": 20},
        "routes": {"plain": {"upstream": upstream.url}},
    }, name="approvals")


def refunds_seen(upstream: Upstream) -> int:
    return sum(1 for s in upstream.seen if s.path == "/refunds")


def test_approve_while_held_forwards_exactly_once(gw: Gateway, keys: Keys, lead: str, upstream: Upstream) -> None:
    before = refunds_seen(upstream)
    with ThreadPoolExecutor(1) as pool:
        held: Future = pool.submit(refund, gw, keys)
        (approval,) = wait_for_pending(gw, lead)
        assert not held.done()
        assert refunds_seen(upstream) == before, "nothing reaches the upstream while held"
        assert approval["agent_id"] == "refund-bot" and approval["method"] == "POST"
        assert approval["path"] == "/refunds" and approval["approvers"] == ["support-lead"]
        assert approval["arguments"] == {"order": "1042", "amount": 30}
        assert approval["reasons"][-1] == "refunds need a support lead's approval"
        assert approval["expires_at"] > approval["created_at"]
        decided = gw.call_admin("POST", f"/v1/approvals/{approval['id']}/approve", lead, {"reason": "customer verified"})
        assert decided.status == 200 and decided.json()["state"] == "approved"
        resp = held.result(timeout=30)
    assert resp.status == 200
    assert resp.json()["body"] == REFUND.decode()
    assert refunds_seen(upstream) == before + 1
    row = gw.audit_row(resp.headers[CALL_ID])
    assert (row["outcome"], row["approval_id"], row["approver"]) == ("approved", approval["id"], "lead-bob")
    assert row["decided_at"] is not None
    events = gw.sql(f"SELECT actor, action, target, reason, result FROM agentgate.admin_events "
                    f"WHERE target = '{approval['id']}'")
    assert {"actor": "lead-bob", "action": "approval.approve", "target": approval["id"],
            "reason": "customer verified", "result": "ok"} in events
    again = gw.call_admin("POST", f"/v1/approvals/{approval['id']}/deny", lead, {"reason": "changed my mind"})
    assert again.status == 409 and again.json()["error"]["code"] == "already_decided"


def test_deny_never_reaches_upstream(gw: Gateway, keys: Keys, lead: str, upstream: Upstream) -> None:
    before = refunds_seen(upstream)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(refund, gw, keys, b'{"order": "666", "amount": 9999}')
        (approval,) = wait_for_pending(gw, lead)
        no_reason = gw.call_admin("POST", f"/v1/approvals/{approval['id']}/deny", lead, {})
        assert no_reason.status == 400
        assert gw.call_admin("POST", f"/v1/approvals/{approval['id']}/deny", lead,
                             {"reason": "amount looks wrong"}).status == 200
        resp = held.result(timeout=30)
    assert resp.status == 403
    err = resp.json()["error"]
    assert err["code"] == "approval_denied" and "amount looks wrong" in err["message"]
    assert resp.headers[APPROVAL_ID.lower()] == approval["id"]
    assert refunds_seen(upstream) == before
    row = gw.audit_row(resp.headers[CALL_ID])
    assert (row["outcome"], row["approver"], row["approval_id"]) == ("approval_denied", "lead-bob", approval["id"])


def test_approver_rules(gw: Gateway, keys: Keys, lead: str) -> None:
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(refund, gw, keys, b'{"order": "7", "amount": 1}')
        (approval,) = wait_for_pending(gw, lead)
        url = f"/v1/approvals/{approval['id']}/approve"
        operator = gw.call_admin("POST", url, keys.admin_token("op", roles=["operator"]), {"reason": "x"})
        assert operator.status == 403 and operator.json()["error"]["code"] == "forbidden_role"
        wrong_role = gw.call_admin("POST", url, keys.admin_token("sales-lead", roles=["approver", "sales-lead"]), {"reason": "x"})
        assert wrong_role.status == 403 and wrong_role.json()["error"]["code"] == "forbidden_role"
        owner = gw.call_admin("POST", url, keys.admin_token("lead-alice", roles=["approver", "support-lead"]), {"reason": "mine"})
        assert owner.status == 403 and owner.json()["error"]["code"] == "self_approval"
        other_team = gw.call_admin("POST", url, keys.admin_token("lead-carol", roles=["approver", "support-lead"],
                                                                 approver_teams=["sales"]), {"reason": "x"})
        assert other_team.status == 403 and other_team.json()["error"]["code"] == "team_not_allowed"
        assert gw.call_admin("POST", url, lead, {"reason": "ok"}).status == 200
        assert held.result(timeout=30).status == 200
    refused = gw.sql("SELECT actor, result FROM agentgate.admin_events "
                     f"WHERE target = '{approval['id']}' AND result != 'ok' ORDER BY ts")
    assert [r["actor"] for r in refused] == ["op", "sales-lead", "lead-alice", "lead-carol"]
    assert refused[0]["result"] == "forbidden"


@pytest.fixture(scope="module")
def short_hold(gateway_factory, upstream: Upstream, tmp_path_factory) -> Gateway:
    return gateway_factory({
        "identity": {"registry_file": str(registry(tmp_path_factory.mktemp("reg2")))},
        "approval": {"hold_seconds": 0.3},
        "routes": {"plain": {"upstream": upstream.url}},
    }, name="shorthold")


def test_hold_timeout_then_approval_then_one_retry(short_hold: Gateway, keys: Keys, lead: str,
                                                   upstream: Upstream) -> None:
    gw = short_hold
    first = refund(gw, keys)
    assert first.status == 403
    err = first.json()["error"]
    assert err["code"] == "approval_pending"
    approval_id = first.headers[APPROVAL_ID.lower()]
    assert approval_id in err["message"]
    assert gw.audit_row(first.headers[CALL_ID])["outcome"] == "approval_expired"
    assert gw.call_admin("POST", f"/v1/approvals/{approval_id}/approve", lead, {"reason": "ok"}).status == 200

    before = refunds_seen(upstream)
    retry = refund(gw, keys)
    assert retry.status == 200, retry.body
    assert refunds_seen(upstream) == before + 1
    row = gw.audit_row(retry.headers[CALL_ID])
    assert (row["outcome"], row["approval_id"]) == ("approved", approval_id)

    second = refund(gw, keys)
    assert second.status == 403 and second.json()["error"]["code"] == "approval_pending"
    assert second.headers[APPROVAL_ID.lower()] != approval_id, "an approval passes exactly once"
    changed = refund(gw, keys, b'{"order": "1042", "amount": 3000}')
    assert changed.status == 403
    assert changed.headers[APPROVAL_ID.lower()] not in (approval_id, second.headers[APPROVAL_ID.lower()])
    assert refunds_seen(upstream) == before + 1


class Hooks:
    """Loopback webhook receivers: one that records, one that never answers."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.hanging = 0
        self.release = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.up = Upstream()

    def app(self) -> web.Application:
        app = web.Application()

        async def ok(request: web.Request) -> web.Response:
            self.received.append({"path": request.path, "body": await request.json()})
            return web.Response(status=204)

        async def hang(request: web.Request) -> web.Response:
            self.hanging += 1
            self.loop = asyncio.get_running_loop()
            await self.release.wait()
            return web.Response(status=204)

        async def fail(request: web.Request) -> web.Response:
            self.received.append({"path": request.path, "body": None})
            return web.Response(status=500)

        app.router.add_post("/ok", ok)
        app.router.add_post("/slack", ok)
        app.router.add_post("/hang", hang)
        app.router.add_post("/fail", fail)
        return app


def test_webhooks_notify_without_delaying_calls(gateway_factory, keys: Keys, lead: str, upstream: Upstream,
                                                 tmp_path: Path) -> None:
    hooks = Hooks()
    stop = start_upstream(hooks.up, tmp_path, hooks.app())
    base = hooks.up.url
    try:
        gw = gateway_factory({
            "approval": {"hold_seconds": 0.3, "webhooks": [
                {"url": f"{base}/hang", "timeout_seconds": 30, "retries": 0},
                {"url": f"{base}/fail", "retries": 2},
                {"url": f"{base}/ok"},
                {"url": f"{base}/slack", "format": "slack"},
            ]},
            "routes": {"plain": {"upstream": upstream.url}},
        }, name="webhooks")
        held = refund(gw, keys)
        assert held.status == 403 and held.json()["error"]["code"] == "approval_pending"
        approval_id = held.headers[APPROVAL_ID.lower()]
        wait_until(lambda: {r["path"] for r in hooks.received} >= {"/ok", "/slack"}, what="webhook deliveries")
        plain = next(r["body"] for r in hooks.received if r["path"] == "/ok")
        assert plain["event"] == "approval.pending" and plain["approval"]["id"] == approval_id
        slack = next(r["body"] for r in hooks.received if r["path"] == "/slack")
        assert approval_id in slack["text"] and slack["blocks"]
        wait_until(lambda: sum(r["path"] == "/fail" for r in hooks.received) == 3, what="failing hook retried")
        # The hanging receiver still holds its request; the gateway keeps serving.
        assert hooks.hanging == 1
        ok = http("GET", gw.route_url("plain", "/while-hook-hangs"),
                  headers={"Authorization": f"Bearer {keys.token()}"})
        assert ok.status == 200
    finally:
        if hooks.loop is not None:
            hooks.loop.call_soon_threadsafe(hooks.release.set)
        stop()


def test_pending_approval_survives_restart(gateway_factory, keys: Keys, lead: str, upstream: Upstream,
                                           tmp_path: Path) -> None:
    overrides = {"data_dir": str(tmp_path / "data"), "approval": {"hold_seconds": 0.2},
                 "routes": {"plain": {"upstream": upstream.url}}}
    gw = gateway_factory(overrides, name="restart-a")
    held = refund(gw, keys, b'{"order": "restart", "amount": 5}')
    approval_id = held.headers[APPROVAL_ID.lower()]
    gw.stop()
    gw2 = gateway_factory(overrides, name="restart-b")
    assert [a["id"] for a in pending(gw2, lead)] == [approval_id]
    assert gw2.call_admin("POST", f"/v1/approvals/{approval_id}/approve", lead, {"reason": "after restart"}).status == 200
    retry = refund(gw2, keys, b'{"order": "restart", "amount": 5}')
    assert retry.status == 200
    assert gw2.audit_row(retry.headers[CALL_ID])["approval_id"] == approval_id
