"""An MCP agent for gateway tests: the ``mcp`` SDK's streamable-HTTP client, driven by a script.

Runs in the ``.venv-mcp`` interpreter (see env.py):

    python client.py --url URL [--header K:V ...] [--bearer-env VAR] [--mode auto|legacy|2026-07-28]
                     [--proxy URL [--proxy-bearer-env VAR] --ca FILE] --script JSON|@FILE
    python client.py --url URL [...same options...] --raw-batch FILE [--no-init]

Script steps: ``{"op": "list_tools"}``, ``{"op": "call", "tool": NAME, "arguments": {...}}``,
``list_resources``, ``read_resource`` (``uri``), ``list_prompts``, ``get_prompt`` (``name``,
``arguments``), ``ping``. Prints ONE JSON document on stdout::

    {"connected": bool, "protocol_version": str|null, "server": str|null, "connect_error": ERR|null,
     "steps": [{"op": ..., "ok": true, "result": {...}} | {"op": ..., "ok": false, "error": ERR}],
     "http": [{"method", "rpc", "status", "content_type", "session_id": bool}]}

where ERR is ``{"code": JSON-RPC code or null, "message": str, "type": exception class}`` and
``http`` lists every HTTP exchange the SDK made (for diagnosing what a proxy changed). A call's
``result`` is the SDK's CallToolResult as JSON (``content``, ``structuredContent``, ``isError``).

Tokens are read from environment variables (``--bearer-env``), never taken on the command line
(argv is visible to every local user). ``--proxy`` sends everything through a forward proxy;
``--ca`` is the CA bundle that verifies HTTPS (the gateway's interception CA). Proxy and TLS
settings are explicit arguments to the SDK's httpx2 client with ``trust_env=False``, so the
caller's HTTP(S)_PROXY / SSL_CERT_FILE never leak in.

``--raw-batch FILE`` bypasses the SDK's session logic (it does not send JSON-RPC batches): it
POSTs FILE's JSON (a batch list, or any JSON-RPC message) with plain httpx2, after an
``initialize`` handshake whose ``Mcp-Session-Id`` it reuses (``--no-init`` skips that), and
prints ``{"init": {...}, "response": {"status", "content_type", "json" | "events" | "text"}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

JSON_AND_SSE = "application/json, text/event-stream"
DEFAULT_PROTOCOL = "2025-11-25"


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) anyio exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def error_doc(exc: BaseException) -> dict[str, Any]:
    exc = _leaf(exc)
    if isinstance(exc, MCPError):
        doc: dict[str, Any] = {"code": exc.code, "message": exc.message, "type": "MCPError"}
        if exc.data is not None:
            doc["data"] = exc.data
        return doc
    if isinstance(exc, TimeoutError):
        return {"code": None, "message": "timed out", "type": "TimeoutError"}
    return {"code": None, "message": str(exc) or repr(exc), "type": type(exc).__name__}


def dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


# -- HTTP client -------------------------------------------------------------------------
def parse_headers(items: list[str], bearer_env: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--header wants NAME:VALUE, got {item!r}")
        headers[name.strip()] = value.strip()
    if bearer_env:
        token = os.environ.get(bearer_env)
        if not token:
            raise SystemExit(f"--bearer-env: {bearer_env} is not set")
        headers["Authorization"] = f"Bearer {token}"
    return headers


class Exchanges:
    """httpx2 event hooks that record each exchange's shape (never header values or bodies)."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []

    async def on_response(self, response: httpx2.Response) -> None:
        req = response.request
        rpc: Any = None
        if req.method == "POST":
            try:
                body = json.loads(req.content)
                rpc = [m.get("method") for m in body] if isinstance(body, list) else body.get("method")
            except (ValueError, AttributeError, httpx2.RequestNotRead):
                rpc = None
        self.log.append({"method": req.method, "rpc": rpc, "status": response.status_code,
                         "content_type": response.headers.get("content-type", "").split(";")[0],
                         "session_id": "mcp-session-id" in response.headers})


def http_client(args: argparse.Namespace, exchanges: Exchanges | None = None) -> httpx2.AsyncClient:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(args.ca)) if args.ca else True
    proxy: httpx2.Proxy | None = None
    if args.proxy:
        proxy_headers = {}
        if args.proxy_bearer_env:
            token = os.environ.get(args.proxy_bearer_env)
            if not token:
                raise SystemExit(f"--proxy-bearer-env: {args.proxy_bearer_env} is not set")
            proxy_headers["Proxy-Authorization"] = f"Bearer {token}"
        proxy = httpx2.Proxy(args.proxy, headers=proxy_headers)
    hooks = {"response": [exchanges.on_response]} if exchanges else {}
    return httpx2.AsyncClient(
        headers=parse_headers(args.header, args.bearer_env), verify=verify, proxy=proxy, trust_env=False,
        timeout=httpx2.Timeout(args.timeout, read=args.timeout), event_hooks=hooks,
    )


