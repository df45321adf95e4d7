"""The built-in load generator: aiohttp keep-alive clients, optionally through a CONNECT proxy.

Used where wrk cannot go (forward-proxy mode: wrk has no CONNECT proxy support), for
rate-limited phases, and everywhere when wrk is not installed. Bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.stats import LoadResult

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)


@dataclass
class Target:
    url: str
    method: str = "GET"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    proxy: str | None = None
    """``http://HOST:PORT`` of a forward proxy (HTTPS URLs go through CONNECT)."""
    proxy_headers: dict[str, str] | None = None
    ssl: ssl.SSLContext | None = None
    """Trust for HTTPS URLs (the upstream's CA, or the proxy's interception CA)."""
    fresh_paths: str | None = None
    """Set: request ``i`` goes to ``url + fresh_paths + str(i)``, a path never sent before."""

    def url_for(self, index: int | str) -> str:
        return self.url if self.fresh_paths is None else f"{self.url}{self.fresh_paths}{index}"

    def request_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"headers": self.headers}
        if self.body:
            kw["data"] = self.body
        if self.proxy:
            kw["proxy"] = self.proxy
            kw["proxy_headers"] = self.proxy_headers
        if self.url.startswith("https:"):
            kw["ssl"] = self.ssl if self.ssl is not None else True
        return kw


def client_session(connections: int) -> tuple[aiohttp.ClientSession, list[int]]:
    """A keep-alive session holding at most ``connections`` connections; the list counts the
    connections it opened (to show that keep-alive held)."""
    opened = [0]

    async def on_open(session: Any, ctx: Any, params: Any) -> None:
        opened[0] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_open)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, force_close=False,
                                     enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, trace_configs=[trace], timeout=REQUEST_TIMEOUT,
                                 auto_decompress=False), opened


async def run_load(target: Target, *, connections: int, max_requests: int, max_seconds: float,
                   rate: float | None = None) -> LoadResult:
    """``connections`` workers send ``target`` back to back (or at ``rate`` requests/s overall)
    until ``max_requests`` are sent or ``max_seconds`` have passed."""
    session, opened = client_session(connections)
    kwargs = target.request_kwargs()
    latencies: list[float] = []
    errors = 0
    first_error = ""
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    last_done = start

    async def worker() -> None:
        nonlocal issued, errors, first_error, last_done
        while issued < max_requests:
            index = issued
            issued += 1
            if rate:
                delay = start + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # open-loop pacing of a rate-limited phase
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                async with session.request(target.method, target.url_for(index), **kwargs) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                continue
            finally:
                last_done = time.perf_counter()
            latencies.append((last_done - t0) * 1e6)
            if not 200 <= status < 300:
                errors += 1
                first_error = first_error or f"HTTP {status}"

    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))),
                               max_seconds + REQUEST_TIMEOUT.total + 5)  # type: ignore[operator]
    finally:
        await session.close()
    return LoadResult.from_latencies("builtin", connections, latencies, errors, last_done - start,
                                     connections_opened=opened[0], first_error=first_error)


async def fetch(session: aiohttp.ClientSession, target: Target) -> tuple[int, dict[str, str], bytes]:
    """One request (probes and audit-lag samples)."""
    async with session.request(target.method, target.url_for("probe"), **target.request_kwargs()) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()
