"""Tamper evidence for audit rows: a hash chain per gateway instance, and its verifier.

Every row a gateway writes through the spool gets ``seq`` (1, 2, ... per ``gateway_instance``),
``prev_hash`` (the previous row's ``row_hash``; empty for seq 1) and ``row_hash``: hex SHA-256
over a canonical encoding of the row's other columns (``prev_hash`` and ``seq`` included).
Rows with ``seq = 0`` are not chained (written before the chain existed).

Canonical encoding: ``CHAIN_VERSION`` + newline + JSON object ``{column: value}`` with keys in
sorted order, no spaces, UTF-8, in which

* columns holding their type's default ("", 0, [], {}, NULL, the nil UUID, the epoch) are left
  out, so adding a column to the table later does not change the hash of older rows;
* values take the form ClickHouse returns them in: UUID as text, DateTime64 as integer
  microseconds since the epoch (UTC), Float32 rounded to single precision, Map as sorted pairs.

:func:`normalize` puts a row into that form *before* it is hashed and written, so what is
stored is exactly what was hashed (strings made valid UTF-8, floats rounded to Float32).

The chain detects rows deleted from (a gap in ``seq``), altered in (``row_hash`` mismatch) or
rewritten in (``prev_hash`` link broken) the store. Like any keyless hash chain it cannot tell
a truncated tail from a quiet gateway: pass ``expected_heads`` (the spool's shipped heads, see
``storage.spool.shipped_heads``) to check the tail against what the gateway itself shipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage import schema

if TYPE_CHECKING:
    from storage.store import Store

CHAIN_VERSION = b"agentgate-chain-v1"
GENESIS = ""
HASHED_COLUMNS: tuple[str, ...] = tuple(n for n in schema.COLUMN_NAMES if n != "row_hash")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ONE_US = dt.timedelta(microseconds=1)
_F32 = struct.Struct("<f")
_IDX = {name: i for i, name in enumerate(schema.COLUMN_NAMES)}
SEQ, PREV_HASH, ROW_HASH, INSTANCE, CALL_ID = (
    _IDX["seq"], _IDX["prev_hash"], _IDX["row_hash"], _IDX["gateway_instance"], _IDX["call_id"])

Conv = Callable[[Any], Any]
# json.dumps with arguments builds an encoder per call; one built once is the same encoding.
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
VERIFY_SETTINGS: dict[str, Any] = {"max_execution_time": 600}


# ---------------------------------------------------------------------------- value forms
def _micros(value: Any) -> int:
    if type(value) is dt.datetime and value.tzinfo is not None:
        return (value - _EPOCH) // _ONE_US  # the usual case
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # chDB may return naive UTC
            value = value.replace(tzinfo=dt.timezone.utc)
        return (value - _EPOCH) // _ONE_US
    if isinstance(value, dt.date):
        return (value - dt.date(1970, 1, 1)).days * 86_400_000_000
    return int(value)


def _f32(value: Any) -> float:
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return v
    try:
        return _F32.unpack(_F32.pack(v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _text(value: Any) -> str:
    if type(value) is str and value.isascii():
        return value  # most values: nothing to replace
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    # Lone surrogates cannot be stored as UTF-8: replace them now so stored == hashed.
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _uuid_text(value: Any) -> str:
    """UUID as text; the nil UUID (the type's default) as "" so it is left out like others."""
    u = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    return str(u) if u.int else ""


def _canon_text(value: Any) -> str:
    return value if type(value) is str else _text(value)


def _same(value: Any) -> Any:
    return value


def _split_args(inner: str) -> list[str]:
    depth, start, out = 0, 0, []
    for i, ch in enumerate(inner):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(inner[start:i].strip())
            start = i + 1
    out.append(inner[start:].strip())
    return out


_WRAPPED = re.compile(r"^(\w+)\((.*)\)$", re.S)


def converters(type_name: str) -> tuple[Conv, Conv]:
    """(normalize, canonical) for a ClickHouse type: the stored Python form, the hashed form."""
    t = type_name.strip()
    m = _WRAPPED.match(t)
    outer, inner = (m.group(1), m.group(2)) if m else (t, "")
    if outer == "LowCardinality":
        return converters(inner)
    if outer == "Nullable":
        norm, canon = converters(inner)
        return (_same if norm is _same else (lambda v: None if v is None else norm(v)),
                lambda v: None if v is None else canon(v))
    if outer == "Array":
        norm, canon = converters(inner)
        return (lambda v: [norm(x) for x in v]), (lambda v: [canon(x) for x in v])
    if outer == "Map":
        (kn, kc), (vn, vc) = (converters(a) for a in _split_args(inner))
        return (lambda v: {kn(k): vn(x) for k, x in dict(v).items()},
                lambda v: sorted([kc(k), vc(x)] for k, x in dict(v).items()))
    if outer in ("String", "FixedString") or outer.startswith("Enum"):
        return _text, _canon_text
    if outer == "UUID":
        return (lambda v: v if isinstance(v, uuid.UUID) else uuid.UUID(str(v))), _uuid_text
    if outer in ("DateTime64", "DateTime", "Date", "Date32"):
        return _same, _micros
    if outer == "Bool":
        return (lambda v: bool(v)), (lambda v: 1 if v else 0)
    if re.fullmatch(r"U?Int(8|16|32|64|128|256)", outer):
        return int, int
    if outer == "Float32":
        return _f32, _f32
    if outer == "Float64":
        return float, float
    raise ValueError(f"storage.chain cannot canonicalise ClickHouse type {type_name!r}: extend converters()")


_CONVERTERS = [converters(c.type) for c in schema.COLUMNS]
_NORMALIZERS = [n for n, _ in _CONVERTERS]
# (index, name, canonical) for hashed columns, in sorted name order.
_HASHED = sorted(((_IDX[n], n, _CONVERTERS[_IDX[n]][1]) for n in HASHED_COLUMNS), key=lambda x: x[1])


_NORMALIZE = [(i, f) for i, f in enumerate(_NORMALIZERS) if f is not _same]


def _normalized(row: tuple[Any, ...]) -> list[Any]:
    values = list(row)
    for i, f in _NORMALIZE:
        values[i] = f(values[i])
    return values


def normalize(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` (in ``schema.COLUMN_NAMES`` order) in the form ClickHouse stores and returns."""
    return tuple(_normalized(row))


def canonical(row: tuple[Any, ...] | list[Any] | Mapping[str, Any]) -> bytes:
    """The bytes :func:`row_hash` hashes; ``row`` is a sequence in column order or a name→value map."""
    if type(row) is tuple or type(row) is list:
        values = [row[idx] for idx, _, _ in _HASHED]
    elif isinstance(row, Mapping):
        values = [row.get(name) for _, name, _ in _HASHED]
    else:
        values = [row[idx] for idx, _, _ in _HASHED]
    doc: dict[str, Any] = {}
    for (_, name, canon), value in zip(_HASHED, values):
        if value is None:
            continue
        if canon is _canon_text and type(value) is str or canon is int and type(value) is int:
            c = value  # already in canonical form (most columns): spare the call
        else:
            c = canon(value)
        if c:  # "", 0, 0.0, [], the epoch, the nil UUID: the type's default is left out
            doc[name] = c
    return CHAIN_VERSION + b"\n" + compact_json(doc).encode("utf-8")


def row_hash(row: tuple[Any, ...] | list[Any] | Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


# ---------------------------------------------------------------------------- sealing
@dataclass(slots=True)
class Head:
    seq: int
    hash: str


class Chain:
    """Chain heads per gateway instance; :meth:`seal` links the next row of an instance."""

    def __init__(self, heads: Mapping[str, Head] | None = None) -> None:
        self.heads: dict[str, Head] = {k: Head(v.seq, v.hash) for k, v in (heads or {}).items()}

    def seal(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """Normalise ``row`` and give it the next seq, prev_hash and row_hash of its instance."""
        values = _normalized(row)
        instance = values[INSTANCE]
        head = self.heads.get(instance) or Head(0, GENESIS)
        values[SEQ] = head.seq + 1
        values[PREV_HASH] = head.hash
        values[ROW_HASH] = ""
        digest = row_hash(values)
        values[ROW_HASH] = digest
        self.heads[instance] = Head(head.seq + 1, digest)
        return tuple(values)


def last_head(client: Any, database: str, instance: str) -> Head | None:
    """The highest chained row of ``instance`` in the store (blocking; for a spool with no state)."""
    schema.validate_database(database)
    rows = client.query(
        f"SELECT max(seq), argMax(row_hash, seq) FROM {database}.{schema.CALLS_TABLE} "
        "WHERE gateway_instance = {i:String} AND seq > 0 HAVING count() > 0",
        parameters={"i": instance}).result_rows
    return Head(int(rows[0][0]), str(rows[0][1])) if rows else None


# ---------------------------------------------------------------------------- verification
@dataclass(frozen=True, slots=True)
class Problem:
    """One finding. kind: missing (deleted rows: seq..seq_end), altered (content does not match
    row_hash), broken_link (prev_hash is not the previous row's row_hash), duplicate_seq
    (two different rows claim one seq), missing_tail (rows the gateway shipped are gone)."""

    kind: str
    instance: str
    seq: int
    call_id: str
    detail: str
    seq_end: int | None = None


@dataclass(slots=True)
class InstanceSummary:
    instance: str
    rows: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problems: int = 0
    head_expired: bool = False
    """The chain starts after seq 1, but old enough that the TTL may have dropped its start."""


@dataclass(slots=True)
class VerifyReport:
    instances: dict[str, InstanceSummary] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0
    unchained_rows: int = 0

    @property
    def ok(self) -> bool:
        return self.problems_total == 0

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems_total": self.problems_total, "unchained_rows": self.unchained_rows,
                "instances": [dataclasses.asdict(s) for s in self.instances.values()],
                "problems": [dataclasses.asdict(p) for p in self.problems]}


class _Collector:
    def __init__(self, report: VerifyReport, max_problems: int) -> None:
        self.report, self.max = report, max_problems

    def add(self, p: Problem) -> None:
        self.report.problems_total += 1
        summary = self.report.instances.get(p.instance)
        if summary is not None:
            summary.problems += 1
        if len(self.report.problems) < self.max:
            self.report.problems.append(p)


Query = tuple[str, dict[str, Any]]
Rows = list[tuple[Any, ...]]
Steps = Generator[Query, Rows, Any]


def _q(sql: str, **params: Any) -> Steps:
    """One query step: the driver runs it and sends back its rows."""
    return (yield (sql, params))


def _check_links(table: str, instance: str, page_rows: int, ttl_days: int | None,
                 now: dt.datetime, out: _Collector) -> Steps:
    """Walk ``instance``'s chain by seq in keyset pages of a few columns.

    Without FINAL: identical copies of a row (a replayed insert not yet merged) are collapsed
    here, while two *different* rows claiming one seq stay visible as a forgery."""
    summary = out.report.instances.setdefault(instance, InstanceSummary(instance))
    prev: tuple[Any, ...] | None = None
    last = 0
    while True:
        rows = yield from _q(
            f"SELECT seq, toString(call_id), prev_hash, row_hash, ts_start FROM {table} "
            "WHERE gateway_instance = {i:String} AND seq > {last:UInt64} "
            "ORDER BY seq LIMIT {n:UInt64} WITH TIES", i=instance, last=last, n=page_rows)
        if not rows:
            return
        last = int(rows[-1][0])
        for seq, call_id, prev_hash, digest, ts_start in rows:
            seq = int(seq)
            if prev is not None and seq == prev[0]:
                if (call_id, prev_hash, digest) != prev[1:4]:
                    out.add(Problem("duplicate_seq", instance, seq, call_id,
                                    f"seq {seq} is claimed by call {prev[1]} and call {call_id}"))
                continue
            summary.rows += 1
            if prev is None:
                summary.first_seq = seq
                if seq > 1:
                    young = ttl_days is None or \
                        _micros(ts_start) > _micros(now) - (ttl_days - 1) * 86_400_000_000
                    if young:
                        out.add(Problem("missing", instance, 1, call_id,
                                        f"rows 1..{seq - 1} are missing before call {call_id}", seq - 1))
                    else:
                        summary.head_expired = True
                elif prev_hash != GENESIS:
                    out.add(Problem("broken_link", instance, seq, call_id, "first row links to a previous row"))
            elif seq > prev[0] + 1:
                out.add(Problem("missing", instance, prev[0] + 1, call_id,
                                f"rows {prev[0] + 1}..{seq - 1} are missing between call {prev[1]} "
                                f"and call {call_id}", seq - 1))
            elif prev_hash != prev[3]:
                out.add(Problem("broken_link", instance, seq, call_id,
                                f"prev_hash does not match row_hash of seq {prev[0]} (call {prev[1]})"))
            prev = (seq, call_id, prev_hash, digest)
            summary.last_seq = seq


def _check_contents(table: str, instance: str | None, page_rows: int, out: _Collector) -> Steps:
    """Recompute every chained row's hash, reading day partitions in time windows of ~page_rows."""
    where = "seq > 0" + ("" if instance is None else " AND gateway_instance = {i:String}")
    params: dict[str, Any] = {} if instance is None else {"i": instance}
    days = yield from _q(f"SELECT toUnixTimestamp(toStartOfDay(ts_start, 'UTC')), count() FROM {table} "
                         f"WHERE {where} GROUP BY 1 ORDER BY 1", **params)
    cols = ", ".join(f"`{n}`" for n in schema.COLUMN_NAMES)
    day_us = 86_400_000_000
    for day_start, count in days:
        windows = max(1, math.ceil(int(count) / page_rows))
        step = math.ceil(day_us / windows)
        start = int(day_start) * 1_000_000
        for k in range(windows):
            lo, hi = start + k * step, min(start + (k + 1) * step, start + day_us)
            rows = yield from _q(
                f"SELECT {cols} FROM {table} WHERE {where} "
                "AND ts_start >= fromUnixTimestamp64Micro({lo:Int64}, 'UTC') "
                "AND ts_start < fromUnixTimestamp64Micro({hi:Int64}, 'UTC')", **params, lo=lo, hi=hi)
            for row in rows:
                if row_hash(row) != row[ROW_HASH]:
                    out.add(Problem("altered", str(row[INSTANCE]), int(row[SEQ]), str(row[CALL_ID]),
                                    "row content does not match its row_hash"))


def verify_steps(database: str, instance: str | None = None, *,
                 expected_heads: Mapping[str, int] | None = None, page_rows: int = 20_000,
                 max_problems: int = 1000, now: dt.datetime | None = None) -> Steps:
    """The verification as a sequence of read-only queries; returns the VerifyReport.

    Two passes, each in bounded pages so memory stays flat for millions of rows: the links
    (seq order, keyset pages of a few columns) and the contents (every row's hash recomputed,
    read by day partition and time window). ``expected_heads`` maps instance → the highest seq
    the gateway knows it shipped; a chain ending before it has lost its tail.
    """
    schema.validate_database(database)
    table = f"{database}.{schema.CALLS_TABLE}"
    report = VerifyReport()
    out = _Collector(report, max_problems)
    now = now or dt.datetime.now(dt.timezone.utc)
    engine = yield from _q("SELECT engine_full FROM system.tables WHERE database = {db:String} "
                           "AND name = {t:String}", db=database, t=schema.CALLS_TABLE)
    ttl = schema._TTL_DAYS.search(str(engine[0][0])) if engine else None
    ttl_days = int(ttl.group(1)) if ttl else None
    if instance is not None:
        names = [instance]
    else:
        rows = yield from _q(f"SELECT DISTINCT gateway_instance FROM {table} WHERE seq > 0 ORDER BY 1")
        names = [str(r[0]) for r in rows]
    for name in names:
        yield from _check_links(table, name, page_rows, ttl_days, now, out)
    for name, expected in (expected_heads or {}).items():
        if instance is not None and name != instance:
            continue
        summary = report.instances.setdefault(name, InstanceSummary(name))
        if summary.last_seq < expected:
            out.add(Problem("missing_tail", name, summary.last_seq + 1, "",
                            f"rows {summary.last_seq + 1}..{expected} were shipped by the gateway "
                            "but are not in the store", expected))
    yield from _check_contents(table, instance, page_rows, out)
    if instance is None:
        [(count,)] = yield from _q(f"SELECT count() FROM {table} FINAL WHERE seq = 0")
        report.unchained_rows = int(count)
    report.problems.sort(key=lambda p: (p.instance, p.seq, p.kind))
    return report


def _rows(client: Any, sql: str, params: dict[str, Any]) -> Rows:
    return list(client.query(sql, parameters=params, settings=VERIFY_SETTINGS).result_rows)


def verify(client: Any, database: str, instance: str | None = None, **kw: Any) -> VerifyReport:
    """Walk each instance's chain and report every problem (blocking, on one client).

    For a gateway's live store prefer :func:`verify_store`: it releases the store's worker
    between pages, so audit inserts keep flowing while a long verification runs."""
    steps = verify_steps(database, instance, **kw)
    rows: Rows | None = None
    try:
        while True:
            sql, params = steps.send(rows)  # type: ignore[arg-type]
            rows = _rows(client, sql, params)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def verify_store(store: "Store", instance: str | None = None, **kw: Any) -> VerifyReport:
    """:func:`verify` on ``store``'s database, one store call per page."""
    steps = verify_steps(store.database, instance, **kw)
    rows: Rows | None = None
    try:
        while True:
            sql, params = steps.send(rows)  # type: ignore[arg-type]
            rows = await store.run(_rows, sql, params)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
