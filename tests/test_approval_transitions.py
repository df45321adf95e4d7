"""An approval is opened and changed once across replicas (storage/state_schema.py
``claim_transition``): two ``Approvals`` on one real chDB store stand for two replicas whose
views of an approval are both current when they act at the same moment. A claim whose row its
claimant never wrote (it stopped in between) is simulated by claiming directly."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from gateway.approvals import (APPROVAL_HEADER, APPROVED, CONSUMED, DENIED, PENDING, Approval, ApprovalError,
                               Approvals, creation_key, request_hash)
from gateway.config import ApprovalConfig
from gateway.errors import Forbidden
from gateway.models import Call, Identity
from storage.state_schema import TRANSITIONS, ClaimNotStored, claim_transition
from storage.store import Store
from tests.storage_helpers import make_call, select, store  # noqa: F401 (store: a fixture)

ADMIN = Identity("lead", None, ("admin",))


def replica(store: Store) -> Approvals:
    return Approvals(store, ApprovalConfig(hold_seconds=0), registry=None, notify=lambda a: None,
                     scrub=lambda v: v)


async def held(a: Approvals) -> str:
    """A call held on ``a`` until its hold (0 s) ends: the pending approval's id."""
    with pytest.raises(Forbidden) as exc:
        await a.hold(make_call(outcome=""))
    assert exc.value.code == "approval_pending"
    (approval,) = a.list()
    return approval.id


async def test_a_claim_holds_and_later_claims_learn_it(store: Store) -> None:
    first = await store.run(claim_transition, store.database, "apr_x", 2, "A", '{"by":"A"}')
    second = await store.run(claim_transition, store.database, "apr_x", 2, "B", '{"by":"B"}')
    assert first == second == ("A", '{"by":"A"}')
    assert await store.run(claim_transition, store.database, "apr_x", 3, "B", '{"by":"B"}') == ("B", '{"by":"B"}')


async def test_approve_here_and_deny_there_at_once_one_wins(store: Store) -> None:
    a, b = replica(store), replica(store)
    approval_id = await held(a)
    await b.refresh()
    results = await asyncio.gather(
        a.decide(approval_id, approve=True, reason="ok", actor=ADMIN, approver_teams=None),
        b.decide(approval_id, approve=False, reason="no", actor=ADMIN, approver_teams=None),
        return_exceptions=True)
    refused = [r for r in results if isinstance(r, ApprovalError)]
    assert len(refused) == 1 and refused[0].code == "already_decided" and refused[0].status == 409, results
    assert a.get(approval_id).state == b.get(approval_id).state in (APPROVED, DENIED)
    await a.refresh(), await b.refresh()
    assert a.get(approval_id) == b.get(approval_id)  # and the store agrees


async def test_one_pass_for_two_retries_on_two_replicas(store: Store) -> None:
    a, b = replica(store), replica(store)
    approval_id = await held(a)
    await a.decide(approval_id, approve=True, reason="ok", actor=ADMIN, approver_teams=None)
    await b.refresh()
    assert b.get(approval_id).state == APPROVED
    results = await asyncio.gather(a.hold(make_call(outcome="")), b.hold(make_call(outcome="")),
                                   return_exceptions=True)
    passed = [r for r in results if r is None]
    assert len(passed) == 1, results  # the other retry is held anew (hold 0 s: approval_pending)
    assert all(isinstance(r, Forbidden) and r.code == "approval_pending" for r in results if r is not None)
    await a.refresh()
    assert a.get(approval_id).state == CONSUMED


async def test_a_killswitch_denial_and_a_retry_at_once(store: Store) -> None:
    """The retry that uses the pass first went through; a denial after it changes nothing."""
    from gateway.killswitch import KillSwitch

    a, b = replica(store), replica(store)
    approval_id = await held(a)
    await a.decide(approval_id, approve=True, reason="ok", actor=ADMIN, approver_teams=None)
    await b.refresh()
    switch = KillSwitch(id="ks_1", scope="agent", target="agent-7", reason="drill", created_by="oncall",
                        created_at=0.0)
    retry = make_call(outcome="")
    results = await asyncio.gather(a.hold(retry), b.deny_for_killswitch(switch), return_exceptions=True)
    await a.refresh(), await b.refresh()
    final = a.get(approval_id)
    assert final == b.get(approval_id)
    if results[0] is None:
        assert final.state == CONSUMED and final.consumed_by_call == retry.call_id
    else:
        assert final.state == DENIED and isinstance(results[0], Forbidden)


