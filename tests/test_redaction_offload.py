"""Large bodies are redacted in a worker process: the result, the report and the fail-closed
errors come back intact, and the event loop keeps running meanwhile."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.redaction import NotRedactable, RedactionSettings, Redactor

EMAIL = "ada@example.com"


def big_body(n: int = 4000) -> bytes:
    return json.dumps({"rows": [{"id": i, "email": EMAIL, "note": "x" * 40} for i in range(n)]}).encode()


async def test_large_body_is_redacted_in_a_worker_process() -> None:
    plan = Redactor(RedactionSettings(thread_threshold_bytes=1024)).plan(["$.rows[0].id"], ["email"])
    assert plan is not None
    body = big_body()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        out, report = await plan.redact_body_async(body, content_type="application/json", content_encoding=None)
    finally:
        task.cancel()
    doc = json.loads(out)
    assert EMAIL.encode() not in out and doc["rows"][0]["id"] == "[REDACTED:field]"
    assert report.counts == {"field": 1, "email": 4000}
    assert ticks > 10, "the event loop must keep running while a large body is redacted"


async def test_worker_errors_fail_closed_with_their_reason() -> None:
    plan = Redactor(RedactionSettings(thread_threshold_bytes=16)).plan([], ["email"])
    assert plan is not None
    with pytest.raises(NotRedactable) as err:
        await plan.redact_body_async(b"\x89PNG" + b"\0" * 64, content_type="image/png", content_encoding=None)
    assert err.value.reason == "unsupported_content_type" and err.value.code == "response_not_redactable"
