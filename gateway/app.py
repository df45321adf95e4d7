"""Wire the gateway together: one process, one asyncio loop, three listeners."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from addons.embed import EmbeddedProxy
from addons.gateway_addon import AgentGate
from gateway.admin import AdminApi
from gateway.admin_events import AdminEvents
from gateway.approvals import Approvals
from gateway.config import Config
from gateway.devkey import ensure_dev_key, public_pem
from gateway.http_server import GatewayRunner, OnBadRequest, name_the_server
from gateway.identity import JwtVerifier
from gateway.killswitch import KillSwitch, KillSwitches
from gateway.metrics import Metrics
from gateway.notify import Notifier
from gateway.pipeline import Pipeline
from gateway.redaction import Redactor, scrub_value
from gateway.redaction import offload as redaction_worker
from gateway.policy import make_engine
from gateway.registry import AgentRegistry
from gateway.routes import RouteFrontEnd
from gateway.state_sync import StateSync
from gateway.streams import OpenStreams
from gateway.upstream import RouteUpstream
from storage.spool import AuditSpool
from storage.store import Store

log = logging.getLogger("agentgate")

MAX_REQUEST_BODY = 64 << 20


def instance_name(data_dir: Path) -> str:
    """``<host>-<id>``: the id is kept in the data dir, so each gateway's hash chain is its own
    and survives restarts (the spool in that data dir belongs to exactly this instance)."""
    id_file = data_dir / "instance-id"
    try:
        ident = id_file.read_text().strip()
    except FileNotFoundError:
        ident = uuid.uuid4().hex[:12]
        id_file.write_text(ident + "\n")
    return f"{socket.gethostname()}-{ident}"


@dataclass
class Listeners:
    proxy: tuple[str, int] | None
    routes: tuple[str, int]
    admin: tuple[str, int]


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.instance = ""
        self._runners: list[web.AppRunner] = []
        self._background: set[asyncio.Task[None]] = set()
        self.proxy: EmbeddedProxy | None = None
        self.listeners: Listeners | None = None

    async def start(self) -> Listeners:
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.instance = instance_name(cfg.data_dir)
        dev_pub = public_pem(ensure_dev_key(cfg.dev_key_path)) if cfg.identity.dev_signing_key else None
        registry = AgentRegistry.load(cfg.identity.registry_file) if cfg.identity.registry_file else None
        self.metrics = Metrics()
        self.verifier = JwtVerifier(cfg.identity, dev_public_key_pem=dev_pub, registry=registry)
        self.engine = make_engine(cfg.policy, {"agents": registry.as_data() if registry else {}})
        await self.engine.start()
        self.store = Store.from_config(cfg)
        await self.store.open()
        self.audit = AuditSpool(self.store, cfg.data_dir / "spool", instance=self.instance,
                                batch_size=cfg.audit.batch_size,
                                flush_interval_seconds=cfg.audit.flush_interval_seconds,
                                spool_max_bytes=cfg.audit.spool_max_bytes, required=cfg.audit.required,
                                fsync=cfg.audit.spool_fsync,
                                fsync_interval_seconds=cfg.audit.spool_fsync_interval_seconds)
        await self.audit.start()
        self.killswitches = KillSwitches(self.store, self.verifier.registry)
        self.notifier = Notifier(cfg.approval.webhooks)
        await self.notifier.start()
        self.approvals = Approvals(self.store, cfg.approval, registry=self.verifier.registry,
                                   notify=self.notifier, scrub=scrub_value)
        self.streams = OpenStreams(self.verifier.registry)
        self.killswitches.on_kill.append(self._on_kill)
        self.sync = StateSync(self.killswitches, self.approvals, cfg.state.poll_seconds)
        await self.sync.start()
        self.events = AdminEvents(self.store, self.instance)
        self.pipeline = Pipeline(cfg, verifier=self.verifier, engine=self.engine, audit=self.audit,
                                 metrics=self.metrics, instance=self.instance, killswitches=self.killswitches,
                                 approvals=self.approvals, streams=self.streams,
                                 redactor=Redactor(cfg.redaction))
        if cfg.redaction.thread_threshold_bytes <= cfg.redaction.max_inspect_bytes:
            redaction_worker.prestart()  # large bodies are redacted there (gateway/redaction/offload.py)
        self.upstream = RouteUpstream(cfg)
        await self.upstream.start()
        routes = RouteFrontEnd(self.pipeline, self.upstream, max_body=MAX_REQUEST_BODY)
        admin = AdminApi(verifier=self.verifier, engine=self.engine, store=self.store,
                         audit=self.audit, metrics=self.metrics, sql_row_limit=cfg.audit.sql_row_limit,
                         killswitches=self.killswitches, approvals=self.approvals, events=self.events,
                         approver_teams_claim=cfg.approval.approver_teams_claim)
        # Bodies go upstream as the agent sent them: aiohttp must not inflate a Content-Encoding
        # (gateway/request_body.py inflates a copy for policy).
        routes_addr = await self._serve(routes.app(), cfg.listen.routes, on_bad_request=routes.refuse_unparsable,
                                        auto_decompress=False)
        admin_addr = await self._serve(admin.app(), cfg.listen.admin)
        proxy_addr = None
        if cfg.listen.proxy_enabled:
            host, port = _split(cfg.listen.proxy)
            self.proxy = EmbeddedProxy(
                host=host, port=port, confdir=cfg.ca_dir, addon=AgentGate(self.pipeline),
                upstream_ca_file=cfg.proxy.upstream_ca_file,
                verify_upstream_tls=cfg.proxy.verify_upstream_tls,
                idle_seconds=cfg.proxy.connection_idle_seconds, max_body_bytes=cfg.proxy.max_body_bytes)
            await self.proxy.start()
            proxy_addr = self.proxy.addresses[0]
        self.listeners = Listeners(proxy=proxy_addr, routes=routes_addr, admin=admin_addr)
        log.info("agentgate up: proxy %s, routes %s, admin %s, policy %s revision %s",
                 proxy_addr, routes_addr, admin_addr, self.engine.name, self.engine.revision)
        return self.listeners

    def _on_kill(self, switch: KillSwitch) -> None:
        """A new kill-switch (from here or another replica): cut open streams, deny held calls."""
        self.streams.cut_matching(switch)
        task = asyncio.get_running_loop().create_task(self.approvals.deny_for_killswitch(switch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _serve(self, app: web.Application, hostport: str, *, on_bad_request: OnBadRequest | None = None,
                     **handler_args: Any) -> tuple[str, int]:
        app.on_response_prepare.append(name_the_server)
        runner = GatewayRunner(app, on_bad_request=on_bad_request, access_log=None, handle_signals=False,
                               keepalive_timeout=self.cfg.listen.idle_seconds, **handler_args)
        await runner.setup()
        host, port = _split(hostport)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        addr = sock.getsockname()
        return addr[0], addr[1]

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.upstream.close()
        await self.sync.close()
        await self.notifier.close()
        await self.audit.close()
        await self.store.close()
        await self.engine.close()
        await self.verifier.close()


GC_YOUNG_THRESHOLD = 20_000


async def serve_forever(cfg: Config) -> None:
    gateway = Gateway(cfg)
    listeners = await gateway.start()
    # Everything loaded so far (mitmproxy, pydantic, aiohttp, the compiled policy ...) lives as
    # long as the process: keep it out of the cyclic GC's scans. Without this every full
    # collection walked all of it, stopping the event loop for 60-75 ms a few times a minute
    # under load (bench, route mode).
    gc.collect()
    gc.freeze()
    # A call allocates a few hundred container objects, nearly all freed by refcount within the
    # call: with the default young-generation threshold (700) a collection ran about once per
    # call. At 20,000 most of them are gone before one runs (bench A/B: route mode 3-6% more req/s).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def fmt(addr: tuple[str, int] | None) -> str:
        return "off" if addr is None else f"{addr[0]}:{addr[1]}"

    print(f"agentgate listening: proxy={fmt(listeners.proxy)} routes={fmt(listeners.routes)} "
          f"admin={fmt(listeners.admin)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await gateway.stop()
