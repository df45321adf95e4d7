"""``redact-large``: redaction of a large JSON response, and what it does to other requests.

Through one gateway process, to the same upstream document (``/bulk/<bytes>``):

1. a probe of each route: HTTP 200, the unredacted body carries ``BULK_EMAIL``, the redacted one
   does not (and its audit row counts the redactions);
2. sequential calls alternating unredacted / redacted on one keep-alive connection (bounded in
   count and time): p50/p99 of each, the added latency, and MB/s of redaction (body over the
   added p50);
3. small route GETs at ``small_connections`` connections alone, then while ``large_background``
   clients call the redacted route back to back: the two p99s and their ratio show whether
   redacting a large body stalls the gateway's event loop for everyone else.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench import loadgen, procs
from bench.phases import Env, Scenario, audit_stats, run_phase
from bench.stats import LoadResult
from bench.workloads import BULK_EMAIL

TRACE = "bench-redact-large"
FIRST_LARGE_TIMEOUT = 60.0
"""Seconds to wait for the first background call before the contended phase (it must overlap)."""


@dataclass
class LargeScenarios:
    plain: Scenario
    """The large document through a route whose decision does not redact."""
    redacted: Scenario
    """The same document through a route whose decision redacts (fields + all detectors)."""
    small: Scenario
    """A small route GET (the requests that must not stall)."""


@dataclass
class Samples:
    latencies_us: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def failed(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what[:300]

    def result(self, connections: int, duration_s: float) -> dict[str, Any]:
        return LoadResult.from_latencies("builtin", connections, self.latencies_us, self.errors, duration_s,
                                         first_error=self.first_error).as_dict()


async def _call(session: Any, target: loadgen.Target, samples: Samples, size: int) -> tuple[float, float] | None:
    """One timed call; ``(start, end)`` in perf_counter seconds when it answered 200 in full."""
    t0 = time.perf_counter()
    try:
        async with session.request(target.method, target.url, **target.request_kwargs()) as resp:
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        samples.failed(f"{type(exc).__name__}: {exc}")
        return None
    t1 = time.perf_counter()
    if status != 200:
        samples.failed(f"HTTP {status}")
        return None
    if len(body) < size // 2:
        samples.failed(f"short body: {len(body)} bytes")
        return None
    samples.latencies_us.append((t1 - t0) * 1e6)
    return t0, t1


async def probe(env: Env, s: LargeScenarios) -> dict[str, Any]:
    """Both routes answer 200 with the document; only the redacted one lost ``BULK_EMAIL``."""
    assert env.gateway is not None
    out: dict[str, Any] = {}
    for kind, scenario in (("plain", s.plain), ("redacted", s.redacted)):
        status, headers, body = await loadgen.fetch(env.session, scenario.target(f"{TRACE}-probe-{kind}"))
        entry: dict[str, Any] = {"status": status, "bytes": len(body), "email_in_body": BULK_EMAIL.encode() in body}
        if status == 200:
            try:
                entry["records"] = len(json.loads(body)["records"])
            except (ValueError, KeyError, TypeError) as exc:
                entry["error"] = f"not the bulk JSON document: {type(exc).__name__}"
        out[kind] = entry
    rows = await env.gateway.sql(env.session, "SELECT outcome, reasons, redaction_counts FROM agentgate.calls "
                                              f"WHERE trace_id = '{TRACE}-probe-redacted' LIMIT 1")
    out["audit_redacted"] = rows[0] if rows else None
    plain, red = out["plain"], out["redacted"]
    problems = [f"{k}: HTTP {v['status']}" for k, v in (("plain", plain), ("redacted", red)) if v["status"] != 200]
    problems += [f"{k}: {v['error']}" for k, v in (("plain", plain), ("redacted", red)) if v.get("error")]
    if not problems and not plain["email_in_body"]:
        problems.append("the unredacted response lacks the bulk email (wrong document)")
    if not problems and red["email_in_body"]:
        problems.append("the redacted route returned the customer email: redaction was not applied")
    if problems:
        out["error"] = "; ".join(problems)
    return out


async def sequential(s: LargeScenarios, *, pairs: int, seconds: float, size: int) -> dict[str, Samples]:
    """Alternate unredacted and redacted calls (order flipped every pair, so drift hits both)."""
    session, _ = loadgen.client_session(1)
    samples = {"plain": Samples(), "redacted": Samples()}
    targets = {"plain": s.plain.target(f"{TRACE}-seq-plain"), "redacted": s.redacted.target(f"{TRACE}-seq-redacted")}
    deadline = time.perf_counter() + seconds
    try:
        for i in range(pairs):
            if time.perf_counter() >= deadline:
                break
            for kind in (("plain", "redacted") if i % 2 == 0 else ("redacted", "plain")):
                await _call(session, targets[kind], samples[kind], size)
    finally:
        await session.close()
    return samples


class Background:
    """``clients`` loops calling the redacted route back to back until stopped (or the caps)."""

    def __init__(self, target: loadgen.Target, clients: int, size: int, *, max_calls: int, seconds: float) -> None:
        self.target, self.clients, self.size = target, clients, size
        self.max_calls, self.deadline = max_calls, time.perf_counter() + seconds
        self.samples = Samples()
        self.spans: list[tuple[float, float]] = []
        self.first = asyncio.Event()
        self.stop = asyncio.Event()
        self.session, _ = loadgen.client_session(clients)
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def _client(self) -> None:
        while not self.stop.is_set() and len(self.spans) + self.samples.errors < self.max_calls \
                and time.perf_counter() < self.deadline:
            span = await _call(self.session, self.target, self.samples, self.size)
            if span is None:
                self.first.set()  # a failure: do not wait for a success that will not come
                continue
            self.spans.append(span)
            self.first.set()

    async def close(self) -> None:
        self.stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True),
                                   loadgen.REQUEST_TIMEOUT.total + 5)  # type: ignore[operator]
        finally:
            for task in self.tasks:
                task.cancel()
            await self.session.close()

    def during(self, w0: float, w1: float) -> dict[str, Any]:
        """The large calls that overlapped the window ``[w0, w1]``: how many, what share of the
        window at least one was in flight (``coverage``), and the throughput of those that ended in it."""
        window = w1 - w0
        overlapping = sorted((max(t0, w0), min(t1, w1)) for t0, t1 in self.spans if t0 < w1 and t1 > w0)
        covered, reach = 0.0, w0
        for start, end in overlapping:  # union of the clipped spans
            if end > reach:
                covered += end - max(start, reach)
                reach = end
        ended = sorted(t1 - t0 for t0, t1 in self.spans if w0 <= t1 <= w1)
        return {"clients": self.clients, "overlapping": len(overlapping), "completed": len(ended),
                "coverage": round(covered / window, 3) if window > 0 else None,
                "errors": self.samples.errors, "first_error": self.samples.first_error,
                "p50_ms": round(ended[len(ended) // 2] * 1000, 1) if ended else None,
                "mb_per_s": round(len(ended) * self.size / 1e6 / window, 2) if ended and window > 0 else None}


async def small_phase(env: Env, small: Scenario, name: str) -> tuple[dict[str, Any], float, float]:
    """Small GETs at ``small_connections``; also the load's window (perf_counter start, end)."""
    opts = env.opts
    trace = f"{TRACE}-small-{name}"
    foreign = procs.ForeignLoad()
    cpu0 = procs.cpu_seconds(small.pid) if small.pid else None
    t0 = time.perf_counter()
    res = await run_phase(env, small, connections=opts.small_connections, requests=opts.requests,
                          seconds=opts.duration, trace=trace)
    t1 = time.perf_counter()
    window = t1 - t0
    out: dict[str, Any] = {"load": res.as_dict(), "window_s": round(window, 3),
                           "foreign_load_cores": foreign.cores()}
    if small.pid and cpu0 is not None:  # read at once: the audit query below is not the phase's work
        out["gateway_cpu_utilisation"] = round((procs.cpu_seconds(small.pid) - cpu0) / window, 3)
    out["audit"] = await audit_stats(env, trace)
    return out, t0, t1


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


