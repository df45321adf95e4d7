"""The bench upstream: ``python -m bench.upstream --cert-dir DIR`` serves plain HTTP and HTTPS
(its own CA, written to ``DIR/upstream-ca.pem``) on 127.0.0.1 and prints one line
``bench-upstream http=HOST:PORT https=HOST:PORT ca=FILE``.

GET /items/{id}: a small JSON document; POST /echo: the request body back; GET /tickets/{id}:
a ticket with customer contact details (what the example policy redacts); GET /bulk/{bytes}: a
JSON document of about that many bytes full of ticket records with PII and secrets (built once
per size, at most 16 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
from pathlib import Path

import trustme
from aiohttp import web

from bench.workloads import BULK_MAX_BYTES, TICKET_EMAIL, bulk_document

ITEM = json.dumps({"id": 42, "name": "widget", "status": "ok", "tags": ["a", "b"]}).encode()
TICKET = json.dumps({"ticket": {
    "id": 1, "subject": "Refund for order 1042", "status": "open",
    "requester": {"name": "Ada Lovelace", "email": TICKET_EMAIL, "phone": "+1 415 555 0100"},
    "description": f"Please call me on +1 415 555 0100 or write to {TICKET_EMAIL}."}}).encode()


async def item(request: web.Request) -> web.Response:
    return web.Response(body=ITEM, content_type="application/json")


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/json")


async def ticket(request: web.Request) -> web.Response:
    return web.Response(body=TICKET, content_type="application/json")


_BULK: dict[int, bytes] = {}


async def bulk(request: web.Request) -> web.Response:
    try:
        size = int(request.match_info["size"])
    except ValueError:
        raise web.HTTPBadRequest(text="size must be an integer") from None
    if not 0 < size <= BULK_MAX_BYTES:
        raise web.HTTPBadRequest(text=f"size must be in 1..{BULK_MAX_BYTES}")
    if size not in _BULK:
        if len(_BULK) >= 4:
            _BULK.clear()  # bounded: the bench asks for one or two sizes
        _BULK[size] = bulk_document(size)
    return web.Response(body=_BULK[size], content_type="application/json")


def make_app() -> web.Application:
    app = web.Application(client_max_size=8 << 20)
    app.router.add_get("/items/{id}", item)
    app.router.add_post("/echo", echo)
    app.router.add_post("/echo/{id}", echo)
    app.router.add_get("/tickets/{id}", ticket)
    app.router.add_get("/bulk/{size}", bulk)
    return app


def server_tls(cert_dir: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    ca_file = cert_dir / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ctx, ca_file


async def main(cert_dir: Path) -> None:
    runner = web.AppRunner(make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    ctx, ca_file = server_tls(cert_dir)
    plain = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx, backlog=1024)
    await plain.start()
    await tls.start()
    ports = [s._server.sockets[0].getsockname()[1] for s in (plain, tls)]  # type: ignore[union-attr]
    print(f"bench-upstream http=127.0.0.1:{ports[0]} https=127.0.0.1:{ports[1]} ca={ca_file}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--cert-dir", type=Path, required=True)
    asyncio.run(main(parser.parse_args().cert_dir))
