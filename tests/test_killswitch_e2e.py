"""Kill-switches through a real gateway: agent, team and global scopes, open streams cut, held
approvals denied, persistence across restarts, revive, and the CLI."""

from __future__ import annotations

from http.client import HTTPConnection, IncompleteRead
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, Gateway, Keys, Upstream, hold_refund, http, wait_until

CALL_ID = "x-agentgate-call-id"


@pytest.fixture(scope="module")
def operator(keys: Keys) -> str:
    return keys.admin_token("oncall-olga", roles=["operator"])


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream) -> Gateway:
    return gateway_factory({"routes": {"plain": {"upstream": upstream.url}}}, name="kill")


def get(gw: Gateway, keys: Keys, agent: str, team: str = "support", path: str = "/x"):
    return http("GET", gw.route_url("plain", path), headers={"Authorization": f"Bearer {keys.token(agent, team=team)}"})


def kill(gw: Gateway, token: str, scope: str, target: str = "", reason: str = "incident 42") -> dict:
    resp = gw.call_admin("POST", "/v1/killswitches", token, {"scope": scope, "target": target, "reason": reason})
    assert resp.status == 201, resp.body
    return resp.json()


def revive(gw: Gateway, token: str, switch_id: str) -> None:
    assert gw.call_admin("DELETE", f"/v1/killswitches/{switch_id}", token).status == 200


def test_kill_agent_refuses_next_call_and_spares_others(gw: Gateway, keys: Keys, operator: str) -> None:
    assert get(gw, keys, "rogue-bot").status == 200
    switch = kill(gw, operator, "agent", "rogue-bot", "exfiltration suspected")
    refused = get(gw, keys, "rogue-bot")
    assert refused.status == 403
    err = refused.json()["error"]
    assert err["code"] == "agent_suspended" and "exfiltration suspected" in err["message"]
    row = gw.audit_row(refused.headers[CALL_ID])
    assert (row["outcome"], row["killswitch_id"], row["agent_id"]) == ("killed", switch["id"], "rogue-bot")
    assert get(gw, keys, "good-bot").status == 200
    listed = gw.call_admin("GET", "/v1/killswitches", operator).json()["killswitches"]
    assert [s["id"] for s in listed] == [switch["id"]]
    events = gw.sql("SELECT actor, action, reason FROM agentgate.admin_events WHERE action = 'killswitch.create'")
    assert {"actor": "oncall-olga", "action": "killswitch.create", "reason": "exfiltration suspected"} in events
    revive(gw, operator, switch["id"])
    assert get(gw, keys, "rogue-bot").status == 200
    assert gw.call_admin("DELETE", f"/v1/killswitches/{switch['id']}", operator).status == 409


def test_team_and_global_scopes(gw: Gateway, keys: Keys, operator: str) -> None:
    team = kill(gw, operator, "team", "sales")
    assert get(gw, keys, "s1", team="sales").status == 403
    assert get(gw, keys, "s2", team="support").status == 200
    everyone = kill(gw, operator, "all")
    assert get(gw, keys, "s2", team="support").status == 403
    revive(gw, operator, everyone["id"])
    assert get(gw, keys, "s2", team="support").status == 200
    assert get(gw, keys, "s1", team="sales").status == 403
    revive(gw, operator, team["id"])
    assert get(gw, keys, "s1", team="sales").status == 200


def test_targets_match_whatever_their_case(gw: Gateway, keys: Keys, operator: str) -> None:
    """An operator's "Rogue-Bot" stops "rogue-bot": a switch errs towards stopping too much."""
    agent = kill(gw, operator, "agent", "Case-Bot")
    team = kill(gw, operator, "team", "FINANCE")
    try:
        assert get(gw, keys, "case-bot").status == 403
        assert get(gw, keys, "f1", team="Finance").status == 403
        assert get(gw, keys, "f1", team="support").status == 200
    finally:
        revive(gw, operator, agent["id"])
        revive(gw, operator, team["id"])
    assert get(gw, keys, "case-bot").status == 200


