"""Human approval holds for high-risk calls.

A decision with ``require_approval`` holds the call: nothing reaches the upstream until a
person with one of the decision's approver roles decides. The approval is bound to the exact
request (a hash of agent, method, canonical URL and body); it lives in ClickHouse so replicas
share it and a restart keeps it, and replicas holding the same request at once open one approval
between them. If the hold ends first, the agent gets 403
``approval_pending``; once approved, its retry of the identical request passes exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gateway.config import ApprovalConfig
from gateway.errors import Forbidden, GatewayError
from gateway.killswitch import KillSwitch, from_datetime, to_datetime
from gateway.models import Call, Identity
from gateway.registry import AgentRegistry
from gateway.request_body import known_content
from storage.state_schema import (APPROVAL_COLUMNS, APPROVALS, ClaimNotStored, claim_transition, latest_claim,
                                  latest_rows, newest_claims)
from storage.store import Store, insert_rows

log = logging.getLogger("agentgate.approvals")

_COLUMN_NAMES = tuple(n for n, _ in APPROVAL_COLUMNS)
_COLUMN_TYPES = tuple(t for _, t in APPROVAL_COLUMNS)
APPROVAL_HEADER = "X-Agentgate-Approval-Id"
MAX_ARGUMENTS_CHARS = 4096
KEPT_AFTER_EXPIRY = 60  # seconds an expired approval stays listed (and loaded from the store)
MAX_SKIPPED_GENERATIONS = 100  # a bound, should a store keep answering that a claim was not stored

PENDING, APPROVED, DENIED, CONSUMED = "pending", "approved", "denied", "consumed"


def request_hash(call: Call) -> str:
    """Binds an approval to the exact request: agent, method, canonical URL and body.

    An MCP ``tools/call`` is bound to its tool and arguments instead of the raw body: MCP
    clients send a new JSON-RPC id with every retry, and the id is not what a person approved.
    """
    req = call.request
    ident = call.identity
    assert ident is not None
    url = f"{req.scheme}://{call.canonical_host}:{req.port}{call.canonical_path}?{req.query}"
    tool = call.tool_input or {}
    if call.rpc_method == "tools/call" and "name" in tool:
        what = json.dumps(["mcp", tool.get("server"), tool.get("name"), tool.get("arguments")],
                          sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    else:
        what = hashlib.sha256(req.body).hexdigest()
    doc = json.dumps([ident.agent_id, req.route or "", req.method, url, what], separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


def creation_key(agent_id: str, digest: str) -> str:
    """The key under which the opening of an approval for this request is claimed (Approvals._create)."""
    return f"request:{agent_id}:{digest}"


@dataclass(frozen=True, slots=True)
class Approval:
    id: str
    state: str
    agent_id: str
    team: str
    method: str
    host: str
    path: str
    route: str
    tool_name: str
    arguments: str
    reasons: tuple[str, ...]
    approvers: tuple[str, ...]
    request_hash: str
    call_id: str
    created_at: float
    expires_at: float
    decided_by: str = ""
    decided_role: str = ""
    decided_at: float | None = None
    decision_reason: str = ""
    consumed_at: float | None = None
    consumed_by_call: str = ""
    version: int = 1

    def effective_state(self, now: float | None = None) -> str:
        """``expired`` when the TTL passed before the approval was used."""
        if self.state in (PENDING, APPROVED) and (now or time.time()) >= self.expires_at:
            return "expired"
        return self.state

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["state"] = self.effective_state()
        doc["reasons"] = list(self.reasons)
        doc["approvers"] = list(self.approvers)
        try:
            doc["arguments"] = json.loads(self.arguments) if self.arguments else None
        except ValueError:
            pass
        doc.pop("version")
        return doc

    def row(self) -> tuple[Any, ...]:
        values = asdict(self)
        values["reasons"] = list(self.reasons)
        values["approvers"] = list(self.approvers)
        for key in ("created_at", "expires_at", "decided_at", "consumed_at"):
            values[key] = to_datetime(values[key])
        return tuple(values[n] for n in _COLUMN_NAMES)

    def record(self) -> str:
        """The whole approval as JSON (what a claimed change carries to the other replicas)."""
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_record(cls, text: str) -> "Approval":
        return cls._of(json.loads(text))

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Approval":
        values = dict(row)
        for key in ("created_at", "expires_at", "decided_at", "consumed_at"):
            values[key] = from_datetime(values[key])
        return cls._of(values)

    @classmethod
    def _of(cls, values: dict[str, Any]) -> "Approval":
        """From the field values of a row or a record (JSON/ClickHouse lists become tuples)."""
        values["reasons"] = tuple(values["reasons"])
        values["approvers"] = tuple(values["approvers"])
        values["version"] = int(values["version"])
        return cls(**values)


@dataclass(slots=True)
class _Waiters:
    events: list[asyncio.Event] = field(default_factory=list)


class ApprovalError(GatewayError):
    """An approver's action that cannot be done (unknown, already decided, not allowed)."""


