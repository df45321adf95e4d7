"""The `agentgate` command: policy test / eval against the shipped bundle, configuration errors
that name the key, dev tokens for agents and for the admin API, and a route timeout."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import jwt

from gateway.config import EXAMPLE_CONFIG, load_config
from gateway.devkey import public_pem
from gateway.identity import IdentityError, JwtVerifier
from tests.conftest import ROOT, Gateway, Keys, Upstream, http


def agentgate(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_policy_test_runs_the_shipped_rego_tests() -> None:
    out = agentgate("policy", "test", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = out.stdout.strip().splitlines()[-1]
    passed = int(summary.split()[0])
    assert summary.endswith("0 failed") and passed >= 40
    assert "PASS data.agentgate_test." in out.stdout


def test_policy_test_reports_a_failing_test(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    (bundle / "agentgate").mkdir(parents=True)
    (bundle / "agentgate" / "decision.rego").write_text(
        'package agentgate\nimport rego.v1\ndefault decision := {"allow": false}\n')
    (bundle / "agentgate" / "decision_test.rego").write_text(
        "package agentgate_test\nimport rego.v1\n"
        "test_denies if { not data.agentgate.decision.allow }\n"
        "test_allows if { data.agentgate.decision.allow }\n")
    out = agentgate("policy", "test", "--dir", str(bundle))
    assert out.returncode == 1
    assert "FAIL data.agentgate_test.test_allows" in out.stdout
    assert out.stdout.strip().endswith("1 passed, 1 failed")


def test_policy_eval_prints_the_decision(tmp_path: Path) -> None:
    doc = {"input": {
        "agent": {"id": "support-bot", "team": "support", "roles": ["support"], "claims": {}},
        "request": {"method": "DELETE", "scheme": "http", "host": "127.0.0.1", "port": 9999, "path": "/tickets/1",
                    "path_segments": ["tickets", "1"], "query": {}, "headers": {}, "body": None, "body_size": 0,
                    "body_truncated": False, "body_error": None, "content_type": ""},
        "route": "demo", "tool": {"kind": "http"},
        "context": {"time_ns": 0, "mode": "route", "client_ip": "127.0.0.1", "trace_id": "t"}}}
    path = tmp_path / "input.json"
    path.write_text(json.dumps(doc))
    out = agentgate("policy", "eval", "--input", str(path))
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["allow"] is False and decision["reasons"]


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[policy]\nengin = "opa"\n[listen]\nroutes = "nowhere"\n')
    out = agentgate("run", "--config", str(bad))
    assert out.returncode == 2
    assert "policy.engin: unknown key" in out.stderr
    assert "listen.routes" in out.stderr and "HOST:PORT" in out.stderr
    env_bad = agentgate("run", env={"AGENTGATE_POLICY__TIMEOUT_SECONDS": "-1"})
    assert env_bad.returncode == 2 and "policy.timeout_seconds" in env_bad.stderr
    missing = agentgate("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "not found" in missing.stderr
    outlived = agentgate("run", env={"AGENTGATE_APPROVAL__HOLD_SECONDS": "120",
                                     "AGENTGATE_APPROVAL__TTL_SECONDS": "60"})
    assert outlived.returncode == 2 and "hold_seconds (120) must not exceed ttl_seconds (60)" in outlived.stderr


def test_spool_fsync_modes_and_the_booleans_of_earlier_versions(tmp_path: Path) -> None:
    def fsync_of(text: str) -> tuple[str, float]:
        path = tmp_path / "audit.toml"
        path.write_text(f"[audit]\n{text}\n")
        audit = load_config(path).audit
        return audit.spool_fsync, audit.spool_fsync_interval_seconds

    assert fsync_of("") == ("interval", 0.02)  # the default: written before forwarding, synced within 20 ms
    assert fsync_of("spool_fsync = true")[0] == "before_forward"
    assert fsync_of("spool_fsync = false")[0] == "off"
    assert fsync_of('spool_fsync = "before_forward"\nspool_fsync_interval_seconds = 0.5') == ("before_forward", 0.5)
    bad = tmp_path / "bad.toml"
    bad.write_text('[audit]\nspool_fsync = "always"\n')
    out = agentgate("run", "--config", str(bad))
    assert out.returncode == 2 and "audit.spool_fsync" in out.stderr and "before_forward" in out.stderr


def test_token_mint_admin_tokens_and_lifetime(tmp_path: Path) -> None:
    """`token mint --admin` is for the admin API's audience only; a --ttl the gateway would refuse
    is refused at once."""
    agent = agentgate("token", "mint", "--agent", "bot", "--roles", "operator", cwd=tmp_path)
    admin = agentgate("token", "mint", "--admin", "--agent", "alice", "--roles", "operator", cwd=tmp_path)
    assert agent.returncode == 0 and admin.returncode == 0, agent.stderr + admin.stderr
    cfg = load_config(EXAMPLE_CONFIG)  # as the command used
    verifier = JwtVerifier(cfg.identity, dev_public_key_pem=public_pem(
        (tmp_path / ".agentgate" / "dev-signing-key.pem").read_bytes()))

    async def outcome(token: str, admin: bool) -> str:
        try:
            return (await verifier.verify(token, agent=not admin)).agent_id
        except IdentityError as err:
            return err.code

    assert asyncio.run(outcome(admin.stdout.strip(), True)) == "alice"
    assert asyncio.run(outcome(admin.stdout.strip(), False)) == "wrong_audience"
    assert asyncio.run(outcome(agent.stdout.strip(), False)) == "bot"
    assert asyncio.run(outcome(agent.stdout.strip(), True)) == "wrong_audience"
    assert jwt.decode(admin.stdout.strip(), options={"verify_signature": False})["aud"] == "agentgate-admin"

    assert agentgate("token", "mint", "--agent", "bot", "--ttl", "1d", cwd=tmp_path).returncode == 0
    too_long = agentgate("token", "mint", "--admin", "--agent", "alice", "--ttl", "2d", cwd=tmp_path)
    assert too_long.returncode == 2 and not too_long.stdout
    assert "identity.max_token_lifetime_seconds (86400 s)" in too_long.stderr


def test_route_timeout_is_504(gateway_factory, keys: Keys, upstream: Upstream) -> None:
    gw: Gateway = gateway_factory({"routes": {"slow": {"upstream": upstream.url, "timeout_seconds": 0.3}}},
                                  name="timeout")
    resp = http("GET", gw.route_url("slow", "/slow"), headers={"Authorization": f"Bearer {keys.token()}"})
    assert resp.status == 504
    assert resp.json()["error"]["code"] == "upstream_timeout"
    assert gw.audit_row(resp.headers["x-agentgate-call-id"])["outcome"] == "upstream_error"

