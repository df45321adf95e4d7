"""A real MCP server (the ``mcp`` SDK's MCPServer) over streamable HTTP, for gateway tests.

Runs in the ``.venv-mcp`` interpreter (see env.py), never in the gateway's venv:

    python server.py --port 0 --log tools.jsonl [--http-log http.jsonl] [--sse | --json] [--stateless]
                     [--certfile cert.pem --keyfile key.pem]

prints ``mcp-server listening on 127.0.0.1:PORT`` once it accepts connections and serves MCP at
``/mcp``. Every ``tools/call`` that reaches the server - known tool or not, valid arguments or
not - is appended to ``--log`` as one JSON line ``{"tool": name, "arguments": {...}}`` *before*
the tool runs, so a test can assert that the server never saw a call the gateway denied.
``--http-log`` records each HTTP request (method, path, headers with credentials redacted,
body) so tests can see what the gateway forwarded. All data here is fake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TICKETS: dict[int, dict[str, Any]] = {
    1001: {"id": 1001, "subject": "Refund for order A-17", "status": "open", "order_id": "A-17",
           "requester": {"name": "Dana Example", "email": "dana@example.com", "phone": "+1-555-0100"}},
    1002: {"id": 1002, "subject": "Cannot log in", "status": "pending", "order_id": None,
           "requester": {"name": "Lee Sample", "email": "lee.sample@example.org", "phone": "+44 20 7946 0958"}},
    1003: {"id": 1003, "subject": "Delete my account", "status": "open", "order_id": None,
           "requester": {"name": "Kim Test", "email": "kim@example.net", "phone": "+1-555-0199"}},
}
_REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class JsonLines:
    """Append-only JSON-lines file, one complete line per write (tools may run in threads)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


class RecordingServer(MCPServer):
    """MCPServer that records every tools/call it receives before dispatching it."""

    def __init__(self, tool_log: JsonLines, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tool_log = tool_log

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:  # type: ignore[override]
        self._tool_log.write({"tool": name, "arguments": arguments})
        return await super().call_tool(name, arguments, context)


def build_server(tool_log: JsonLines) -> RecordingServer:
    mcp = RecordingServer(tool_log, name="agentgate-test-helpdesk", version="1.0.0",
                          instructions="Fake helpdesk for agentgate tests.", log_level="WARNING")

    @mcp.tool()
    def search_tickets(query: str) -> list[dict[str, Any]]:
        """Search tickets by subject; returns id, subject and status."""
        q = query.lower()
        return [{"id": t["id"], "subject": t["subject"], "status": t["status"]}
                for t in TICKETS.values() if q in t["subject"].lower()]

    @mcp.tool()
    def get_ticket(id: int) -> dict[str, Any]:  # noqa: A002 - the tool's argument is called "id"
        """One ticket, with the requester's contact details (email, phone)."""
        if id not in TICKETS:
            raise ToolError(f"ticket {id} not found")
        return TICKETS[id]

    @mcp.tool()
    def refund_order(order_id: str, amount: float) -> dict[str, Any]:
        """Refund an order (money moves)."""
        if amount <= 0:
            raise ToolError("amount must be positive")
        return {"order_id": order_id, "refunded": amount, "currency": "USD", "status": "refunded"}

    @mcp.tool()
    def delete_customer(customer_id: str) -> dict[str, Any]:
        """Delete a customer and all their data (irreversible)."""
        return {"customer_id": customer_id, "deleted": True}

    @mcp.resource("helpdesk://policies/refunds", name="refund-policy", mime_type="text/plain")
    def refund_policy() -> str:
        """The refund policy support agents follow."""
        return "Refunds up to 100 USD need no approval; larger refunds need a support lead."

    @mcp.prompt()
    def summarize_ticket(ticket_id: str) -> str:
        """Ask the model to summarize a ticket."""
        return f"Summarize ticket {ticket_id} in two sentences, without contact details."

    return mcp


class HttpLog:
    """ASGI middleware: one JSON line per HTTP request (credentials redacted, body as text)."""

    def __init__(self, app: ASGIApp, log: JsonLines) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.log.path is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:  # buffer the body, then replay it to the app
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False) and message["type"] == "http.request"
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): ("<redacted>" if k.decode("latin-1").lower() in _REDACTED_HEADERS
                                                 else v.decode("latin-1")) for k, v in scope["headers"]}
        self.log.write({"method": scope["method"], "path": scope["path"],
                        "query": scope.get("query_string", b"").decode("latin-1"),
                        "headers": headers, "body": body.decode("utf-8", "replace")})
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", type=Path, required=True, help="JSON-lines file of tool calls")
    p.add_argument("--http-log", type=Path, help="JSON-lines file of HTTP requests")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sse", dest="json_response", action="store_false", help="answer POSTs with SSE (default)")
    mode.add_argument("--json", dest="json_response", action="store_true", help="answer POSTs with JSON bodies")
    p.add_argument("--stateless", action="store_true", help="no Mcp-Session-Id sessions")
    p.add_argument("--certfile", type=Path)
    p.add_argument("--keyfile", type=Path)
    p.set_defaults(json_response=False)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    mcp = build_server(JsonLines(args.log))
    scheme = "https" if args.certfile else "http"
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{args.host}:*", "localhost:*"],
        allowed_origins=[f"{scheme}://{args.host}:*", f"{scheme}://localhost:*"],
    )
    app: ASGIApp = mcp.streamable_http_app(json_response=args.json_response, stateless_http=args.stateless,
                                           transport_security=security, host=args.host)
    app = HttpLog(app, JsonLines(args.http_log))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            ssl_certfile=str(args.certfile) if args.certfile else None,
                            ssl_keyfile=str(args.keyfile) if args.keyfile else None,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn offers no startup event; bounded by the task finishing
        if task.done():
            await task
            raise SystemExit("mcp-server failed to start")
        await asyncio.sleep(0.01)
    port = sock.getsockname()[1]
    print(f"mcp-server listening on {args.host}:{port}", flush=True)
    await task


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
