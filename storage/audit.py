"""Audit rows: building one from a finished call, and writing them in batches off the request path."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from gateway.redaction import scrub_text
from storage import schema

if TYPE_CHECKING:
    from gateway.models import Call
    from storage.store import Store

log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
SECRET_NAME_PARTS = ("token", "key", "secret", "password", "passwd", "pwd", "auth", "signature",
                     "sig", "session", "credential", "code", "jwt")
_JWT_VALUE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_SEPARATOR = re.compile(r"([&;])")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _is_secret_name(raw_name: str) -> bool:
    name = unquote_plus(raw_name).lower()
    return any(part in name for part in SECRET_NAME_PARTS)


def redact_query(query: str) -> str:
    """Replace values of credential-like parameters (and JWT-looking values) with [REDACTED].

    Keeps the rest of the query string byte for byte; both '&' and ';' count as separators so
    a server that splits on either cannot smuggle a secret past the scrubber.
    """
    if not query:
        return ""
    pieces = _SEPARATOR.split(query)
    for idx in range(0, len(pieces), 2):
        name, eq, value = pieces[idx].partition("=")
        if not eq:
            continue
        if _is_secret_name(name) or _JWT_VALUE.match(unquote_plus(value)):
            pieces[idx] = f"{name}={REDACTED}"
    return "".join(pieces)


def _clamp(value: Any, hi: int) -> int:
    try:
        return min(max(int(value), 0), hi)
    except (TypeError, ValueError):
        return 0


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        # Not expected (Call assigns uuid4); derive a stable id rather than lose the row.
        return uuid.uuid5(uuid.NAMESPACE_OID, str(value))


def _ts(ns: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=ns // 1000)


def call_to_row(call: "Call", *, instance: str) -> tuple[Any, ...]:
    """One ``calls`` row for a finished call, in ``schema.COLUMN_NAMES`` order.

    The end time is taken now (unless the call carries ``ts_end_ns``), measured with the
    monotonic clock from ``call.t0`` so wall-clock steps cannot make ts_end < ts_start.
    """
    req = call.request
    ident = call.identity
    ts_end_ns = getattr(call, "ts_end_ns", 0) or 0
    if ts_end_ns:
        elapsed_ns = max(0, ts_end_ns - call.ts_start_ns)
    else:
        elapsed_ns = max(0, int((time.perf_counter() - call.t0) * 1e9))
        ts_end_ns = call.ts_start_ns + elapsed_ns
    upstream_ms = max(0.0, float(call.upstream_ms or 0.0))
    values: dict[str, Any] = {
        "call_id": _uuid(call.call_id),
        "trace_id": call.trace_id or "",
        "ts_start": _ts(call.ts_start_ns),
        "ts_end": _ts(ts_end_ns),
        "agent_id": ident.agent_id if ident else "",
        "team": (ident.team or "") if ident else "",
        "roles": [str(r) for r in ident.roles] if ident else [],
        "mode": req.mode,
        "route": req.route or "",
        "method": req.method,
        "scheme": req.scheme,
        "host": call.canonical_host or req.host.lower(),
        "port": _clamp(req.port, 65535),
        "path": call.canonical_path or req.path,
        "query": scrub_text(redact_query(req.query)) if req.query else "",
        "tool_kind": call.tool_kind or "",
        "tool_name": call.tool_name or "",
        "request_bytes": _clamp(call.request_bytes, 2**64 - 1),
        "response_bytes": _clamp(call.response_bytes, 2**64 - 1),
        "status": _clamp(call.status, 65535),
        "outcome": call.outcome or "",
        "reasons": [str(r) for r in call.reasons],
        "error_code": call.error_code or "",
        "policy_revision": call.policy_revision or "",
        "engine": call.engine or "",
        "enforce": 1 if call.enforce else 0,
        "fail_open": 1 if call.fail_open else 0,
        "decision_us": _clamp(call.decision_us, 2**32 - 1),
        "upstream_ms": upstream_ms,
        "gateway_ms": max(0.0, elapsed_ns / 1e6 - upstream_ms),
        "client_ip": req.client_ip or "",
        "gateway_instance": instance,
        "approval_id": call.approval_id,
        "approver": call.approver,
        "decided_at": _ts(call.decided_at_ns) if call.decided_at_ns else None,
        "killswitch_id": call.killswitch_id,
        # Filled in by the spool's hash chain (storage/chain.py); 0/empty = not chained.
        "seq": 0,
        "prev_hash": "",
        "row_hash": "",
        "redacted_paths": list(call.redacted_paths),
        "redaction_counts": dict(call.redaction_counts),
        "rpc_method": call.rpc_method,
        "rpc_id": call.rpc_id,
        "tool_arguments": call.tool_arguments,
        "tool_error": 1 if call.tool_error else 0,
    }
    return tuple(values[name] for name in schema.COLUMN_NAMES)


INCOMPLETE_OUTCOME = "incomplete"
INCOMPLETE_REASON = "gateway stopped before the call completed"
_COL = {name: i for i, name in enumerate(schema.COLUMN_NAMES)}


def incomplete_row(begin_row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row for a call whose request was forwarded but whose completion was never recorded
    (the gateway died): what was known before the upstream, outcome ``incomplete``, status 0.
    The end time is unknown, so ts_end = ts_start."""
    values = list(begin_row)
    values[_COL["outcome"]] = INCOMPLETE_OUTCOME
    values[_COL["status"]] = 0
    values[_COL["reasons"]] = [*begin_row[_COL["reasons"]], INCOMPLETE_REASON]
    values[_COL["ts_end"]] = begin_row[_COL["ts_start"]]
    values[_COL["response_bytes"]] = 0
    values[_COL["upstream_ms"]] = 0.0
    values[_COL["gateway_ms"]] = 0.0
    for name, empty in (("seq", 0), ("prev_hash", ""), ("row_hash", "")):
        values[_COL[name]] = empty
    return tuple(values)


