"""The `agentgate` command: policy test / eval against the shipped bundle, configuration errors
that name the key, and a route timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_route_timeout_is_504(gateway_factory, keys: Keys, upstream: Upstream) -> None:
    gw: Gateway = gateway_factory({"routes": {"slow": {"upstream": upstream.url, "timeout_seconds": 0.3}}},
                                  name="timeout")
    resp = http("GET", gw.route_url("slow", "/slow"), headers={"Authorization": f"Bearer {keys.token()}"})
    assert resp.status == 504
    assert resp.json()["error"]["code"] == "upstream_timeout"
    assert gw.audit_row(resp.headers["x-agentgate-call-id"])["outcome"] == "upstream_error"

