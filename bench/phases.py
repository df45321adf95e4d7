"""Measuring one configuration and workload: probe, warm up, 32 connections, 1 connection."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import loadgen, procs, wrk
from bench.gateway import GatewayProcess
from bench.options import Options
from bench.stats import LoadResult
from bench.workloads import Workload


@dataclass
class Env:
    """What every phase of one run shares."""

    opts: Options
    pinning: procs.Pinning
    workdir: Path
    session: aiohttp.ClientSession
    """For probes and the admin API (not for load)."""
    use_wrk: bool
    gateway: GatewayProcess | None = None


@dataclass
class Scenario:
    config: str
    workload: Workload
    url: str
    """Full URL of the request (through ``proxy`` when set)."""
    headers: dict[str, str] = field(default_factory=dict)
    proxy: str | None = None
    proxy_headers: dict[str, str] | None = None
    ssl: ssl.SSLContext | None = None
    pid: int | None = None
    """Process under test (CPU time and RSS), if any."""
    store_pid: int | None = None
    """The gateway's store process (embedded ClickHouse): its CPU and RSS are reported apart."""
    audited: bool = False
    """Calls leave audit rows (decision latency comes from them)."""
    baseline: str | None = None
    """Configuration whose throughput is this one's limit (the ratio's denominator)."""
    wrk_ok: bool = True
    """wrk can drive it (it cannot speak through a CONNECT proxy)."""

    def target(self, trace: str | None = None) -> loadgen.Target:
        headers = dict(self.headers, **self.workload.headers)
        if trace:
            headers["X-Agent-Session"] = trace
        return loadgen.Target(url=self.url, method=self.workload.method, body=self.workload.body,
                              headers=headers, proxy=self.proxy, proxy_headers=self.proxy_headers, ssl=self.ssl,
                              fresh_paths=f"{trace or 'bench'}-" if self.workload.new_path_each_time else None)


def trace_id(scenario: Scenario, phase: str) -> str:
    return f"bench-{scenario.config}-{scenario.workload.name}-{phase}"


async def run_phase(env: Env, scenario: Scenario, *, connections: int, requests: int, seconds: float,
                    trace: str | None, rate: float | None = None) -> LoadResult:
    target = scenario.target(trace)
    if env.use_wrk and scenario.wrk_ok and rate is None:
        scheme, _, rest = target.url.partition("://")
        host, slash, path = rest.partition("/")
        return await wrk.run_wrk(f"{scheme}://{host}", method=target.method, path=slash + path,
                                 headers=target.headers, body=target.body, fresh_paths=target.fresh_paths,
                                 connections=connections,
                                 max_requests=requests, max_seconds=seconds, script_dir=env.workdir,
                                 cpus=env.pinning.load)
    return await loadgen.run_load(target, connections=connections, max_requests=requests,
                                  max_seconds=seconds, rate=rate)


async def audit_stats(env: Env, trace: str) -> dict[str, Any]:
    """Decision latency and the gateway's own time from the audit rows of one phase."""
    assert env.gateway is not None
    rows = await env.gateway.sql(env.session, (
        "SELECT count() AS rows, countIf(outcome = 'allowed') AS allowed, uniqExact(path) AS paths, "
        "quantileExact(0.5)(decision_us) AS decision_p50_us, "
        "quantileExact(0.99)(decision_us) AS decision_p99_us, max(decision_us) AS decision_max_us, "
        "quantileExact(0.5)(gateway_ms) AS gateway_p50_ms, quantileExact(0.99)(gateway_ms) AS gateway_p99_ms "
        f"FROM agentgate.calls WHERE trace_id = '{trace}'"))
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[0].items()}


async def probe(env: Env, scenario: Scenario) -> tuple[int, dict[str, str], bytes]:
    return await loadgen.fetch(env.session, scenario.target(trace_id(scenario, "probe")))


