"""aiohttp's HTTP server as the gateway runs it: its own answers in the gateway's JSON error format.

aiohttp answers a request it cannot parse (a bad request line, header syntax, a duplicate
Content-Length, broken chunk framing) itself, before any handler or middleware runs: a
``text/plain`` 400 naming the Python and aiohttp versions in ``Server``, and nothing the gateway
could audit. aiohttp has no hook for that answer (aio-libs/aiohttp#3287), only the overridable
``RequestHandler.handle_error``, which its ``Server`` instantiates. So :class:`GatewayRunner`
builds its server with a ``RequestHandler`` subclass whose ``handle_error`` answers the
gateway's JSON error and reports the refusal (the route front end audits it).

The same subclass ends a body whose chunk framing breaks after its head was read (aiohttp would
leave it waiting; see ``_Handler.data_received``).

On an aiohttp upgrade, re-check that ``AppRunner._make_server`` still returns a ``web.Server``
whose ``__call__`` makes the connection's ``RequestHandler`` from ``_loop`` and ``_kwargs``; that
``handle_error(request, status, exc, message)`` still makes the parse-error answers; and that
``data_received`` still queues ``(_ErrInfo, payload)`` in ``_messages`` for a parse error.
tests/test_route_protocol_errors_e2e.py fails if any of that stops holding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions, web, web_protocol
from aiohttp.http import SERVER_SOFTWARE as AIOHTTP_SERVER

from gateway.errors import CALL_ID_HEADER, GatewayError, error_body, parser_reason, unparsable

log = logging.getLogger("agentgate.http")

SERVER_NAME = "agentgate"
"""The ``Server`` header of the gateway's own answers, and of relayed ones whose upstream sent
none. aiohttp's default names the Python and aiohttp versions, which tells a prober too much."""

OnBadRequest = Callable[[str, GatewayError], str]
"""Called with the client's address and the refusal; returns the call id of its audit row."""


async def name_the_server(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: aiohttp fills in its default ``Server`` before this signal; a
    value equal to it is aiohttp's (or an upstream's that runs this very aiohttp and Python)."""
    if response.headers.get("Server") == AIOHTTP_SERVER:
        response.headers["Server"] = SERVER_NAME


def parse_refusal(exc: BaseException | None, message: str | None) -> GatewayError:
    """The refusal for a request aiohttp could not parse, in words that quote none of it."""
    if isinstance(exc, http_exceptions.InvalidURLError):
        return unparsable("Invalid request target")  # its message is the target itself
    return unparsable(parser_reason(message))


class MalformedBody(Exception):
    """Ends a request body whose framing (chunk sizes, chunk ends) broke while it was read."""

    def __init__(self, refusal: GatewayError) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


_ERR_INFO: type | None = getattr(web_protocol, "_ErrInfo", None)


class _Handler(web.RequestHandler):
    __slots__ = ("_reading",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading: Any = None
        """The body the parser feeds: the last request it parsed a head for."""

    def data_received(self, data: bytes) -> None:
        """When a request's body framing breaks after its head was parsed, aiohttp queues its 400
        behind that request, whose body then never ends: its handler would wait for the rest as
        long as the agent keeps the connection open. The body is ended with the error instead
        (the route handler answers it and audits the call against its agent), and the 400 is
        not queued."""
        queued = len(self._messages)
        super().data_received(data)
        if _ERR_INFO is None or len(self._messages) == queued:
            return
        last, payload = self._messages[-1]
        if not isinstance(last, _ERR_INFO):
            self._reading = payload
            return
        reading, self._reading = self._reading, None
        if reading is not None and not reading.is_eof():  # the parser was inside that body
            self._messages.pop()
            reading.set_exception(MalformedBody(parse_refusal(last.exc, last.message)))

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer is under way: aiohttp can only drop the connection
            return super().handle_error(request, status, exc, message)
        if status == HTTPStatus.BAD_REQUEST:
            err = parse_refusal(exc, message)
            log.info("refused a request from %s that could not be parsed: %s", request.remote, err.message)
        else:  # a handler that raised (every gateway handler answers its own errors) or timed out
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            err = GatewayError("internal gateway error", status=status)
        on_bad_request: OnBadRequest | None = getattr(self._manager, "on_bad_request", None)
        call_id = ""
        if on_bad_request is not None and status == HTTPStatus.BAD_REQUEST:
            try:
                call_id = on_bad_request(request.remote or "", err)
            except Exception:  # noqa: BLE001 - the agent still gets its answer
                log.exception("could not audit a request that could not be parsed")
        resp = web.Response(status=err.status, body=error_body(err.code, err.message, call_id),
                            headers={CALL_ID_HEADER: call_id, "Content-Type": "application/json",
                                     "Server": SERVER_NAME})
        resp.force_close()
        return resp


class _Server(web.Server):
    on_bad_request: OnBadRequest | None = None

    def __call__(self) -> web.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's own errors as the gateway's JSON,
    and report the requests it could not parse to ``on_bad_request``."""

    def __init__(self, app: web.Application, *, on_bad_request: OnBadRequest | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._on_bad_request = on_bad_request

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is not web.Server:
            log.warning("aiohttp's server is a %s: its own error answers stay aiohttp's", type(server))
            return server
        server.__class__ = _Server
        server.on_bad_request = self._on_bad_request  # type: ignore[attr-defined]
        return server
