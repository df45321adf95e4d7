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

``make_error_response`` does not know which call an answer belongs to, so ``install()`` also
rewrites the commands two ``Http1Server`` methods yield (both generators of commands):

* ``send``, for a ``ResponseProtocolError``: the answer carries the call id the addon's ``error``
  hook recorded for the connection (``AgentGate.answered_call_id``). When no hook saw the
  request (mitmproxy refuses an origin-form request with no Host before any hook), the addon
  audits it there and then;
* ``read_headers``: a request head mitmproxy cannot parse at all gets its 400 with no flow and no
  hook, and a log line quoting the head (a request line with its query string, a header line
  with its value; mitmproxy also logs the bytes of a head the client abandons). The refusal is
  audited (attributed when the connection is an agent's tunnel), and the answer and the log
  line keep only the parser's reason.

On a mitmproxy upgrade, re-check that both are still ``(self, event)`` generators, that
``read_headers`` answers an unparsable head with ``SendData`` while ``self.request`` is None and
logs it with a ``Log``, and that ``send`` answers a ``ResponseProtocolError`` with ``SendData``.
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

from gateway.errors import CALL_ID_HEADER, error_body, parser_reason, unparsable

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
"""The message of the answer mitmproxy had built last: read by ``read_headers`` right after
mitmproxy built its 400 for a head it could not parse (the same synchronous step)."""


def render_error(status_code: int, message: str = "") -> bytes:
    """Stands in for ``_http1.make_error_response``: the same HTTP/1 answer, as the gateway's JSON
    error, with no ``Server`` header."""
    _last_message[0] = message
    return _render(status_code, message, "")


def _render(status_code: int, message: str, call_id: str) -> bytes:
    status_code = int(status_code)
    body = error_body(error_code(status_code), clean_message(status_code, message), call_id)
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if call_id:
        headers[CALL_ID_HEADER] = call_id
    resp = http.Response.make(status_code, body, headers)
    return http1.assemble_response(resp)  # make() sets Content-Length


def _gateway_addon() -> Any:
    return ctx.master.addons.get("agentgate") if getattr(ctx, "master", None) else None


def _call_id(ask: Callable[[Any], str]) -> str:
    """``ask(addon)``: the call id of the audit row an answer belongs to ("" when no gateway addon
    is loaded, or it failed: the agent still gets its answer)."""
    addon = _gateway_addon()
    if addon is None:
        return ""
    try:
        return ask(addon)
    except Exception:  # noqa: BLE001
        log.exception("could not find or write the audit row of the proxy's own answer")
        return ""


Rewrite = Callable[[Any, events.Event, commands.Command], commands.Command]


def _rewriting(method: Callable[..., Any], rewrite: Rewrite) -> Callable[..., Any]:
    """A layer method (a generator of commands) whose commands pass through ``rewrite`` on their
    way to mitmproxy; what mitmproxy sends back goes to the method unchanged."""
    def rewritten(self: Any, event: events.Event) -> Any:
        gen = method(self, event)
        try:
            cmd = next(gen)
            while True:
                cmd = gen.send((yield rewrite(self, event, cmd)))
        except StopIteration as stop:
            return stop.value
    rewritten.__wrapped__ = method  # type: ignore[attr-defined]
    rewritten.__name__ = method.__name__
    return rewritten


def _read_headers_rewrite(server: Any, event: events.Event, cmd: commands.Command) -> commands.Command:
    """``Http1Server.read_headers``: mitmproxy's 400 for a head it refuses names the call.

    * A head it cannot parse at all (``server.request`` is None: no flow, no hook follows) is
      audited here; the answer and the log line keep only the parser's reason.
    * A head it parsed but whose framing headers it refuses (conflicting Content-Length) is
      answered before the hooks for it run: the answer names a call id the addon reserves for
      the connection, and the error hook's audit row takes it.
    * A head the client abandoned: the log line no longer quotes its bytes."""
    if isinstance(event, events.DataReceived) and isinstance(cmd, commands.SendData):
        if server.request is None:
            err = unparsable(parser_reason(_last_message[0]))
            call_id = _call_id(lambda addon: addon.refuse_unseen(server.conn, err))
            return commands.SendData(cmd.connection, _render(400, err.message, call_id))
        call_id = _call_id(lambda addon: addon.reserve_call_id(server.conn))
        return commands.SendData(cmd.connection, _render(400, _last_message[0], call_id))
    if isinstance(cmd, commands.Log) and server.request is None:
        address = human.format_address(server.conn.peername)
        if isinstance(event, events.ConnectionClosed):
            return commands.Log(f"{address}: closed the connection before its request head was complete", cmd.level)
        return commands.Log(f"{address}: {unparsable(parser_reason(_last_message[0])).message}", cmd.level)
    return cmd


_response_protocol_error: list[type | None] = [None]
"""mitmproxy's ``ResponseProtocolError`` event class, found where ``install()`` found ``send``."""


def _send_rewrite(server: Any, event: events.Event, cmd: commands.Command) -> commands.Command:
    """``Http1Server.send``: mitmproxy's error answer for a flow carries the call id of the flow's
    audit row (or, when no hook saw the flow, of a row written now)."""
    if type(event) is _response_protocol_error[0] and isinstance(cmd, commands.SendData):
        call_id = _call_id(lambda addon: addon.answered_call_id(server.conn, event.code, event.message))
        return commands.SendData(cmd.connection, _render(event.code, event.message, call_id))
    return cmd


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
    ``render_error``, and rewrite the commands of ``target.Http1Server.read_headers`` and ``send``
    (see the module docstring). True once installed (again: a no-op); False, with a warning, when
    any of them is not there in the expected form."""
    module = target if target is not None else _mitmproxy_http1()
    current = getattr(module, "make_error_response", None)
    if current is not render_error:
        if module is None or current is None or _signature(current) != _EXPECTED:
            log.warning("mitmproxy's make_error_response is missing or changed: the forward proxy's own error "
                        "answers (400, 413, 502) stay mitmproxy's HTML (see addons/protocol_errors.py)")
            return False
        setattr(module, "make_error_response", render_error)
    server = getattr(module, "Http1Server", None)
    methods = {"read_headers": _read_headers_rewrite, "send": _send_rewrite}
    found = {name: getattr(server, name, None) for name in methods}
    if not isinstance(getattr(module, "ResponseProtocolError", None), type) or any(
           fn is None or not inspect.isgeneratorfunction(fn)
           or [p.name for p in inspect.signature(fn).parameters.values()] != ["self", "event"]
           for fn in found.values()):
        log.warning("mitmproxy's Http1Server.read_headers or send is missing or changed: the forward proxy's "
                    "own answers carry no call id, and a request head it cannot parse is not audited "
                    "(see addons/protocol_errors.py)")
        return False
    _response_protocol_error[0] = getattr(module, "ResponseProtocolError", None)
    for name, fn in found.items():
        if not hasattr(fn, "__wrapped__"):
            setattr(server, name, _rewriting(fn, methods[name]))
    return True
