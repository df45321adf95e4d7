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
    new_path_each_time: bool = False
    """Every request goes to ``path`` + a number never sent before (so no decision is reused)."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"} if self.body else {}


GET = Workload("get", "GET", "/items/42")
POST = Workload("post", "POST", "/echo", POST_BODY)
GET_NEW = Workload("get", "GET", "/items/", new_path_each_time=True)
POST_NEW = Workload("post", "POST", "/echo/", POST_BODY, new_path_each_time=True)
TICKET = Workload("ticket", "GET", "/tickets/1")
"""A retrieval the example policy redacts (``ticket_read``: route demo, GET /tickets/...)."""

BULK_EMAIL = "grace.hopper@example.com"
"""In the first record of every bulk document: present without redaction, never with it."""
BULK_MAX_BYTES = 16 << 20


def bulk_path(size: int) -> str:
    return f"/bulk/{size}"


_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXN0b21lciJ9.c2lnbmF0dXJlLW5vdC1yZWFsLWF0LWFsbA"


def _bulk_description(i: int, n: int, email: str) -> str:
    """Ticket prose; sensitive values at different rates, every detector's kind somewhere."""
    parts = [f"Hi, I was charged twice for order {40000 + n} and the invoice total is wrong since the last "
             f"update. Please look into it before the end of the week, thanks."]
    if i % 2 == 0:
        parts.append(f"You can reach me at {email}.")
    if i % 3 == 0:
        parts.append(f"Call me on (415) 555-{n % 10000:04d} after 5pm.")
    if i % 5 == 0:
        parts.append("Refund to card 4111 1111 1111 1111 please.")
    if i % 7 == 0:
        parts.append(f"My SSN is {500 + n % 100}-{10 + n % 80:02d}-{1000 + n % 9000:04d} if you need it.")
    if i % 9 == 0:
        parts.append("Or wire it to IBAN DE89 3704 0044 0532 0130 00.")
    if i % 10 == 0:
        parts.append(f"The app log said Authorization: Bearer sk_live_{n:024d} from 10.0.{i % 256}.7.")
    if i % 20 == 0:
        parts.append(f"Leaked in a screenshot: AKIA{n:016d} and {_JWT}.")
    return " ".join(parts)


def bulk_document(size: int) -> bytes:
    """A JSON document of about ``size`` bytes (at least one record): ticket-like records with
    contact and payment details in fields, and PII and secrets in their prose; the same every time."""
    records: list[dict[str, object]] = []
    total = 14  # {"records":[]}
    i = 0
    while total < size or not records:
        n = 1000 + i
        email = BULK_EMAIL if i == 0 else f"customer{n}@example.com"
        record = {
            "id": n, "status": ("open", "pending", "solved")[i % 3], "priority": i % 4,
            "created_at": f"2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}T10:{i % 60:02d}:00Z",
            "subject": f"Refund for order {40000 + n}",
            "requester": {"name": f"Customer {n}", "email": email, "phone": f"+1 415 555 {n % 10000:04d}"},
            "payment": {"card_number": "4111 1111 1111 1111", "iban": "DE89 3704 0044 0532 0130 00"},
            "description": _bulk_description(i, n, email),
            "tags": ["billing", "refund", "vip" if i % 7 == 0 else "standard"],
        }
        records.append(record)
        total += len(json.dumps(record, separators=(",", ":"))) + 1
        i += 1
    return json.dumps({"records": records}, separators=(",", ":")).encode()
