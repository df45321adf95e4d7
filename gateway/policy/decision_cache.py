"""Decisions of one compiled bundle, reused for inputs it has already decided.

A decision is a function of the bundle (modules and data, fixed for a ``CompiledPolicy``; a
reload builds a new one with an empty cache) and the part of the input the bundle reads
(gateway/policy/input_shape.py). Entries are keyed by a BLAKE2b-256 digest of that part's
canonical JSON, so memory per entry does not grow with the input; the oldest entry goes first
when the cache is full. Only successful evaluations are stored: errors and undefined decisions
are evaluated again every time.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

_canonical = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode

MAX_KEYED_INPUT_CHARS = 64 * 1024
"""Inputs larger than this (big request bodies the policy reads) are evaluated, not cached:
hashing them costs about what evaluating does."""


class DecisionCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: dict[bytes, Any] = {}

    def key(self, entrypoint: str, doc: Any) -> bytes | None:
        """The entry key for ``doc``, or None when it should not be cached."""
        try:
            text = _canonical(doc)
        except (TypeError, ValueError, RecursionError):
            return None  # not JSON: evaluation reports it
        if len(text) > MAX_KEYED_INPUT_CHARS:
            return None
        h = hashlib.blake2b(entrypoint.encode(), digest_size=32)
        h.update(b"\0")
        h.update(text.encode("utf-8", "surrogatepass"))
        return h.digest()

    def get(self, key: bytes) -> Any | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: bytes, value: Any) -> None:
        if value is None:
            return
        entries = self._entries
        if len(entries) >= self.size and key not in entries:
            del entries[next(iter(entries))]
        entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)
