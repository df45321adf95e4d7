"""Keep this replica's kill-switches and approvals in step with the shared store."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.approvals import Approvals
from gateway.killswitch import KillSwitches

log = logging.getLogger("agentgate.state")


class StateSync:
    """Polls the store every ``interval`` seconds: a switch flipped or an approval decided on
    another replica takes effect here within one interval (plus the query time)."""

    def __init__(self, killswitches: KillSwitches, approvals: Approvals, interval: float) -> None:
        self.killswitches = killswitches
        self.approvals = approvals
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    async def start(self) -> None:
        await self.refresh()  # fail start-up loudly if the state cannot be read at all
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def refresh(self) -> None:
        await self.killswitches.save_unsaved()
        await self.killswitches.refresh()
        await self.approvals.refresh()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep polling; the last known state stays
                self.failures += 1
                log.warning("state refresh failed (%s); keeping the last known state", type(exc).__name__)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
