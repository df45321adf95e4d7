"""Embedded chDB in a child process: calls cross a pipe, a dead child is replaced on open()."""

from __future__ import annotations

import datetime as dt
import os
import signal
from pathlib import Path

import pytest

from storage.state_schema import ADMIN_EVENT_COLUMNS, ADMIN_EVENTS
from storage.store import QueryError, Store, StoreError, insert_rows
from tests.storage_helpers import dsn


def _count(client, db: str) -> int:  # type: ignore[no-untyped-def]
    return int(client.query(f"SELECT count() FROM {db}.{ADMIN_EVENTS}").result_rows[0][0])


def _pid(client, db: str) -> int:  # type: ignore[no-untyped-def]
    return os.getpid()


def _event(n: int) -> tuple:  # type: ignore[type-arg]
    return (dt.datetime.now(dt.timezone.utc), "ops", ["operator"], "test", f"t{n}", "", "ok", "", "gw")


NAMES = [c[0] for c in ADMIN_EVENT_COLUMNS]
TYPES = [c[1] for c in ADMIN_EVENT_COLUMNS]


async def test_calls_run_in_a_child_that_is_replaced_when_it_dies(tmp_path: Path) -> None:
    store = Store(dsn(tmp_path / "ch"), process=True)
    await store.open()
    try:
        child_pid = await store.run(_pid, store.database)
        assert child_pid != os.getpid()
        # Inserts yield the CPU to request handling where they share a core: every thread of chDB too.
        assert all(os.sched_getscheduler(int(tid)) == os.SCHED_IDLE for tid in os.listdir(f"/proc/{child_pid}/task"))
        await store.run(insert_rows, ADMIN_EVENTS, [_event(1), _event(2)], store.database, NAMES, TYPES)
        assert await store.run(_count, store.database) == 2
        assert await store.ping()

        with pytest.raises(TypeError, match="module-level function"):
            await store.run(lambda c: 1)  # a closure cannot cross; the store stays usable
        assert await store.run(_count, store.database) == 2

        os.kill(child_pid, signal.SIGKILL)
        with pytest.raises(StoreError, match="store process"):
            await store.run(_count, store.database)
        assert not store.is_open
        await store.open()  # a new child on the same data
        assert await store.run(_pid, store.database) not in (child_pid, os.getpid())
        assert await store.run(_count, store.database) == 2
    finally:
        await store.close()
    assert not store.is_open


async def test_errors_come_back_as_the_clients_errors(tmp_path: Path) -> None:
    store = Store(dsn(tmp_path / "ch"), process=True)
    await store.open()
    try:
        with pytest.raises(QueryError, match="UNKNOWN_TABLE|Unknown table"):
            await store.query_readonly("SELECT * FROM agentgate.no_such_table", limit=5)
        columns, rows = await store.query_readonly("SELECT 1 AS one", limit=5)
        assert (columns, rows) == (["one"], [[1]])
    finally:
        await store.close()
