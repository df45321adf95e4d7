"""Run mitmproxy inside the gateway's event loop with only the addons the gateway needs.

mitmdump's default addon set roughly halves throughput; a security proxy needs none of
replay, scripting, HAR export or the terminal UI.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from addons import protocol_errors
from gateway.errors import ProxyStartError

log = logging.getLogger("agentgate.forward")


class EmbeddedProxy:
    def __init__(self, *, host: str, port: int, confdir: Path, addon: object,
                 upstream_ca_file: Path | None, verify_upstream_tls: bool,
                 idle_seconds: float, max_body_bytes: int) -> None:
        self._settings = dict(
            mode=["regular"],
            listen_host=host,
            listen_port=port,
            confdir=str(confdir),
            # Decide before touching the upstream: a denied call never opens a connection to it.
            connection_strategy="lazy",
            ssl_insecure=not verify_upstream_tls,
            ssl_verify_upstream_trusted_ca=str(upstream_ca_file) if upstream_ca_file else None,
            # Never relay a tunnel as raw TCP (no policy, no audit): what is not HTTP gets a 400.
            rawtcp=False,
            # Bodies are read whole before the request hook judges them (mitmproxy's
            # stream_large_bodies would send a large request upstream first); the addon streams
            # responses itself where nothing needs redacting. Larger bodies are refused (413 / 502).
            stream_large_bodies=None,
            body_size_limit=str(max_body_bytes),
            tcp_timeout=int(idle_seconds),
        )
        self._addon = addon
        self.master: Master | None = None

    async def start(self) -> None:
        protocol_errors.install()  # mitmproxy's own 400 / 413 / 502 answers in the gateway's JSON
        opts = options.Options()
        self.master = Master(opts)
        self.master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                               tlsconfig.TlsConfig(), self._addon)
        known = {k: v for k, v in self._settings.items() if k in opts}
        opts.update(**known)
        ps = self.master.addons.get("proxyserver")
        if not await ps.setup_servers():
            raise ProxyStartError(
                f"forward proxy could not listen on {self._settings['listen_host']}:{self._settings['listen_port']}")
        await self.master.running()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        assert self.master is not None
        return [(a[0], a[1]) for a in self.master.addons.get("proxyserver").listen_addrs()]

    async def stop(self) -> None:
        if self.master is None:
            return
        ps = self.master.addons.get("proxyserver")
        await ps.servers.update([])
        await self.master.done()
        self.master = None