# -- SDK script mode ---------------------------------------------------------------------
async def run_step(client: Client, step: dict[str, Any]) -> Any:
    op = step.get("op")
    if op == "list_tools":
        return dump(await client.list_tools())
    if op == "call":
        return dump(await client.call_tool(step["tool"], step.get("arguments") or {}))
    if op == "list_resources":
        return dump(await client.list_resources())
    if op == "read_resource":
        return dump(await client.read_resource(step["uri"]))
    if op == "list_prompts":
        return dump(await client.list_prompts())
    if op == "get_prompt":
        return dump(await client.get_prompt(step["name"], step.get("arguments") or {}))
    if op == "ping":
        return dump(await client.send_ping())
    raise ValueError(f"unknown op {op!r}")


async def run_script(args: argparse.Namespace, steps: list[dict[str, Any]]) -> dict[str, Any]:
    exchanges = Exchanges()
    out: dict[str, Any] = {"connected": False, "protocol_version": None, "server": None,
                           "connect_error": None, "steps": [], "http": exchanges.log}
    try:
        # One overall deadline: a cancel scope may not end inside the SDK's task groups.
        with anyio.fail_after(args.timeout * (len(steps) + 2)):
            async with http_client(args, exchanges) as hc:
                transport = streamable_http_client(args.url, http_client=hc)
                # cache=None: every list goes over the wire, so what a proxy filters is what the agent sees.
                async with Client(transport, mode=args.mode, cache=None,
                                  read_timeout_seconds=args.timeout) as client:
                    out.update(connected=True, protocol_version=client.protocol_version,
                               server=client.server_info.name if client.server_info else None)
                    for step in steps:
                        try:
                            with anyio.fail_after(args.timeout):
                                result = await run_step(client, step)
                            out["steps"].append({"op": step.get("op"), "ok": True, "result": result})
                        except Exception as exc:  # noqa: BLE001 - every failure is reported, per step
                            out["steps"].append({"op": step.get("op"), "ok": False, "error": error_doc(exc)})
    except Exception as exc:  # noqa: BLE001
        out["connect_error" if not out["connected"] else "close_error"] = error_doc(exc)
    return out


# -- raw mode ----------------------------------------------------------------------------
def parse_body(resp: httpx2.Response) -> dict[str, Any]:
    ctype = resp.headers.get("content-type", "").split(";")[0].strip()
    doc: dict[str, Any] = {"status": resp.status_code, "content_type": ctype,
                           "session_id": "mcp-session-id" in resp.headers}
    text = resp.text
    if ctype == "text/event-stream":
        events = []
        for block in text.replace("\r\n", "\n").split("\n\n"):
            data = "\n".join(line[5:].lstrip() for line in block.split("\n") if line.startswith("data:"))
            if data:
                try:
                    events.append(json.loads(data))
                except ValueError:
                    events.append(data)
        doc["events"] = events
    else:
        try:
            doc["json"] = json.loads(text) if text else None
        except ValueError:
            doc["text"] = text
    return doc


async def run_raw(args: argparse.Namespace, payload: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"init": None, "response": None, "error": None}
    headers = {"Content-Type": "application/json", "Accept": JSON_AND_SSE}
    try:
        async with http_client(args) as hc:
            if not args.no_init:
                init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                        "params": {"protocolVersion": DEFAULT_PROTOCOL, "capabilities": {},
                                   "clientInfo": {"name": "agentgate-raw-client", "version": "1"}}}
                resp = await hc.post(args.url, json=init, headers=headers)
                out["init"] = parse_body(resp)
                session = resp.headers.get("mcp-session-id")
                if session:
                    headers["Mcp-Session-Id"] = session
                headers["MCP-Protocol-Version"] = DEFAULT_PROTOCOL
                await hc.post(args.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                              headers=headers)
            resp = await hc.post(args.url, content=json.dumps(payload).encode(), headers=headers)
            out["response"] = parse_body(resp)
    except Exception as exc:  # noqa: BLE001
        out["error"] = error_doc(exc)
    return out


# -- entry point -------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MCP test agent (mcp SDK streamable-HTTP client)")
    p.add_argument("--url", required=True, help="the MCP endpoint, e.g. http://127.0.0.1:PORT/mcp")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    p.add_argument("--bearer-env", metavar="VAR", help="send Authorization: Bearer $VAR")
    p.add_argument("--proxy", help="forward proxy URL (userinfo becomes Basic proxy auth)")
    p.add_argument("--proxy-bearer-env", metavar="VAR", help="send Proxy-Authorization: Bearer $VAR")
    p.add_argument("--ca", type=Path, help="CA bundle for HTTPS (e.g. the gateway's CA)")
    p.add_argument("--mode", default="auto", help="SDK negotiation: auto (default), legacy, or a modern version")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per step (and per HTTP read)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--script", help="JSON list of steps, or @FILE")
    what.add_argument("--raw-batch", type=Path, metavar="FILE", help="POST this JSON (e.g. a batch) as is")
    p.add_argument("--no-init", action="store_true", help="raw mode: no initialize handshake first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_batch is not None:
        doc = anyio.run(run_raw, args, json.loads(args.raw_batch.read_text()))
    else:
        text = Path(args.script[1:]).read_text() if args.script.startswith("@") else args.script
        steps = json.loads(text)
        if not isinstance(steps, list):
            raise SystemExit("--script must be a JSON list of steps")
        doc = anyio.run(run_script, args, steps)
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
