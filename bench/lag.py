"""Audit lag: time from a response to its row being visible in ClickHouse, at a sustained rate.

A rate-limited route-mode load runs while a sampler makes its own calls a few times a second
and polls ``SELECT count() ... WHERE call_id = X`` through the admin SQL API until the row is
there (tight polling, bounded in count and time). Note that the admin SQL endpoint first waits
for the audit writer to flush what it holds (up to 2 s), so this is the lag a responder asking
about a call sees; rows nobody asks about are written within ``audit.flush_interval_seconds``
(0.2 s by default) plus one insert.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from bench import loadgen, procs
from bench.phases import Env, Scenario, run_phase
from bench.stats import percentile

POLL_BOUND_SECONDS = 5.0
POLL_BOUND_COUNT = 2_000
LAG_CONNECTIONS = 16


async def _sample(env: Env, target: loadgen.Target) -> dict[str, Any]:
    assert env.gateway is not None
    status, headers, _ = await loadgen.fetch(env.session, target)
    responded = time.perf_counter()
    call_id = str(uuid.UUID(headers["x-agentgate-call-id"]))
    polls = 0
    while polls < POLL_BOUND_COUNT and time.perf_counter() - responded < POLL_BOUND_SECONDS:
        polls += 1
        rows = await env.gateway.sql(env.session,
                                     f"SELECT count() AS n FROM agentgate.calls WHERE call_id = '{call_id}'")
        if rows and rows[0]["n"] >= 1:
            return {"status": status, "lag_ms": (time.perf_counter() - responded) * 1000, "polls": polls}
    return {"status": status, "lag_ms": None, "polls": polls}


async def audit_lag(env: Env, scenario: Scenario) -> dict[str, Any]:
    assert env.gateway is not None
    opts = env.opts
    rate, seconds = opts.lag_rate, opts.lag_seconds
    cpu0 = procs.cpu_seconds(env.gateway.pid)
    foreign = procs.ForeignLoad()
    load = asyncio.create_task(run_phase(env, scenario, connections=LAG_CONNECTIONS,
                                         requests=max(1, int(rate * seconds)), seconds=seconds,
                                         trace="bench-lag-load", rate=rate))
    target = scenario.target("bench-lag-sample")
    interval = 1 / opts.lag_samples_per_second
    wanted = max(1, int(seconds * opts.lag_samples_per_second))
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i in range(wanted):
        if i and load.done():
            break
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing of the sampler, not a wait for a result
        samples.append(await _sample(env, target))
    result = await load
    cpu = procs.cpu_seconds(env.gateway.pid) - cpu0
    other = foreign.cores()
    lags = sorted(s["lag_ms"] for s in samples if s["lag_ms"] is not None)
    return {
        "rate_target": rate, "rate_achieved": round(result.rps, 1), "connections": LAG_CONNECTIONS,
        "load": result.as_dict(), "samples": len(samples), "visible": len(lags),
        "lag_p50_ms": round(percentile(lags, 50), 2) if lags else None,
        "lag_p99_ms": round(percentile(lags, 99), 2) if lags else None,
        "lag_max_ms": round(lags[-1], 2) if lags else None,
        "polls_max": max((s["polls"] for s in samples), default=0),
        "sample_errors": sum(1 for s in samples if s["status"] != 200),
        "gateway_cpu_utilisation": round(cpu / result.duration_s, 3) if result.duration_s else None,
        "foreign_load_cores": other,
    }
