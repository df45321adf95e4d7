"""An approval changes once across replicas (storage/state_schema.py ``claim_transition``): two
``Approvals`` on one real chDB store stand for two replicas whose views of an approval are
both current when they act at the same moment."""

from __future__ import annotations

import asyncio

import pytest

from gateway.approvals import APPROVED, CONSUMED, DENIED, ApprovalError, Approvals
from gateway.config import ApprovalConfig
from gateway.errors import Forbidden
from gateway.models import Identity
from storage.state_schema import claim_transition
from storage.store import Store
from tests.storage_helpers import make_call, store  # noqa: F401 (store: a fixture)

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
