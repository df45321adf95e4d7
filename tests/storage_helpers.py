"""Helpers shared by the storage tests (test_storage, test_chain, test_spool): a real embedded
ClickHouse (chDB) store in tmp_path, a fully populated call, an audit spool on it.

``store`` is a fixture: a test module uses it by importing it (``from tests.storage_helpers
import store``). chDB hosts one engine per process, so the store is closed in teardown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.models import Call, Decision, GatewayRequest, Identity
from storage.audit import call_to_row
from storage.spool import AuditSpool
from storage.store import Store

GW = "gw-test"


def dsn(path: Path) -> str:
    return f"chdb://{path.resolve()}"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(dsn(tmp_path / "ch"), ttl_days=90)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def spool(store: Store, tmp_path: Path, *, instance: str = GW, **kw: Any) -> AuditSpool:
    """A spool in ``tmp_path/spool`` with test-friendly timings, fsync'd before each begin
    returns unless ``fsync`` says otherwise (not started)."""
    kw.setdefault("flush_interval_seconds", 0.02)
    kw.setdefault("retry_min_seconds", 0.01)
    kw.setdefault("begin_timeout_seconds", 30)  # a loaded test machine can be slow to fsync
    kw.setdefault("fsync", "before_forward")  # the strictest mode: a begin returns once synced
    return AuditSpool(store, tmp_path / "spool", instance=instance, **kw)


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition a background task reaches on its own (bounded; polls the loop)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def select(s: Store, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    return await s.run(lambda c: c.query(sql, parameters=params).result_rows)


def make_call(**overrides: Any) -> Call:
    """A finished call with every field set (secrets in the query and headers included)."""
    req = GatewayRequest(
        mode="route", method="POST", scheme="https", host="API.Example.com", port=8443,
        path="/v1/repos/x/issues", query="page=2&access_token=hunter2&sig=abc123&q=ok",
        headers=[("Authorization", "Bearer s3cr3t-header")], body=b'{"a":1}',
        client_ip="127.0.0.7", route="github")
    call = Call(request=req, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                identity=Identity("agent-7", "blue", ("reader", "writer")),
                canonical_host="api.example.com", canonical_path="/v1/repos/x/issues",
                decision=Decision(allow=False, reasons=["no_writes"]),
                policy_revision="rev-42", engine="embedded", enforce=False, fail_open=True,
                outcome="denied", status=403, error_code="forbidden", reasons=["no_writes", "x"],
                request_bytes=7, response_bytes=2**40, decision_us=1234, upstream_ms=12.5,
                tool_kind="mcp", tool_name="create_issue")
    for key, value in overrides.items():
        setattr(call, key, value)
    return call


def row(instance: str = GW, **overrides: Any) -> tuple[Any, ...]:
    return call_to_row(make_call(**overrides), instance=instance)