def test_kill_requires_operator_and_valid_input(gw: Gateway, keys: Keys, operator: str) -> None:
    responder = keys.admin_token("r", roles=["responder"])
    resp = gw.call_admin("POST", "/v1/killswitches", responder, {"scope": "all", "reason": "x"})
    assert resp.status == 403 and resp.json()["error"]["code"] == "forbidden_role"
    for body in ({"scope": "planet", "reason": "x"}, {"scope": "agent", "reason": "x"}, {"scope": "team", "target": "t"}):
        bad = gw.call_admin("POST", "/v1/killswitches", operator, body)
        assert bad.status == 400 and bad.json()["error"]["code"] == "bad_request", body
    rows = gw.sql("SELECT actor, result FROM agentgate.admin_events WHERE action = 'killswitch.create' "
                  "AND result = 'forbidden'")
    assert rows and rows[-1]["actor"] == "r"


def _read_stream(conn: HTTPConnection, method: str, url: str, headers: dict[str, str]) -> tuple[int, list[str]]:
    conn.request(method, url, headers=headers)
    resp = conn.getresponse()
    events: list[str] = []
    try:
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                events.append(line.decode().strip())
    except (IncompleteRead, ConnectionError, OSError):
        pass
    return resp.status, events


@pytest.mark.parametrize("mode", ["route", "forward"])
def test_kill_cuts_open_stream(gw: Gateway, keys: Keys, operator: str, upstream: Upstream, mode: str) -> None:
    agent = f"streamer-{mode}"
    token = keys.token(agent)
    if mode == "route":
        host, port = gw.routes.split(":")
        conn = HTTPConnection(host, int(port), timeout=30)
        args = ("GET", "/r/plain/sse-slow", {"Authorization": f"Bearer {token}"})
    else:
        host, port = gw.proxy.split(":")
        conn = HTTPConnection(host, int(port), timeout=30)
        args = ("GET", f"{upstream.url}/sse-slow", {"Proxy-Authorization": f"Bearer {token}"})
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_read_stream, conn, *args)
        wait_until(lambda: any(s.path.endswith("/sse-slow") and s.headers.get("host") for s in upstream.seen[-5:])
                   and len(gw.sql(f"SELECT 1 FROM agentgate.calls WHERE agent_id = '{agent}'")) == 0,
                   what="the stream to open")
        # A concurrent agent's call is untouched.
        other = pool.submit(get, gw, keys, f"bystander-{mode}")
        switch = kill(gw, operator, "agent", agent)
        started = time.monotonic()
        status, events = reading.result(timeout=30)
        elapsed = time.monotonic() - started
    conn.close()
    assert status == 200
    assert 0 < len(events) < 200, "the stream must end early, not run to completion"
    assert elapsed < 5, f"stream cut took {elapsed:.1f}s"
    assert other.result().status == 200
    wait_until(lambda: len(gw.sql(f"SELECT 1 FROM agentgate.calls WHERE agent_id = '{agent}'")) == 1,
               what="the cut stream's audit row")
    (row,) = gw.sql(f"SELECT outcome, killswitch_id, error_code FROM agentgate.calls WHERE agent_id = '{agent}'")
    assert row == {"outcome": "killed", "killswitch_id": switch["id"], "error_code": "agent_suspended"}
    revive(gw, operator, switch["id"])


def test_kill_denies_held_approvals(gw: Gateway, keys: Keys, operator: str, upstream: Upstream) -> None:
    lead = keys.admin_token("lead", roles=["approver", "support-lead"])
    with ThreadPoolExecutor(1) as pool:
        held, _ = hold_refund(pool, gw, keys.token("held-bot", roles=["writer"]), agent="held-bot", lead=lead,
                              body=b'{"n": 1}')
        switch = kill(gw, operator, "agent", "held-bot", "runaway refunds")
        resp = held.result(timeout=30)
    assert resp.status == 403
    assert resp.json()["error"]["code"] == "approval_denied"
    assert "runaway refunds" in resp.json()["error"]["message"]
    denied = gw.call_admin("GET", "/v1/approvals?state=denied", lead).json()["approvals"]
    assert any(a["agent_id"] == "held-bot" and a["decided_by"] == f"killswitch:{switch['id']}" for a in denied)
    revive(gw, operator, switch["id"])


