"""What survives a restart: the shipper's position (state.json) and the start-up scan of the
segments previous runs left."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from storage.chain import INSTANCE, ROW_HASH, SEQ, Head
from storage.spool.records import BEGIN, COMPLETE, FORMAT_VERSION, row_decoder
from storage.spool.segments import (Pos, ScanResult, fsync_dir, iter_records, list_segments, read_header,
                                    segment_path)

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclasses.dataclass
class SpoolState:
    shipped: Pos = (0, 0)
    """Every COMPLETE before this position is in the store."""
    resume: Pos = (0, 0)
    """Reading from here finds every BEGIN still waiting for its COMPLETE."""
    heads: dict[str, Head] = dataclasses.field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT_VERSION, "shipped": list(self.shipped), "resume": list(self.resume),
                           "heads": {k: [h.seq, h.hash] for k, h in self.heads.items()}}).encode()


def load_state(directory: Path) -> SpoolState:
    path = directory / STATE_FILE
    try:
        doc = json.loads(path.read_bytes())
        return SpoolState(tuple(doc["shipped"]), tuple(doc["resume"]),  # type: ignore[arg-type]
                          {k: Head(int(v[0]), str(v[1])) for k, v in doc.get("heads", {}).items()})
    except FileNotFoundError:
        return SpoolState()
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        # Replaced atomically, so this is damage: replay everything (duplicates are replaced).
        log.error("audit spool %s is unreadable (%s): replaying the whole spool", path, exc)
        return SpoolState()


def save_state(directory: Path, state: SpoolState) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, state.to_json())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / STATE_FILE)
    fsync_dir(directory)


def shipped_heads(directory: Path) -> dict[str, int]:
    """Highest seq per instance this spool has shipped (for ``chain.verify(expected_heads=...)``)."""
    return {k: h.seq for k, h in load_state(directory).heads.items()}


@dataclasses.dataclass
class Recovered:
    state: SpoolState
    sizes: dict[int, int]
    open_begins: list[tuple[bytes, tuple[Any, ...]]]  # (call_id, begin row), oldest first
    unshipped_rows: int
    heads: dict[str, Head]
    next_seg: int
    damaged_segments: int


def recover(directory: Path, instance: str) -> Recovered:
    """Scan what previous runs left (blocking; the caller holds the LOCK)."""
    state = load_state(directory)
    segs = list_segments(directory)
    for seg in [s for s in segs if s < state.resume[0]]:  # acked; the delete did not happen
        segment_path(directory, seg).unlink(missing_ok=True)
    segs = [s for s in segs if s >= state.resume[0]]
    open_: dict[bytes, tuple[Pos, bytes, list[str]]] = {}
    unshipped = damaged = 0
    sizes: dict[int, int] = {}
    for idx, seg in enumerate(segs):
        path = segment_path(directory, seg)
        columns = read_header(path)
        if columns is None:
            log.error("audit spool segment %s has no valid header: skipped", path.name)
            damaged += 1
            sizes[seg] = path.stat().st_size
            continue
        start = state.resume[1] if seg == state.resume[0] else 0
        scan = ScanResult()
        for kind, cid, payload, off, _ in iter_records(path, start, None, scan):
            if kind == BEGIN:
                open_[cid] = ((seg, off), payload, columns)
            elif kind == COMPLETE:
                open_.pop(cid, None)
                if (seg, off) >= state.shipped:
                    unshipped += 1
        if scan.zero_tail and not _zeros_from(path, scan.good_end):
            scan.status = "corrupt"  # records after a zeroed stretch: not a preallocated tail
        if scan.zero_tail and scan.status == "eof":  # space a run preallocated and never closed
            os.truncate(path, scan.good_end)
        elif scan.status != "eof":
            if idx == len(segs) - 1:
                log.warning("audit spool: cutting a %s tail off %s at byte %d (the gateway stopped mid-write)",
                            scan.status, path.name, scan.good_end)
                os.truncate(path, scan.good_end)
            else:
                log.error("audit spool: %s record in %s at byte %d; the rest of that segment is skipped",
                          scan.status, path.name, scan.good_end)
                damaged += 1
        sizes[seg] = path.stat().st_size
    begins = []
    for cid, (_, payload, columns) in sorted(open_.items(), key=lambda kv: kv[1][0]):
        begins.append((cid, row_decoder(columns)(payload)))
    need = {instance} | {row[INSTANCE] for _, row in begins}
    heads = {k: v for k, v in state.heads.items()}
    found = _heads_from_segments(directory, segs, need)
    for name, head in found.items():
        if name not in heads or head.seq > heads[name].seq:
            heads[name] = head
    next_seg = max([*segs, state.resume[0], state.shipped[0]]) + 1
    return Recovered(state, sizes, begins, unshipped, heads, next_seg, damaged)


def _zeros_from(path: Path, offset: int, chunk: int = 1 << 20) -> bool:
    """Whether the file holds nothing but zero bytes from ``offset`` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        while data := f.read(chunk):
            if data.count(0) != len(data):
                return False
    return True


def _heads_from_segments(directory: Path, segs: list[int], need: set[str]) -> dict[str, Head]:
    """The last chained row of each needed instance, searching segments from the newest."""
    found: dict[str, Head] = {}
    for seg in reversed(segs):
        path = segment_path(directory, seg)
        columns = read_header(path)
        if columns is None:
            continue
        decode = row_decoder(columns)
        completes = [payload for kind, _, payload, _, _ in iter_records(path, 0, None, ScanResult())
                     if kind == COMPLETE]
        for payload in reversed(completes):
            row = decode(payload)
            name = row[INSTANCE]
            if name in need and name not in found and row[SEQ] > 0:
                found[name] = Head(int(row[SEQ]), str(row[ROW_HASH]))
                if len(found) == len(need):
                    return found
    return found


