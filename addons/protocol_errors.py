"""The answers mitmproxy writes itself, in the gateway's JSON error format.

mitmproxy answers some requests on its own, before or after the addon sees them: a request line or
headers it cannot parse (400), a body over ``body_size_limit`` (413), an upstream it cannot reach
or that fails (502). It writes those as an HTML page with ``Server: mitmproxy <version>``, through
the private ``mitmproxy.proxy.layers.http._http1.make_error_response``. mitmproxy has no public
hook for these answers: its ``error`` hook cannot replace them (mitmproxy/mitmproxy#7999, open at
the time of writing, would let it override the 502s), and the known way to change them is to
replace that function (https://github.com/mitmproxy/mitmproxy/issues/4854). So ``install()``
monkeypatches it, guarded: if the function is gone or its signature changed, mitmproxy's HTML
stays and one warning says so.

On a mitmproxy upgrade, re-check that ``_http1.make_error_response(status_code, message="")``
still exists, is still looked up by name where ``Http1Server`` answers (``read_headers``, and
``send`` for a ``ResponseProtocolError``), and returns a whole HTTP/1 response as bytes.
The HTTP/2 and HTTP/3 layers build their error answers inline (``format_error``): an agent
speaking HTTP/2 inside a tunnel still gets mitmproxy's HTML there.

The call id is not known where mitmproxy answers: ``call_id`` is empty. The gateway audits these
refusals in the addon's ``error`` hook when mitmproxy had a flow for them (see gateway_addon.py).

A request head mitmproxy cannot parse at all gets its 400 with no flow and no hook, and a log
line that quotes the head (a request line with its query string, a header line with its value).
``install()`` also wraps ``Http1Server.read_headers`` to watch the commands it yields for that
case: the refusal is audited through the addon (``AgentGate.refuse_unparsable_head``, attributed
when the connection is an agent's tunnel), the answer carries the call id, and the log line keeps
only the parser's reason. On a mitmproxy upgrade, re-check that ``read_headers(self, event)`` still
answers such a head with ``SendData`` from ``make_error_response(400, str(e))`` while
``self.request`` is None, and logs it with one ``Log`` command.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.utils import human

from gateway.errors import error_body, parser_reason

log = logging.getLogger("agentgate.forward")

MAX_MESSAGE = 300
CODES = {400: "bad_request", 407: "unauthenticated", 413: "request_too_large",
         502: "upstream_error", 504: "upstream_timeout"}
_EXPECTED = [("status_code", inspect.Parameter.empty), ("message", "")]


def error_code(status_code: int) -> str:
    return CODES.get(status_code, "proxy_error")


def clean_message(status_code: int, message: str) -> str:
    """mitmproxy's message as one bounded line of text, naming no product."""
    text = " ".join(str(message).split())
    text = re.sub(r"(?i)\bmitmproxy('s)?", lambda m: "the proxy's" if m.group(1) else "the proxy", text)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 3].rstrip() + "..."
    return text or http.status_codes.RESPONSES.get(status_code, "proxy error").lower()


_last_message = [""]
"""The message of the answer ``render_error`` built last: read by ``read_headers`` right after
mitmproxy built its 400 for a head it could not parse (the same synchronous step)."""


def render_error(status_code: int, message: str = "", call_id: str = "") -> bytes:
    """Stands in for ``_http1.make_error_response``: the same HTTP/1 answer, as the gateway's JSON
    error, with no ``Server`` header."""
    status_code = int(status_code)
    _last_message[0] = message
    body = error_body(error_code(status_code), clean_message(status_code, message), call_id)
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if call_id:
        headers["X-Agentgate-Call-Id"] = call_id
    resp = http.Response.make(status_code, body, headers)
    return http1.assemble_response(resp)  # make() sets Content-Length


def _audit_unparsable(conn: object, reason: str) -> str:
    """The call id of the audit row for a head ``conn`` sent that could not be parsed ("" when
    no gateway addon is loaded to audit it)."""
    addon = ctx.master.addons.get("agentgate") if getattr(ctx, "master", None) else None
    if addon is None:
        return ""
    try:
        return addon.refuse_unparsable_head(conn, reason)
    except Exception:  # noqa: BLE001 - the agent still gets its answer
        log.exception("could not audit a request head that could not be parsed")
        return ""


def _watching(read_headers: Callable[..., Any]) -> Callable[..., Any]:
    def watched(self: Any, event: events.Event) -> Any:
        """``Http1Server.read_headers``, with a head it cannot parse audited and its bytes kept out
        of the answer and the log (see the module docstring)."""
        gen = read_headers(self, event)
        reason = ""
        try:
            cmd = next(gen)
            while True:
                if isinstance(event, events.DataReceived) and self.request is None:
                    if isinstance(cmd, commands.SendData):  # mitmproxy's 400 for the head
                        reason = parser_reason(_last_message[0])
                        message = f"the request could not be parsed as HTTP/1.1: {reason}"
                        cmd = commands.SendData(cmd.connection, render_error(
                            400, message, _audit_unparsable(self.conn, message)))
                    elif isinstance(cmd, commands.Log):  # "<address>: <error quoting the head>"
                        cmd = commands.Log(f"{human.format_address(self.conn.peername)}: refused a request head "
                                           f"that could not be parsed ({reason or 'Malformed request'})", cmd.level)
                elif isinstance(event, events.ConnectionClosed) and isinstance(cmd, commands.Log):
                    cmd = commands.Log(f"{human.format_address(self.conn.peername)}: closed the connection before "
                                       f"its request head was complete", cmd.level)
                cmd = gen.send((yield cmd))
        except StopIteration as stop:
            return stop.value
    watched.__wrapped__ = read_headers  # type: ignore[attr-defined]
    return watched


def _signature(fn: Callable[..., object]) -> list[tuple[str, object]] | None:
    try:
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        return None


def _mitmproxy_http1() -> ModuleType | None:
    try:
        return importlib.import_module("mitmproxy.proxy.layers.http._http1")
    except ImportError:
        return None


def install(target: ModuleType | None = None) -> bool:
    """Replace ``target.make_error_response`` (default: mitmproxy's ``_http1``) with
    ``render_error``, and watch ``target.Http1Server.read_headers``. True once installed (again: a
    no-op); False, with a warning, when either is not there in the expected form."""
    module = target if target is not None else _mitmproxy_http1()
    current = getattr(module, "make_error_response", None)
    if current is not render_error:
        if module is None or current is None or _signature(current) != _EXPECTED:
            log.warning("mitmproxy's make_error_response is missing or changed: the forward proxy's own error "
                        "answers (400, 413, 502) stay mitmproxy's HTML (see addons/protocol_errors.py)")
            return False
        setattr(module, "make_error_response", render_error)
    server = getattr(module, "Http1Server", None)
    read_headers = getattr(server, "read_headers", None)
    if read_headers is None or not inspect.isgeneratorfunction(read_headers) or \
            [p.name for p in inspect.signature(read_headers).parameters.values()] != ["self", "event"]:
        log.warning("mitmproxy's Http1Server.read_headers is missing or changed: a request head the forward "
                    "proxy cannot parse is not audited (see addons/protocol_errors.py)")
        return False
    if not hasattr(read_headers, "__wrapped__"):
        server.read_headers = _watching(read_headers)
    return True
