"""Who may decide an approval, and what an approval survives (found by review; each test failed
before its fix)."""
from __future__ import annotations

import pytest

from tests.conftest import Gateway, Keys, Upstream, http, wait_until

APPROVAL_ID = "x-agentgate-approval-id"
REFUND = b'{"order": "1042", "amount": 30}'


def refunds(upstream: Upstream, marker: bytes) -> list:
    return [s for s in upstream.seen if s.path == "/refunds" and s.body == marker]


def refund(gw: Gateway, token: str, body: bytes, extra: dict | None = None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(extra or {})}
    return http("POST", gw.route_url("plain", "/refunds"), body=body, headers=headers)


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream, tmp_path_factory) -> Gateway:
    reg = tmp_path_factory.mktemp("reg") / "agents.toml"
    reg.write_text('[agents.refund-bot]\nowner = "Lead-Alice@Example.com"\nteam = "support"\n'
                   '[agents.ops-bot]\nowner = "someone-else"\nteam = "support"\n')
    return gateway_factory({"identity": {"registry_file": str(reg)},
                            "approval": {"hold_seconds": 0.3},
                            "routes": {"plain": {"upstream": upstream.url}}}, name="approval-deciders")


@pytest.fixture(scope="module")
def lead(keys: Keys) -> str:
    return keys.admin_token("lead-bob", roles=["approver", "support-lead"])


def test_agent_approves_its_own_call(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    """The requesting agent's own identity may decide its own approval (no actor == agent check).
    Its agent token cannot reach the admin API at all; an admin token with its subject tries."""
    body = b'{"order": "self", "amount": 999}'
    me = keys.token("ops-bot", roles=["writer", "approver", "support-lead"])
    first = refund(gw, me, body)
    assert first.status == 403 and first.json()["error"]["code"] == "approval_pending"
    approval_id = first.headers[APPROVAL_ID]
    me_admin = keys.admin_token("ops-bot", roles=["approver", "support-lead"])
    decided = gw.call_admin("POST", f"/v1/approvals/{approval_id}/approve", me_admin, {"reason": "I approve myself"})
    retry = refund(gw, me, body)
    assert decided.status == 403, f"ops-bot approved its own call: {decided.status} {decided.body[:200]!r}; retry {retry.status}"


def test_owner_check_is_case_sensitive_on_email(gw: Gateway, keys: Keys) -> None:
    body = b'{"order": "owner", "amount": 5}'
    first = refund(gw, keys.token("refund-bot", roles=["writer"]), body)
    approval_id = first.headers[APPROVAL_ID]
    owner = keys.admin_token("alice", roles=["approver", "support-lead"], email="lead-alice@example.com")
    decided = gw.call_admin("POST", f"/v1/approvals/{approval_id}/approve", owner, {"reason": "mine"})
    assert decided.status == 403, f"registry owner approved own agent's call (email case differs): {decided.status}"


def test_approved_approval_survives_kill_switch(gw: Gateway, keys: Keys, lead: str, upstream: Upstream) -> None:
    """README: a killed agent's held approvals end as denied. An approved-but-unused one is kept and
    honoured after the agent is revived."""
    operator = keys.admin_token("oncall", roles=["operator"])
    body = b'{"order": "kill", "amount": 77}'
    bot = keys.token("refund-bot", roles=["writer"])
    first = refund(gw, bot, body)
    approval_id = first.headers[APPROVAL_ID]
    assert gw.call_admin("POST", f"/v1/approvals/{approval_id}/approve", lead, {"reason": "ok"}).status == 200
    ks = gw.call_admin("POST", "/v1/killswitches", operator,
                       {"scope": "agent", "target": "refund-bot", "reason": "compromised"}).json()
    wait_until(lambda: refund(gw, bot, b"{}").status == 403, what="kill applied")
    wait_until(lambda: gw.call_admin("GET", f"/v1/approvals/{approval_id}", lead).json()["state"] == "denied",
               what="the approved, unused approval denied by the kill-switch")
    assert gw.call_admin("DELETE", f"/v1/killswitches/{ks['id']}", operator).status == 200
    retry = refund(gw, bot, body)
    assert retry.status == 403 and not refunds(upstream, body), "revived, the agent used the old approval"
