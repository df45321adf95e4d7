"""Write-ahead audit spool: no call reaches an upstream without a record of it on disk.

Layout under ``<data_dir>/spool/``::

    LOCK                 flock'd by the one gateway process that owns the spool
    state.json           shipper position and chain heads, replaced atomically after each insert
    0000000000000001.seg segments: append-only, rotated at ``segment_bytes``

A segment is a sequence of records ``<u32 body length><u32 CRC32(body)><body>``, body =
``<u8 kind><16-byte call_id><payload>``. The first record is a HEADER (payload: JSON with the
column names the segment's rows use, so rows survive a schema change across an upgrade).
BEGIN carries the row as known before the upstream; COMPLETE the full, hash-chained row.
Payloads are JSON arrays in header column order (UUID as text, DateTime64 as microseconds).

Request path (event loop):

* :meth:`AuditSpool.begin` appends a BEGIN and returns once it is written. Group commit: a
  writer task takes whatever records arrived, writes them in one ``write`` on a dedicated
  thread, then resolves every waiting begin; records arriving meanwhile form the next group.
  When the record is fsync'd is ``fsync`` (``SYNC_MODES``): before the begin returns
  (``before_forward``: one ``fdatasync`` per group, the call waits for the disk), within
  ``fsync_interval_seconds`` after it (``interval``, the default: the sync follows a group, or
  a timer when writes stop, and no call waits for it), or when the segment is closed (``off``).
  A written record survives a crash of the gateway (the kernel has it); only a synced one
  survives a power loss or a kernel crash.
* :meth:`AuditSpool.submit` (the completed row) seals the row into its instance's hash chain
  (storage/chain.py) and appends a COMPLETE without waiting; it is synced with the next group,
  or within ``flush_interval_seconds``. The pipeline hands it over with
  :meth:`AuditSpool.submit_later`, so the row is built once the response is on its way.

A shipper task reads written records in order, inserts COMPLETE rows into ClickHouse in
batches (retrying with backoff while the store is down) and only then records its position
in state.json. The position it records (``resume``) never passes a BEGIN whose COMPLETE it
has not seen, so a crash never loses a forwarded call; segments wholly before ``resume`` are
deleted. A call running long enough to pin an old segment has its BEGIN copied forward.

Start-up recovery (the LOCK proves the previous owner is gone): the previous runs' segments
are scanned from ``resume``; a torn tail is cut off; every BEGIN without a COMPLETE is
completed with an ``incomplete`` row (storage.audit.incomplete_row). Replays are harmless:
``calls`` is a ReplacingMergeTree keyed by call and each batch carries a content-derived
``insert_deduplication_token``.

Modules: ``records`` (record framing, row codec), ``segments`` (segment files, the writer),
``recovery`` (state.json, the start-up scan), ``audit_spool`` (``AuditSpool``: request path,
group commit, shipper).
"""

from storage.spool.audit_spool import (LOCK_FILE, AuditSpool, AuditUnavailable, SpoolLocked, SpoolWriteError,
                                       insert_spooled)
from storage.spool.records import BEGIN, COMPLETE, HEADER, encode_record, encode_row
from storage.spool.recovery import STATE_FILE, shipped_heads
from storage.spool.segments import PREALLOCATE_BYTES, ScanResult, iter_records, list_segments, segment_path

__all__ = ["BEGIN", "COMPLETE", "HEADER", "LOCK_FILE", "PREALLOCATE_BYTES", "STATE_FILE", "AuditSpool",
           "AuditUnavailable", "ScanResult", "SpoolLocked", "SpoolWriteError", "encode_record", "encode_row",
           "insert_spooled", "iter_records", "list_segments", "segment_path", "shipped_heads"]
