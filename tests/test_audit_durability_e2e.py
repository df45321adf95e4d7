"""The audit loses nothing: a ClickHouse outage (the server fixture killed and restarted),
required mode refusing calls once the spool is full, kill -9 of the gateway under load, and
tampering found by `agentgate audit verify`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import clickhouse_connect
import pytest

from tests.clickhouse_fixture import ClickHouseFixture
from tests.conftest import ROOT, Gateway, Keys, Upstream, http, wait_until

CALL_ID = "x-agentgate-call-id"


def get(gw: Gateway, keys: Keys, path: str):
    return http("GET", gw.route_url("plain", path), headers={"Authorization": f"Bearer {keys.token('durable-bot')}"})


def readyz(gw: Gateway) -> dict:
    return http("GET", f"http://{gw.admin}/readyz").json()


@pytest.fixture
def clickhouse(tmp_path: Path) -> ClickHouseFixture:
    fixture = ClickHouseFixture(tmp_path / "ch")
    fixture.start()
    yield fixture
    if fixture.running:
        fixture.stop()


def direct(fixture: ClickHouseFixture):
    return clickhouse_connect.get_client(dsn=fixture.dsn)


def test_outage_spools_and_replays_without_duplicates(gateway_factory, keys: Keys, upstream: Upstream,
                                                     clickhouse: ClickHouseFixture) -> None:
    gw = gateway_factory({"audit": {"dsn": clickhouse.dsn}, "routes": {"plain": {"upstream": upstream.url}}},
                         name="outage")
    before = [get(gw, keys, f"/before/{i}").headers[CALL_ID] for i in range(5)]
    clickhouse.kill()
    during = []
    for i in range(30):
        resp = get(gw, keys, f"/during/{i}")
        assert resp.status == 200, "calls keep flowing while ClickHouse is away"
        during.append(resp.headers[CALL_ID])
    wait_until(lambda: readyz(gw)["audit"]["store_reachable"] is False, what="the outage to show in /readyz")
    status = readyz(gw)
    assert status["ready"] is True and status["audit"]["depth"] >= 30
    metrics = http("GET", f"http://{gw.admin}/metrics").body.decode()
    assert "agentgate_audit_store_reachable 0.0" in metrics

    clickhouse.restart()
    wait_until(lambda: readyz(gw)["audit"]["depth"] == 0, timeout=30, what="the backlog to be replayed")
    client = direct(clickhouse)
    ids = before + during
    rows = client.query("SELECT toString(call_id), path FROM agentgate.calls FINAL WHERE agent_id = 'durable-bot'").result_rows
    assert sorted(r[0] for r in rows) == sorted(ids)
    raw = client.query("SELECT count(), uniqExact(call_id) FROM agentgate.calls WHERE agent_id = 'durable-bot'").result_rows[0]
    assert raw[0] == raw[1] == len(ids), "a replayed record never doubles a row"
    client.close()


def test_required_audit_refuses_calls_when_spool_is_full(gateway_factory, keys: Keys, upstream: Upstream,
                                                         clickhouse: ClickHouseFixture) -> None:
    gw = gateway_factory({"audit": {"dsn": clickhouse.dsn, "required": True, "spool_max_bytes": 65536},
                          "routes": {"plain": {"upstream": upstream.url}}}, name="required")
    assert get(gw, keys, "/ok").status == 200
    clickhouse.kill()
    statuses = []
    for i in range(400):
        resp = get(gw, keys, f"/fill/{i}/" + "x" * 200)
        statuses.append(resp.status)
        if resp.status == 503:
            assert resp.json()["error"]["code"] == "audit_unavailable"
            break
    assert statuses[-1] == 503, "required mode refuses calls once the spool is full"
    assert readyz(gw)["ready"] is False
    clickhouse.restart()
    wait_until(lambda: get(gw, keys, "/after").status == 200, timeout=30, what="service to resume")


def test_kill_9_under_load_loses_no_forwarded_call(gateway_factory, keys: Keys, tmp_path: Path) -> None:
    up = Upstream()
    from tests.conftest import start_upstream

    stop_up = start_upstream(up, tmp_path)
    overrides = {"data_dir": str(tmp_path / "data"), "routes": {"plain": {"upstream": up.url}},
                 "audit": {"flush_interval_seconds": 5}}  # rows stay in the spool when the gateway dies
    gw = gateway_factory(overrides, name="crash-a")
    token = keys.token("crash-bot")

    def hammer(worker: int) -> None:
        for i in range(200):
            try:
                http("GET", gw.route_url("plain", f"/load/{worker}/{i}"),
                     headers={"Authorization": f"Bearer {token}"}, timeout=5)
            except OSError:
                return

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(hammer, w) for w in range(8)]
            wait_until(lambda: len(up.seen) >= 100, what="load to build up")
            os.kill(gw.proc.pid, signal.SIGKILL)
            gw.proc.wait(10)
            for f in futures:
                f.result()
        forwarded = {s.path for s in up.seen if s.path.startswith("/load/")}
        gw2 = gateway_factory(overrides, name="crash-b")
        rows = gw2.sql("SELECT path, outcome FROM agentgate.calls FINAL WHERE agent_id = 'crash-bot'")
        audited = {r["path"] for r in rows}
        assert forwarded <= audited, f"{len(forwarded - audited)} forwarded call(s) have no audit row"
        assert {r["outcome"] for r in rows} <= {"allowed", "incomplete"}
    finally:
        stop_up()


def test_audit_verify_detects_deleted_and_altered_rows(gateway_factory, keys: Keys, upstream: Upstream,
                                                       clickhouse: ClickHouseFixture) -> None:
    gw = gateway_factory({"audit": {"dsn": clickhouse.dsn}, "routes": {"plain": {"upstream": upstream.url}}},
                         name="verify")
    ids = [get(gw, keys, f"/v/{i}").headers[CALL_ID] for i in range(6)]
    responder = keys.admin_token("auditor", roles=["responder"])

    def verify() -> subprocess.CompletedProcess[str]:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}, "AGENTGATE_TOKEN": responder}
        return subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--json", "--config",
                               str(gw.config), "--admin-url", f"http://{gw.admin}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    clean = verify()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["ok"] is True
    client = direct(clickhouse)
    client.command(f"ALTER TABLE agentgate.calls UPDATE status = 201 WHERE call_id = '{ids[2]}' "
                   "SETTINGS mutations_sync = 1")
    client.command(f"ALTER TABLE agentgate.calls DELETE WHERE call_id = '{ids[4]}' SETTINGS mutations_sync = 1")
    client.close()
    tampered = verify()
    assert tampered.returncode == 1
    report = json.loads(tampered.stdout)
    kinds = {(p["kind"], p["call_id"]) for p in report["problems"]}
    assert ("altered", ids[2]) in kinds
    assert any(kind == "missing" for kind, _ in kinds)
