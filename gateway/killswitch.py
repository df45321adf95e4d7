"""Kill-switches: stop one agent, a team, or every agent, at once and on every replica.

The switches live in ClickHouse (``agentgate.killswitches``) so they survive restarts and are
shared by replicas; each replica keeps the active ones in memory for an O(1) check per request
and learns of switches flipped elsewhere from :class:`gateway.state_sync.StateSync`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from gateway.models import Identity
from gateway.registry import AgentRegistry
from storage.state_schema import KILLSWITCH_COLUMNS, KILLSWITCHES, latest_rows
from storage.store import Store, insert_rows

log = logging.getLogger("agentgate.killswitch")

Scope = Literal["agent", "team", "all"]
SCOPES: tuple[str, ...] = ("agent", "team", "all")
_COLUMN_NAMES = tuple(n for n, _ in KILLSWITCH_COLUMNS)
_COLUMN_TYPES = tuple(t for _, t in KILLSWITCH_COLUMNS)


def teams_of(identity: Identity, registry: AgentRegistry | None) -> frozenset[str]:
    """The casefolded teams a team switch stops this agent for: its token's team claim and the
    team of its registry entry. Either suffices (fail closed): an operator who stops a team
    expects every agent the registry lists under it to stop, whatever its token says."""
    teams = registry.teams(identity.agent_id) if registry is not None else frozenset()
    return (teams | {identity.team.casefold()}) if identity.team else teams


def to_datetime(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def from_datetime(value: Any) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


@dataclass(frozen=True, slots=True)
class KillSwitch:
    id: str
    scope: str
    target: str
    reason: str
    created_by: str
    created_at: float
    revoked_by: str = ""
    revoked_at: float | None = None
    version: int = 1

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def matches(self, identity: Identity, registry: AgentRegistry | None) -> bool:
        """Case-insensitively: an operator who types "Rogue-Bot" for "rogue-bot" must still stop it
        (a switch errs towards stopping too much, never too little). A team is the token's or the
        registry's (:func:`teams_of`)."""
        if self.scope == "all":
            return True
        if self.scope == "agent":
            return identity.agent_id.casefold() == self.target.casefold()
        return self.target.casefold() in teams_of(identity, registry)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "scope": self.scope, "target": self.target, "reason": self.reason,
                "created_by": self.created_by, "created_at": self.created_at,
                "revoked_by": self.revoked_by or None, "revoked_at": self.revoked_at, "active": self.active}

    def row(self) -> tuple[Any, ...]:
        return (self.id, self.scope, self.target, self.reason, self.created_by,
                to_datetime(self.created_at), self.revoked_by, to_datetime(self.revoked_at), self.version)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "KillSwitch":
        return cls(id=row["id"], scope=row["scope"], target=row["target"], reason=row["reason"],
                   created_by=row["created_by"], created_at=from_datetime(row["created_at"]) or 0.0,
                   revoked_by=row["revoked_by"], revoked_at=from_datetime(row["revoked_at"]),
                   version=int(row["version"]))


class KillSwitches:
    """The active kill-switches of this replica, backed by the shared store."""

    def __init__(self, store: Store, registry: AgentRegistry | None) -> None:
        self.store = store
        self.registry = registry
        """The agent registry: a team switch also stops the agents it lists under that team."""
        self._all: dict[str, KillSwitch] = {}
        self._global: dict[str, KillSwitch] = {}
        self._by_agent: dict[str, dict[str, KillSwitch]] = {}
        self._by_team: dict[str, dict[str, KillSwitch]] = {}
        self._unsaved: dict[str, KillSwitch] = {}
        self.on_kill: list[Callable[[KillSwitch], None]] = []
        """Called once per switch newly seen active (locally or from another replica)."""

    # -- the per-request check ------------------------------------------------------------
    def match(self, identity: Identity) -> KillSwitch | None:
        for switch in self._global.values():
            return switch
        if self._by_agent and (agent := self._by_agent.get(identity.agent_id.casefold())):
            return next(iter(agent.values()))
        if self._by_team:
            for name in teams_of(identity, self.registry):  # one or two dict lookups
                if team := self._by_team.get(name):
                    return next(iter(team.values()))
        return None

    def active(self) -> list[KillSwitch]:
        return sorted((s for s in self._all.values() if s.active), key=lambda s: s.created_at)

    def all(self) -> list[KillSwitch]:
        return sorted(self._all.values(), key=lambda s: s.created_at)

    def get(self, switch_id: str) -> KillSwitch | None:
        return self._all.get(switch_id)

    # -- changes ----------------------------------------------------------------------------
    async def create(self, scope: str, target: str, reason: str, actor: str) -> tuple[KillSwitch, bool]:
        """The new switch, in force here at once, and whether it is stored yet. A store that is
        down must not keep an operator from stopping an agent: the switch applies here now and
        is stored (for the other replicas) by :meth:`save_unsaved` as soon as the store is back."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        if scope == "all":
            target = "*"
        elif not target:
            raise ValueError(f"a {scope} kill-switch needs a target")
        switch = KillSwitch(id=f"ks_{uuid.uuid4().hex[:16]}", scope=scope, target=target, reason=reason,
                            created_by=actor, created_at=time.time())
        self.apply([switch])
        try:
            await self._persist(switch)
        except Exception as exc:  # noqa: BLE001 - in force here all the same; stored later
            log.error("kill-switch %s is in force on this replica but could not be stored (%s): "
                      "retrying with every state refresh", switch.id, type(exc).__name__)
            self._unsaved[switch.id] = switch
            return switch, False
        return switch, True

    async def save_unsaved(self) -> None:
        """Store switches created while the store was down (raises while it still is)."""
        for switch_id in list(self._unsaved):
            await self._persist(self._all.get(switch_id, self._unsaved[switch_id]))
            del self._unsaved[switch_id]
            log.info("kill-switch %s is stored now", switch_id)

    async def revoke(self, switch: KillSwitch, actor: str) -> KillSwitch:
        revoked = replace(switch, revoked_by=actor, revoked_at=time.time(), version=switch.version + 1)
        await self._persist(revoked)
        self.apply([revoked])
        return revoked

    async def _persist(self, switch: KillSwitch) -> None:
        db = self.store.database
        await self.store.run(insert_rows, KILLSWITCHES, [switch.row()], db, _COLUMN_NAMES, _COLUMN_TYPES)

    def apply(self, switches: list[KillSwitch]) -> None:
        """Merge switches (newer versions win) and fire ``on_kill`` for newly active ones."""
        for switch in switches:
            known = self._all.get(switch.id)
            if known is not None and known.version >= switch.version:
                continue
            self._all[switch.id] = switch
            index = self._index(switch)
            if switch.active:
                index[switch.id] = switch
                if known is None or not known.active:
                    log.warning("kill-switch %s on %s %s: %s", switch.id, switch.scope, switch.target, switch.reason)
                    for callback in self.on_kill:
                        callback(switch)
            else:
                index.pop(switch.id, None)
                self._prune()

    def _index(self, switch: KillSwitch) -> dict[str, KillSwitch]:
        if switch.scope == "all":
            return self._global
        book = self._by_agent if switch.scope == "agent" else self._by_team
        return book.setdefault(switch.target.casefold(), {})

    def _prune(self) -> None:
        for book in (self._by_agent, self._by_team):
            for key in [k for k, v in book.items() if not v]:
                del book[key]

    # -- loading ----------------------------------------------------------------------------
    async def refresh(self) -> None:
        rows = await self.store.run(latest_rows, self.store.database, KILLSWITCHES, _COLUMN_NAMES)
        self.apply([KillSwitch.from_row(r) for r in rows])