def _insert(client: Any, database: str, rows: list[tuple[Any, ...]],
            settings: dict[str, Any] | None = None) -> None:
    client.insert(schema.CALLS_TABLE, rows, database=database, settings=settings,
                  column_names=schema.COLUMN_NAMES, column_type_names=schema.COLUMN_TYPES)


def _describe(exc: BaseException) -> str:
    """An error for the log: its type and first line, never the rows being inserted."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


class AuditWriter:
    """Buffers audit rows and inserts them in batches from a background task.

    ``submit`` runs on the event loop for every request: O(1), never blocks, never raises.
    At most ``queue_max`` rows are held (waiting plus the batch being written); beyond that
    rows are dropped and counted. A failed insert is retried with backoff, same batch, in
    order, so ``flush`` can wait on a simple sequence number.
    """

    MAX_BACKOFF_SECONDS = 5.0
    DROP_WARNING_INTERVAL_SECONDS = 10.0

    def __init__(self, store: "Store", *, batch_size: int = 2000, flush_interval_seconds: float = 0.2,
                 queue_max: int = 100_000, instance: str = "") -> None:
        if batch_size < 1 or queue_max < 1 or flush_interval_seconds <= 0:
            raise ValueError("batch_size and queue_max must be >= 1, flush_interval_seconds > 0")
        self._store = store
        self.batch_size = batch_size
        self.flush_interval_seconds = flush_interval_seconds
        self.queue_max = queue_max
        self.instance = instance
        self._buffer: collections.deque[tuple[Any, ...]] = collections.deque()
        self._inflight = 0
        self._accepted = 0  # sequence number of the last accepted row
        self._done = 0  # rows accepted and no longer pending (written, or lost at close)
        self._written = 0
        self._dropped = 0
        self._failed_batches = 0
        self._batches = 0
        self._drops_unreported = 0
        self._last_drop_warning = float("-inf")
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._closing = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    # -- counters
    @property
    def depth(self) -> int:
        return len(self._buffer) + self._inflight

    @property
    def written(self) -> int:
        return self._written

    @property
    def batches_written(self) -> int:
        """Successful inserts (one per batch)."""
        return self._batches

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def failed_batches(self) -> int:
        """Failed insert attempts (each retry of a batch counts)."""
        return self._failed_batches

    # -- request path
    def submit(self, row: tuple[Any, ...]) -> None:
        try:
            if self._closing or self.depth >= self.queue_max:
                self._drop()
                return
            self._buffer.append(row)
            self._accepted += 1
            if len(self._buffer) == 1 or len(self._buffer) >= self.batch_size:
                self._wake.set()
        except Exception:  # never let auditing break a request
            self._dropped += 1

    def _drop(self) -> None:
        self._dropped += 1
        self._drops_unreported += 1
        now = time.monotonic()
        if now - self._last_drop_warning >= self.DROP_WARNING_INTERVAL_SECONDS:
            self._last_drop_warning = now
            log.warning("audit queue %s: dropped %d row(s) (%d total, queue_max %d)",
                        "closed" if self._closing else "full", self._drops_unreported,
                        self._dropped, self.queue_max)
            self._drops_unreported = 0

    # -- lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="agentgate-audit-writer")

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every row accepted before this call is written (or lost at close)."""
        target = self._accepted
        if self._done >= target:
            return
        if self._task is None or self._task.done():
            raise RuntimeError("audit writer is not running")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._wake.set()
        await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting rows and write what is left, giving up after ``timeout`` seconds."""
        if self._closed:
            return
        self._closing = True
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except BaseException:
                    pass
        lost = len(self._buffer) + self._inflight
        if lost:
            log.error("audit writer closed with %d row(s) not written", lost)
            self._dropped += lost
            self._buffer.clear()
            self._inflight = 0
        self._done = self._accepted
        self._release_waiters()
        self._closed = True

    # -- background task
    def _release_waiters(self) -> None:
        keep = []
        for target, fut in self._waiters:
            if self._done >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def _run(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._buffer) < self.batch_size and not self._closing and not self._waiters:
                self._wake.clear()
                try:  # let the batch fill, unless it fills up or someone flushes
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_seconds)
                except asyncio.TimeoutError:
                    pass
            n = min(self.batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(n)]
            self._inflight = n
            await self._write(batch)
            self._inflight = 0
            self._done += n
            self._release_waiters()

    async def _write(self, batch: list[tuple[Any, ...]]) -> None:
        delay = min(0.05, self.flush_interval_seconds)
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._store.run(_insert, self._store.database, batch)
                self._written += len(batch)
                self._batches += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed_batches += 1
                log.error("audit insert of %d row(s) failed (attempt %d, retrying in %.2fs): %s",
                          len(batch), attempt, delay, _describe(exc))
            # Back off; close() interrupts the wait but the batch is still retried until
            # close's deadline cancels this task.
            if not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(delay)
            delay = min(delay * 2, self.MAX_BACKOFF_SECONDS)