async def measure_large(env: Env, s: LargeScenarios) -> dict[str, Any]:
    """The whole phase (see the module docstring); ``error`` is set when a part produced no numbers."""
    opts = env.opts
    size = opts.large_bytes
    out: dict[str, Any] = {"body_bytes_requested": size, "background_clients": opts.large_background,
                           "small_connections": opts.small_connections,
                           "generator_small": "wrk" if env.use_wrk and s.small.wrk_ok else "builtin"}
    out["probe"] = await probe(env, s)
    if out["probe"].get("error"):
        out["error"] = f"probe: {out['probe']['error']}"
        return out
    body = out["body_bytes"] = out["probe"]["plain"]["bytes"]
    await sequential(s, pairs=2, seconds=opts.large_seconds, size=body)  # warm-up (untimed)
    seq = await sequential(s, pairs=opts.large_requests, seconds=opts.large_seconds, size=body)
    plain = out["plain"] = seq["plain"].result(1, sum(seq["plain"].latencies_us) / 1e6)
    red = out["redacted"] = seq["redacted"].result(1, sum(seq["redacted"].latencies_us) / 1e6)
    added = {q: (red[f"{q}_us"] - plain[f"{q}_us"]) / 1000 if red[f"{q}_us"] is not None
             and plain[f"{q}_us"] is not None else None for q in ("p50", "p99", "mean")}
    out["added_ms"] = {q: None if v is None else round(v, 2) for q, v in added.items()}
    out["mb_per_s"] = round(body / 1e6 / (added["p50"] / 1000), 2) if added["p50"] and added["p50"] > 0 else None
    # Small requests: warm up, alone, then with large redactions running the whole time.
    await run_phase(env, s.small, connections=opts.small_connections, requests=opts.warmup_requests,
                    seconds=min(opts.duration, 5.0), trace=f"{TRACE}-small-warmup")
    out["small_alone"], _, _ = await small_phase(env, s.small, "alone")
    bg = Background(s.redacted.target(f"{TRACE}-background"), opts.large_background, body,
                    max_calls=max(opts.large_requests, 1) * 20,
                    seconds=opts.duration + FIRST_LARGE_TIMEOUT + 10)
    bg.start()
    try:
        await asyncio.wait_for(bg.first.wait(), FIRST_LARGE_TIMEOUT)
        out["small_during"], w0, w1 = await small_phase(env, s.small, "during")
    finally:
        await bg.close()
    out["background"] = bg.during(w0, w1)
    alone, during = out["small_alone"]["load"], out["small_during"]["load"]
    out["small_p99_ratio"] = _ratio(during["p99_us"], alone["p99_us"])
    out["small_p50_ratio"] = _ratio(during["p50_us"], alone["p50_us"])
    if problems := _problems(out):
        out["error"] = "; ".join(problems)
    return out


def _problems(out: dict[str, Any]) -> list[str]:
    found = []
    for name in ("plain", "redacted"):
        r = out[name]
        if not r["requests"] or r["errors"]:
            found.append(f"sequential {name}: {r['errors']} errors of {r['requests']} "
                         f"({r['first_error'] or 'no responses'})")
    for name in ("small_alone", "small_during"):
        r = out[name]["load"]
        if not r["requests"] or r["errors"]:
            found.append(f"{name}: {r['errors']} errors of {r['requests']} ({r['first_error'] or 'no responses'})")
    bg = out["background"]
    if bg["errors"] or not bg["overlapping"]:
        found.append(f"background: {bg['errors']} errors, {bg['overlapping']} large calls overlapped the "
                     f"small phase ({bg['first_error'] or 'none overlapped'})")
    return found