async def measure(env: Env, scenario: Scenario) -> dict[str, Any]:
    """Probe once (must be 200), warm up, then the loaded and the single-connection phase."""
    opts = env.opts
    generator = "wrk" if env.use_wrk and scenario.wrk_ok else "builtin"
    out: dict[str, Any] = {"config": scenario.config, "workload": scenario.workload.name,
                           "generator": generator, "baseline": scenario.baseline}
    status, headers, body = await probe(env, scenario)
    if status != 200:
        out["error"] = f"probe answered HTTP {status}: {body[:300].decode(errors='replace')}"
        return out
    out["probe"] = {"status": status, "bytes": len(body), "call_id": headers.get("x-agentgate-call-id")}
    conns = opts.connections
    await run_phase(env, scenario, connections=conns, requests=opts.warmup_requests,
                    seconds=min(opts.duration, 5.0), trace=trace_id(scenario, "warmup"))
    # Loaded phase: CPU time is read after the audit query, which first flushes the phase's rows,
    # so the audit inserts are part of the cost per request.
    cpu0 = procs.cpu_seconds(scenario.pid) if scenario.pid else None
    store_cpu0 = procs.cpu_seconds(scenario.store_pid) if scenario.store_pid else None
    spool0 = await env.gateway.spool_counts(env.session) if scenario.audited and env.gateway else None
    foreign = procs.ForeignLoad()
    loaded = await run_phase(env, scenario, connections=conns, requests=opts.requests,
                             seconds=opts.duration, trace=trace_id(scenario, f"c{conns}"))
    out["foreign_load_cores"] = foreign.cores()
    # Read before the audit query below, whose freshness flush syncs the spool once more.
    spool1 = await env.gateway.spool_counts(env.session) if spool0 is not None and env.gateway else None
    if scenario.audited:
        out["audit_loaded"] = await audit_stats(env, trace_id(scenario, f"c{conns}"))
    if spool0 is not None and spool1 is not None:
        begins, fsyncs = (b - a for a, b in zip(spool0, spool1))
        # Group commit at work: how many calls' write-ahead records each fsync made durable.
        out["spool_loaded"] = {"begins": begins, "fsyncs": fsyncs,
                               "begins_per_fsync": round(begins / fsyncs, 2) if fsyncs else None}
    if scenario.pid and cpu0 is not None:
        cpu = procs.cpu_seconds(scenario.pid) - cpu0
        # The gateway's own count (audit rows) includes requests wrk left in flight when it stopped.
        served = out.get("audit_loaded", {}).get("rows") or loaded.requests
        out["cpu_us_per_request"] = round(cpu / served * 1e6, 1) if served else None
        out["cpu_utilisation"] = round(cpu / loaded.duration_s, 3) if loaded.duration_s else None
        if scenario.store_pid and store_cpu0 is not None and served:
            store_cpu = procs.cpu_seconds(scenario.store_pid) - store_cpu0
            out["store_cpu_us_per_request"] = round(store_cpu / served * 1e6, 1)
    foreign = procs.ForeignLoad()
    single = await run_phase(env, scenario, connections=1, requests=opts.requests,
                             seconds=opts.duration, trace=trace_id(scenario, "c1"))
    out["foreign_load_cores_single"] = foreign.cores()
    if scenario.audited:
        out["audit_single"] = await audit_stats(env, trace_id(scenario, "c1"))
    if scenario.pid:
        mem = procs.memory_kb(scenario.pid)
        out["rss_mb"] = round(mem["VmRSS"] / 1024, 1)
        out["peak_rss_mb"] = round(mem["VmHWM"] / 1024, 1)
    if scenario.store_pid:
        out["store_peak_rss_mb"] = round(procs.memory_kb(scenario.store_pid)["VmHWM"] / 1024, 1)
    out["loaded"] = loaded.as_dict()
    out["single"] = single.as_dict()
    bad = [r for r in (loaded, single) if r.errors or not r.requests]
    if bad:
        out["error"] = "; ".join(f"{r.connections} conn: {r.errors} errors of {r.requests} "
                                 f"({r.first_error or 'no responses'})" for r in bad)
    return out


def with_ratio(results: list[dict[str, Any]]) -> None:
    """Add ``ratio_to_baseline`` (req/s at the loaded phase over the baseline's, same workload)."""
    by_key = {(r["config"], r["workload"]): r for r in results}
    for r in results:
        base = by_key.get((r.get("baseline"), "get" if r["workload"] == "ticket" else r["workload"]))
        mine = r.get("loaded", {}).get("rps")
        theirs = base.get("loaded", {}).get("rps") if base else None
        r["ratio_to_baseline"] = round(mine / theirs, 3) if mine and theirs else None
