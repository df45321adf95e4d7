"""Spool records: the framing of a record and the JSON codec of the rows they carry.

A record is ``<u32 body length><u32 CRC32(body)><body>``, body = ``<u8 kind><16-byte call_id><payload>``.
Row payloads are JSON arrays in the column order of their segment's HEADER (UUID as text,
DateTime64 as microseconds since the epoch).
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import uuid
import zlib
from typing import Any

from storage import schema
from storage.chain import compact_json


HEADER, BEGIN, COMPLETE = 0, 1, 2
REC_HEAD = struct.Struct("<II")  # body length, CRC32 of body
KIND_ID = struct.Struct("<B16s")
MIN_BODY = KIND_ID.size
MAX_BODY = 64 << 20
FORMAT_VERSION = 1
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ONE_US = dt.timedelta(microseconds=1)
_NIL = uuid.UUID(int=0)


def _same(v: Any) -> Any:
    return v


def _codec(type_name: str) -> tuple[Any, Any, Any]:
    """(encode to JSON-able, decode, default) for one column type; ``_same`` where the value
    is its own JSON form."""
    t = type_name
    while t.startswith("LowCardinality("):
        t = t[len("LowCardinality("):-1]
    if t.startswith("Nullable("):
        enc, dec, _ = _codec(t[len("Nullable("):-1])
        return ((_same if enc is _same else (lambda v: None if v is None else enc(v))),
                (_same if dec is _same else (lambda v: None if v is None else dec(v))), None)
    if t == "UUID":
        return str, uuid.UUID, _NIL
    if t.startswith(("DateTime64", "DateTime")):
        return ((lambda v: (v - _EPOCH) // _ONE_US),
                (lambda v: _EPOCH + _ONE_US * v), _EPOCH)
    if t.startswith("Array("):
        return _same, _same, []
    if t.startswith("Map("):
        return (lambda v: dict(v)), _same, {}
    if t.startswith(("UInt", "Int", "Bool")):
        return _same, _same, 0
    if t.startswith("Float"):
        return _same, _same, 0.0
    return _same, _same, ""


_CODECS = [_codec(c.type) for c in schema.COLUMNS]
_ENCODE = [(i, enc) for i, (enc, _, _) in enumerate(_CODECS) if enc is not _same]


def encode_row(row: tuple[Any, ...]) -> bytes:
    values = list(row)
    for i, enc in _ENCODE:
        values[i] = enc(values[i])
    return compact_json(values).encode("utf-8")


def row_decoder(columns: list[str]) -> Any:
    """A function decoding a payload written with ``columns`` into a row in today's order."""
    where = {name: i for i, name in enumerate(columns)}
    plan = [(where.get(name), dec, default) for name, (_, dec, default) in zip(schema.COLUMN_NAMES, _CODECS)]

    def decode(payload: bytes) -> tuple[Any, ...]:
        values = json.loads(payload)
        return tuple(default if i is None else dec(values[i]) for i, dec, default in plan)
    return decode


def encode_record(kind: int, call_id: bytes, payload: bytes) -> bytes:
    body = KIND_ID.pack(kind, call_id) + payload
    return REC_HEAD.pack(len(body), zlib.crc32(body)) + body


def header_record() -> bytes:
    doc = {"format": FORMAT_VERSION, "columns": list(schema.COLUMN_NAMES)}
    return encode_record(HEADER, bytes(16), json.dumps(doc).encode())


def call_id_bytes(value: Any) -> bytes:
    return value.bytes if isinstance(value, uuid.UUID) else uuid.UUID(str(value)).bytes


