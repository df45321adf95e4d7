"""One bench run: start the upstream, the gateway and bare mitmproxy, measure each configuration."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import loadgen, meta, procs, wrk
from bench.gateway import BULK_REDACT_ROUTE, BULK_ROUTE, GatewayProcess, Keys, start_gateway
from bench.lag import audit_lag
from bench.leak import leak_check
from bench.options import Options
from bench.phases import Env, Scenario, measure, with_ratio
from bench.profile import profile_gateway
from bench.redact_large import LargeScenarios, measure_large
from bench.workloads import GET, GET_NEW, POST, POST_NEW, TICKET, TICKET_EMAIL, Workload, bulk_path

GATEWAY_CONFIGS = {"route", "route-new", "redact", "redact-large", "forward", "lag"}


class Upstream:
    def __init__(self, child: procs.Child) -> None:
        self.child = child
        parts = dict(p.split("=", 1) for p in child.ready_line.split()[1:])
        self.http, self.https, self.ca = parts["http"], parts["https"], Path(parts["ca"])


def _trust(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


class Run:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.pinning = procs.Pinning.plan(opts.pin)
        self.workdir = Path(tempfile.mkdtemp(prefix="agentgate-bench-"))
        self.keys = Keys.create(self.workdir)
        self.agent_token = self.keys.token("bench-agent", ["support"], team="support")
        self.upstream: Upstream | None = None
        self.mitm: procs.Child | None = None
        self.report: dict[str, Any] = {"results": [], "lag": None, "leak": None, "profile": None,
                                       "redaction": None, "redact_large": None, "errors": []}

    def use_wrk(self) -> bool:
        if self.opts.generator == "builtin":
            return False
        if wrk.wrk_path() is None:
            if self.opts.generator == "wrk":
                raise SystemExit("--generator wrk: wrk is not installed (apt-get install wrk)")
            return False
        return True

    # -- scenarios ---------------------------------------------------------------------
    def scenarios(self, config: str, gw: GatewayProcess | None) -> list[Scenario]:
        up = self.upstream
        assert up is not None
        auth = {"Authorization": f"Bearer {self.agent_token}"}
        if config == "direct":
            return [Scenario("direct", w, f"http://{up.http}{w.path}") for w in (GET, POST)]
        if config == "direct-tls":
            return [Scenario("direct-tls", w, f"https://{up.https}{w.path}", ssl=_trust(up.ca), wrk_ok=False)
                    for w in (GET, POST)]
        if config == "mitm":
            mitm_port = self.mitm.ready_line.split("=", 1)[1] if self.mitm else ""
            return [Scenario("mitm", w, f"https://{up.https}{w.path}", proxy=f"http://{mitm_port}",
                             ssl=_trust(self.workdir / "mitm" / "mitmproxy-ca-cert.pem"),
                             pid=self.mitm.pid if self.mitm else None, baseline="direct-tls", wrk_ok=False)
                    for w in (GET, POST)]
        assert gw is not None
        if config == "route":
            return [Scenario("route", w, gw.route_url(w.path), headers=auth, pid=gw.pid, store_pid=gw.store_pid, audited=True,
                             baseline="direct") for w in (GET, POST)]
        if config == "route-fsync":
            return [Scenario("route-fsync", w, gw.route_url(w.path), headers=auth, pid=gw.pid, store_pid=gw.store_pid,
                             audited=True, baseline="direct") for w in (GET, POST)]
        if config == "route-new":
            return [Scenario("route-new", w, gw.route_url(w.path), headers=auth, pid=gw.pid, store_pid=gw.store_pid,
                             audited=True, baseline="direct") for w in (GET_NEW, POST_NEW)]
        if config == "redact":
            return [Scenario("redact", TICKET, gw.route_url(TICKET.path), headers=auth, pid=gw.pid, store_pid=gw.store_pid,
                             audited=True, baseline="direct")]
        if config == "forward":
            return [Scenario("forward", w, f"https://{up.https}{w.path}", proxy=f"http://{gw.proxy}",
                             proxy_headers={"Proxy-Authorization": f"Bearer {self.agent_token}"},
                             ssl=_trust(gw.ca_file), pid=gw.pid, store_pid=gw.store_pid, audited=True, baseline="direct-tls",
                             wrk_ok=False) for w in (GET, POST)]
        raise ValueError(config)

    def large_scenarios(self, gw: GatewayProcess) -> LargeScenarios:
        """The large document without and with redaction (same upstream path, two routes), and
        the small route GET."""
        auth = {"Authorization": f"Bearer {self.agent_token}"}
        bulk = Workload("bulk", "GET", bulk_path(self.opts.large_bytes))
        plain, redacted = (Scenario("redact-large", bulk, gw.route_url(bulk.path, route), headers=auth,
                                    pid=gw.pid, store_pid=gw.store_pid, audited=True) for route in (BULK_ROUTE, BULK_REDACT_ROUTE))
        small = Scenario("redact-large", GET, gw.route_url(GET.path), headers=auth, pid=gw.pid, store_pid=gw.store_pid, audited=True)
        return LargeScenarios(plain=plain, redacted=redacted, small=small)

    # -- the run -----------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        opts = self.opts
        procs.pin_self(self.pinning.load)
        use_wrk = self.use_wrk()
        self.report["meta"] = meta.describe(opts, self.pinning, use_wrk)
        self.report["meta"]["loadavg_start"] = meta.loadavg()
        started = time.monotonic()
        self.upstream = Upstream(procs.start(
            "upstream", [sys.executable, "-m", "bench.upstream", "--cert-dir", str(self.workdir)],
            ready_prefix="bench-upstream", log=self.workdir / "upstream.log", cpus=self.pinning.load))
        gw: GatewayProcess | None = None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                env = Env(opts, self.pinning, self.workdir, session, use_wrk)
                configs = () if opts.leak_only else opts.only
                if GATEWAY_CONFIGS & set(configs) or opts.leak or opts.profile_seconds:
                    gw = env.gateway = self._start_gateway()
                for config in configs:
                    if config in GATEWAY_CONFIGS and gw is None:
                        continue  # the gateway did not start: report["errors"] says why
                    await self._config(env, config, gw)
                with_ratio(self.report["results"])
                if opts.leak and gw is not None:
                    await self._guard("leak", lambda: self._leak(env, gw))
                if opts.profile_seconds and gw is not None:
                    await self._guard("profile", lambda: self._profile(env, gw))
        finally:
            for child in (self.mitm, gw.child if gw else None, self.upstream.child):
                if child is not None:
                    child.stop()
            if gw is not None:
                self.report["gateway_log_tail"] = gw.child.tail(20)
            if not opts.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
        self.report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
        self.report["meta"]["loadavg_end"] = meta.loadavg()
        return self.report

    def _start_gateway(self, name: str = "gateway", audit: dict[str, Any] | None = None) -> GatewayProcess | None:
        assert self.upstream is not None
        try:
            gw = start_gateway(self.workdir / name, self.keys, upstream_http=self.upstream.http,
                               upstream_ca=self.upstream.ca, cpus=self.pinning.proxy,
                               store_cpus=self.pinning.load, audit=audit)
        except RuntimeError as exc:
            self.report["errors"].append({"what": f"{name} start", "error": str(exc)[-3000:]})
            print(f"bench: the {name} did not start: {exc}", file=sys.stderr, flush=True)
            return None
        if name != "gateway":
            return gw
        self.report["gateway_start_rss_mb"] = round(procs.memory_kb(gw.pid)["VmRSS"] / 1024, 1)
        if gw.store_pid is not None:
            self.report["meta"]["store_cpus"] = sorted(self.pinning.load) if self.pinning.load else None
            self.report["meta"]["store_thread_cpus"] = sorted({tuple(sorted(cpus)) for cpus in
                                                               procs.thread_affinities(gw.store_pid)})
        return gw

    async def _guard(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others' numbers
            self.report["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}",
                                          "trace": traceback.format_exc(limit=5)})
            print(f"bench: {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    async def _config(self, env: Env, config: str, gw: GatewayProcess | None) -> None:
        if config == "lag":
            await self._guard("lag", lambda: self._lag(env, gw))
            return
        if config == "redact-large":
            await self._guard("redact-large", lambda: self._redact_large(env, gw))
            return
        if config == "mitm":
            await self._guard("mitm start", self._start_mitm)
            if self.mitm is None:
                return
        if config == "route-fsync":  # a gateway of its own: the same, syncing each record before forwarding
            gw = self._start_gateway("gateway-fsync", audit={"spool_fsync": "before_forward"})
            if gw is None:
                return
            env = dataclasses.replace(env, gateway=gw)
        try:
            if config == "redact":
                await self._guard("redaction probe", lambda: self._redaction_probe(env, gw))
            for scenario in self.scenarios(config, gw):
                t0 = time.monotonic()
                try:
                    result = await measure(env, scenario)
                except Exception as exc:  # noqa: BLE001
                    result = {"config": scenario.config, "workload": scenario.workload.name,
                              "error": f"{type(exc).__name__}: {exc}"}
                self.report["results"].append(result)
                _progress(result, time.monotonic() - t0)
        finally:
            if config == "mitm" and self.mitm is not None:
                self.mitm.stop()
            if config == "route-fsync" and gw is not None:
                gw.stop()

    async def _start_mitm(self) -> None:
        assert self.upstream is not None
        confdir = self.workdir / "mitm"
        confdir.mkdir(exist_ok=True)
        self.mitm = procs.start(
            "mitmproxy", [sys.executable, "-m", "bench.bare_mitm", "--confdir", str(confdir),
                          "--upstream-ca", str(self.upstream.ca)],
            ready_prefix="bench-mitm", log=self.workdir / "mitm.log", cpus=self.pinning.proxy)

    async def _redaction_probe(self, env: Env, gw: GatewayProcess | None) -> None:
        """What the gateway does today with a retrieval its policy says to redact."""
        assert gw is not None
        scenario = self.scenarios("redact", gw)[0]
        status, headers, body = await loadgen.fetch(env.session, scenario.target("bench-redact-probe"))
        call_id = headers.get("x-agentgate-call-id", "")
        rows = await gw.sql(env.session, "SELECT outcome, reasons FROM agentgate.calls "
                                         "WHERE trace_id = 'bench-redact-probe' LIMIT 1")
        self.report["redaction"] = {
            "status": status, "call_id": call_id,
            "email_in_response": TICKET_EMAIL.encode() in body,
            "redaction_applied": status == 200 and TICKET_EMAIL.encode() not in body,
            "audit": rows[0] if rows else None,
        }

    async def _lag(self, env: Env, gw: GatewayProcess | None) -> None:
        assert gw is not None
        route_get = self.scenarios("route", gw)[0]
        self.report["lag"] = lag = await audit_lag(env, route_get)
        print(f"bench: audit lag at {lag['rate_achieved']} req/s: p50 {lag['lag_p50_ms']} ms, "
              f"max {lag['lag_max_ms']} ms ({lag['visible']}/{lag['samples']} samples)", flush=True)

    async def _redact_large(self, env: Env, gw: GatewayProcess | None) -> None:
        assert gw is not None
        t0 = time.monotonic()
        self.report["redact_large"] = r = await measure_large(env, self.large_scenarios(gw))
        if "small_during" in r:
            print(f"bench: redact-large: {r['body_bytes']:,} bytes: p50 {_ms(r['plain']['p50_us'])} ms plain, "
                  f"{_ms(r['redacted']['p50_us'])} ms redacted ({r['mb_per_s']} MB/s); small GET p99 "
                  f"{_ms(r['small_alone']['load']['p99_us'])} ms alone, {_ms(r['small_during']['load']['p99_us'])} "
                  f"ms during large redactions (×{r['small_p99_ratio']}) [{time.monotonic() - t0:.1f}s]"
                  f"{' ERROR: ' + r['error'] if r.get('error') else ''}", flush=True)
        else:
            print(f"bench: redact-large: no numbers: {r.get('error')}", flush=True)

    async def _leak(self, env: Env, gw: GatewayProcess | None) -> None:
        assert gw is not None
        self.report["leak"] = leak = await leak_check(env, self.scenarios(self.opts.leak_config, gw)[0])
        print(f"bench: leak check: RSS {leak['rss_after_first_mb']} MB after {leak['requests_first']} requests, "
              f"{leak['rss_after_total_mb']} MB after {leak['requests_total']}", flush=True)

    async def _profile(self, env: Env, gw: GatewayProcess | None) -> None:
        assert gw is not None
        self.report["profile"] = await profile_gateway(env, self.scenarios(self.opts.profile_config, gw)[0],
                                                       self.opts.profile_seconds)


def _ms(us: float | None) -> str:
    return "?" if us is None else f"{us / 1000:.1f}"


def _progress(r: dict[str, Any], elapsed: float) -> None:
    name = f"{r['config']}/{r['workload']}"
    if "loaded" in r:
        line = (f"{r['loaded']['rps']} req/s at {r['loaded']['connections']} conn, p50 {r['single']['p50_us']} µs "
                f"at 1 conn ({r.get('generator')})")
    else:
        line = "no numbers"
    err = f" ERROR: {r['error']}" if r.get("error") else ""
    print(f"bench: {name}: {line} [{elapsed:.1f}s]{err}", flush=True)


async def run(opts: Options) -> dict[str, Any]:
    return await Run(opts).run()
