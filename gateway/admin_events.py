"""Every admin action, and every refused admin attempt, as a row of ``agentgate.admin_events``."""

from __future__ import annotations

import datetime as dt
import logging
from gateway.models import Identity
from storage.state_schema import ADMIN_EVENT_COLUMNS, ADMIN_EVENTS
from storage.store import Store, insert_rows

log = logging.getLogger("agentgate.admin")
_NAMES = tuple(n for n, _ in ADMIN_EVENT_COLUMNS)
_TYPES = tuple(t for _, t in ADMIN_EVENT_COLUMNS)


class AdminEvents:
    def __init__(self, store: Store, instance: str) -> None:
        self.store = store
        self.instance = instance

    async def record(self, actor: Identity | None, action: str, target: str, *, reason: str = "",
                     result: str = "ok", detail: str = "") -> None:
        """Durable before the admin call answers: an operator's action is never unlogged."""
        row = (dt.datetime.now(dt.timezone.utc), actor.agent_id if actor else "",
               list(actor.roles) if actor else [], action, target, reason, result, detail, self.instance)
        db = self.store.database
        try:
            await self.store.run(insert_rows, ADMIN_EVENTS, [row], db, _NAMES, _TYPES)
        except Exception:  # noqa: BLE001
            log.exception("could not record admin event %s on %s", action, target)
            raise
