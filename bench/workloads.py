"""What the load generators send: small JSON GETs, 2 KB JSON POSTs, ticket retrievals."""

from __future__ import annotations

import json
from dataclasses import dataclass


def post_body(size: int = 2048) -> bytes:
    """A JSON document of exactly ``size`` bytes (a tool call's arguments, roughly)."""
    doc = {"tool": "search_tickets", "arguments": {"query": "refund", "limit": 20}, "pad": ""}
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["pad"] = "x" * max(0, size - base)
    return json.dumps(doc, separators=(",", ":")).encode()


POST_BODY = post_body()
TICKET_EMAIL = "ada@example.com"


@dataclass(frozen=True)
class Workload:
    name: str
    method: str
    path: str
    """Upstream path; route mode prefixes ``/r/<route>``."""
    body: bytes = b""

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"} if self.body else {}


GET = Workload("get", "GET", "/items/42")
POST = Workload("post", "POST", "/echo", POST_BODY)
TICKET = Workload("ticket", "GET", "/tickets/1")
"""A retrieval the example policy redacts (``ticket_read``: route demo, GET /tickets/...)."""
