"""``python -m bench --smoke``: every configuration runs end to end and produces numbers.

Real processes on 127.0.0.1 (upstream, gateway, bare mitmproxy, wrk or the built-in generator);
no timing assertions, only that each configuration measured something, got only 2xx answers,
and that the gateway audited every call it served.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {("direct", "get"), ("direct", "post"), ("direct-tls", "get"), ("direct-tls", "post"),
            ("route", "get"), ("route", "post"), ("route-new", "get"), ("route-new", "post"), ("route-fsync", "get"),
            ("route-fsync", "post"), ("redact", "ticket"), ("forward", "get"),
            ("forward", "post"), ("mitm", "get"), ("mitm", "post")}
GATEWAY = {"route", "route-new", "route-fsync", "redact", "forward"}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, f"bench --smoke failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text()


@pytest.mark.timeout(240)  # the smoke run takes 10-40 s alone; generous for a loaded machine
def test_every_configuration_produced_numbers(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    assert report["problems"] == []
    assert {(r["config"], r["workload"]) for r in report["results"]} == EXPECTED
    for r in report["results"]:
        name = f"{r['config']}/{r['workload']}"
        assert "error" not in r, (name, r.get("error"))
        for phase, conns in (("loaded", 32), ("single", 1)):
            res = r[phase]
            assert res["connections"] == conns
            assert res["requests"] > 0 and res["errors"] == 0, (name, phase, res)
            assert all(_number(res[k]) and res[k] > 0 for k in ("rps", "p50_us", "p99_us")), (name, phase, res)
            assert res["p50_us"] <= res["p99_us"] <= res["max_us"]
        if r["config"] in GATEWAY | {"mitm"}:
            assert _number(r["cpu_us_per_request"]) and r["peak_rss_mb"] > 0, name
            assert _number(r["ratio_to_baseline"]) and r["ratio_to_baseline"] > 0, name
        if r["config"] in GATEWAY:
            for phase, key in (("loaded", "audit_loaded"), ("single", "audit_single")):
                audit = r[key]
                # wrk may leave a few requests in flight when it stops: rows >= responses counted.
                assert audit["rows"] >= r[phase]["requests"] and audit["allowed"] == audit["rows"], (name, audit)
                assert _number(audit["decision_p50_us"]) and _number(audit["decision_p99_us"]), (name, audit)
                # route-new sends every request to a new path (no decision can be reused); route repeats one.
                assert audit["paths"] == (audit["rows"] if r["config"] == "route-new" else 1), (name, audit)
            spool = r["spool_loaded"]  # every forwarded call's write-ahead record
            assert spool["begins"] >= r["loaded"]["requests"], (name, spool)
            if r["config"] == "route-fsync":  # fsync'd before forwarding: group commits, at least one
                assert spool["fsyncs"] > 0, (name, spool)
        if r["config"] in ("forward", "mitm"):
            assert r["generator"] == "builtin"  # wrk cannot speak through a CONNECT proxy
            assert r["loaded"]["connections_opened"] <= 32 + 2, "keep-alive did not hold"


@pytest.mark.timeout(240)  # the smoke run takes 10-40 s alone; generous for a loaded machine
def test_lag_leak_redaction_and_targets_reported(smoke: tuple[dict[str, Any], str]) -> None:
    report, md = smoke
    lag = report["lag"]
    assert lag["load"]["requests"] > 0 and lag["load"]["errors"] == 0
    assert lag["samples"] >= 1 and lag["visible"] == lag["samples"] and _number(lag["lag_max_ms"])
    leak = report["leak"]
    assert leak["errors"] == 0 and 0 < leak["requests_first"] < leak["requests_total"]
    assert leak["rss_after_first_mb"] > 0 and leak["rss_after_total_mb"] > 0
    red = report["redaction"]
    assert red["status"] == 200 and isinstance(red["redaction_applied"], bool)
    assert any("redact" in reason for reason in red["audit"]["reasons"]), red  # the policy asked for it
    assert len(report["targets"]) == 12
    assert all(t["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and _number(t["value"]) for t in report["targets"])
    assert report["meta"]["pinning"]
    if report["meta"].get("store_cpus"):  # every thread of the store process, not just its first
        assert report["meta"]["store_thread_cpus"] == [report["meta"]["store_cpus"]]
    assert "| configuration | workload |" in md and "## Targets" in md
    for config, workload in EXPECTED:
        assert f"| {config} | {workload} |" in md


@pytest.mark.timeout(240)  # the smoke run takes 10-40 s alone; generous for a loaded machine
def test_large_redaction_measured(smoke: tuple[dict[str, Any], str]) -> None:
    """redact-large: one gateway, the same document redacted and not, and small GETs alone and
    while large redactions run."""
    report, md = smoke
    rl = report["redact_large"]
    assert "error" not in rl, rl.get("error")
    probe = rl["probe"]
    assert probe["plain"]["status"] == probe["redacted"]["status"] == 200
    assert probe["plain"]["email_in_body"] and not probe["redacted"]["email_in_body"]
    counts = probe["audit_redacted"]["redaction_counts"]
    assert counts.get("field", 0) > 0, counts  # JSONPath fields ...
    assert {"email", "phone", "payment_card", "iban", "us_ssn", "bearer_token", "jwt", "aws_access_key",
            "ip_address"} <= set(counts), counts  # ... and every detector
    assert rl["body_bytes"] == probe["plain"]["bytes"] >= 1_000
    for name in ("plain", "redacted"):
        res = rl[name]
        assert res["requests"] > 0 and res["errors"] == 0, (name, res)
        assert _number(res["p50_us"]) and 0 < res["p50_us"] <= res["p99_us"], (name, res)
    assert _number(rl["added_ms"]["p50"]) and _number(rl["added_ms"]["p99"])
    assert rl["mb_per_s"] is None or rl["mb_per_s"] > 0  # None only when redaction added nothing measurable
    for name in ("small_alone", "small_during"):
        res = rl[name]["load"]
        assert res["connections"] == 8 and res["requests"] > 0 and res["errors"] == 0, (name, res)
        assert _number(res["p99_us"]) and res["p99_us"] > 0, (name, res)
        assert rl[name]["audit"]["rows"] >= res["requests"], (name, rl[name]["audit"])
    assert _number(rl["small_p99_ratio"]) and rl["small_p99_ratio"] > 0
    bg = rl["background"]
    assert bg["errors"] == 0 and bg["overlapping"] >= 1 and bg["coverage"] > 0, bg
    assert "## Redaction of a large response" in md and "| ratio (while / alone) |" in md
