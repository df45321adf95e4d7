"""The ClickHouse HTTP test fixture (tests/clickhouse_fixture.py) against the real clients:
clickhouse-connect unchanged, two processes sharing the store, kill/restart, and the gateway's
own Store + AuditSpool (migrations, batched inserts, read-only admin queries, outage replay)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from gateway.models import Call, GatewayRequest, Identity
from storage import schema
from storage.audit import call_to_row
from storage.spool import AuditSpool
from storage.store import QueryError, Store
from tests.clickhouse_fixture import ROOT, ClickHouseFixture, scan_statement

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseFixture]:
    fx = ClickHouseFixture(tmp_path_factory.mktemp("chfx") / "data")
    fx.start()
    yield fx
    fx.stop()
    assert fx.returncode == 0, fx.logs()


@pytest.fixture
def own_ch(tmp_path: Path) -> Iterator[ClickHouseFixture]:
    """A fixture server of the test's own, for tests that kill it."""
    fx = ClickHouseFixture(tmp_path / "data")
    fx.start()
    yield fx
    fx.stop()


def client(fx: ClickHouseFixture, **kw: Any) -> Any:
    return clickhouse_connect.get_client(dsn=fx.dsn, connect_timeout=5, **kw)


def raw(fx: ClickHouseFixture, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(fx.url + path, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


# ---------------------------------------------------------------------------- HTTP surface
def test_ping_and_plain_http(ch: ClickHouseFixture) -> None:
    assert raw(ch, "GET", "/ping")[::2] == (200, b"Ok.\n")
    status, headers, body = raw(ch, "POST", "/?default_format=JSONEachRow", b"SELECT 1 AS x, 'a' AS y")
    assert (status, json.loads(body)) == (200, {"x": 1, "y": "a"})
    assert headers["X-ClickHouse-Format"] == "JSONEachRow"
    assert headers["X-ClickHouse-Timezone"] and json.loads(headers["X-ClickHouse-Summary"])["read_rows"] == "1"

    status, headers, body = raw(ch, "GET", "/?query=SELECT%20*%20FROM%20no_such_table")
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "60"
    assert body.startswith(b"Code: 60. DB::Exception: ") and b"(UNKNOWN_TABLE) (version " in body

    # GET runs read-only, as on a server.
    status, headers, body = raw(ch, "GET", "/?query=CREATE%20TABLE%20g%20(a%20Int8)%20ENGINE%3DMemory")
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "164", body

    bad = {"Authorization": "Basic " + base64.b64encode(b"default:wrong").decode()}
    status, headers, body = raw(ch, "POST", "/", b"SELECT 1", bad)
    assert status == 403 and headers["X-ClickHouse-Exception-Code"] == "516"


def test_statement_scanner() -> None:
    st = scan_statement(b"INSERT INTO db.t (`format`, b) FORMAT Native\n\x20\x01rest")
    assert (st.insert_header, st.insert_format) == ("INSERT INTO db.t (`format`, b)", "Native")
    assert st.data_start == len(b"INSERT INTO db.t (`format`, b) FORMAT Native\n")  # 0x20 is data
    st = scan_statement(b"INSERT INTO t (format) SELECT format FROM src")
    assert (st.first, st.insert_header) == ("INSERT", None)
    st = scan_statement(b"-- c\nSELECT 'a;b' /* ; */ FROM t\n FORMAT Native;")
    assert (st.first, st.output_format, st.insert_header) == ("SELECT", "Native", None)
    for bad in (b"SELECT 1; DROP TABLE t", b"  -- only a comment\n"):
        with pytest.raises(Exception, match="Multi-statements|Empty query"):
            scan_statement(bad)


# ---------------------------------------------------------------------------- clickhouse-connect
TYPES_DDL = """CREATE TABLE IF NOT EXISTS {t} (
    id UUID, ts DateTime64(6, 'UTC'), tags Array(String), kind LowCardinality(String),
    port UInt16, n32 UInt32, n64 UInt64, ms Float32, flag UInt8,
    note Nullable(String), maybe Nullable(UInt32), ts_null Nullable(DateTime64(6, 'UTC'))
) ENGINE = MergeTree ORDER BY (kind, id)"""
UTC = dt.timezone.utc


def typed_rows(n: int = 3) -> list[tuple[Any, ...]]:
    base = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    rows: list[tuple[Any, ...]] = [
        (uuid.uuid4(), base, ["reader", "ünïcödé", ""], "route", 65535, 2**32 - 1, 2**64 - 1, 1.5, 1,
         "tab\there 'quote'", 7, base),
        (uuid.uuid4(), base + dt.timedelta(microseconds=1), [], "", 0, 0, 0, -0.25, 0, None, None, None),
    ]
    for i in range(n - 2):
        rows.append((uuid.uuid4(), base + dt.timedelta(seconds=i), [f"r{i}"] * (i % 3), f"k{i % 2}",
                     i, i * 1000, i * 10**12, i / 4, i % 2, f"n{i}", i, None))
    return rows


def naive(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """clickhouse-connect's default tz_mode returns UTC DateTime64 values as naive datetimes."""
    return tuple(v.replace(tzinfo=None) if isinstance(v, dt.datetime) else v for v in row)


@pytest.mark.parametrize("compress", [True, False, "gzip", "zstd"])
def test_insert_and_select_gateway_types(ch: ClickHouseFixture, compress: bool | str) -> None:
    c = client(ch, compress=compress)
    table = f"types_{str(compress).lower()}"
    c.command(TYPES_DDL.format(t=table))
    rows = typed_rows(50)
    summary = c.insert(table, rows)
    assert summary.written_rows == len(rows)
    got = c.query(f"SELECT * FROM {table} ORDER BY kind, id").result_rows
    assert sorted(got, key=lambda r: (r[3], r[0])) == sorted((naive(r) for r in rows), key=lambda r: (r[3], r[0]))
    assert c.command(f"SELECT count() FROM {table}") == len(rows)
    c.close()


def test_errors_settings_and_sessions(ch: ClickHouseFixture) -> None:
    c = client(ch)
    with pytest.raises(DatabaseError, match=r"Code: 60\. DB::Exception: .*UNKNOWN_TABLE") as info:
        c.query("SELECT * FROM does_not_exist")
    assert info.value.code == 60
    with pytest.raises(DatabaseError, match="Multi-statements are not allowed"):
        c.query("SELECT 1; SELECT 2")
    with pytest.raises(DatabaseError, match="readonly") as info:
        c.command("CREATE TABLE ro_probe (a Int8) ENGINE = Memory", settings={"readonly": 1})
    assert info.value.code == 164
    # readonly=1 is applied last, so the other settings of the same request are accepted.
    res = c.query("SELECT number FROM system.numbers_mt LIMIT 200000",
                  settings={"max_result_rows": 10, "result_overflow_mode": "break", "readonly": 1})
    assert 10 <= res.row_count < 200000
    with pytest.raises(DatabaseError, match="TOO_MANY_ROWS_OR_BYTES"):
        c.query("SELECT number FROM numbers(100)", settings={"max_result_rows": 10})
    with pytest.raises(DatabaseError, match="TIMEOUT_EXCEEDED"):
        c.query("SELECT sleepEachRow(0.2) FROM numbers(20)", settings={"max_execution_time": 1, "max_block_size": 1})
    # The failed query leaves nothing behind for the next one.
    assert c.query("SELECT 1 WHERE 0").result_rows == []
    res = c.query("SELECT {s:String} AS s, {n:UInt32} AS n", parameters={"s": "a\tb'c\\", "n": 7})
    assert res.result_rows == [("a\tb'c\\", 7)]
    assert c.command("SELECT 1 WHERE 0") == ""

    # SET and USE last for the client's session only.
    c.command("CREATE DATABASE IF NOT EXISTS fx_other")
    c.command("SET max_result_rows = 12345")
    c.command("USE fx_other")
    other = client(ch)
    assert c.command("SELECT getSetting('max_result_rows'), currentDatabase()") == ["12345", "fx_other"]
    assert other.command("SELECT getSetting('max_result_rows'), currentDatabase()") == ["0", "default"]
    c.close()
    other.close()


def test_password_from_dsn(tmp_path: Path) -> None:
    with ClickHouseFixture(tmp_path / "data", password="p@ss:w/rd") as fx:
        assert client(fx).command("SELECT currentUser()") == "default"
        with pytest.raises(DatabaseError) as info:
            clickhouse_connect.get_client(host="127.0.0.1", port=fx.port, username="default", password="nope")
        assert info.value.code == 516
    assert "p@ss" not in fx.logs()


CHILD = r"""
import json, sys
import clickhouse_connect
c = clickhouse_connect.get_client(dsn=sys.argv[1])
c.insert("shared", [("child", 2)], column_names=["who", "n"])
print(json.dumps(c.query("SELECT who, n FROM shared ORDER BY n").result_rows))
"""


def test_two_processes_share_the_store(ch: ClickHouseFixture) -> None:
    c = client(ch)
    c.command("CREATE TABLE shared (who String, n UInt8) ENGINE = MergeTree ORDER BY n")
    c.insert("shared", [("parent", 1)], column_names=["who", "n"])
    out = subprocess.run([sys.executable, "-c", CHILD, ch.dsn], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [["parent", 1], ["child", 2]]
    assert c.query("SELECT who FROM shared ORDER BY n").result_rows == [("parent",), ("child",)]
    c.close()


def test_kill_then_restart_keeps_data(own_ch: ClickHouseFixture) -> None:
    c = client(own_ch)
    c.command("CREATE TABLE durable (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
    c.insert("durable", [(i, f"v{i}") for i in range(100)], column_names=["id", "s"])
    url = own_ch.url
    own_ch.kill()
    assert own_ch.returncode == -9
    assert not c.ping()
    with pytest.raises(OperationalError):
        c.query("SELECT count() FROM durable")
    assert own_ch.restart() == url and not own_ch.port_changed
    assert c.ping()
    assert c.query("SELECT count(), sum(id) FROM durable").result_rows == [(100, 4950)]
    own_ch.stop()
    assert own_ch.returncode == 0, own_ch.logs()
    own_ch.restart()
    assert client(own_ch).command("SELECT count() FROM durable") == 100


# ---------------------------------------------------------------------------- the gateway's store
def make_call(i: int, agent: str = "agent-1") -> Call:
    req = GatewayRequest(mode="route", method="POST", scheme="https", host="API.Example.com", port=443,
                         path=f"/v1/tools/{i}", query="q=1&api_key=secret", headers=[], body=b"",
                         client_ip="127.0.0.1", route="tools")
    call = Call(request=req, identity=Identity(agent_id=agent, team="support", roles=("reader", "writer")))
    call.outcome, call.status, call.reasons = "allowed", 200, [f"reason-{i}"]
    call.decision_us, call.upstream_ms, call.request_bytes = 42, 1.5, i
    return call


def spool(store: Store, directory: Path) -> AuditSpool:
    return AuditSpool(store, directory, instance="fx", batch_size=50, flush_interval_seconds=0.05,
                      retry_min_seconds=0.01, begin_timeout_seconds=30)


async def test_store_and_audit_spool(ch: ClickHouseFixture, tmp_path: Path) -> None:
    store = Store(ch.dsn, database="agentgate_fx", ttl_days=30)
    await store.open()
    sp = spool(store, tmp_path / "spool")
    await sp.start()
    try:
        calls = [make_call(i) for i in range(120)]
        for call in calls:
            sp.submit(call_to_row(call, instance="fx"))
        await sp.flush(timeout=20)
        assert (sp.written, sp.dropped, sp.failed_batches) == (120, 0, 0)
        assert sp.batches_written >= 3  # batches of at most 50 rows
        assert await store.ping()

        cols, rows = await store.query_readonly(
            "SELECT call_id, agent_id, roles, host, port, query, request_bytes, ts_start "
            "FROM agentgate_fx.calls ORDER BY request_bytes", limit=1000)
        assert cols == ["call_id", "agent_id", "roles", "host", "port", "query", "request_bytes", "ts_start"]
        assert [r[0] for r in rows] == [c.call_id for c in calls]
        assert rows[5][1:7] == ["agent-1", ["reader", "writer"], "api.example.com", 443,
                                "q=1&api_key=[REDACTED]", 5]
        assert rows[5][7].startswith(str(dt.datetime.now(UTC).year))
        _, rows = await store.query_readonly(
            "SELECT version FROM agentgate_fx.schema_version ORDER BY version", limit=100)
        assert rows == [[v] for v, _ in schema.migrations("agentgate_fx", 30)]
        _, rows = await store.query_readonly("SELECT number FROM system.numbers LIMIT 100000", limit=7)
        assert len(rows) == 7
        with pytest.raises(QueryError, match="UNKNOWN_TABLE"):
            await store.query_readonly("SELECT * FROM agentgate_fx.nope", limit=1)
    finally:
        await sp.close()
        await store.close()

    again = Store(ch.dsn, database="agentgate_fx", ttl_days=30)  # migrations are idempotent
    await again.open()
    try:
        _, rows = await again.query_readonly("SELECT count() FROM agentgate_fx.schema_version", limit=1)
        assert rows == [[len(schema.migrations("agentgate_fx", 30))]]
    finally:
        await again.close()


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_audit_spool_replays_after_outage(own_ch: ClickHouseFixture, tmp_path: Path) -> None:
    store = Store(own_ch.dsn, database="agentgate", ttl_days=7, connect_timeout_seconds=2)
    await store.open()
    stores = [store]
    sp = spool(store, tmp_path / "spool")
    await sp.start()
    try:
        sp.submit(call_to_row(make_call(0), instance="fx"))
        await sp.flush(timeout=10)
        await asyncio.to_thread(own_ch.kill)
        assert not await store.ping()
        for i in range(1, 11):
            call = make_call(i)
            await sp.begin(call_to_row(call, instance="fx"))  # the spool keeps taking calls
            sp.submit(call_to_row(call, instance="fx"))
        await wait_for(lambda: sp.failed_batches >= 1, 10, "a failed insert while the store is down")
        assert sp.depth == 10 and not sp.healthy
        await asyncio.to_thread(own_ch.restart)
        if own_ch.port_changed:  # the old port was taken: ship to the new address
            stores.append(Store(own_ch.dsn, database="agentgate", ttl_days=7, connect_timeout_seconds=2))
        sp.store = stores[-1]  # the store is back: retry now rather than at the end of the backoff
        await sp.flush(timeout=20)
        assert (sp.written, sp.dropped, sp.depth) == (11, 0, 0) and sp.healthy
        _, rows = await stores[-1].query_readonly(
            "SELECT count(), uniqExact(call_id), max(request_bytes) FROM agentgate.calls", limit=1)
        assert rows == [[11, 11, 10]]
    finally:
        await sp.close()
        for s in stores:
            await s.close()