def _arguments_preview(call: Call, scrub: Any) -> str:
    """What the approver sees of the request body: parsed JSON when it parses, scrubbed."""
    body = known_content(call.request)  # inflated, when policy read it inflated
    if not body:
        return ""
    try:
        value: Any = json.loads(body)
    except ValueError:
        value = body[:MAX_ARGUMENTS_CHARS].decode("utf-8", "replace")
    text = json.dumps(scrub(value), separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= MAX_ARGUMENTS_CHARS else json.dumps(text[:MAX_ARGUMENTS_CHARS] + "…")


class Approvals:
    """Open approvals of this replica, backed by the shared store."""

    def __init__(self, store: Store, cfg: ApprovalConfig, *, registry: AgentRegistry | None,
                 notify: Any, scrub: Any) -> None:
        self.store = store
        self.cfg = cfg
        self.registry = registry
        self.notify = notify
        self.scrub = scrub
        self._by_id: dict[str, Approval] = {}
        self._waiters: dict[str, _Waiters] = {}
        self._lock = asyncio.Lock()

    # -- the pipeline's stage -----------------------------------------------------------------
    async def hold(self, call: Call) -> None:
        """Return when the call may go upstream; raise a 403 otherwise."""
        assert call.identity is not None and call.decision is not None
        digest = request_hash(call)
        async with self._lock:
            approval = self._find(call.identity.agent_id, digest) or await self._create(call, digest)
            if approval.state == APPROVED:
                if await self._consume(approval, call):
                    return
                # Another call (on any replica) used it, or it was denied meanwhile.
                approval = await self._create(call, digest)
        call.approval_id = approval.id
        # An adopted approval can have been decided already: then there is nothing to wait for.
        decided = approval.state != PENDING or await self._wait(approval.id, self.cfg.hold_seconds)
        async with self._lock:
            current = self._by_id[approval.id]
            if current.state == APPROVED and current.effective_state() == APPROVED:
                if await self._consume(current, call):
                    return
                current = self._by_id[approval.id]
        self._mark(call, current)
        if current.state == DENIED:
            raise Forbidden(f"approval {current.id} denied by {current.decided_by}: {current.decision_reason}",
                            code="approval_denied", outcome="approval_denied",
                            headers={APPROVAL_HEADER: current.id})
        if current.state == CONSUMED and decided:
            # Approved, but a concurrent identical request used the one pass first.
            log.info("approval %s was used by call %s first", current.id, current.consumed_by_call)
        raise Forbidden(
            f"call held for approval {current.id}; no decision within {self.cfg.hold_seconds:g}s. "
            f"Retry the identical request once it is approved (until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(current.expires_at))})",
            code="approval_pending", outcome="approval_expired", headers={APPROVAL_HEADER: current.id})

    def _find(self, agent_id: str, digest: str) -> Approval | None:
        now = time.time()
        for approval in self._by_id.values():
            if approval.agent_id == agent_id and approval.request_hash == digest \
                    and approval.effective_state(now) in (PENDING, APPROVED):
                return approval
        return None

    @staticmethod
    def _mark(call: Call, approval: Approval) -> None:
        call.approval_id = approval.id
        call.approver = approval.decided_by
        call.decided_at_ns = int(approval.decided_at * 1e9) if approval.decided_at else 0
        if approval.state == APPROVED:
            call.outcome = "approved"

    async def _create(self, call: Call, digest: str) -> Approval:
        """The open approval for this request: a new one, or the one another replica opened for it.

        Opening is claimed once across replicas like a change (``_transition``), under the
        request's ``creation_key`` (the agent and request digest ``_find`` matches on) and a
        generation as the version. Generation n + 1 is claimed only once the approval of
        generation n has ended (expired, denied or consumed): replicas that miss at the same moment
        claim the same ``key@n+1``, the first claim is the approval and the others adopt it (same
        id), while the same request after that approval ended opens generation n + 2. The
        generation and the state of its approval are read from the store, not from this replica's
        view, which lags behind other replicas and forgets approvals that expired a while ago (a
        token from a replica's own count, or from the clock, would let racing replicas disagree).
        """
        assert call.identity is not None
        key = creation_key(call.identity.agent_id, digest)
        generation = 0
        latest = await self.store.run(latest_claim, self.store.database, key)
        if latest is not None:
            generation, record = latest
            prior = await self._newest(Approval.from_record(record))
            if prior.effective_state() in (PENDING, APPROVED):
                self._apply_one(prior)
                log.info("approval %s for agent %s adopted from another replica", prior.id, prior.agent_id)
                return prior
        draft = self._draft(call, digest)
        claimant = uuid.uuid4().hex
        # A generation whose claim the table's TTL removed can still be taken (ClaimNotStored): skip it.
        for generation in range(generation + 1, generation + 1 + MAX_SKIPPED_GENERATIONS):
            try:
                holder, record = await self.store.run(claim_transition, self.store.database, key, generation,
                                                      claimant, draft.record())
                break
            except ClaimNotStored:
                continue
        else:
            raise ClaimNotStored(f"no generation of {key} could be claimed")
        if holder != claimant:  # another replica opened it first
            won = Approval.from_record(record)
            await self._persist(won)  # idempotent; covers a claimant that stopped before writing it
            self._apply_one(won)
            return self._by_id.get(won.id, won)
        await self._persist(draft)
        self._apply_one(draft)
        log.info("approval %s pending for agent %s: %s %s%s", draft.id, draft.agent_id,
                 draft.method, draft.host, draft.path)
        self.notify(draft)
        return draft

    def _draft(self, call: Call, digest: str) -> Approval:
        ident, decision, req = call.identity, call.decision, call.request
        assert ident is not None and decision is not None
        now = time.time()
        return Approval(
            id=f"apr_{uuid.uuid4().hex[:16]}", state=PENDING, agent_id=ident.agent_id, team=ident.team or "",
            method=req.method, host=call.canonical_host, path=call.canonical_path, route=req.route or "",
            tool_name=call.tool_name, arguments=_arguments_preview(call, self.scrub),
            reasons=tuple(decision.reasons), approvers=tuple(decision.approvers), request_hash=digest,
            call_id=call.call_id, created_at=now, expires_at=now + self.cfg.ttl_seconds)

    async def _newest(self, approval: Approval) -> Approval:
        """The newest of ``approval``, this replica's copy and the last change claimed for it."""
        latest = await self.store.run(latest_claim, self.store.database, approval.id)
        known = [approval, self._by_id.get(approval.id), Approval.from_record(latest[1]) if latest else None]
        return max((a for a in known if a is not None), key=lambda a: a.version)

    async def _consume(self, approval: Approval, call: Call) -> bool:
        """Use the approval's one pass for ``call``; False if another call (or a denial) came first."""
        used = replace(approval, state=CONSUMED, consumed_at=time.time(), consumed_by_call=call.call_id,
                       version=approval.version + 1)
        if await self._transition(used) is not used:
            log.info("approval %s: call %s lost the pass to another change", approval.id, call.call_id)
            return False
        self._mark(call, approval)
        return True

    async def _transition(self, new: Approval) -> Approval:
        """Make the change ``new`` (a version above the one it was made from), once across
        replicas: returns ``new`` if it happened, else the change that did (now applied here).

        See storage/state_schema.py: the change is claimed in the store first; only the claimant
        that holds writes the new version."""
        claimant = uuid.uuid4().hex
        holder, record = await self.store.run(claim_transition, self.store.database, new.id, new.version,
                                              claimant, new.record())
        if holder == claimant:
            await self._persist(new)
            self._apply_one(new)
            return new
        won = Approval.from_record(record)
        await self._persist(won)  # idempotent; covers a claimant that stopped before writing it
        self._apply_one(won)
        return won

    async def _wait(self, approval_id: str, timeout: float) -> bool:
        event = asyncio.Event()
        self._waiters.setdefault(approval_id, _Waiters()).events.append(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.events.remove(event)
                if not waiters.events:
                    del self._waiters[approval_id]

    # -- approvers -----------------------------------------------------------------------------
    def list(self, state: str | None = None) -> list[Approval]:
        now = time.time()
        items = [a for a in self._by_id.values() if state is None or a.effective_state(now) == state]
        return sorted(items, key=lambda a: a.created_at)

    def get(self, approval_id: str) -> Approval | None:
        return self._by_id.get(approval_id)

    async def decide(self, approval_id: str, *, approve: bool, reason: str, actor: Identity,
                     approver_teams: list[str] | None) -> Approval:
        async with self._lock:
            approval = self._by_id.get(approval_id)
            if approval is None:
                raise ApprovalError(f"no approval {approval_id}", code="not_found", status=404)
            state = approval.effective_state()
            if state != PENDING:
                raise ApprovalError(f"approval {approval_id} is already {state}; a decision is final",
                                    code="already_decided", status=409)
            role = self._approver_role(approval, actor)
            if actor.agent_id == approval.agent_id:  # whatever its roles, and allow_self_approval
                raise ApprovalError(f"{actor.agent_id} may not decide on its own call",
                                    code="self_approval", status=403)
            if approver_teams is not None and approval.team not in approver_teams:
                raise ApprovalError(f"you may approve only for the teams {', '.join(approver_teams) or '(none)'}",
                                    code="team_not_allowed", status=403)
            if approve and not self.cfg.allow_self_approval and self._owns(actor, approval.agent_id):
                raise ApprovalError(f"{actor.agent_id} owns agent {approval.agent_id} and may not approve its calls",
                                    code="self_approval", status=403)
            decided = replace(approval, state=APPROVED if approve else DENIED, decided_by=actor.agent_id,
                              decided_role=role, decided_at=time.time(), decision_reason=reason,
                              version=approval.version + 1)
            happened = await self._transition(decided)
            if happened is not decided:  # decided (or used, or denied by a kill-switch) elsewhere first
                raise ApprovalError(f"approval {approval_id} is already {happened.effective_state()}; "
                                    "a decision is final", code="already_decided", status=409)
            return decided

    def _approver_role(self, approval: Approval, actor: Identity) -> str:
        if "admin" in actor.roles:
            return "admin"
        allowed = [r for r in actor.roles if r in approval.approvers]
        if not allowed:
            raise ApprovalError(f"approval {approval.id} needs one of the roles "
                                f"{', '.join(approval.approvers) or '(none named by the policy)'}",
                                code="forbidden_role", status=403)
        return allowed[0]

    def _owns(self, actor: Identity, agent_id: str) -> bool:
        record = self.registry.get(agent_id) if self.registry else None
        if record is None or not record.owner:
            return False
        ids = {actor.agent_id.casefold(), str(actor.claims.get("email", "")).casefold()}
        return record.owner.casefold() in ids

    async def deny_for_killswitch(self, switch: KillSwitch) -> None:
        """A killed agent's held approvals end as denied, approved ones not yet used included:
        reviving the agent must not revive what was approved before it was stopped."""
        async with self._lock:
            for approval in list(self._by_id.values()):
                if approval.effective_state() not in (PENDING, APPROVED):
                    continue
                ident = Identity(agent_id=approval.agent_id, team=approval.team or None)
                if not switch.matches(ident, self.registry):
                    continue
                denied = replace(approval, state=DENIED, decided_by=f"killswitch:{switch.id}",
                                 decided_role="operator", decided_at=time.time(),
                                 decision_reason=f"agent suspended: {switch.reason}", version=approval.version + 1)
                await self._transition(denied)  # a pass used meanwhile stays used: it went through

    # -- replication ---------------------------------------------------------------------------
    def apply(self, approvals: list[Approval]) -> None:
        for approval in approvals:
            self._apply_one(approval)

    def _apply_one(self, approval: Approval) -> None:
        known = self._by_id.get(approval.id)
        if known is not None and known.version >= approval.version:
            return
        self._by_id[approval.id] = approval
        if approval.state != PENDING:
            for event in self._waiters.get(approval.id, _Waiters()).events:
                event.set()
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = time.time() - KEPT_AFTER_EXPIRY
        for key in [k for k, a in self._by_id.items() if a.expires_at < horizon]:
            del self._by_id[key]

    async def _persist(self, approval: Approval) -> None:
        db = self.store.database
        await self.store.run(insert_rows, APPROVALS, [approval.row()], db, _COLUMN_NAMES, _COLUMN_TYPES)

    async def refresh(self) -> None:
        """Load approvals that can still matter (not yet expired) from the store.

        A change is claimed before its row is written (``_transition``, ``_create``), so a
        claimant that stopped in between left the row behind its claim: claims newer than the
        rows are applied as well, and their rows written (the same row whoever writes it, so
        replicas repairing at once, or the claimant resuming, do no harm)."""
        db = self.store.database
        rows = await self.store.run(latest_rows, db, APPROVALS, _COLUMN_NAMES,
                                    f"expires_at > now64(6) - INTERVAL {KEPT_AFTER_EXPIRY} SECOND")
        stored = {a.id: a for a in map(Approval.from_row, rows)}
        # An approval's changes are all claimed while it is open, within its TTL of its opening.
        records = await self.store.run(newest_claims, db, KEPT_AFTER_EXPIRY,
                                       math.ceil(self.cfg.ttl_seconds) + KEPT_AFTER_EXPIRY)
        behind: dict[str, Approval] = {}  # an approval's opening and its changes: the newest stays
        for approval in sorted(map(Approval.from_record, records), key=lambda a: a.version):
            if approval.id not in stored or stored[approval.id].version < approval.version:
                behind[approval.id] = approval
        self.apply([*stored.values(), *behind.values()])
        for approval in behind.values():
            log.info("approval %s: version %d is claimed but not written yet; writing it",
                     approval.id, approval.version)
            await self._persist(approval)