# -- opening an approval --------------------------------------------------------------------------
async def pending_id(a: Approvals, call: Call | None = None) -> str:
    """Hold ``call`` (by default the usual request) on ``a`` until its 0 s hold ends: the approval id."""
    with pytest.raises(Forbidden) as exc:
        await a.hold(call or make_call(outcome=""))
    assert exc.value.code == "approval_pending"
    return exc.value.headers[APPROVAL_HEADER]


async def approval_rows(store: Store) -> list[tuple]:
    return await select(store, "SELECT id, state, version FROM agentgate.approvals FINAL ORDER BY created_at")


async def test_two_replicas_holding_one_request_at_once_open_one_approval(store: Store) -> None:
    a, b = replica(store), replica(store)
    ids = await asyncio.gather(pending_id(a), pending_id(b))
    assert ids[0] == ids[1], ids  # both callers wait on (and are told) the same approval
    assert [x.id for x in a.list()] == [x.id for x in b.list()] == [ids[0]]
    assert [r[0] for r in await approval_rows(store)] == [ids[0]]
    # Deciding it on either replica releases the request on both.
    await b.decide(ids[0], approve=True, reason="ok", actor=ADMIN, approver_teams=None)
    await a.refresh()
    assert a.get(ids[0]).state == APPROVED


async def test_a_request_is_held_anew_once_its_approval_ended(store: Store) -> None:
    """Only a live approval is shared: after a denial, the next identical request opens a new one,
    on a replica that never saw the first approval too, and the other replica adopts it."""
    a, b = replica(store), replica(store)
    first = await pending_id(a)
    await a.decide(first, approve=False, reason="no", actor=ADMIN, approver_teams=None)
    second = await pending_id(b)  # b has not refreshed: it knows nothing of the first approval
    assert second != first
    assert await pending_id(a) == second
    assert [(r[0], r[1]) for r in await approval_rows(store)] == [(first, DENIED), (second, PENDING)]


async def test_a_claim_forgotten_by_the_ttl_but_still_deduplicated_is_skipped(store: Store) -> None:
    """The table's TTL removes old claims, yet ClickHouse may still deduplicate against their
    tokens: opening the request again takes the next generation rather than failing."""
    call = make_call(outcome="")
    key = creation_key("agent-7", request_hash(call))
    await store.run(claim_transition, store.database, key, 1, "long-gone", '{"id":"apr_old"}')
    await store.run(lambda c: c.command(f"ALTER TABLE agentgate.{TRANSITIONS} DELETE WHERE 1",
                                        settings={"mutations_sync": 2}))
    with pytest.raises(ClaimNotStored):  # the situation the test is about
        await store.run(claim_transition, store.database, key, 1, "again", '{"id":"apr_new"}')
    a, b = replica(store), replica(store)
    assert await pending_id(a) == await pending_id(b)


# -- a claimant that stopped between its claim and its row ----------------------------------------
async def test_refresh_applies_a_change_claimed_by_a_replica_that_stopped(store: Store) -> None:
    a, b = replica(store), replica(store)
    approval_id = await pending_id(a)
    await b.refresh()
    pending = b.get(approval_id)
    approved = replace(pending, state=APPROVED, decided_by="lead", decided_role="admin", decided_at=time.time(),
                       decision_reason="ok", version=pending.version + 1)
    # The claimant stops here: its claim is stored, the approvals row is not written.
    await store.run(claim_transition, store.database, approval_id, approved.version, "crashed", approved.record())
    await b.refresh()
    assert b.get(approval_id) == approved
    assert await approval_rows(store) == [(approval_id, APPROVED, approved.version)]  # b wrote the row
    await a.refresh()  # a reads the repaired row (times to the microsecond)
    assert (a.get(approval_id).state, a.get(approval_id).version) == (APPROVED, approved.version)


async def test_refresh_shows_an_approval_whose_opener_stopped_before_its_row(store: Store) -> None:
    a, b = replica(store), replica(store)
    call = make_call(outcome="")
    now = time.time()
    opened = Approval(id="apr_orphan", state=PENDING, agent_id="agent-7", team="blue", method="POST",
                      host="api.example.com", path="/v1/repos/x/issues", route="github", tool_name="create_issue",
                      arguments="", reasons=("no_writes",), approvers=(), request_hash=request_hash(call),
                      call_id=call.call_id, created_at=now, expires_at=now + 900)
    # The opener stops here: its claim is stored, the approvals row is not written.
    await store.run(claim_transition, store.database, creation_key("agent-7", opened.request_hash), 1,
                    "crashed", opened.record())
    await b.refresh()
    assert b.get("apr_orphan") == opened
    assert await approval_rows(store) == [("apr_orphan", PENDING, 1)]
    assert await pending_id(a, call) == "apr_orphan"  # the same request waits on it
