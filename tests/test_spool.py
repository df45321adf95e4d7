"""The write-ahead audit spool against real files and a real embedded ClickHouse (chDB).

A "store that is down" is a Store whose DSN points at a closed loopback port; "the store is
back" swaps in a chDB store. A real crash is a subprocess killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import storage.spool as spool_mod
import storage.spool.audit_spool as audit_spool_mod
import storage.spool.segments as segments_mod
from storage.spool.records import row_decoder
from storage import schema
from storage.audit import INCOMPLETE_OUTCOME, INCOMPLETE_REASON
from storage.chain import verify
from storage.spool import (BEGIN, COMPLETE, AuditSpool, AuditUnavailable, ScanResult, SpoolLocked,
                           iter_records, list_segments, segment_path)
from storage.store import Store
from tests.storage_helpers import GW, dsn, row, select, spool, store, wait_until  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
COL = {n: i for i, n in enumerate(schema.COLUMN_NAMES)}


def closed_port_dsn() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://default:pw@127.0.0.1:{port}"


def down_store() -> Store:
    return Store(closed_port_dsn(), connect_timeout_seconds=1)


def records(directory: Path) -> list[tuple[int, bytes]]:
    out = []
    for seg in list_segments(directory):
        for kind, cid, _, _, _ in iter_records(segment_path(directory, seg), 0, None, ScanResult()):
            if kind in (BEGIN, COMPLETE):
                out.append((kind, cid))
    return out


async def ids_by_seq(s: Store) -> list[uuid.UUID]:
    return [r[0] for r in await select(s, "SELECT call_id FROM agentgate.calls FINAL ORDER BY seq")]


# ------------------------------------------------------------------ the write path
async def test_group_commit_shares_fsyncs(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real = segments_mod._fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(segments_mod, "_fdatasync", counting)
    sp = spool(store, tmp_path)
    await sp.start()
    try:
        rows = [row() for _ in range(64)]
        await asyncio.gather(*(sp.begin(r) for r in rows))  # 64 concurrent callers
        assert 1 <= len(synced) <= 4, len(synced)
        # Each begin returned after its record was on disk: read the segment files themselves.
        on_disk = {cid for kind, cid in records(sp.directory) if kind == BEGIN}
        assert on_disk == {r[COL["call_id"]].bytes for r in rows}
        for r in rows:
            sp.submit(r)
        await sp.flush(timeout=10)
        assert (sp.depth, sp.written, sp.dropped) == (0, 64, 0)
    finally:
        await sp.close()


# ------------------------------------------------------------------ fsync "interval"
@contextlib.contextmanager
def blocked_fdatasync(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every fdatasync of the spool blocks (on the writer's thread) until released, and none
    after that; yields (entered: a sync has started, release)."""
    entered, released = threading.Event(), threading.Event()
    real = segments_mod._fdatasync

    def held(fd: int) -> None:
        entered.set()
        released.wait(30)
        real(fd)

    monkeypatch.setattr(segments_mod, "_fdatasync", held)
    try:
        yield entered, released.set
    finally:
        released.set()


