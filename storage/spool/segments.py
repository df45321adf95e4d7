"""Segment files: append-only files of records, written and synced by ``SegmentWriter``, read
back by ``iter_records``."""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from storage.spool.records import HEADER, KIND_ID, MAX_BODY, MIN_BODY, REC_HEAD, header_record

PREALLOCATE_BYTES = 1 << 20
SEGMENT_SUFFIX = ".seg"

Pos = tuple[int, int]  # (segment number, byte offset)


def _fdatasync(fd: int) -> None:
    """The one place the spool syncs record data (tests count calls through a wrapper)."""
    os.fdatasync(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segment_path(directory: Path, seg: int) -> Path:
    return directory / f"{seg:016d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[int]:
    out = []
    for p in directory.glob(f"*{SEGMENT_SUFFIX}"):
        stem = p.name[:-len(SEGMENT_SUFFIX)]
        if stem.isdigit():
            out.append(int(stem))
    return sorted(out)


@dataclasses.dataclass
class ScanResult:
    status: str = "eof"  # eof: clean end; torn: partial record at the end; corrupt: bad record
    good_end: int = 0
    zero_tail: bool = False  # the records end in preallocated space (SegmentWriter)


def iter_records(path: Path, start: int, end: int | None, result: ScanResult,
                 chunk: int = 1 << 20) -> Iterator[tuple[int, bytes, bytes, int, int]]:
    """(kind, call_id, payload, offset, end offset) of each valid record in ``[start, end)``."""
    result.good_end, result.status, result.zero_tail = start, "eof", False
    with open(path, "rb") as f:
        f.seek(start)
        buf, i, off = bytearray(), 0, start
        fpos = start

        def have(n: int) -> bool:
            nonlocal buf, i, fpos
            while len(buf) - i < n:
                if i:
                    del buf[:i]
                    i = 0
                want = max(chunk, n - len(buf))
                if end is not None:
                    want = min(want, end - fpos)
                data = f.read(want) if want > 0 else b""
                if not data:
                    return False
                fpos += len(data)
                buf += data
            return True

        while True:
            if not have(REC_HEAD.size):
                result.status = "eof" if len(buf) == i else "torn"
                return
            length, crc = REC_HEAD.unpack_from(buf, i)
            if length == 0 and crc == 0:  # the zero-filled space after the last record
                result.status = "eof"
                result.zero_tail = True
                return
            if not MIN_BODY <= length <= MAX_BODY:
                result.status = "corrupt"
                return
            if not have(REC_HEAD.size + length):
                result.status = "torn"
                return
            body = bytes(buf[i + REC_HEAD.size:i + REC_HEAD.size + length])
            if zlib.crc32(body) != crc:
                result.status = "corrupt"
                return
            kind, call_id = KIND_ID.unpack_from(body)
            rec_end = off + REC_HEAD.size + length
            yield kind, call_id, body[MIN_BODY:], off, rec_end
            i += REC_HEAD.size + length
            off = rec_end
            result.good_end = off


def read_header(path: Path) -> list[str] | None:
    scan = ScanResult()
    for kind, _, payload, _, _ in iter_records(path, 0, None, scan, chunk=64 << 10):
        if kind == HEADER:
            return list(json.loads(payload)["columns"])
        return None
    return None


class SegmentWriter:
    """The open segment: append, fdatasync, rotate. Used from one thread only.

    With fsync on, records are written into space zero-filled ahead of them (``PREALLOCATE_BYTES``
    at a time, as PostgreSQL does for its WAL): an ``fdatasync`` then has no file size or extent
    to record, only data, which on ext4 spares a journal commit per group (~40 µs less wait and
    ~20 µs less CPU per sync on the bench machine). Readers stop at the zero tail (an all-zero
    record header, see ``iter_records``); a closed segment is cut back to its records.
    ``append(data, sync=False)`` leaves the sync to a later :meth:`sync` (or to the rotation).
    """

    def __init__(self, directory: Path, seg: int, segment_bytes: int, fsync: bool) -> None:
        self.directory, self.segment_bytes, self.fsync = directory, segment_bytes, fsync
        self.seg, self.size, self.fd = seg, 0, -1
        self.zeroed = 0  # the file's length: [size, zeroed) is zero-filled
        self.synced = 0  # [0, synced) of the open segment is on disk
        self.syncs = 0
        self.header_size = len(header_record())

    def open(self, seg: int) -> int:
        """Create segment ``seg`` with its header, durably. Returns its size."""
        path = segment_path(self.directory, seg)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            header = header_record()
            os.write(fd, header)
            os.fsync(fd)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self.seg, self.size, self.zeroed, self.fd = seg, len(header), len(header), fd
        self.synced = self.size
        return self.size

    def append(self, data: bytes, sync: bool = True) -> Pos:
        """Write ``data`` (whole records) and, with fsync on and ``sync``, sync it; on failure
        the segment is cut back."""
        if self.fd < 0:
            self.open(self.seg + 1)
        elif self.size + len(data) > self.segment_bytes and self.size > self.header_size:
            self.close(sync=True)
            self.open(self.seg + 1)
        try:
            end = self.size + len(data)
            if self.fsync and end > self.zeroed:
                self._zero_fill(max(end, min(self.zeroed + PREALLOCATE_BYTES, self.segment_bytes)))
            _write_at(self.fd, data, self.size)
            if self.fsync and sync:
                _fdatasync(self.fd)  # also makes a zero fill durable, file size included
                self.syncs += 1
                self.synced = end
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
                self.zeroed = self.size
            except OSError:  # cannot even cut back: continue in a fresh segment
                self.close(sync=False)
            raise
        self.size = end
        return self.seg, self.size

    @property
    def unsynced(self) -> bool:
        """Records of the open segment that fsync on has not synced yet."""
        return self.fsync and self.fd >= 0 and self.synced < self.size

    def sync(self) -> bool:
        """Sync what was appended without a sync; whether there was anything to sync."""
        if not self.unsynced:
            return False
        end = self.size
        _fdatasync(self.fd)
        self.syncs += 1
        self.synced = end
        return True

    def _zero_fill(self, until: int) -> None:
        _write_at(self.fd, bytes(until - self.zeroed), self.zeroed)
        self.zeroed = until

    def close(self, *, sync: bool, trim: bool = True) -> None:
        """Close the segment, cut back to its records (``trim=False`` leaves the zero tail a
        crash would: tests)."""
        if self.fd >= 0:
            try:
                if trim and self.zeroed > self.size:
                    os.ftruncate(self.fd, self.size)
                    self.zeroed = self.size
                if sync:
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view, written = memoryview(data), 0
    while written < len(data):
        written += os.pwrite(fd, view[written:], offset + written)


