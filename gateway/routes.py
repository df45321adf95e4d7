"""Route front end: ``/r/<route>/<path>`` on aiohttp's web server, translated to the core pipeline.

Only translation lives here: aiohttp request → :class:`GatewayRequest`, pipeline result →
aiohttp response. The order of the checks is the pipeline's.
"""

from __future__ import annotations

import asyncio
import logging

from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import mcp
from gateway.echo_guard import KIND
from gateway.http_server import MalformedBody
from gateway.errors import (CALL_ID_HEADER, INCOMPLETE_BODY, INCOMPLETE_RESPONSE, GatewayError,
                            client_closed, error_body, request_too_large)
from gateway.models import Call, GatewayRequest
from gateway.pipeline import Pipeline
from gateway.redaction import NotRedactable
from gateway.upstream import RouteUpstream, response_headers

log = logging.getLogger("agentgate.routes")

_BUFFER_LIMIT = 1 << 20
"""Responses up to this size with a known length are sent in one piece; larger or
open-ended ones (SSE, downloads) are streamed chunk by chunk."""


_BODY_NEVER_ENDS = frozenset({"request_timeout", "bad_request"})
"""Refusals of a body that stalled or whose framing broke: its connection is not reused."""


def error_response(err: GatewayError, call_id: str) -> web.Response:
    headers = {CALL_ID_HEADER: call_id, "Content-Type": "application/json", **err.headers}
    return web.Response(status=err.status, body=error_body(err.code, err.message, call_id), headers=headers)


def refusal_response(call: Call, err: GatewayError) -> web.Response:
    """A refused call's answer: a JSON-RPC error for an MCP request (gateway/mcp.py), else HTTP's."""
    reply = mcp.refusal(call, err)
    return error_response(err, call.call_id) if reply is None else reply_response(reply)


def reply_response(reply: mcp.Reply) -> web.Response:
    return web.Response(status=reply.status, body=reply.body, headers=reply.headers)


def _split_raw_path(raw: str) -> tuple[str | None, str, str]:
    """``/r/<route>/<rest>?<query>`` → (route, "/<rest>", query); route None if not a route path."""
    path, _, query = raw.partition("?")
    if not path.startswith("/r/"):
        return None, path, query
    name, slash, rest = path[3:].partition("/")
    return name, slash + rest if slash else "/", query


