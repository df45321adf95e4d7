"""The spool itself: the request path's begin/submit, the group-commit writer and the shipper
(see storage/spool/__init__.py for the design)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.audit import _describe, _insert, incomplete_row
from storage.chain import CALL_ID, INSTANCE, ROW_HASH, SEQ, Chain, Head, last_head
from storage.spool.records import (BEGIN, COMPLETE, MIN_BODY, REC_HEAD, call_id_bytes, encode_record, encode_row,
                                   row_decoder)
from storage.spool.recovery import SpoolState, recover, save_state
from storage.spool.segments import Pos, ScanResult, SegmentWriter, iter_records, read_header, segment_path

if TYPE_CHECKING:
    from storage.store import Store

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"

SYNC_MODES = ("before_forward", "interval", "off")
"""When a write-ahead record reaches the disk (``AuditSpool(fsync=...)``, ``audit.spool_fsync``):
``before_forward``, fsync'd before the call goes upstream (survives a power loss; the call waits
for the disk); ``interval``, written before the call goes upstream and fsync'd within
``fsync_interval_seconds`` (survives a gateway crash, and a power loss but for that last
interval); ``off``, written, and synced when its segment is closed (survives a gateway crash)."""


class AuditUnavailable(Exception):
    """The call cannot be recorded durably (spool full or unwritable) and audit.required is
    set: refuse the call with 503 ``audit_unavailable``."""


class SpoolLocked(Exception):
    """Another process owns this spool directory."""


class SpoolWriteError(Exception):
    """Records could not be written or synced to the spool."""


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()


async def _wait_event(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``. (asyncio.timeout, unlike wait_for on 3.11,
    never swallows a cancellation that races with the wake-up.)"""
    try:
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()
    except TimeoutError:
        pass


@dataclasses.dataclass(slots=True)
class _OpenCall:
    payload: bytes
    seg: int | None  # segment holding its latest BEGIN; None while that is not yet written


@dataclasses.dataclass(slots=True)
class _Batch:
    parts: list[tuple[tuple[str, ...], list[bytes]]]
    """Row payloads as spooled, with the columns of the segment that holds them."""
    count: int
    end: Pos
    token: str


def insert_spooled(client: Any, database: str, parts: list[tuple[tuple[str, ...], list[bytes]]],
                   settings: dict[str, Any] | None = None) -> dict[str, tuple[int, str]]:
    """Decode spooled row payloads and insert them (one INSERT); the chain head of each instance.

    Runs where the store runs its calls: for embedded chDB, in the store process, so decoding
    (the shipper's main CPU cost) stays off the proxy's core.
    """
    rows: list[tuple[Any, ...]] = []
    for columns, payloads in parts:
        decode = row_decoder(list(columns))
        rows.extend(decode(p) for p in payloads)
    _insert(client, database, rows, settings)
    heads: dict[str, tuple[int, str]] = {}
    for row in rows:
        if row[SEQ] > 0:
            heads[row[INSTANCE]] = (int(row[SEQ]), str(row[ROW_HASH]))
    return heads


