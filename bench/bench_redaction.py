"""Redaction throughput on a ~1 MB JSON body (fields + all detectors) versus json.loads+dumps.

    python bench/bench_redaction.py

Prints MB/s for each case and the ratio to the plain parse+serialise baseline; also the
per-call cost of ``scrub_text`` on a short query string. Runs in well under 30 s.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.redaction import RedactionSettings, Redactor, scrub_text  # noqa: E402

FIELDS = ["$.customer.email", "$.tickets[*].requester.phone", "$..ssn"]


def make_body(target: int = 1_000_000, seed: int = 7) -> bytes:
    """Realistic ticket data: ids, timestamps, prose, and some PII/secrets in free text."""
    rnd = random.Random(seed)
    words = ("printer offline again please help the invoice total is wrong since last update "
             "customer reports login failure after password reset on mobile app").split()
    tickets = []
    i = 0
    while True:
        note = " ".join(rnd.choice(words) for _ in range(rnd.randint(6, 20)))
        if i % 10 == 0:
            note += f" call me at (415) 555-{i % 10000:04d}"
        if i % 25 == 0:
            note += " card 4111 1111 1111 1111"
        if i % 40 == 0:
            note += " Authorization: Bearer sk_live_" + "".join(rnd.choice("abcdef0123456789") for _ in range(24))
        tickets.append({
            "id": 100000 + i,
            "uuid": "%08x-%04x-4%03x-a%03x-%012x" % (rnd.getrandbits(32), rnd.getrandbits(16), rnd.getrandbits(12),
                                                    rnd.getrandbits(12), rnd.getrandbits(48)),
            "subject": f"Ticket {i}: " + " ".join(rnd.choice(words) for _ in range(5)),
            "status": rnd.choice(["open", "pending", "closed"]),
            "priority": rnd.randint(1, 4),
            "created_at": f"2024-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}T10:{rnd.randint(0, 59):02d}:00Z",
            "updated_ms": 1700000000000 + rnd.randint(0, 10**9),
            "requester": {"name": f"User {i}", "email": f"user{i}@example.com", "phone": f"+1 202 555 {i % 10000:04d}"},
            "tags": rnd.sample(words, 3),
            "ssn": "123-45-6789",
            "note": note,
            "client_ip": f"10.{i % 256}.{(i * 7) % 256}.{(i * 13) % 256}",
            "version": "1.2.3.4.5",
        })
        i += 1
        if i % 50 == 0 and len(json.dumps(tickets)) >= target:
            break
    return json.dumps({"customer": {"email": "boss@example.com"}, "tickets": tickets}).encode()


def timeit(fn: Callable[[], object], min_time: float = 1.0, max_runs: int = 50) -> float:
    """Best-of time per call."""
    best = float("inf")
    total = 0.0
    runs = 0
    while (total < min_time or runs < 3) and runs < max_runs:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        total += dt
        runs += 1
    return best


def main() -> None:
    body = make_body()
    mb = len(body) / 1e6
    redactor = Redactor(RedactionSettings())
    plan_all = redactor.plan(FIELDS, ["all"])
    plan_fields = redactor.plan(FIELDS, [])
    plan_secrets = redactor.plan([], ["jwt", "bearer_token", "aws_access_key", "private_key", "api_key"])
    gz = gzip.compress(body, 6)

    base = timeit(lambda: json.dumps(json.loads(body)).encode())
    rows = [("json.loads + dumps (baseline)", base)]
    rows.append(("fields only", timeit(lambda: plan_fields.redact_body(body, content_type="application/json",
                                                                         content_encoding=None))))
    rows.append(("secret detectors only", timeit(lambda: plan_secrets.redact_body(
        body, content_type="application/json", content_encoding=None))))
    rows.append(("fields + all detectors", timeit(lambda: plan_all.redact_body(
        body, content_type="application/json", content_encoding=None))))
    rows.append(("fields + all detectors, gzip", timeit(lambda: plan_all.redact_body(
        gz, content_type="application/json", content_encoding="gzip"))))

    _, report = plan_all.redact_body(body, content_type="application/json", content_encoding=None)
    print(f"body: {len(body):,} bytes JSON; redactions: {report.total:,} {dict(sorted(report.counts.items()))}")
    print(f"{'case':<32}{'ms':>10}{'MB/s':>10}{'x baseline':>12}")
    for name, t in rows:
        print(f"{name:<32}{t * 1e3:>10.1f}{mb / t:>10.1f}{t / base:>12.1f}")

    for q in ("page=2&sort=desc&q=printer", "q=x&token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln&k=AKIAIOSFODNN7EXAMPLE"):
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            scrub_text(q)
        print(f"scrub_text({len(q)} chars): {(time.perf_counter() - t0) / n * 1e6:.1f} µs/call")


if __name__ == "__main__":
    main()
