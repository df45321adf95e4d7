"""The README quickstart, as a new user runs it: the shipped example configuration and
policies, `agentgate token mint`, allowed and denied calls in both modes with curl, and
each call found again with `agentgate audit sql`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, Upstream, serving

CALL_ID = "x-agentgate-call-id"


def agentgate(*args: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Upstream:
    """The demo upstream app (`agentgate demo-upstream`) on a free port."""
    from gateway.demo_upstream import make_app

    with serving(make_app(), tmp_path_factory.mktemp("demo")) as up:
        yield up


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, demo: Upstream):
    cwd = tmp_path_factory.mktemp("quickstart")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    env.update({
        "PYTHONPATH": str(ROOT),
        "AGENTGATE_LISTEN__PROXY": "127.0.0.1:0",
        "AGENTGATE_LISTEN__ROUTES": "127.0.0.1:0",
        "AGENTGATE_LISTEN__ADMIN": "127.0.0.1:0",
        "AGENTGATE_ROUTES": json.dumps({"demo": {"upstream": demo.url}}),
    })
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=open(cwd / "gateway.log", "w"), text=True)
    line = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not line.startswith("agentgate listening:"):
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
    assert line.startswith("agentgate listening:"), (cwd / "gateway.log").read_text()
    parts = dict(p.split("=", 1) for p in line.split(":", 1)[1].split())
    env["AGENTGATE_LISTEN__ADMIN"] = parts["admin"]  # so the CLI finds the admin API
    yield cwd, env, parts
    proc.terminate()
    proc.wait(20)


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    proc = subprocess.run(["curl", "-sS", "--max-time", "30", "-D", "-", "--noproxy", "", *args],
                          capture_output=True, text=True, timeout=60)
    head, _, body = proc.stdout.replace("\r\n", "\n").rpartition("\n\n")
    blocks = [b for b in head.split("\n\n") if b.startswith("HTTP/")] or [head]
    lines = blocks[-1].splitlines()
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return status, headers, body


def test_quickstart_end_to_end(quickstart, demo: Upstream) -> None:
    cwd, env, listen = quickstart
    # The example configuration keeps its state in ./.agentgate of the working directory.
    assert (cwd / ".agentgate" / "dev-signing-key.pem").exists()
    token = agentgate("token", "mint", "--agent", "support-bot", "--team", "support", "--roles", "support",
                      cwd=cwd, env=env).stdout.strip()
    admin = agentgate("token", "mint", "--admin", "--agent", "alice", "--roles", "responder",
                      cwd=cwd, env=env).stdout.strip()

    # Route mode: one allowed, one denied call.
    ok = curl("-H", f"Authorization: Bearer {token}", f"http://{listen['routes']}/r/demo/tickets")
    denied = curl("-X", "DELETE", "-H", f"Authorization: Bearer {token}", f"http://{listen['routes']}/r/demo/tickets/1")
    assert ok[0] == 200, ok
    assert denied[0] == 403 and json.loads(denied[2])["error"]["code"] == "policy_denied"

    # Forward-proxy mode: the same two calls through HTTP_PROXY.
    proxy = f"http://agent:{token}@{listen['proxy']}"
    fok = curl("-x", proxy, f"{demo.url}/tickets")
    fdenied = curl("-x", proxy, "-X", "DELETE", f"{demo.url}/tickets/1")
    assert fok[0] == 200, fok
    assert fdenied[0] == 403

    ids = [r[1][CALL_ID] for r in (ok, denied, fok, fdenied)]
    out = agentgate("audit", "sql", "--token", admin, "--json",
                    "SELECT call_id, mode, method, outcome FROM agentgate.calls ORDER BY ts_start",
                    cwd=cwd, env=env).stdout
    rows = {r[0]: r[1:] for r in json.loads(out)["rows"]}
    assert rows[ids[0]] == ["route", "GET", "allowed"]
    assert rows[ids[1]] == ["route", "DELETE", "denied"]
    assert rows[ids[2]] == ["forward", "GET", "allowed"]
    assert rows[ids[3]] == ["forward", "DELETE", "denied"]
    table = agentgate("audit", "sql", "--token", admin, "SELECT outcome, count() AS n FROM agentgate.calls "
                      "GROUP BY outcome ORDER BY outcome", cwd=cwd, env=env).stdout
    assert "allowed" in table and "denied" in table and "rows)" in table


def test_ca_path_points_at_the_interception_ca(quickstart) -> None:
    cwd, env, _ = quickstart
    path = Path(agentgate("ca", "path", cwd=cwd, env=env).stdout.strip())
    assert path == (cwd / ".agentgate" / "ca" / "mitmproxy-ca-cert.pem").resolve()
    assert path.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_audit_sql_cli_errors_are_clear(quickstart) -> None:
    cwd, env, _ = quickstart
    no_token = agentgate("audit", "sql", "SELECT 1", cwd=cwd, env=env, check=False)
    assert no_token.returncode == 2 and "AGENTGATE_TOKEN" in no_token.stderr
    no_role = agentgate("token", "mint", "--admin", "--agent", "bob", "--roles", "support",
                        cwd=cwd, env=env).stdout.strip()
    refused = agentgate("audit", "sql", "--token", no_role, "SELECT 1", cwd=cwd, env=env, check=False)
    assert refused.returncode != 0 and "forbidden_role" in refused.stderr
    # An agent token is not an admin token, whatever its roles: the message says what to use.
    agent_token = agentgate("token", "mint", "--agent", "bot", "--roles", "responder", cwd=cwd, env=env).stdout.strip()
    refused = agentgate("audit", "sql", "--token", agent_token, "SELECT 1", cwd=cwd, env=env, check=False)
    assert refused.returncode != 0 and "wrong_audience" in refused.stderr
    assert "agentgate token mint --admin" in refused.stderr
