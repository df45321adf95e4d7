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
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from types import ModuleType

from mitmproxy import http
from mitmproxy.net.http import http1

from gateway.errors import error_body

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


def render_error(status_code: int, message: str = "") -> bytes:
    """Stands in for ``_http1.make_error_response``: the same HTTP/1 answer, as the gateway's JSON
    error, with no ``Server`` header."""
    status_code = int(status_code)
    body = error_body(error_code(status_code), clean_message(status_code, message), "")
    resp = http.Response.make(status_code, body, {"Content-Type": "application/json", "Connection": "close"})
    return http1.assemble_response(resp)  # make() sets Content-Length


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
    ``render_error``. True once installed (again: a no-op); False, with a warning, when the
    function is not there in the expected form."""
    module = target if target is not None else _mitmproxy_http1()
    current = getattr(module, "make_error_response", None)
    if current is render_error:
        return True
    if module is None or current is None or _signature(current) != _EXPECTED:
        log.warning("mitmproxy's make_error_response is missing or changed: the forward proxy's own error "
                    "answers (400, 413, 502) stay mitmproxy's HTML (see addons/protocol_errors.py)")
        return False
    setattr(module, "make_error_response", render_error)
    return True
