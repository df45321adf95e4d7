"""Bare mitmproxy, the engine's own floor: ``python -m bench.bare_mitm --confdir D --upstream-ca F``.

The same embedding and options as the gateway's forward proxy (``addons/embed.py``) but only
mitmproxy's core, proxyserver, next_layer and tlsconfig addons: no identity, policy or audit.
Prints ``bench-mitm listening=HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master


async def main(confdir: Path, upstream_ca: Path) -> None:
    opts = options.Options()
    master = Master(opts)
    master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig())
    opts.update(mode=["regular"], listen_host="127.0.0.1", listen_port=0, confdir=str(confdir),
                connection_strategy="lazy", ssl_verify_upstream_trusted_ca=str(upstream_ca),
                stream_large_bodies="1m")
    ps = master.addons.get("proxyserver")
    if not await ps.setup_servers():
        raise SystemExit("bare mitmproxy could not listen")
    await master.running()  # as addons/embed.py does: no master.run(), so no eager task factory
    host, port = ps.listen_addrs()[0][:2]
    print(f"bench-mitm listening={host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ps.servers.update([])
    await master.done()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bare_mitm")
    parser.add_argument("--confdir", type=Path, required=True)
    parser.add_argument("--upstream-ca", type=Path, required=True)
    a = parser.parse_args()
    asyncio.run(main(a.confdir, a.upstream_ca))
