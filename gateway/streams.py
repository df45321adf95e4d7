"""Open long-lived responses (streams, SSE, downloads) per agent, so a kill-switch can cut them."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.killswitch import KillSwitch
from gateway.models import Call
from gateway.registry import AgentRegistry

log = logging.getLogger("agentgate.streams")


class OpenStreams:
    def __init__(self, registry: AgentRegistry | None) -> None:
        self._open: dict[str, tuple[Call, Callable[[], None]]] = {}
        self.registry = registry  # a team switch cuts the streams of the agents it lists there too

    def add(self, call: Call, cut: Callable[[], None]) -> None:
        self._open[call.call_id] = (call, cut)

    def discard(self, call: Call) -> None:
        self._open.pop(call.call_id, None)

    def __len__(self) -> int:
        return len(self._open)

    def cut_matching(self, switch: KillSwitch) -> int:
        cut = 0
        for call_id, (call, stop) in list(self._open.items()):
            if call.identity is not None and switch.matches(call.identity, self.registry):
                call.killswitch_id = switch.id
                call.reasons.append(f"stream cut by kill-switch {switch.id}: {switch.reason}")
                del self._open[call_id]
                stop()
                cut += 1
        if cut:
            log.warning("kill-switch %s cut %d open stream(s)", switch.id, cut)
        return cut