class AuditSpool:
    """Durable audit: ``await begin(row)`` before the upstream, ``submit(row)`` when done.

    Also: ``flush`` (rows in the store), ``sync`` (records on disk), ``start``, ``close``,
    ``required``, the counters ``depth``, ``dropped``, ``written``, ``bytes``, ``full``,
    ``healthy``, :meth:`status` (everything /readyz and /metrics show) and the ``store`` setter.
    ``dropped`` counts records (a BEGIN or a row) that were not spooled.
    """

    MAX_BACKOFF_SECONDS = 5.0
    ERROR_LOG_INTERVAL_SECONDS = 10.0

    def __init__(self, store: "Store", directory: Path, *, instance: str, batch_size: int = 2000,
                 flush_interval_seconds: float = 0.2, spool_max_bytes: int = 1 << 30,
                 required: bool = False, fsync: str = "interval", fsync_interval_seconds: float = 0.02,
                 segment_bytes: int = 16 << 20, begin_timeout_seconds: float = 2.0,
                 retry_min_seconds: float = 0.05) -> None:
        if batch_size < 1 or flush_interval_seconds <= 0 or spool_max_bytes < 1 or segment_bytes < 4096:
            raise ValueError("batch_size and spool_max_bytes >= 1, flush_interval_seconds > 0, "
                             "segment_bytes >= 4096")
        if fsync not in SYNC_MODES or fsync_interval_seconds <= 0:
            raise ValueError(f"fsync is one of {', '.join(SYNC_MODES)}; fsync_interval_seconds > 0")
        self._store = store
        self.directory = Path(directory)
        self.instance = instance
        self.batch_size = batch_size
        self.flush_interval_seconds = flush_interval_seconds
        self.spool_max_bytes = spool_max_bytes
        self.required = required
        self.fsync = fsync
        self.fsync_interval_seconds = fsync_interval_seconds
        self._next_sync = 0.0  # monotonic time by which written records must be synced (interval)
        # The open segment is only deleted once rotated: keep it a small part of the quota.
        self.segment_bytes = max(4096, min(segment_bytes, spool_max_bytes // 8))
        self.begin_timeout_seconds = begin_timeout_seconds
        self.retry_min_seconds = retry_min_seconds
        self._chain: Chain | None = None
        self._log: SegmentWriter | None = None
        self._lock_fd = -1
        self._io: ThreadPoolExecutor | None = None  # the writer's thread
        self._ship_io: ThreadPoolExecutor | None = None  # the shipper's thread
        # writer
        self._pending: list[bytes] = []
        self._later: list[Callable[[], tuple[Any, ...]]] = []
        self._pending_bytes = 0
        self._pending_cids: list[bytes] = []  # BEGINs in _pending (their segment is learned on write)
        self._begin_waiters: list[asyncio.Future[None]] = []
        self._flushers: list[tuple[int, asyncio.Future[Pos]]] = []
        """(records queued when the flusher asked, its future): released once that many are on disk."""
        self._queued = 0  # records ever queued for writing
        self._on_disk = 0  # of which written and synced
        self._open: dict[bytes, _OpenCall] = {}
        self._synced: Pos = (0, 0)
        self._sizes: dict[int, int] = {}
        self._disk_bytes = 0
        self._write_ok = True
        self._sync_ok = True  # the last interval sync succeeded
        # shipper
        self._read_pos: Pos = (0, 0)
        self._skip_before: Pos = (0, 0)
        self._shipped_state = SpoolState()
        self._ship_open: collections.OrderedDict[bytes, Pos] = collections.OrderedDict()
        self._headers: dict[int, list[str] | None] = {}
        self._ship_waiters: list[tuple[Pos, asyncio.Future[None]]] = []
        self._store_ok = True
        # counters
        self._rows_pending = 0
        self._written = 0
        self._batches = 0
        self._failed_batches = 0
        self._dropped = 0
        self._drops_unreported = 0
        self._last_drop_log = float("-inf")
        self._last_error_log: dict[str, float] = {}
        self._begins = 0
        self._carried = 0
        self.recovered_incomplete = 0
        # lifecycle
        self._wake_writer = asyncio.Event()
        self._wake_shipper = asyncio.Event()  # new records are on disk
        # Ship before the interval is up: a full batch, a flush() waiter, close(). New records
        # alone must not cut the wait short, or batches never gather (one insert per fsync).
        self._ship_now = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._closing = False
        self._closed = False
        self._close_deadline = float("inf")
        self._writer_task: asyncio.Task[None] | None = None
        self._shipper_task: asyncio.Task[None] | None = None

    # -- counters ---------------------------------------------------------------------
    @property
    def store(self) -> "Store":
        return self._store

    @store.setter
    def store(self, store: "Store") -> None:
        """Ship to another store from now on (and retry at once)."""
        self._store = store
        self._retry_now.set()

    @property
    def depth(self) -> int:
        """Rows accepted (or recovered) and not yet in the store."""
        return self._rows_pending

    @property
    def bytes(self) -> int:
        """Spool size: segment files on disk plus records queued for the next write."""
        return self._disk_bytes + self._pending_bytes

    @property
    def full(self) -> bool:
        return self.bytes >= self.spool_max_bytes

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def written(self) -> int:
        """Rows inserted into the store by this process."""
        return self._written

    @property
    def batches_written(self) -> int:
        return self._batches

    @property
    def failed_batches(self) -> int:
        return self._failed_batches

    @property
    def fsyncs(self) -> int:
        return self._log.syncs if self._log else 0

    @property
    def begins(self) -> int:
        return self._begins

    @property
    def healthy(self) -> bool:
        """The spool is writable and the store takes inserts (a backlog may exist)."""
        return self._write_ok and self._sync_ok and self._store_ok and not self._closed

    def status(self) -> dict[str, Any]:
        return {"depth": self.depth, "bytes": self.bytes, "max_bytes": self.spool_max_bytes,
                "full": self.full, "dropped": self.dropped, "required": self.required,
                "healthy": self.healthy, "spool_writable": self._write_ok, "store_reachable": self._store_ok,
                "written": self.written, "failed_batches": self.failed_batches,
                "begins": self.begins, "fsyncs": self.fsyncs, "fsync": self.fsync, "synced": self._sync_ok}

    # -- request path -----------------------------------------------------------------
    async def begin(self, row: tuple[Any, ...]) -> None:
        """Record a call about to be forwarded: returns once its record is written to the spool
        (group commit), and fsync'd too under ``before_forward`` (see ``SYNC_MODES``).

        Raises AuditUnavailable in required mode when the record cannot be written
        (spool full, spool unwritable, closed, or not synced within begin_timeout_seconds);
        otherwise such a record is dropped and counted and the call goes ahead.
        """
        problem = self._refusal()
        if problem is None:
            try:
                cid = call_id_bytes(row[CALL_ID])
                rec = encode_record(BEGIN, cid, encode_row(row))
            except Exception as exc:  # a row that cannot be encoded is a bug: never let it pass silently
                problem = f"audit record could not be encoded: {_describe(exc)}"
            else:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                fut.add_done_callback(_retrieve)  # a begin that timed out leaves nobody to read it
                self._open[cid] = _OpenCall(rec[REC_HEAD.size + MIN_BODY:], None)
                self._append(rec, begin_cid=cid, waiter=fut)
                self._begins += 1
                try:
                    # Not shielded: a begin that times out cancels its own future, which the
                    # writer then skips (it resolves only futures that are not done).
                    async with asyncio.timeout(self.begin_timeout_seconds):
                        await fut
                    return
                except SpoolWriteError as exc:
                    problem = str(exc)
                except TimeoutError:
                    # The record is queued and lands when the disk catches up.
                    problem = f"audit spool did not sync within {self.begin_timeout_seconds}s"
                    if not self.required:
                        self._log_error("slow", problem)
                        return
        if self.required:
            raise AuditUnavailable(problem)
        self._drop(problem)

    def _refusal(self) -> str | None:
        if self._closing or self._chain is None:
            return "audit spool is not running"
        if not self._write_ok:
            return "audit spool cannot be written (see the error log)"
        if not self._sync_ok:
            return "audit spool cannot be synced to disk (see the error log)"
        if self.full:
            return f"audit spool is full ({self.bytes} of {self.spool_max_bytes} bytes: is the store down?)"
        return None

    def submit(self, row: tuple[Any, ...]) -> None:
        """Record a finished call: O(1) on the loop, never blocks, never raises."""
        try:
            cid = call_id_bytes(row[CALL_ID])
            began = self._open.pop(cid, None) is not None
            if self._closing or self._chain is None:
                self._drop("audit spool is not running")
                return
            # A call that was forwarded always gets its COMPLETE; the quota holds back the rest.
            if not began and self.full:
                self._drop(f"audit spool is full ({self.bytes} of {self.spool_max_bytes} bytes)")
                return
            self._complete(cid, row)
        except Exception as exc:  # never let auditing break a request
            self._dropped += 1
            self._log_error("submit", f"audit row not recorded: {_describe(exc)}")

    def submit_later(self, build: Callable[[], tuple[Any, ...]]) -> None:
        """``submit(build())`` as soon as the event loop is free: the caller's response goes out
        before its row is built, sealed and encoded. close() runs what is still waiting."""
        self._later.append(build)
        if len(self._later) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._submit_waiting)
            except RuntimeError:  # no running loop: a synchronous caller
                self._submit_waiting()

    def _submit_waiting(self) -> None:
        waiting, self._later = self._later, []
        for build in waiting:
            try:
                row = build()
            except Exception as exc:  # never let auditing break a request
                self._dropped += 1
                self._log_error("submit", f"audit row not built: {_describe(exc)}")
                continue
            self.submit(row)

    def _complete(self, cid: bytes, row: tuple[Any, ...]) -> None:
        assert self._chain is not None
        sealed = self._chain.seal(row)
        self._append(encode_record(COMPLETE, cid, encode_row(sealed)))
        self._rows_pending += 1
        if self._rows_pending == self.batch_size:
            self._wake_writer.set()  # a full batch need not wait for the interval

    def _append(self, rec: bytes, *, begin_cid: bytes | None = None,
                waiter: asyncio.Future[None] | None = None) -> None:
        self._queued += 1
        self._pending.append(rec)
        self._pending_bytes += len(rec)
        if begin_cid is not None:
            self._pending_cids.append(begin_cid)
        if waiter is not None:
            self._begin_waiters.append(waiter)
            self._wake_writer.set()
        elif len(self._pending) == 1:
            self._wake_writer.set()

    def _drop(self, why: str) -> None:
        self._dropped += 1
        self._drops_unreported += 1
        now = time.monotonic()
        if now - self._last_drop_log >= self.ERROR_LOG_INTERVAL_SECONDS:
            self._last_drop_log = now
            log.error("audit record(s) dropped: %s (%d now, %d in total)", why, self._drops_unreported,
                      self._dropped)
            self._drops_unreported = 0

    def _log_error(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log.get(key, float("-inf")) >= self.ERROR_LOG_INTERVAL_SECONDS:
            self._last_error_log[key] = now
            log.error("%s", message)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Take the spool's lock, recover what a previous run left, start writing and shipping."""
        if self._writer_task is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="agentgate-spool-write")
        self._ship_io = ThreadPoolExecutor(1, thread_name_prefix="agentgate-spool-ship")
        loop = asyncio.get_running_loop()
        try:
            rec = await loop.run_in_executor(self._io, recover, self.directory, self.instance)
            if self.instance not in rec.heads and self._store.is_open:
                try:  # a new spool for an instance the store already knows: continue its chain
                    async with asyncio.timeout(10):
                        head = await self._store.run(last_head, self._store.database, self.instance)
                    if head is not None:
                        rec.heads[self.instance] = head
                except Exception as exc:
                    log.warning("audit chain of %s starts anew: store not readable (%s)",
                                self.instance, _describe(exc))
            self._log = SegmentWriter(self.directory, rec.next_seg, self.segment_bytes, self.fsync != "off")
            header_size = await loop.run_in_executor(self._io, self._log.open, rec.next_seg)
        except BaseException:
            self._shutdown_io()
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise
        self._chain = Chain(rec.heads)
        self._sizes = {**rec.sizes, rec.next_seg: header_size}
        self._disk_bytes = sum(self._sizes.values())
        self._synced = (rec.next_seg, header_size)
        self._shipped_state = SpoolState(rec.state.shipped, rec.state.resume, dict(rec.state.heads))
        self._read_pos = rec.state.resume
        self._skip_before = rec.state.shipped
        self._rows_pending = rec.unshipped_rows
        for cid, row in rec.open_begins:
            self._complete(cid, incomplete_row(row))
        self.recovered_incomplete = len(rec.open_begins)
        if rec.unshipped_rows or rec.open_begins or rec.damaged_segments:
            log.warning("audit spool %s: %d row(s) from a previous run to ship, %d call(s) recorded as "
                        "incomplete, %d damaged segment(s)", self.directory, rec.unshipped_rows,
                        len(rec.open_begins), rec.damaged_segments)
        self._writer_task = asyncio.create_task(self._write_loop(), name="agentgate-spool-writer")
        self._shipper_task = asyncio.create_task(self._ship_loop(), name="agentgate-spool-shipper")
        for task in (self._writer_task, self._shipper_task):
            task.add_done_callback(self._task_done)

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"audit spool {self.directory} is in use by another gateway process") from None
        self._lock_fd = fd

    async def _durable(self) -> Pos:
        """Sync everything queued so far; the end of the spool once it is on disk."""
        self._submit_waiting()
        fut: asyncio.Future[Pos] = asyncio.get_running_loop().create_future()
        self._flushers.append((self._queued, fut))
        self._wake_writer.set()
        return await fut

    async def sync(self, timeout: float | None = None) -> None:
        """Wait until every record queued before this call is in the spool (not yet shipped;
        fsync'd as ``fsync`` says)."""
        if self._closed or self._writer_task is None:
            return
        async with asyncio.timeout(timeout):
            await self._durable()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every row recorded before this call is in the store."""
        if self._closed or self._writer_task is None:
            return

        async def _wait() -> None:
            end = await self._durable()
            if self._shipped_state.shipped >= end:
                return
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._ship_waiters.append((end, done))
            self._wake_shipper.set()
            self._ship_now.set()
            await done

        async with asyncio.timeout(timeout):
            await _wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting records, sync what is queued, ship what the store takes within
        ``timeout``; whatever is left stays in the spool for the next start."""
        if self._closed:
            return
        self._submit_waiting()
        self._closing = True
        self._close_deadline = time.monotonic() + timeout
        self._wake_writer.set()
        self._wake_shipper.set()
        self._ship_now.set()
        self._retry_now.set()
        for task in (self._writer_task, self._shipper_task):
            if task is None:
                continue
            try:
                async with asyncio.timeout(max(0.0, self._close_deadline - time.monotonic())):
                    await asyncio.shield(task)
            except (TimeoutError, Exception):
                await self._cancel(task)
        if self._pending:
            log.error("audit spool closed with %d record(s) not written", len(self._pending))
            self._dropped += len(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
        if self._rows_pending:
            log.warning("audit spool closed with %d row(s) not yet shipped; they ship at the next start",
                        self._rows_pending)
        self._finish()

    async def _cancel(self, task: "asyncio.Task[None]") -> None:
        task.cancel()
        try:
            async with asyncio.timeout(10):
                await asyncio.shield(task)
        except BaseException:
            if not task.done():
                log.error("audit spool task %s did not stop", task.get_name())

    async def abandon(self) -> None:
        """Stop dead, as a crash would: queued records are lost, nothing is flushed (tests)."""
        for task in (self._writer_task, self._shipper_task):
            if task is not None:
                await self._cancel(task)
        self._pending.clear()
        self._pending_bytes = 0
        self._finish(trim=False)

    def _finish(self, *, trim: bool = True) -> None:
        self._closing = self._closed = True
        for fut in self._begin_waiters:
            if not fut.done():
                fut.set_exception(SpoolWriteError("audit spool closed"))
        for fut in [*(f for _, f in self._flushers), *(f for _, f in self._ship_waiters)]:
            fut.cancel()
        self._begin_waiters, self._flushers, self._ship_waiters = [], [], []
        if self._log is not None and self._io is not None:
            try:
                self._io.submit(self._log.close, sync=True, trim=trim).result(timeout=10)
            except Exception as exc:
                log.error("audit spool: closing the segment failed: %s", _describe(exc))
        self._shutdown_io()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _shutdown_io(self) -> None:
        for ex in (self._io, self._ship_io):
            if ex is not None:
                ex.shutdown(wait=False)
        self._io = self._ship_io = None

    # -- writer task ------------------------------------------------------------------
    async def _write_loop(self) -> None:
        try:
            await self._write_records()
        finally:
            self._wake_shipper.set()  # the shipper waits for the writer to finish at close
            self._ship_now.set()

    def _task_done(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled() and task.exception() is not None:
            if task is self._writer_task:
                self._write_ok = False  # fail closed: begin() refuses in required mode
            else:
                self._store_ok = False
            log.error("audit spool task %s failed", task.get_name(), exc_info=task.exception())

    async def _write_records(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.retry_min_seconds
        while True:
            if not self._pending:
                self._release_flushers()
                if self._closing:
                    return
                self._wake_writer.clear()
                if not self._next_sync:
                    await self._wake_writer.wait()
                elif time.monotonic() < self._next_sync:
                    await _wait_event(self._wake_writer, self._next_sync - time.monotonic())
                else:  # interval: nothing more to write, and what was written is due on disk
                    self._next_sync = 0.0
                    await loop.run_in_executor(self._io, self._sync_written, loop)
                continue
            if (not self._begin_waiters and not self._flushers and not self._closing
                    and self._rows_pending < self.batch_size):
                self._wake_writer.clear()  # completes only: let them gather, unless a begin comes
                await _wait_event(self._wake_writer, self.flush_interval_seconds)
            data = b"".join(self._pending)
            queued = self._queued  # every record queued so far is in data
            cids, waiters = self._pending_cids, self._begin_waiters
            self._pending, self._pending_bytes, self._pending_cids, self._begin_waiters = [], 0, [], []
            sync_after = bool(self._next_sync) and time.monotonic() >= self._next_sync
            if sync_after:
                self._next_sync = 0.0
            try:
                await self._sync_group(loop, data, queued, cids, waiters, sync_after=sync_after)
            except Exception as exc:
                self._write_ok = False
                self._pending.insert(0, data)  # retried, in order, ahead of newer records
                self._pending_bytes += len(data)
                self._pending_cids[:0] = cids
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(SpoolWriteError(f"audit spool write failed: {_describe(exc)}"))
                self._log_error("write", f"audit spool write of {len(data)} bytes failed "
                                         f"(retrying in {delay:.2f}s): {_describe(exc)}")
                if self._closing and time.monotonic() >= self._close_deadline:
                    return
                await self._sleep(delay)
                delay = min(delay * 2, self.MAX_BACKOFF_SECONDS)
                continue
            delay = self.retry_min_seconds

    def _sync_group(self, loop: asyncio.AbstractEventLoop, data: bytes, queued: int, cids: list[bytes],
                    waiters: list[asyncio.Future[None]], *, sync_after: bool = False) -> asyncio.Future[None]:
        """Write ``data`` on the writer's thread (and sync it, under ``before_forward``); done
        once it is in the segment. ``sync_after`` (``interval``): then sync everything written
        so far, after the group's begins are released.

        The thread hands the result to the loop in one callback that also resolves the
        group's begins (:meth:`_synced_group`), so a waiting call resumes on the loop's next
        turn, not after the writer task's (a run_in_executor round trip costs two more turns:
        about 30 µs of each call's latency at one connection).
        """
        assert self._log is not None and self._io is not None
        done: asyncio.Future[None] = loop.create_future()
        sync_now = self.fsync == "before_forward"

        def settle(pos: Pos | None, exc: BaseException | None) -> None:
            if done.cancelled():
                return
            if exc is not None:
                done.set_exception(exc)
                return
            assert pos is not None
            self._synced_group(pos, queued, cids, waiters)
            if self.fsync == "interval" and not sync_after and not self._next_sync:
                self._next_sync = time.monotonic() + self.fsync_interval_seconds
            done.set_result(None)

        def work(append: Callable[[bytes, bool], Pos]) -> None:
            try:
                pos = append(data, sync_now)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer task
                loop.call_soon_threadsafe(settle, None, exc)
                return
            loop.call_soon_threadsafe(settle, pos, None)
            if sync_after:
                self._sync_written(loop)

        self._io.submit(work, self._log.append)
        return done

    def _sync_written(self, loop: asyncio.AbstractEventLoop) -> None:
        """(Writer's thread, ``interval``.) Sync what the segment has not synced yet. A failure
        marks the spool unhealthy (and refuses calls when audit is required) and the sync is
        tried again after the interval, until one succeeds."""
        assert self._log is not None
        try:
            self._log.sync()
        except OSError as exc:
            self._sync_ok = False
            self._log_error("sync", f"audit spool fsync failed: {_describe(exc)}")
            loop.call_soon_threadsafe(self._retry_sync)
        else:
            self._sync_ok = True

    def _retry_sync(self) -> None:
        if not self._next_sync:
            self._next_sync = time.monotonic() + self.fsync_interval_seconds
        self._wake_writer.set()  # an idle writer waits for the new deadline

    def _synced_group(self, pos: Pos, queued: int, cids: list[bytes],
                      waiters: list[asyncio.Future[None]]) -> None:
        """A group is written (on the loop): advance the written position, release its begins."""
        seg, end = pos
        self._write_ok = True
        self._on_disk = queued
        self._disk_bytes += end - self._sizes.get(seg, 0)
        self._sizes[seg] = end
        self._synced = pos
        for cid in cids:
            call = self._open.get(cid)
            if call is not None and call.seg is None:
                call.seg = seg
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        self._release_flushers()
        self._wake_shipper.set()
        if self._rows_pending >= self.batch_size:
            self._ship_now.set()

    def _release_flushers(self) -> None:
        """Resolve the flushers whose records are all on disk (a flusher that came while a
        write was in flight waits for the next one, which carries the records it came after)."""
        keep = []
        for target, fut in self._flushers:
            if target > self._on_disk:
                keep.append((target, fut))
            elif not fut.done():
                fut.set_result(self._synced)
        self._flushers = keep

    async def _sleep(self, seconds: float) -> None:
        """Back off, cut short by close() or a new store."""
        self._retry_now.clear()
        if self._closing:
            seconds = min(seconds, max(0.0, self._close_deadline - time.monotonic()))
        await _wait_event(self._retry_now, seconds)

    # -- shipper task -----------------------------------------------------------------
    async def _ship_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._read_pos >= self._synced:
                if self._closing and (self._writer_task is None or self._writer_task.done()):
                    return
                self._wake_shipper.clear()
                await self._wake_shipper.wait()
                continue
            if self._rows_pending < self.batch_size and not self._ship_waiters and not self._closing:
                self._ship_now.clear()  # let a batch gather
                await _wait_event(self._ship_now, self.flush_interval_seconds)
            assert self._ship_io is not None
            batch = await loop.run_in_executor(self._ship_io, self._read_batch, self._synced,
                                               dict(self._sizes))
            heads: dict[str, tuple[int, str]] = {}
            if batch.count:
                inserted = await self._insert(batch)
                if inserted is None:
                    return  # closing with the store down: the spool keeps the rows
                heads = inserted
            await self._commit(batch, heads)

    def _read_batch(self, limit: Pos, sizes: dict[int, int]) -> _Batch:
        """Read records from the read position up to ``limit`` (blocking, shipper thread).

        A segment is read up to the size the writer recorded for it (what it wrote and
        synced), never to whatever else the file may hold."""
        parts: list[tuple[tuple[str, ...], list[bytes]]] = []
        count = 0
        digest = hashlib.sha256()
        pos = self._read_pos
        segs = sorted(sizes)
        while pos < limit and count < self.batch_size:
            seg, off = pos
            if seg not in sizes:
                later = [s for s in segs if s > seg]
                pos = (later[0], 0) if later and later[0] <= limit[0] else limit
                continue
            path = segment_path(self.directory, seg)
            if seg not in self._headers:
                self._headers[seg] = read_header(path)
            columns = self._headers[seg]
            end = limit[1] if seg == limit[0] else sizes[seg]
            if columns is None:
                log.error("audit spool segment %s has no valid header: skipped", path.name)
                pos = (seg + 1, 0) if seg < limit[0] else limit
                continue
            payloads: list[bytes] = []
            parts.append((tuple(columns), payloads))
            scan = ScanResult()
            full = False
            for kind, cid, payload, roff, rend in iter_records(path, off, end, scan):
                if kind == BEGIN:
                    self._ship_open[cid] = (seg, roff)
                    self._ship_open.move_to_end(cid)
                elif kind == COMPLETE:
                    self._ship_open.pop(cid, None)
                    if (seg, roff) >= self._skip_before:
                        payloads.append(payload)
                        count += 1
                        digest.update(payload)
                pos = (seg, rend)
                if count >= self.batch_size:
                    full = True
                    break
            if full:
                break
            if scan.status != "eof":
                log.error("audit spool: %s record in %s at byte %d; the rest of that segment is skipped",
                          scan.status, path.name, scan.good_end)
            if seg < limit[0]:
                self._headers.pop(seg, None)
                pos = (seg + 1, 0)
            else:
                pos = limit
        return _Batch([part for part in parts if part[1]], count, pos, digest.hexdigest())

    async def _insert(self, batch: _Batch) -> dict[str, tuple[int, str]] | None:
        """Insert until it succeeds (the batch's chain heads); None if closing cut the retries short."""
        delay = self.retry_min_seconds
        attempt = 0
        settings = {"insert_deduplication_token": f"agentgate-spool-{batch.token}"}
        while True:
            attempt += 1
            store = self._store
            try:
                if not store.is_open:
                    await store.open()
                heads = await store.run(insert_spooled, store.database, batch.parts, settings)
                self._store_ok = True
                return heads
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._store_ok = False
                self._failed_batches += 1
                self._log_error("insert", f"audit insert of {batch.count} row(s) failed (attempt {attempt}, "
                                          f"{self.depth} row(s) spooled, retrying): {_describe(exc)}")
            if self._closing and time.monotonic() >= self._close_deadline:
                return None
            await self._sleep(delay)
            delay = min(delay * 2, self.MAX_BACKOFF_SECONDS)

    async def _commit(self, batch: _Batch, shipped: dict[str, tuple[int, str]]) -> None:
        """Record the position (durably) and delete segments nothing points into any more."""
        heads = self._shipped_state.heads
        for instance, (seq, row_hash) in shipped.items():
            heads[instance] = Head(seq, row_hash)
        self._read_pos = batch.end
        resume = next(iter(self._ship_open.values()), batch.end)
        state = SpoolState(batch.end, resume, dict(heads))
        obsolete = [s for s in self._sizes if s < resume[0]]
        assert self._ship_io is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self._ship_io, self._save_and_delete, state, obsolete)
        except OSError as exc:  # the rows are in the store; a replay after a crash is harmless
            self._log_error("state", f"audit spool state not saved: {_describe(exc)}")
        else:
            for seg in obsolete:
                self._disk_bytes -= self._sizes.pop(seg, 0)
        self._shipped_state = state
        self._rows_pending -= batch.count
        self._written += batch.count
        if batch.count:
            self._batches += 1
        keep = []
        for end, fut in self._ship_waiters:
            if end <= batch.end:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((end, fut))
        self._ship_waiters = keep
        self._carry_forward()

    def _save_and_delete(self, state: SpoolState, obsolete: list[int]) -> None:
        save_state(self.directory, state)
        for seg in obsolete:
            segment_path(self.directory, seg).unlink(missing_ok=True)
            self._headers.pop(seg, None)

    def _carry_forward(self) -> None:
        """Copy the BEGIN of a call still running into the current segment when it is the
        only thing keeping an older segment alive."""
        for cid, (seg, _) in self._ship_open.items():
            if seg >= self._read_pos[0]:
                break
            call = self._open.get(cid)
            if call is not None and call.seg is not None and call.seg <= seg:
                call.seg = None
                self._append(encode_record(BEGIN, cid, call.payload), begin_cid=cid)
                self._carried += 1