def test_killswitch_survives_restart_and_cli(gateway_factory, keys: Keys, operator: str, upstream: Upstream,
                                            tmp_path: Path) -> None:
    overrides = {"data_dir": str(tmp_path / "data"), "routes": {"plain": {"upstream": upstream.url}}}
    gw = gateway_factory(overrides, name="kill-restart-a")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")},
               "AGENTGATE_TOKEN": operator}
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--config", str(gw.config),
                               "--admin-url", f"http://{gw.admin}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    out = cli("kill", "agent", "persist-bot", "--reason", "drill")
    assert out.returncode == 0, out.stderr
    assert "persist-bot" in out.stdout
    assert cli("kill", "team", "ops").returncode == 0
    assert get(gw, keys, "persist-bot").status == 403
    gw.stop()
    gw2 = gateway_factory(overrides, name="kill-restart-b")
    assert get(gw2, keys, "persist-bot").status == 403
    assert get(gw2, keys, "ops-bot", team="ops").status == 403
    gw.admin = gw2.admin  # the CLI helper talks to the running replica
    listed = cli("killswitches")
    assert "persist-bot" in listed.stdout and "ops" in listed.stdout
    assert cli("revive", "agent", "persist-bot").returncode == 0
    assert cli("revive", "team", "ops").returncode == 0
    assert get(gw2, keys, "persist-bot").status == 200
    assert get(gw2, keys, "ops-bot", team="ops").status == 200
    missing = cli("revive", "agent", "nobody")
    assert missing.returncode != 0 and "no active kill-switch" in missing.stderr


async def test_kill_cuts_open_websocket_in_forward_mode(gateway_factory, keys: Keys, operator: str,
                                                        tmp_path: Path) -> None:
    """wss through a CONNECT tunnel (how clients reach websockets through a proxy)."""
    import asyncio
    import ssl

    import aiohttp
    import trustme
    from aiohttp import web

    from tests.conftest import start_upstream

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for i in range(200):  # bounded: 200 ticks, 10 s
            if ws.closed:
                break
            await ws.send_str(f"tick {i}")
            await asyncio.sleep(0.05)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    up = Upstream(tls=trustme.CA())
    stop = await asyncio.to_thread(start_upstream, up, tmp_path, app)
    try:
        gw = await asyncio.to_thread(gateway_factory, {"proxy": {"upstream_ca_file": str(up.ca_file)}}, None, "ws")
        client_tls = ssl.create_default_context(cafile=str(gw.ca_file))
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"wss://127.0.0.1:{up.port}/ws", proxy=f"http://{gw.proxy}", ssl=client_tls,
                                          proxy_headers={"Proxy-Authorization": f"Bearer {keys.token('ws-bot')}"}) as ws:
                first = await ws.receive(timeout=10)
                assert first.type == aiohttp.WSMsgType.TEXT and first.data.startswith("tick")
                await asyncio.to_thread(kill, gw, operator, "agent", "ws-bot")
                ticks = 1
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    ticks += 1
                assert ticks < 200, "the websocket must be cut, not run to completion"
    finally:
        await asyncio.to_thread(stop)


def test_a_killed_agent_opens_no_tunnel(gw: Gateway, keys: Keys, operator: str, upstream: Upstream) -> None:
    """The CONNECT itself is refused (407/403 before any TLS), and audited with the switch."""
    from tests.raw_http import proxy_addr, read_response_head_only

    switch = kill(gw, operator, "agent", "tunnel-bot", "contain")
    try:
        with socket.create_connection(proxy_addr(gw), timeout=30) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                         f"Proxy-Authorization: Bearer {keys.token('tunnel-bot')}\r\n\r\n".encode())
            status, headers, _ = read_response_head_only(sock)
        assert status == 403
        row = gw.audit_row(headers[CALL_ID])
        assert (row["method"], row["outcome"], row["killswitch_id"]) == ("CONNECT", "killed", switch["id"])
    finally:
        revive(gw, operator, switch["id"])


# -- team switches and the agent registry ------------------------------------------------------
REGISTRY = """
[agents.depot-bot]
owner = "wendy@example.com"
team = "Warehouse"

[agents.Crate-Bot]
owner = "wendy@example.com"
team = "warehouse"

[agents.claims-bot]
owner = "carl@example.com"
team = "claims"
"""