async def test_interval_begin_returns_once_written_and_the_sync_follows(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under "interval" a call is forwarded once its record is in the segment, without waiting
    for the disk (whose fdatasync here never finishes); the sync follows within the interval."""
    sp = spool(store, tmp_path, fsync="interval", fsync_interval_seconds=0.05)
    await sp.start()
    try:
        with blocked_fdatasync(monkeypatch) as (entered, release):
            rows = [row() for _ in range(8)]
            async with asyncio.timeout(10):
                await asyncio.gather(*(sp.begin(r) for r in rows))
            assert {cid for kind, cid in records(sp.directory) if kind == BEGIN} == \
                {r[COL["call_id"]].bytes for r in rows}
            assert await asyncio.to_thread(entered.wait, 10), "no fdatasync after the interval"
            release()
        await wait_until(lambda: sp._log is not None and not sp._log.unsynced)
        assert sp.fsyncs >= 1 and sp.healthy
    finally:
        await sp.close()


async def test_interval_syncs_while_writes_keep_coming(store: Store, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A steady stream of calls: the sync comes once the interval has passed since the first
    unsynced write (new writes do not push the deadline back), not only once calls stop. The
    spool's clock advances 1 ms per call, so "the interval" is 20 calls, whatever the machine."""
    synced: list[int] = []
    real = segments_mod._fdatasync
    monkeypatch.setattr(segments_mod, "_fdatasync", lambda fd: (synced.append(fd), real(fd)))
    clock = [1000.0]
    monkeypatch.setattr(audit_spool_mod, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    sp = spool(store, tmp_path, fsync="interval", fsync_interval_seconds=0.02)
    await sp.start()
    try:
        n = 0
        async with asyncio.timeout(20):
            while not synced and n < 200:
                await sp.begin(row())
                clock[0] += 0.001
                n += 1
        assert synced, f"{n} calls written over {n} ms of the spool's clock and never synced"
        assert 20 <= n <= 25, n  # not before the interval either
    finally:
        await sp.close()


async def test_interval_sync_failure_is_unhealthy_and_refuses_required_calls(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = segments_mod._fdatasync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    sp = spool(store, tmp_path, fsync="interval", fsync_interval_seconds=0.02, required=True)
    await sp.start()
    try:
        monkeypatch.setattr(segments_mod, "_fdatasync", failing)
        await sp.begin(row())
        await wait_until(lambda: not sp.healthy)
        assert sp.status()["synced"] is False
        with pytest.raises(AuditUnavailable, match="cannot be synced"):
            await sp.begin(row())
        monkeypatch.setattr(segments_mod, "_fdatasync", real)  # the disk is back
        await wait_until(lambda: sp.healthy)  # the failed sync is tried again
        assert sp._log is not None and not sp._log.unsynced
        await sp.begin(row())
    finally:
        await sp.close()


def test_sync_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="before_forward, interval, off"):
        AuditSpool(down_store(), Path("/nonexistent"), instance="x", fsync="always")  # type: ignore[arg-type]


@dataclasses.dataclass
class WriteOnDisk:
    """A spool whose first write (one row, with a flush waiting on it) is held inside fdatasync."""

    sp: AuditSpool
    first: tuple[Any, ...]
    first_flush: "asyncio.Future[None]"
    release: Callable[[], None]


@contextlib.asynccontextmanager
async def write_on_disk(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[WriteOnDisk]:
    sp = spool(store, tmp_path, flush_interval_seconds=60)
    await sp.start()
    try:
        with blocked_fdatasync(monkeypatch) as (entered, release):  # released: later writes sync at once
            first = row()
            sp.submit(first)
            first_flush = asyncio.ensure_future(sp.flush(timeout=10))
            assert await asyncio.to_thread(entered.wait, 10)  # the first write is syncing now
            yield WriteOnDisk(sp, first, first_flush, release)
            await first_flush
    finally:
        await sp.close()


async def test_flush_covers_rows_recorded_while_a_write_is_on_disk(store: Store, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A row recorded while an earlier write is still syncing, then flush(): flush returns only
    once that row too is in the store (it once returned with the earlier write's position, and
    the admin API's freshness flush then missed the newest rows)."""
    async with write_on_disk(store, tmp_path, monkeypatch) as w:
        second = row()
        w.sp.submit(second)
        second_flush = asyncio.ensure_future(w.sp.flush(timeout=10))
        w.release()
        await second_flush
        assert set(await ids_by_seq(store)) == {w.first[COL["call_id"]], second[COL["call_id"]]}


async def test_flush_covers_rows_submitted_for_later(store: Store, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """submit_later() builds the row once the loop is free (a response goes out first); a
    flush() that comes before then still covers it, even with an earlier write on disk."""
    async with write_on_disk(store, tmp_path, monkeypatch) as w:
        second = row()
        built: list[int] = []
        second_flush = asyncio.ensure_future(w.sp.flush(timeout=10))  # runs before the row is built
        w.sp.submit_later(lambda: built.append(1) or second)
        assert built == []  # not on the caller's time
        w.release()
        await second_flush
        assert built == [1]
        assert set(await ids_by_seq(store)) == {w.first[COL["call_id"]], second[COL["call_id"]]}


async def test_close_ships_rows_submitted_for_later(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path)
    await sp.start()
    r = row()
    await sp.begin(r)
    sp.submit_later(lambda: r)

    def broken() -> tuple[Any, ...]:
        raise ValueError("no row")
    sp.submit_later(broken)  # a row that cannot be built is counted, never raised to the caller
    await sp.close()
    assert sp.dropped == 1
    assert await ids_by_seq(store) == [r[COL["call_id"]]]


async def test_rows_ship_in_order_with_chain(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path, batch_size=7)
    await sp.start()
    rows = [row() for _ in range(50)]
    for r in rows:
        sp.submit(r)
    assert sp.depth == 50
    await sp.flush(timeout=10)
    assert sp.batches_written >= 8  # batches of at most 7 rows
    assert await ids_by_seq(store) == [r[COL["call_id"]] for r in rows]
    assert await select(store, "SELECT min(seq), max(seq), uniqExact(seq) FROM agentgate.calls") == [(1, 50, 50)]
    report = await store.run(verify, "agentgate")
    assert report.ok and report.instances[GW].rows == 50
    await sp.close()


async def test_rows_gather_into_one_batch_until_the_interval(store: Store, tmp_path: Path) -> None:
    """Records synced one at a time wait for the interval (or a flush) and ship as one batch:
    each fsync must not trigger its own insert (an insert costs ~10 ms of ClickHouse CPU)."""
    sp = spool(store, tmp_path, batch_size=1000, flush_interval_seconds=60)
    await sp.start()
    for _ in range(5):
        sp.submit(row())
        await sp.sync(timeout=10)  # on disk, and the shipper has been told so
    assert sp.batches_written == 0
    await sp.flush(timeout=10)
    assert (sp.written, sp.batches_written) == (5, 1)
    await sp.close()


async def test_a_full_batch_ships_before_the_interval(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path, batch_size=3, flush_interval_seconds=60)
    await sp.start()
    for _ in range(3):
        sp.submit(row())
    await wait_until(lambda: sp.written == 3)  # no flush: a full batch does not wait 60 s
    await sp.close()


async def test_completes_sync_without_a_begin(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path, flush_interval_seconds=0.05)
    await sp.start()
    sp.submit(row())
    await wait_until(lambda: sp.written == 1)  # no begin, no flush: the interval writes it
    await sp.close()


async def test_close_ships_what_is_left(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path, batch_size=1000, flush_interval_seconds=60)  # only close() ships them
    await sp.start()
    for _ in range(7):
        sp.submit(row())
    await sp.close(timeout=20)
    assert (sp.written, sp.depth, sp.dropped) == (7, 0, 0)
    assert await select(store, "SELECT count() FROM agentgate.calls") == [(7,)]
    sp.submit(row())  # after close: counted, never raises
    assert sp.dropped == 1
    await sp.flush()  # returns at once after close


async def test_spool_locked_by_one_process(store: Store, tmp_path: Path) -> None:
    a = spool(store, tmp_path)
    await a.start()
    with pytest.raises(SpoolLocked):
        await spool(store, tmp_path).start()
    await a.close()
    b = spool(store, tmp_path)
    await b.start()  # the lock is released on close
    await b.close()


# ------------------------------------------------------------------ recovery
async def test_restart_ships_begun_calls_as_incomplete(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path)
    await sp.start()
    done, lost = [row() for _ in range(2)], [row() for _ in range(3)]
    for r in done + lost:
        await sp.begin(r)
    for r in done:
        sp.submit(r)
    await sp.sync(timeout=10)
    await sp.abandon()  # a crash: no flush, no shipping, the lock released by the OS

    again = spool(store, tmp_path)
    await again.start()
    assert again.recovered_incomplete == 3
    await again.flush(timeout=10)
    got = await select(store, "SELECT call_id, outcome, status, reasons, ts_end = ts_start "
                              "FROM agentgate.calls FINAL ORDER BY seq")
    assert [g[0] for g in got] == [r[COL["call_id"]] for r in done + lost]
    assert [g[1] for g in got[:2]] == ["denied", "denied"]  # make_call's outcome
    for _, outcome, status, reasons, same_ts in got[2:]:
        assert (outcome, status, reasons[-1], same_ts) == (INCOMPLETE_OUTCOME, 0, INCOMPLETE_REASON, 1)
    assert (await store.run(verify, "agentgate")).ok  # the chain continues across the restart
    await again.close()

    third = spool(store, tmp_path)  # nothing is recovered twice
    await third.start()
    assert (third.recovered_incomplete, third.depth) == (0, 0)
    await third.close()
    assert await select(store, "SELECT count() FROM agentgate.calls FINAL") == [(5,)]


def record_end(path: Path) -> int:
    scan = ScanResult()
    for _ in iter_records(path, 0, None, scan):
        pass
    return scan.good_end


async def crashed_after_one_begin(store: Store, tmp_path: Path) -> tuple[tuple[Any, ...], Path, int]:
    """A spool that stopped dead after one durable BEGIN: its segment, as a crash leaves it,
    still has the zero-filled space after the record."""
    sp = spool(store, tmp_path, required=True)
    await sp.start()
    r = row()
    await sp.begin(r)
    await sp.abandon()
    last = segment_path(sp.directory, list_segments(sp.directory)[-1])
    end = record_end(last)
    assert last.stat().st_size >= end + (64 << 10)  # preallocated
    assert open(last, "rb").read()[end:] == bytes(last.stat().st_size - end)
    return r, last, end


async def test_torn_tail_is_cut_off(store: Store, tmp_path: Path) -> None:
    r, last, end = await crashed_after_one_begin(store, tmp_path)
    with open(last, "r+b") as f:  # half a record in the preallocated space: the process died inside write()
        f.seek(end)
        f.write(spool_mod.encode_record(COMPLETE, r[COL["call_id"]].bytes, b"[1,2,3]")[:11])
    again = spool(store, tmp_path)
    await again.start()
    assert last.stat().st_size == end
    await again.flush(timeout=10)
    assert await select(store, "SELECT outcome FROM agentgate.calls FINAL") == [(INCOMPLETE_OUTCOME,)]
    await again.close()


async def test_preallocated_tail_of_a_crashed_run_is_cut_off(store: Store, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    _, last, end = await crashed_after_one_begin(store, tmp_path)
    again = spool(store, tmp_path)
    await again.start()
    assert last.stat().st_size == end
    assert "corrupt" not in caplog.text and "torn" not in caplog.text
    await again.flush(timeout=10)
    assert await select(store, "SELECT outcome FROM agentgate.calls FINAL") == [(INCOMPLETE_OUTCOME,)]
    await again.close()


async def test_records_after_a_zeroed_stretch_are_corruption(store: Store, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Zeros end a segment only when nothing but zeros follows: a record after them is damage
    to report, not a tail to cut quietly."""
    r, last, end = await crashed_after_one_begin(store, tmp_path)
    with open(last, "r+b") as f:
        f.seek(end + 4096)
        f.write(spool_mod.encode_record(COMPLETE, r[COL["call_id"]].bytes, b"[1,2,3]"))
    again = spool(store, tmp_path)
    await again.start()
    assert "cutting a corrupt tail" in caplog.text
    await again.close()


async def test_commits_write_into_preallocated_space(store: Store, tmp_path: Path) -> None:
    """Group commits do not grow the file (so fdatasync has no size to record); a closed
    segment keeps only its records."""
    sp = spool(store, tmp_path)
    await sp.start()
    await sp.begin(row())
    last = segment_path(sp.directory, list_segments(sp.directory)[-1])
    size = last.stat().st_size
    for _ in range(20):
        await sp.begin(row())
    assert last.stat().st_size == size > record_end(last)
    await sp.close()
    assert last.stat().st_size == record_end(last)


async def test_no_preallocation_without_fsync(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path, fsync="off")
    await sp.start()
    await sp.begin(row())
    await sp.sync(timeout=10)
    last = segment_path(sp.directory, list_segments(sp.directory)[-1])
    assert last.stat().st_size == record_end(last)
    await sp.close()


async def test_long_call_does_not_pin_old_segments(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path, segment_bytes=4096, batch_size=5)
    await sp.start()
    long_call = row()
    await sp.begin(long_call)
    first_seg = list_segments(sp.directory)[0]
    for _ in range(60):  # ~30 KB of other calls: several rotations
        r = row()
        await sp.begin(r)
        sp.submit(r)
    await sp.flush(timeout=10)
    await sp.flush(timeout=10)  # the carried BEGIN is read and acked too
    segs = list_segments(sp.directory)
    assert first_seg not in segs and len(segs) <= 3, segs
    await sp.abandon()  # the long call never completes

    again = spool(store, tmp_path)
    await again.start()
    await again.flush(timeout=10)
    got = await select(store, "SELECT outcome FROM agentgate.calls FINAL WHERE call_id = {c:UUID}",
                       c=long_call[COL["call_id"]])
    assert got == [(INCOMPLETE_OUTCOME,)]
    assert await select(store, "SELECT count() FROM agentgate.calls FINAL") == [(61,)]
    await again.close()


# ------------------------------------------------------------------ store down, quota
async def test_store_down_spool_grows_then_replays_in_order(store: Store, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    sp = spool(down_store(), tmp_path, batch_size=10)
    await sp.start()
    rows = [row(approval_id="ap-leak-check") for _ in range(40)]
    with caplog.at_level(logging.ERROR, logger="storage.spool"):
        for r in rows[:20]:
            await sp.begin(r)
            sp.submit(r)
        await wait_until(lambda: sp.failed_batches >= 2)
        assert not sp.healthy and sp.status()["store_reachable"] is False
        before = sp.bytes
        for r in rows[20:]:
            await sp.begin(r)  # the gateway keeps serving
            sp.submit(r)
        with pytest.raises(asyncio.TimeoutError):
            await sp.flush(timeout=0.2)
        assert sp.depth == 40 and sp.bytes > before and sp.dropped == 0
        sp.store = store  # the store is back
        await sp.flush(timeout=20)
    assert sp.healthy and sp.depth == 0 and sp.written == 40
    assert await ids_by_seq(store) == [r[COL["call_id"]] for r in rows]
    assert await select(store, "SELECT count() FROM agentgate.calls") == [(40,)]
    assert any("failed" in r.getMessage() for r in caplog.records)
    assert "ap-leak-check" not in caplog.text and "agent-7" not in caplog.text and "pw@" not in caplog.text
    await sp.close()


async def test_quota_required_refuses_new_calls(tmp_path: Path) -> None:
    sp = spool(down_store(), tmp_path, spool_max_bytes=8192, required=True)
    await sp.start()
    begun = []
    with pytest.raises(AuditUnavailable, match="full"):
        for _ in range(100):
            r = row()
            await sp.begin(r)
            begun.append(r)
    assert sp.full and 0 < len(begun) < 100
    depth = sp.depth
    for r in begun:  # calls already forwarded still get their row, over the quota
        sp.submit(r)
    assert sp.depth == depth + len(begun) and sp.dropped == 0
    sp.submit(row())  # a call that was never forwarded (say, denied) is dropped when full
    assert sp.dropped == 1
    await sp.close(timeout=0.2)


async def test_quota_not_required_drops_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sp = spool(down_store(), tmp_path, spool_max_bytes=8192)
    await sp.start()
    with caplog.at_level(logging.ERROR, logger="storage.spool"):
        for _ in range(40):
            r = row()
            await sp.begin(r)  # never raises: the gateway keeps serving
            sp.submit(r)
    assert sp.full and sp.dropped > 0
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1  # rate-limited
    await sp.close(timeout=0.2)


async def test_unwritable_spool(tmp_path: Path) -> None:
    """A write that fails (here: file size limit, as a full disk would) refuses in required
    mode, and the spool heals once writes succeed again."""
    sp = spool(down_store(), tmp_path, required=True, segment_bytes=1 << 30)
    await sp.start()
    await sp.begin(row())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (sp.bytes + 100, hard))
    try:
        with pytest.raises(AuditUnavailable, match="write failed"):
            await sp.begin(row())
        assert not sp.status()["spool_writable"]
        with pytest.raises(AuditUnavailable, match="cannot be written"):
            await sp.begin(row())  # fail fast while the spool is broken
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    await wait_until(lambda: sp.status()["spool_writable"])  # the failed records are retried in order
    await sp.begin(row())
    assert sp.dropped == 0 and sp.depth == 0  # nothing lost; no COMPLETE submitted yet
    await sp.close(timeout=0.2)


# ------------------------------------------------------------------ idempotence
async def test_replay_never_doubles_a_row(store: Store, tmp_path: Path) -> None:
    sp = spool(store, tmp_path, batch_size=9)
    await sp.start()
    rows = [row() for _ in range(30)]
    for r in rows:
        sp.submit(r)
    await sp.flush(timeout=10)
    await sp.abandon()
    (sp.directory / spool_mod.STATE_FILE).unlink()  # as if every ack was lost: replay everything

    again = spool(store, tmp_path, batch_size=4)  # other batch boundaries: other insert blocks
    await again.start()
    assert again.depth == 30
    await again.flush(timeout=10)
    await again.close()
    assert await select(store, "SELECT count() FROM agentgate.calls FINAL") == [(30,)]
    await store.run(lambda c: c.command("OPTIMIZE TABLE agentgate.calls FINAL"))
    assert await select(store, "SELECT count() FROM agentgate.calls") == [(30,)]
    assert await select(store, "SELECT sum(calls) FROM agentgate.calls_hourly") == [(30,)]
    assert (await store.run(verify, "agentgate")).ok


async def test_migration_to_replacing_keeps_rows(tmp_path: Path) -> None:
    """A version-2 database (plain MergeTree, no chain columns) is converted in place."""
    db = "audit_v2"
    s = Store(dsn(tmp_path / "ch"), database=db, ttl_days=30)
    v2_cols = schema.COLUMNS[:schema.COLUMN_NAMES.index("killswitch_id") + 1]
    ddl = schema.calls_ddl(db, 30).replace("ENGINE = ReplacingMergeTree", "ENGINE = MergeTree")
    for c in schema.COLUMNS[len(v2_cols):]:  # version 3 and later columns
        ddl = ddl.replace(f",\n    `{c.name}` {c.type} COMMENT {schema._quote(c.comment)}", "")
    names = [c.name for c in v2_cols]
    rows = [tuple(r[COL[n]] for n in names) for r in (row(outcome=o) for o in ["allowed"] * 3 + ["denied"] * 2)]

    def make_v2(client: Any) -> None:
        client.command(f"CREATE DATABASE {db}")
        client.command(schema.version_table_ddl(db))
        client.command(ddl)
        client.command(f"INSERT INTO {db}.schema_version VALUES (1, now64(3)), (2, now64(3))")
        client.insert("calls", rows, database=db, column_names=names)
        # A copy left by a migration that crashed half-way is finished too.
        client.command(f"CREATE TABLE {db}.{schema.PRE_V3_PREFIX}crashed AS {db}.calls")
        client.insert(f"{schema.PRE_V3_PREFIX}crashed", rows[:1], database=db, column_names=names)

    import clickhouse_connect
    raw = clickhouse_connect.get_client(dsn=dsn(tmp_path / "ch"))
    try:
        make_v2(raw)
    finally:
        raw.close()
    await s.open()  # applies version 3
    try:
        tables = dict(await select(s, "SELECT name, engine FROM system.tables WHERE database = {d:String}", d=db))
        assert tables["calls"] == "ReplacingMergeTree"
        assert not [t for t in tables if t.startswith(schema.PRE_V3_PREFIX)]
        assert {"calls_hourly", "calls_hourly_state", "calls_hourly_mv"} <= set(tables)
        assert await select(s, f"SELECT count() FROM {db}.calls FINAL") == [(5,)]
        cols = await select(s, "SELECT name FROM system.columns WHERE database = {d:String} AND table = 'calls' "
                               "ORDER BY position", d=db)
        assert [c for (c,) in cols] == list(schema.COLUMN_NAMES)
        hourly = await select(s, f"SELECT outcome, sum(calls) FROM {db}.calls_hourly GROUP BY outcome ORDER BY outcome")
        assert hourly == [("allowed", 3), ("denied", 2)]
        assert await s.run(schema.apply_migrations, db, 30) == []
        report = await s.run(verify, db)
        assert report.ok and report.unchained_rows == 5  # rows from before the chain
    finally:
        await s.close()


# ------------------------------------------------------------------ a real crash
CHILD = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from storage.audit import call_to_row
from storage.spool import AuditSpool
from storage.store import Store
from tests.storage_helpers import make_call

async def worker(sp, n):
    while True:
        call = make_call()
        await sp.begin(call_to_row(call, instance="gw-crash"))
        print(call.call_id, flush=True)   # forwarded upstream from here on
        await asyncio.sleep(0)
        if n % 3:
            sp.submit(call_to_row(call, instance="gw-crash"))
        n += 1

async def main():
    sp = AuditSpool(Store(sys.argv[2], connect_timeout_seconds=1), Path(sys.argv[1]), instance="gw-crash",
                    flush_interval_seconds=0.01, retry_min_seconds=0.05, segment_bytes=64 << 10)
    await sp.start()
    print("ready", flush=True)
    await asyncio.gather(*(worker(sp, i) for i in range(16)))

asyncio.run(main())
"""


async def test_kill_9_under_load_loses_no_forwarded_call(store: Store, tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), closed_port_dsn(), str(ROOT)],
                            stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    forwarded: list[str] = []
    try:
        assert proc.stdout.readline().strip() == b"ready"
        while len(forwarded) < 400:
            line = proc.stdout.readline()
            assert line, "the child died on its own"
            forwarded.append(line.decode().strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    forwarded += [x.decode().strip() for x in proc.stdout.read().splitlines()[:-1]]  # last may be torn
    sp = AuditSpool(store, directory, instance="gw-crash", flush_interval_seconds=0.02)
    await sp.start()
    await sp.flush(timeout=30)
    got = dict(await select(store, "SELECT toString(call_id), outcome FROM agentgate.calls FINAL"))
    missing = [c for c in forwarded if c not in got]
    assert not missing, f"{len(missing)} forwarded call(s) without a row"
    assert INCOMPLETE_OUTCOME in got.values() and "denied" in got.values()
    assert (await store.run(verify, "agentgate")).ok
    await sp.close()


def test_row_codec_round_trips() -> None:
    r = row(decided_at_ns=1_700_000_000_123_456_000, approval_id="ap-1")
    decoded = row_decoder(list(schema.COLUMN_NAMES))(spool_mod.encode_row(r))
    assert decoded == r
    assert decoded[COL["decided_at"]] == dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=dt.timezone.utc)
    older = [n for n in schema.COLUMN_NAMES if n != "tool_name"]  # a segment from another version
    payload = spool_mod.encode_row(r)
    import json
    values = json.loads(payload)
    del values[COL["tool_name"]]
    decoded = row_decoder(older)(json.dumps(values).encode())
    assert decoded[COL["tool_name"]] == "" and decoded[COL["call_id"]] == r[COL["call_id"]]
