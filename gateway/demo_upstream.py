"""A local stand-in for a ticketing API, so the quickstart needs no network.

``agentgate demo-upstream`` serves it on 127.0.0.1:9999: GET /tickets, GET /tickets/{id},
POST /tickets (echo), DELETE /tickets/{id}. Its data is fake customer data for redaction demos.
"""

from __future__ import annotations

from aiohttp import web

TICKETS = {
    "1": {"id": 1, "subject": "Refund for order 1042", "status": "open",
          "requester": {"name": "Ada Lovelace", "email": "ada@example.com", "phone": "+1 415 555 0100"}},
    "2": {"id": 2, "subject": "Cannot log in", "status": "pending",
          "requester": {"name": "Alan Turing", "email": "alan@example.org", "phone": "+44 20 7946 0958"}},
}


async def list_tickets(request: web.Request) -> web.Response:
    return web.json_response({"tickets": list(TICKETS.values())})


async def get_ticket(request: web.Request) -> web.Response:
    ticket = TICKETS.get(request.match_info["id"])
    if ticket is None:
        return web.json_response({"error": "no such ticket"}, status=404)
    return web.json_response({"ticket": ticket})


async def create_ticket(request: web.Request) -> web.Response:
    return web.json_response({"created": await request.json()}, status=201)


async def delete_ticket(request: web.Request) -> web.Response:
    return web.Response(status=204)


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/tickets", list_tickets)
    app.router.add_get("/tickets/{id}", get_ticket)
    app.router.add_post("/tickets", create_ticket)
    app.router.add_delete("/tickets/{id}", delete_ticket)
    return app


def serve(host: str = "127.0.0.1", port: int = 9999) -> None:
    web.run_app(make_app(), host=host, port=port, print=lambda msg: print(f"demo upstream: {msg}", flush=True))