class RouteFrontEnd:
    def __init__(self, pipeline: Pipeline, upstream: RouteUpstream, *, max_body: int) -> None:
        self.pipeline = pipeline
        self.upstream = upstream
        self.max_body = max_body
        self.body_timeout = pipeline.cfg.listen.body_timeout_seconds
        self._send = mcp.route_sender(upstream)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route, path, query = _split_raw_path(request.raw_path)
        body, unread = await self._read_body(request)
        greq = GatewayRequest(
            mode="route", method=request.method, scheme="http", host=request.host.rpartition(":")[0] or request.host,
            port=0, path=path, query=query, headers=list(request.headers.items()), body=body,
            client_ip=request.remote or "", route=route,
        )
        call = Call(request=greq)
        credential = request.headers.get("Authorization")
        refusal = self._front_end_refusal(route, unread)
        if refusal is not None:
            resp = await self._refuse_unrouted(call, refusal, credential)
            if unread is not None and unread.code in _BODY_NEVER_ENDS:
                resp.force_close()  # Connection: close
            return resp
        # Policy sees the upstream's host and scheme, not the gateway's.
        target = self.upstream.target(route)  # type: ignore[arg-type]
        greq.scheme, greq.host, greq.port = target
        if (batch := mcp.batch_of(call, self.pipeline.cfg.policy.inspect_body_bytes)) is not None:
            return reply_response(await mcp.run_batch(  # JSON-RPC batch: each element its own call
                self.pipeline, call, batch, credential=credential, send=self._batch_sender))
        try:
            upstream_resp = await self.pipeline.run(call, self.upstream, credential=credential)
        except GatewayError as err:
            return refusal_response(call, err)
        except Exception:  # noqa: BLE001 - never let a bug leave a call unaudited
            log.exception("internal error on call %s", call.call_id)
            err = GatewayError("internal gateway error")
            self.pipeline.fail(call, err)
            return error_response(err, call.call_id)
        return await self._relay(request, call, upstream_resp)

    async def _batch_sender(self, call: Call) -> mcp.Reply:
        """A JSON-RPC batch element's upstream answer (the route's credential cut out of it)."""
        reply = await self._send(call)
        guard = self.upstream.echo_guard(call.request.route)
        if guard is not None:
            _echoes(call, guard.headers(reply.headers))
            coding = next((v for k, v in reply.headers.items() if k.lower() == "content-encoding"), None)
            reply.body, n = guard.whole(reply.body, coding, call.reasons)
            _echoes(call, n)
        return reply

    async def _read_body(self, request: web.Request) -> tuple[bytes, GatewayError | None]:
        """The whole request body, or why there is none: the request is refused, and audited.

        A body that stops arriving for ``listen.body_timeout_seconds`` is refused (nginx's
        ``client_body_timeout``): aiohttp itself would wait for it as long as the agent keeps
        the connection open."""
        content = request.content
        body = bytearray()
        try:
            if content.is_eof():  # all of it arrived with the head (most bodies): nothing to wait for
                return await request.read(), None
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.body_timeout) as stall:
                while chunk := await content.readany():
                    body += chunk
                    if len(body) > self.max_body:
                        return b"", request_too_large(self.max_body)
                    stall.reschedule(loop.time() + self.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            return b"", request_too_large(self.max_body)
        except TimeoutError:
            return b"", GatewayError(f"no request body bytes for {self.body_timeout:g} s", code="request_timeout",
                                     status=408, outcome="rejected")
        except MalformedBody as exc:  # broken chunk framing (gateway/http_server.py)
            content.feed_eof()  # nothing more comes: aiohttp must not linger over the rest
            return b"", exc.refusal
        except ConnectionError:  # the agent hung up mid-body (aiohttp: "Connection lost")
            return b"", client_closed(INCOMPLETE_BODY)
        return bytes(body), None

    def refuse_unparsable(self, client_ip: str, err: GatewayError) -> str:
        """Audit a request aiohttp could not parse (gateway/http_server.py answers it): nothing
        about it can be trusted but the address it came from. Returns its call id."""
        call = Call(request=GatewayRequest.unparsed("route", client_ip))
        self.pipeline.fail(call, err)
        return call.call_id

    def _front_end_refusal(self, route: str | None, unread: GatewayError | None) -> GatewayError | None:
        if route is None:
            return GatewayError("not found: agent calls go to /r/<route>/<path>", code="not_found",
                                status=404, outcome="rejected")
        if route not in self.pipeline.cfg.routes:
            return GatewayError(f"unknown route {route!r}", code="unknown_route", status=404,
                                outcome="rejected")
        return unread

    async def _refuse_unrouted(self, call: Call, err: GatewayError, credential: str | None) -> web.Response:
        """Refusals found before the pipeline runs are still attributed (when the token is
        good) and audited."""
        try:
            call.identity = await self.pipeline.authenticate("route", credential)
        except GatewayError:
            pass
        if call.request.route not in self.pipeline.cfg.routes:
            call.request.route = None  # not a route: the audit names none
        self.pipeline.fail(call, err)
        return error_response(err, call.call_id)

    async def _relay(self, request: web.Request, call: Call, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = response_headers(upstream, session=not self.upstream.injects_credential(call.request.route))
        guard = self.upstream.echo_guard(call.request.route)
        if guard is not None:
            _echoes(call, guard.headers(headers))
        headers[CALL_ID_HEADER] = call.call_id
        length = upstream.content_length
        is_sse = upstream.content_type == "text/event-stream"
        sse = None
        rpc = mcp.reply_handler(self.pipeline, call, upstream.status, upstream.headers.get("Content-Type", ""),
                                _content_encoding(upstream.headers))
        try:
            self.pipeline.check_partial_response(call, upstream.status, upstream.headers.get("Content-Type", ""))
            if rpc is not None and rpc.buffered:  # an MCP listing: read whole, filtered by policy
                return await self._relay_mcp_listing(call, upstream, headers, rpc)
            if call.redaction is not None:
                if is_sse:
                    sse = self._sse_redactor(call, upstream)
                elif not await self._must_stream_unredacted(call, length):
                    return await self._relay_redacted(request, call, upstream, headers, rpc)
            elif not (length is None or length > _BUFFER_LIMIT or is_sse):
                try:
                    body = await upstream.read()
                except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                    return error_response(self._broken(call, exc), call.call_id)
                if rpc is not None:
                    await rpc.body(body)  # MCP: records the tool result's isError
                return self._whole(call, upstream.status, body, headers)
            return await self._relay_stream(request, call, upstream, headers, sse, rpc=rpc)
        except GatewayError as err:  # the response cannot be redacted and the route refuses it
            self.pipeline.fail(call, err)
            return error_response(err, call.call_id)
        except Exception:  # noqa: BLE001 - a bug must not leave the call unaudited or answered in plain text
            if call.finished:
                raise  # a stream had started: it is recorded, and cutting it is the only signal left
            log.exception("internal error relaying call %s", call.call_id)
            err = GatewayError("internal gateway error")
            self.pipeline.fail(call, err)
            return error_response(err, call.call_id)
        finally:
            upstream.release()

    def _sse_redactor(self, call: Call, upstream: aiohttp.ClientResponse) -> Any:
        try:
            return call.redaction.sse(_content_encoding(upstream.headers))
        except NotRedactable as exc:
            self.pipeline.unredactable(call, exc)  # raises unless the route lets it pass
            return None

    async def _must_stream_unredacted(self, call: Call, length: int | None) -> bool:
        """A declared body too large to inspect: refused, or (route says pass) streamed as is."""
        limit = self.pipeline.cfg.redaction.max_inspect_bytes
        if length is not None and length > limit:
            self.pipeline.unredactable(call, NotRedactable("too_large", f"body exceeds {limit} bytes"))
            return True
        return False

    async def _relay_mcp_listing(self, call: Call, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str],
                                 rpc: mcp.ReplyHandler) -> web.Response:
        reply = await mcp.read_reply(upstream)
        body = await rpc.body(reply.body)
        body = await self.pipeline.redact(call, body, content_type=upstream.headers.get("Content-Type", ""),
                                          content_encoding=_content_encoding(upstream.headers))
        return self._whole(call, upstream.status, body, headers)

    async def _relay_redacted(self, request: web.Request, call: Call, upstream: aiohttp.ClientResponse,
                              headers: CIMultiDict[str], rpc: mcp.ReplyHandler | None = None) -> web.StreamResponse:
        limit = self.pipeline.cfg.redaction.max_inspect_bytes
        try:
            body, complete = await _read_bounded(upstream, limit)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            return error_response(self._broken(call, exc), call.call_id)
        if not complete:  # refused here, unless the route lets it pass: then stream it on as is
            self.pipeline.unredactable(call, NotRedactable("too_large", f"body exceeds {limit} bytes"))
            return await self._relay_stream(request, call, upstream, headers, None, prefix=body)
        if rpc is not None:
            await rpc.body(body)  # MCP: records the tool result's isError
        body = await self.pipeline.redact(call, body, content_type=upstream.headers.get("Content-Type", ""),
                                          content_encoding=_content_encoding(upstream.headers))
        return self._whole(call, upstream.status, body, headers)

    def _whole(self, call: Call, status: int, body: bytes, headers: CIMultiDict[str]) -> web.Response:
        """Answer with a body read whole (the route's credential cut out of it first)."""
        guard = self.upstream.echo_guard(call.request.route)
        if guard is not None:
            body, n = guard.whole(body, _content_encoding(headers), call.reasons)
            _echoes(call, n)
        self.pipeline.finish(call, status=status, response_bytes=len(body))
        return web.Response(status=status, body=body, headers=headers)

    async def _relay_stream(self, request: web.Request, call: Call, upstream: aiohttp.ClientResponse,
                            headers: CIMultiDict[str], sse: Any, prefix: bytes = b"",
                            rpc: mcp.ReplyHandler | None = None) -> web.StreamResponse:
        guard = self.upstream.echo_guard(call.request.route)
        echo = None
        if guard is not None:
            guard.check_stream(_content_encoding(upstream.headers), call.reasons)
            echo = guard.stream()
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)

        async def write(data: bytes) -> int:
            try:
                await resp.write(data)
            except ConnectionError as exc:  # the agent's side, not the upstream's
                raise _AgentGone from exc
            return len(data)

        async def send(data: bytes) -> int:
            return await write(echo.feed(data) if echo is not None else data)

        cut = asyncio.Event()

        def stop() -> None:  # a kill-switch ends the stream at once
            cut.set()
            upstream.close()

        self.pipeline.streams.add(call, stop)
        sent = 0
        failure: GatewayError | None = None
        try:
            if prefix:
                sent = await send(prefix)
            async for chunk in upstream.content.iter_any():
                if rpc is not None:
                    rpc.feed(chunk)  # MCP: observes the tool result's isError as events pass
                out = sse.feed(chunk) if sse is not None else chunk
                if out:
                    sent += await send(out)
            if sse is not None and (tail := sse.close()):
                sent += await send(tail)
            if echo is not None and (tail := echo.close()):
                sent += await write(tail)
            if not cut.is_set():
                try:
                    await resp.write_eof()
                except ConnectionError:  # the agent hung up after the whole answer (MCP clients do)
                    pass
        except NotRedactable as exc:
            failure = GatewayError(f"stream cut: an event cannot be redacted ({exc.reason})",
                                   code="response_not_redactable", status=upstream.status,
                                   outcome="redaction_failed")
        except _AgentGone:
            failure = client_closed(INCOMPLETE_RESPONSE, upstream.status)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            if not cut.is_set():
                call.response_bytes = sent
                self._broken(call, exc)
                raise  # headers are out: cutting the connection is the only honest signal
        except Exception:
            call.response_bytes = sent
            self.pipeline.fail(call, GatewayError("internal gateway error while relaying the response"))
            raise  # as above
        finally:
            self.pipeline.streams.discard(call)
            if sse is not None:
                self.pipeline.record_redaction(call, sse.report)
            if echo is not None:
                _echoes(call, echo.count)
        call.response_bytes = sent
        if cut.is_set():
            failure = GatewayError("stream cut: agent suspended", code="agent_suspended",
                                   status=upstream.status, outcome="killed")
        if failure is not None:
            self.pipeline.fail(call, failure)
            if request.transport is not None:
                request.transport.close()
            return resp
        self.pipeline.finish(call, status=upstream.status, response_bytes=sent)
        return resp

    def _broken(self, call: Call, exc: BaseException) -> GatewayError:
        call.reasons.append(f"upstream failed mid-response: {type(exc).__name__}")
        err = GatewayError("upstream failed while sending its response", code="upstream_broken",
                           status=502, outcome="upstream_error")
        self.pipeline.fail(call, err)
        return err


def _echoes(call: Call, n: int) -> None:
    """Record that the upstream sent the route's credential back (``n`` times; cut out)."""
    if n:
        call.redaction_counts[KIND] = call.redaction_counts.get(KIND, 0) + n
        log.warning("call %s: the upstream of route %s echoed the route credential (%d times; cut out)",
                    call.call_id, call.request.route, n)


class _AgentGone(Exception):
    """Writing to the agent failed: it hung up mid-response (audited as such, not as the upstream's fault)."""


def _content_encoding(headers: "CIMultiDictProxy[str] | CIMultiDict[str]") -> str | None:
    """Every Content-Encoding the upstream sent, in order: a second header is a second coding
    (clients apply them all), so redaction must decode them all too."""
    values = headers.getall("Content-Encoding", [])
    return ", ".join(values) if values else None


async def _read_bounded(upstream: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """(body, True), or (what was read, False) as soon as it passes ``limit`` bytes."""
    buf = bytearray()
    async for chunk in upstream.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            return bytes(buf), False
    return bytes(buf), True
