"""Leak check: the gateway's RSS after N route-mode requests against its RSS after N/10
(``--leak-config route-new``: every one a new path, so every decision is evaluated).

The first tenth doubles as warm-up (caches, pools, allocator arenas fill); growth over the
other nine tenths that does not level off points at per-request retention.
"""

from __future__ import annotations

import time
from typing import Any

from bench import procs
from bench.phases import Env, Scenario, run_phase


async def leak_check(env: Env, scenario: Scenario) -> dict[str, Any]:
    assert scenario.pid is not None
    opts = env.opts
    n = opts.leak_requests
    deadline = time.monotonic() + opts.leak_seconds
    first = await run_phase(env, scenario, connections=opts.connections, requests=max(1, n // 10),
                            seconds=opts.leak_seconds, trace="bench-leak")
    mem_first = procs.memory_kb(scenario.pid)
    left = max(1.0, deadline - time.monotonic())
    rest = await run_phase(env, scenario, connections=opts.connections, requests=max(1, n - first.requests),
                           seconds=left, trace="bench-leak")
    mem_all = procs.memory_kb(scenario.pid)
    total = first.requests + rest.requests
    growth_kb = mem_all["VmRSS"] - mem_first["VmRSS"]
    return {
        "config": scenario.config, "workload": scenario.workload.name, "generator": first.generator,
        "requests_target": n, "requests_first": first.requests, "requests_total": total,
        "complete": total >= n, "errors": first.errors + rest.errors,
        "rss_after_first_mb": round(mem_first["VmRSS"] / 1024, 1),
        "rss_after_total_mb": round(mem_all["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(mem_all["VmHWM"] / 1024, 1),
        "rss_ratio": round(mem_all["VmRSS"] / mem_first["VmRSS"], 3),
        "growth_mb": round(growth_kb / 1024, 1),
        "growth_bytes_per_request": round(growth_kb * 1024 / rest.requests, 1) if rest.requests else None,
        "rps": round(total / (first.duration_s + rest.duration_s), 1) if first.duration_s + rest.duration_s else None,
    }
