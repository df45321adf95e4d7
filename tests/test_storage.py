"""Audit storage against a real embedded ClickHouse (chDB) in tmp_path.

chDB hosts one engine per process: a second data path can only be opened once every client
on the first is closed (see test_chdb_one_path_per_process). Each test therefore closes its
stores in teardown, and tests run one after the other.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import uuid
from pathlib import Path

import pytest

import storage.store as store_mod
from gateway.models import Call, GatewayRequest
from storage import schema
from storage.audit import REDACTED, call_to_row, redact_query
from storage.chain import GENESIS, row_hash, verify
from storage.spool import list_segments, segment_path
from storage.store import (TABLE_FUNCTIONS, QueryError, QueryRejected, Store, StoreError, check_readonly_sql,
                           redact_dsn)
from tests.storage_helpers import dsn, make_call, select, spool, store  # noqa: F401 (store: a fixture)

DB = "agentgate"


# ------------------------------------------------------------------ schema & migrations
async def test_migrations_idempotent_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "ch"
    for _ in range(2):
        s = Store(dsn(path), database="audit_x", ttl_days=30)
        await s.open()
        try:
            assert await s.run(schema.apply_migrations, "audit_x", 30) == []  # nothing left to do
            versions = await select(s, "SELECT version, applied_at FROM audit_x.schema_version ORDER BY version")
            assert [v for v, _ in versions] == [m[0] for m in schema.migrations("audit_x", 30)]
            assert all(isinstance(at, dt.datetime) for _, at in versions)
            [(part, order, ttl_days)] = await select(
                s, "SELECT partition_key, sorting_key, engine_full FROM system.tables "
                   "WHERE database = 'audit_x' AND name = 'calls'")
            assert part == "toDate(ts_start)"
            assert order == "agent_id, ts_start, call_id"
            assert "TTL ts_start + toIntervalDay(30)" in ttl_days
            cols = await select(s, "SELECT name, type, comment FROM system.columns "
                                   "WHERE database = 'audit_x' AND table = 'calls' ORDER BY position")
            assert [(n, t) for n, t, _ in cols] == list(zip(schema.COLUMN_NAMES, schema.COLUMN_TYPES))
            assert all(comment for _, _, comment in cols)
        finally:
            await s.close()


async def test_ttl_change_is_applied_on_open(tmp_path: Path) -> None:
    path = tmp_path / "ch"
    for days in (90, 7, 7):
        s = Store(dsn(path), ttl_days=days)
        await s.open()
        try:
            assert await s.run(schema.current_ttl_days, DB) == days
        finally:
            await s.close()


def test_bad_database_name_refused() -> None:
    with pytest.raises(ValueError, match="audit database name"):
        Store("chdb:///tmp/x", database="x; DROP TABLE y")


# ------------------------------------------------------------------ store
async def test_run_uses_one_worker_thread(store: Store) -> None:
    ids = {await store.run(lambda c: threading.get_ident()) for _ in range(3)}
    assert len(ids) == 1 and threading.get_ident() not in ids
    assert await store.ping() is True
    await store.close()
    assert await store.ping() is False
    with pytest.raises(StoreError, match="not open"):
        await store.run(lambda c: None)


async def test_chdb_one_path_per_process(tmp_path: Path) -> None:
    """chDB is one engine per process: two paths at once fail, the same path twice works."""
    a, b, a2 = Store(dsn(tmp_path / "a")), Store(dsn(tmp_path / "b")), Store(dsn(tmp_path / "a"))
    await a.open()
    try:
        with pytest.raises(StoreError, match="cannot open audit store chdb://.*/b"):
            await b.open()
        await a2.open()  # a second Store on the same path shares the engine
        assert await a2.ping()
        await a2.close()
    finally:
        await a.close()
    await b.open()  # once every client on 'a' is closed, another path can be opened
    assert await b.ping()
    await b.close()


async def test_open_failure_names_dsn_without_password() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = Store(f"http://admin:hunter2@127.0.0.1:{port}", connect_timeout_seconds=1)
    with pytest.raises(StoreError) as exc:
        await s.open()
    assert f"http://admin:***@127.0.0.1:{port}" in str(exc.value)
    assert "hunter2" not in str(exc.value)
    with pytest.raises(StoreError, match="expected chdb:///path"):
        await Store("mysql://root:pw@h/db").open()


def test_redact_dsn() -> None:
    assert redact_dsn("https://u:p%40ss@ch.local:8443/db") == "https://u:***@ch.local:8443/db"
    assert redact_dsn("http://u@h:8123") == "http://u@h:8123"
    assert redact_dsn("chdb:///var/lib/x") == "chdb:///var/lib/x"
    assert redact_dsn("http://h:8123/?password=pw&x=1") == f"http://h:8123/?password={REDACTED}&x=1"


# ------------------------------------------------------------------ read-only SQL
REJECTED = [
    "INSERT INTO agentgate.calls (call_id) VALUES (generateUUIDv4())",
    "ALTER TABLE agentgate.calls DELETE WHERE 1",
    "DROP TABLE agentgate.calls",
    "TRUNCATE TABLE agentgate.calls",
    "SELECT 1; DROP TABLE agentgate.calls",
    "SELECT 1;; SELECT 2",
    "WITH 1 AS y INSERT INTO agentgate.calls (call_id) SELECT generateUUIDv4()",
    "with x as (select 1) insert into agentgate.calls (call_id) select generateUUIDv4()",
    "SELECT 1 INTO OUTFILE '/tmp/agentgate-outfile-test'",
    "SET readonly = 0",
    "OPTIMIZE TABLE agentgate.calls FINAL",
    "SYSTEM STOP MERGES",
    "/* SELECT */ DELETE FROM agentgate.calls WHERE 1",
    "-- SELECT\nDROP TABLE agentgate.calls",
    "SELECT $$x$$; DROP TABLE agentgate.calls",
    "SELECT $$'$$; DROP TABLE agentgate.calls; SELECT '$$",
    "SELECT 'unterminated",
    "SELECT 1 /* unterminated",
    "",
    "  ;  ",
    "-- nothing but a comment",
]


@pytest.mark.parametrize("sql", REJECTED)
def test_check_readonly_sql_rejects(sql: str) -> None:
    with pytest.raises(QueryRejected):
        check_readonly_sql(sql)


@pytest.mark.parametrize("sql,expected", [
    ("  -- why\n select 1 ;  -- trailing\n", "select 1"),
    ("/* c */ WITH 1 AS x SELECT x", "WITH 1 AS x SELECT x"),
    ("SELECT 'a;b; DROP TABLE t' AS s, `insert` FROM t", "SELECT 'a;b; DROP TABLE t' AS s, `insert` FROM t"),
    ("SELECT 'it''s', 'a\\'b;'", "SELECT 'it''s', 'a\\'b;'"),
    ("describe table agentgate.calls", "describe table agentgate.calls"),
    ("DESC agentgate.calls", "DESC agentgate.calls"),
    ("show create table agentgate.calls", "show create table agentgate.calls"),
    ("EXPLAIN SELECT 1", "EXPLAIN SELECT 1"),
])
def test_check_readonly_sql_accepts(sql: str, expected: str) -> None:
    assert check_readonly_sql(sql) == expected


async def test_query_readonly_refuses_writes_and_keeps_data(store: Store, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sp = spool(store, tmp_path)
    await sp.start()
    sp.submit(call_to_row(make_call(), instance="t"))
    await sp.close()
    for sql in REJECTED:
        with pytest.raises(QueryRejected):
            await store.query_readonly(sql, limit=10)
    # Second line of defence: with the Python guard disabled, ClickHouse's readonly=1 refuses.
    monkeypatch.setattr(store_mod, "check_readonly_sql", lambda sql: sql)
    for sql in ["WITH 1 AS y INSERT INTO agentgate.calls (call_id) SELECT generateUUIDv4()",
                "SELECT 1; DROP TABLE agentgate.calls",
                f"SELECT * FROM file('{tmp_path}/x.txt', 'LineAsString')",
                "SELECT number FROM numbers(10) SETTINGS max_result_rows = 0"]:
        with pytest.raises(QueryError, match="readonly|READONLY"):
            await store.query_readonly(sql, limit=10)
    monkeypatch.undo()
    assert await select(store, "SELECT count() FROM agentgate.calls") == [(1,)]
    # The worker's own client is not left read-only.
    await store.run(lambda c: c.command("CREATE TABLE agentgate.scratch (x UInt8) ENGINE = Memory"))


async def test_every_table_function_of_the_store_is_known(store: Store) -> None:
    """storage.store.TABLE_FUNCTIONS is refused in admin SQL: a chDB upgrade that adds a table
    function (a new way to read files or reach the network) must extend it."""
    _, rows = await store.query_readonly("SELECT name FROM system.table_functions", limit=10_000)
    assert {name.lower() for (name,) in rows} <= TABLE_FUNCTIONS


async def test_query_readonly_results(store: Store) -> None:
    cols, rows = await store.query_readonly("SELECT number FROM numbers(100000)", limit=10)
    assert cols == ["number"] and rows == [[i] for i in range(10)]
    _, rows = await store.query_readonly("SELECT number FROM numbers(200000)", limit=70_000)
    assert len(rows) == 70_000  # 'break' overshoots to a block boundary; trimmed exactly
    cols, rows = await store.query_readonly(
        "SELECT toUUID('6f1c1a4e-0d1e-4a57-9a3f-1f0e6a1b2c3d') AS u, "
        "toDateTime64('2025-01-02 03:04:05.123456', 6, 'UTC') AS t, toDate('2025-01-02') AS d, "
        "toDecimal64(1.5, 2) AS dec, toIPv4('10.1.2.3') AS ip, map('a', 1) AS m, "
        "tuple(1, 'x') AS tup, nan AS n, [1, 2] AS arr, toFixedString('ab', 3) AS fs", limit=5)
    assert cols == ["u", "t", "d", "dec", "ip", "m", "tup", "n", "arr", "fs"]
    json.dumps(rows, allow_nan=False)
    u, t, d, dec, ip, m, tup, n, arr, _ = rows[0]
    assert u == "6f1c1a4e-0d1e-4a57-9a3f-1f0e6a1b2c3d"
    assert t.startswith("2025-01-02 03:04:05.123456")
    assert (d, dec, ip, m, tup, n, arr) == ("2025-01-02", "1.50", "10.1.2.3", {"a": 1}, [1, "x"], None, [1, 2])
    cols, rows = await store.query_readonly("DESCRIBE TABLE agentgate.calls", limit=100)
    assert [r[0] for r in rows] == list(schema.COLUMN_NAMES)
    _, rows = await store.query_readonly("SHOW TABLES FROM agentgate", limit=100)
    assert ["calls"] in rows and ["schema_version"] in rows
    with pytest.raises(QueryError, match="UNKNOWN_TABLE|does not exist"):
        await store.query_readonly("SELECT * FROM agentgate.nope", limit=1)
    with pytest.raises(QueryRejected):
        await store.query_readonly("SELECT 1", limit=0)


# ------------------------------------------------------------------ rows
def test_redact_query() -> None:
    cases = {
        "": "",
        "page=2&q=x": "page=2&q=x",
        "access_token=abc&page=2": f"access_token={REDACTED}&page=2",
        "API_KEY=abc;x=1": f"API_KEY={REDACTED};x=1",
        "X-Amz-Signature=ff&X-Amz-Credential=AK%2F1": f"X-Amz-Signature={REDACTED}&X-Amz-Credential={REDACTED}",
        "client_secret=s&password=p&passwd=q&auth=a&sessionid=z&code=c&sig=g":
            "&".join(f"{k}={REDACTED}" for k in
                     ["client_secret", "password", "passwd", "auth", "sessionid", "code", "sig"]),
        "api%5Fkey=abc": f"api%5Fkey={REDACTED}",
        "q=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln": f"q={REDACTED}",
        "flag&token=": f"flag&token={REDACTED}",
    }
    for raw, expected in cases.items():
        assert redact_query(raw) == expected, raw


def test_call_to_row_defaults_and_timing() -> None:
    req = GatewayRequest(mode="forward", method="GET", scheme="http", host="Example.COM", port=80,
                         path="/a", query="", headers=[], body=b"")
    call = Call(request=req)
    call.t0 -= 0.5  # the call started half a second ago
    call.upstream_ms = 200.0
    row = dict(zip(schema.COLUMN_NAMES, call_to_row(call, instance="gw-1")))
    assert len(row) == len(schema.COLUMNS)
    assert row["agent_id"] == row["team"] == row["route"] == row["client_ip"] == ""
    assert row["roles"] == [] and row["host"] == "example.com"
    assert row["call_id"] == uuid.UUID(call.call_id)
    assert row["gateway_instance"] == "gw-1" and row["enforce"] == 1 and row["fail_open"] == 0
    elapsed_ms = (row["ts_end"] - row["ts_start"]) / dt.timedelta(milliseconds=1)
    assert 500 <= elapsed_ms < 5000
    assert row["gateway_ms"] == pytest.approx(elapsed_ms - 200.0, abs=0.01)
    assert row["ts_start"].tzinfo is dt.timezone.utc


async def test_every_column_round_trips(store: Store, tmp_path: Path) -> None:
    """A row from call_to_row goes through the spool into ClickHouse and comes back unchanged,
    with the chain columns the spool fills in."""
    call = make_call()
    expected = dict(zip(schema.COLUMN_NAMES, call_to_row(call, instance="gw-a")))
    sp = spool(store, tmp_path, instance="gw-a", batch_size=100)
    await sp.start()
    try:
        sp.submit(tuple(expected.values()))
        await sp.flush(timeout=10)
        assert (sp.written, sp.depth, sp.dropped) == (1, 0, 0)
    finally:
        await sp.close()
    names = ", ".join(schema.COLUMN_NAMES)
    [row] = await select(store, f"SELECT {names}, toUnixTimestamp64Micro(ts_start), "
                                f"toUnixTimestamp64Micro(ts_end) FROM agentgate.calls")
    got = dict(zip(schema.COLUMN_NAMES, row))
    chained = {"seq", "prev_hash", "row_hash"}
    for name in schema.COLUMN_NAMES:
        want = expected[name]
        if name in chained:
            continue
        if name in ("ts_start", "ts_end"):
            micros = row[len(schema.COLUMN_NAMES) + (0 if name == "ts_start" else 1)]
            assert micros == (want - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)
        elif isinstance(want, float):
            assert got[name] == pytest.approx(want, rel=1e-6), name
        else:
            assert got[name] == want, name
    assert (got["seq"], got["prev_hash"]) == (1, GENESIS)  # the first row of gw-a's chain
    assert got["row_hash"] == row_hash(row[:len(schema.COLUMN_NAMES)]) and len(got["row_hash"]) == 64
    assert got["call_id"] == uuid.UUID(call.call_id) and got["gateway_instance"] == "gw-a"
    assert got["query"] == f"page=2&access_token={REDACTED}&sig={REDACTED}&q=ok"
    assert (got["mode"], got["route"], got["roles"], got["response_bytes"]) == ("route", "github", ["reader", "writer"], 2**40)
    report = await store.run(verify, DB)
    assert report.ok and report.instances["gw-a"].rows == 1


async def test_secrets_never_written(store: Store, tmp_path: Path) -> None:
    """Secret query parameters are scrubbed before the row exists: neither the spool's files
    nor the stored row hold them, and request headers are never recorded."""
    sp = spool(store, tmp_path)
    await sp.start()
    call = make_call()
    call.request.query = "token=hunter2&apiKey=hunter2&Password=hunter2&SessionId=hunter2&auth_code=hunter2&x=1"
    try:
        await sp.begin(call_to_row(call, instance="t"))
        sp.submit(call_to_row(call, instance="t"))
        await sp.sync(timeout=10)
        on_disk = b"".join(segment_path(sp.directory, seg).read_bytes() for seg in list_segments(sp.directory))
        assert b"agent-7" in on_disk  # the records are there ...
        assert b"hunter2" not in on_disk and b"s3cr3t-header" not in on_disk  # ... without the secrets
        await sp.flush(timeout=10)
    finally:
        await sp.close()
    cols, rows = await store.query_readonly("SELECT * FROM agentgate.calls", limit=10)
    dumped = json.dumps(rows)
    assert len(rows) == 1
    assert "hunter2" not in dumped and "s3cr3t-header" not in dumped
    assert rows[0][cols.index("query")].endswith("&x=1")
