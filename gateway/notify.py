"""Announce new pending approvals to webhooks (JSON or Slack-compatible), off the request path."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from gateway.config import WebhookConfig

log = logging.getLogger("agentgate.notify")
MAX_PENDING = 1000


def slack_message(approval: dict[str, Any]) -> dict[str, Any]:
    target = f"{approval['method']} {approval['host']}{approval['path']}"
    text = (f":raised_hand: agent *{approval['agent_id']}* wants `{target}` — approval `{approval['id']}` "
            f"needs one of: {', '.join(approval['approvers']) or 'admin'}")
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "; ".join(approval["reasons"]) or "-"}]},
        ],
    }


class Notifier:
    """Fire-and-forget webhook delivery with retries and a bound on undelivered messages."""

    def __init__(self, hooks: list[WebhookConfig]) -> None:
        self.hooks = hooks
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    async def start(self) -> None:
        if self.hooks:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def __call__(self, approval: Any) -> None:
        """Schedule delivery of ``approval`` (anything with ``to_json()``) to every hook."""
        if self._session is None:
            return
        doc = approval.to_json()
        for hook in self.hooks:
            if len(self._tasks) >= MAX_PENDING:
                self.failed += 1
                log.warning("webhook backlog full; approval %s not announced to %s", doc["id"], hook.url)
                continue
            payload = slack_message(doc) if hook.format == "slack" else {"event": "approval.pending",
                                                                           "approval": doc}
            task = asyncio.get_running_loop().create_task(self._deliver(hook, payload, doc["id"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, hook: WebhookConfig, payload: dict[str, Any], approval_id: str) -> None:
        assert self._session is not None
        delay = 0.2
        for attempt in range(hook.retries + 1):
            try:
                async with self._session.post(hook.url, json=payload, headers=hook.headers,
                                              timeout=aiohttp.ClientTimeout(total=hook.timeout_seconds)) as resp:
                    if resp.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = type(exc).__name__
            log.warning("webhook %s for approval %s failed (attempt %d): %s", hook.url, approval_id,
                        attempt + 1, problem)
            if attempt < hook.retries:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.failed += 1