@pytest.fixture(scope="module")
def reg_gw(gateway_factory, upstream: Upstream, tmp_path_factory) -> Gateway:
    """A gateway with an agent registry: depot-bot and Crate-Bot are listed under warehouse."""
    registry = tmp_path_factory.mktemp("registry") / "agents.toml"
    registry.write_text(REGISTRY)
    return gateway_factory({"routes": {"plain": {"upstream": upstream.url}},
                            "identity": {"registry_file": str(registry)}}, name="kill-registry")


def test_team_switch_stops_agents_the_registry_lists_under_the_team(reg_gw: Gateway, keys: Keys,
                                                                    operator: str) -> None:
    """Fail closed: the token's team claim or the registry's team, either one, is enough."""
    stopped = [("depot-bot", None), ("depot-bot", "billing"),  # no team claim; another team's claim
               ("Crate-Bot", None),  # listed under "warehouse": team names match case-insensitively
               ("claims-bot", "warehouse")]  # registered elsewhere, but its token says warehouse
    spared = [("claims-bot", "billing"), ("drifter", None), ("drifter", "billing")]
    assert all(get(reg_gw, keys, a, team=t).status == 200 for a, t in stopped + spared)
    switch = kill(reg_gw, operator, "team", "WAREHOUSE", "inventory wipe")
    try:
        for agent, team in stopped:
            refused = get(reg_gw, keys, agent, team=team)
            assert refused.status == 403, (agent, team, refused.body)
            assert refused.json()["error"]["code"] == "agent_suspended"
            row = reg_gw.audit_row(refused.headers[CALL_ID])
            assert (row["outcome"], row["killswitch_id"], row["agent_id"]) == ("killed", switch["id"], agent)
        for agent, team in spared:
            assert get(reg_gw, keys, agent, team=team).status == 200, (agent, team)
    finally:
        revive(reg_gw, operator, switch["id"])
    assert get(reg_gw, keys, "depot-bot", team=None).status == 200


def test_team_switch_denies_held_approvals_of_registered_agents(reg_gw: Gateway, keys: Keys, operator: str) -> None:
    lead = keys.admin_token("lead", roles=["approver", "support-lead"])
    token = keys.token("depot-bot", roles=["writer"], team=None)  # the registry alone says warehouse
    with ThreadPoolExecutor(1) as pool:
        held, _ = hold_refund(pool, reg_gw, token, agent="depot-bot", lead=lead, body=b'{"n": 2}')
        switch = kill(reg_gw, operator, "team", "warehouse", "runaway restock")
        try:
            resp = held.result(timeout=30)
        finally:
            revive(reg_gw, operator, switch["id"])
    assert resp.status == 403 and resp.json()["error"]["code"] == "approval_denied", resp.body
    denied = reg_gw.call_admin("GET", "/v1/approvals?state=denied", lead).json()["approvals"]
    assert any(a["agent_id"] == "depot-bot" and a["decided_by"] == f"killswitch:{switch['id']}" for a in denied)


STREAM_ROWS = "SELECT {cols} FROM agentgate.calls WHERE agent_id = 'Crate-Bot' AND path = '/sse-slow'"


def test_team_switch_cuts_open_streams_of_registered_agents(reg_gw: Gateway, keys: Keys, operator: str,
                                                            upstream: Upstream) -> None:
    host, port = reg_gw.routes.split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    token = keys.token("Crate-Bot", team="billing")  # registered under warehouse
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_read_stream, conn, "GET", "/r/plain/sse-slow", {"Authorization": f"Bearer {token}"})
        wait_until(lambda: any(s.path.endswith("/sse-slow") for s in upstream.seen[-5:])
                   and not reg_gw.sql(STREAM_ROWS.format(cols="1")),
                   what="the stream to open")
        switch = kill(reg_gw, operator, "team", "warehouse", "runaway restock")
        try:
            status, events = reading.result(timeout=30)
        finally:
            revive(reg_gw, operator, switch["id"])
    conn.close()
    assert status == 200 and 0 < len(events) < 200, "the stream must end early, not run to completion"
    wait_until(lambda: bool(reg_gw.sql(STREAM_ROWS.format(cols="1"))),
               what="the cut stream's audit row")
    (row,) = reg_gw.sql(STREAM_ROWS.format(cols="outcome, killswitch_id"))
    assert row == {"outcome": "killed", "killswitch_id": switch["id"]}
