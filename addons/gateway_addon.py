"""The mitmproxy side of the forward proxy: translate flows to and from the core pipeline.

mitmproxy makes the upstream exchange itself (TLS interception, HTTP/2, streaming are what it
is for); everything else — identity, policy, audit — is the core pipeline's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from mitmproxy import connection, ctx, exceptions, flow as mflow, http
from mitmproxy.utils import human

from addons.protocol_errors import clean_message, error_code
from gateway import mcp
from gateway.errors import (CALL_ID_HEADER, CLIENT_CLOSED_REQUEST, INCOMPLETE_BODY, INCOMPLETE_RESPONSE, BadRequest,
                            GatewayError, UpstreamError, client_closed, error_body, request_too_large)
from gateway.identity import extract_bearer
from gateway.models import Call, GatewayRequest, Identity, new_call_id
from gateway.pipeline import RANGE_HEADERS, Pipeline
from gateway.redaction import NotRedactable

log = logging.getLogger("agentgate.forward")

CALL_KEY = "agentgate.call"
AUDITED_KEY = "agentgate.audited"
"""The call id of a flow refused before admission, once its refusal is audited: it is audited once."""
STREAM_FROM_BYTES = 1 << 20
"""Responses with nothing to redact are relayed as they arrive from this size (or of unknown
size) instead of being held whole."""


def error_flow_response(err: GatewayError, call_id: str) -> http.Response:
    headers = {CALL_ID_HEADER: call_id, "Content-Type": "application/json", **err.headers}
    return http.Response.make(err.status, error_body(err.code, err.message, call_id), headers)


def reply_flow_response(reply: mcp.Reply) -> http.Response:
    return http.Response.make(reply.status, reply.body, reply.headers)


def _answer_instead(flow: http.HTTPFlow, err: GatewayError, call_id: str) -> None:
    """Answer ``err`` in place of a response whose headers are in but whose body is not: the
    upstream's body is read and dropped, the agent gets the JSON error."""
    body = error_body(err.code, err.message, call_id)
    made = error_flow_response(err, call_id)
    made.headers["content-length"] = str(len(body))
    assert flow.response is not None
    flow.response.status_code, flow.response.reason = made.status_code, made.reason
    flow.response.headers = made.headers
    flow.response.stream = lambda chunk: [] if chunk else [body]


_CLIENT_GONE = ("Client disconnected.",  # mitmproxy, while the agent waits for the answer
                "peer closed connection without sending complete message body")  # h11, mid-body


def _client_gone(message: str) -> bool:
    """mitmproxy's error says the agent hung up (its errors carry only a message)."""
    return any(sign in message for sign in _CLIENT_GONE)


def _proxy_refusal(message: str, body_limit: int | None) -> GatewayError:
    """The refusal to audit for an error mitmproxy reported on a flow the gateway never admitted."""
    if message == mflow.Error.KILLED_MESSAGE:  # only _internal_error kills an unadmitted flow
        return GatewayError("internal gateway error")
    if "body_size_limit" in message:  # a chunked body found too large while read (mitmproxy's 413)
        return request_too_large(body_limit)
    if _client_gone(message):
        return client_closed(f"{INCOMPLETE_BODY} ({clean_message(CLIENT_CLOSED_REQUEST, message)})")
    return BadRequest(f"refused by the proxy: {clean_message(400, message)}")


def _tokens(*credentials: str | None) -> set[str]:
    """The agent tokens in these Authorization / Proxy-Authorization values."""
    out = set()
    for value in credentials:
        try:
            out.add(extract_bearer(value))
        except GatewayError:
            continue
    return out


def _split_path(raw: bytes) -> tuple[str, str]:
    # UTF-8 as route mode reads it; bytes that are not UTF-8 stay surrogate escapes, which
    # canonical.py refuses as "not UTF-8" (and mitmproxy writes back unchanged).
    path, _, query = raw.decode("utf-8", "surrogateescape").partition("?")
    return path or "/", query


def _small(response: http.Response) -> bool:
    declared = response.headers.get("content-length", "")
    return declared.isdigit() and int(declared) < STREAM_FROM_BYTES


def _sent(flow: http.HTTPFlow) -> int:
    counter: _StreamRelay | None = flow.metadata.get("agentgate.counter")
    if counter is not None:
        return counter.count
    return len(flow.response.raw_content or b"") if flow.response else 0


def _cut_connection(flow: http.HTTPFlow) -> None:
    """End a flow that is streaming now. ``flow.kill()`` alone cannot stop a flow in transit
    (mitmproxy issue 4711), so the connection's tasks are cancelled, as mitmproxy's own idle
    timeout does."""
    if flow.killable:
        flow.kill()
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    if handler is None:
        return
    for io in list(handler.transports.values()):
        if io.handler is not None:
            io.handler.cancel("agent suspended by kill-switch")


class _StreamRelay:
    """The ``response.stream`` callable: counts what the agent is sent and, when the decision
    asks for redaction, redacts an event stream event by event. mitmproxy calls it with each
    chunk and finally with ``b""``."""

    __slots__ = ("count", "sse", "flow", "failure")

    def __init__(self, sse: Any, flow: http.HTTPFlow) -> None:
        self.count = 0
        self.sse = sse
        self.flow = flow
        self.failure: NotRedactable | None = None

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        # An empty bytes object would be relayed as an empty chunk, which ends an HTTP/1
        # chunked body: "nothing to send yet" is an empty list.
        if self.sse is not None and self.failure is None:
            try:
                chunk = self.sse.feed(chunk) if chunk else self.sse.close()
            except NotRedactable as exc:  # nothing more of this stream may reach the agent
                self.failure = exc
                asyncio.get_running_loop().call_soon(_cut_connection, self.flow)
                return []
        elif self.failure is not None:
            return []
        self.count += len(chunk)
        return chunk if chunk else []


@dataclass(slots=True)
class _Tunnel:
    identity: Identity
    host: str
    token: str
    """The agent's own token: never forwarded upstream, whatever header carries it."""


class AgentGate:
    """Forward-proxy adapter. A CONNECT tunnel is authenticated once; its identity is bound to
    the client connection and re-checked for expiry on every request inside it."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, _Tunnel] = weakref.WeakKeyDictionary()
        self._stream_types: tuple[str, ...] = ("text/event-stream",)
        self._body_limit: int | None = None  # mitmproxy's body_size_limit, parsed once per change
        self._answers: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()
        """Per connection, the call id of mitmproxy's next error answer there (set by the error
        hook, taken by addons/protocol_errors.py)."""
        self._reserved: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()
        """Per connection, the call id mitmproxy's answer already named for the request whose
        hooks run next (addons/protocol_errors.py): the audit row of its refusal takes it."""

    # -- mitmproxy addon protocol ------------------------------------------------------
    def load(self, loader) -> None:
        loader.add_option(
            "agentgate_stream_content_types", Sequence[str], ["text/event-stream"],
            "Response content types relayed to the agent as they arrive instead of buffered.",
        )

    def configure(self, updated: set[str]) -> None:
        if "agentgate_stream_content_types" in updated:
            types = ctx.options.agentgate_stream_content_types
            bad = [t for t in types if "/" not in t or t != t.strip().lower()]
            if bad:
                raise exceptions.OptionsError(
                    f"agentgate_stream_content_types: not a lower-case media type: {', '.join(bad)}")
            self._stream_types = tuple(types)
        if "body_size_limit" in updated:
            self._body_limit = human.parse_size(ctx.options.body_size_limit)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        call = Call(request=self._gateway_request(flow))
        credential = flow.request.headers.get("proxy-authorization")
        try:
            call.identity = identity = await self.pipeline.authenticate("forward", credential)
            self.pipeline.check_killswitch(call)  # a stopped agent opens no new tunnel either
        except GatewayError as err:
            self._refuse(flow, call, err)
            return
        self.tunnels[flow.client_conn] = _Tunnel(identity, flow.request.host, extract_bearer(credential))
        flow.request.headers.pop("proxy-authorization", None)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A body declared larger than mitmproxy's body_size_limit: mitmproxy answers 413 itself
        right after this hook and never calls request(); record the refusal here."""
        if self._answers:  # a new request: no earlier error answer is due
            self._answers.pop(flow.client_conn, None)
        limit = self._body_limit
        declared = flow.request.headers.get("content-length", "")
        if limit is None or not declared.isdigit() or int(declared) <= limit:
            return
        call = await self._unadmitted_call(flow)
        flow.metadata[AUDITED_KEY] = call.call_id  # mitmproxy calls the error hook for it next
        self.pipeline.fail(call, request_too_large(limit))

    def tcp_start(self, flow: Any) -> None:
        """Never a raw TCP relay (no policy, no audit): rawtcp is off, this holds should a
        mitmproxy layer pick TCP all the same."""
        log.warning("refusing a raw TCP flow to %s", flow.server_conn.address)
        flow.kill()

    udp_start = tcp_start

    # mitmproxy logs an exception raised by a hook and carries on with the flow: the request would
    # go upstream unjudged, the response reach the agent unredacted. So each hook that decides
    # catches everything and refuses instead.
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        call = None
        try:
            tunnel = self.tunnels.get(flow.client_conn)
            call = Call(request=self._gateway_request(flow, tunnel))
            await self._request(flow, call, tunnel)
        except Exception:  # noqa: BLE001 - see above
            self._internal_error(flow, call)

    async def _request(self, flow: http.HTTPFlow, call: Call, tunnel: _Tunnel | None) -> None:
        credential = flow.request.headers.get("proxy-authorization")
        if tunnel is not None and len(flow.request.headers.get_all("host")) > 1:
            self._refuse(flow, call, BadRequest("more than one Host header", code="host_mismatch"))
            return
        if (batch := mcp.batch_of(call, self.pipeline.cfg.policy.inspect_body_bytes)) is not None:
            await self._mcp_batch(flow, call, batch, credential, tunnel)  # each element its own call
            return
        try:
            await self.pipeline.admit(call, credential=credential,
                                      identity=tunnel.identity if tunnel else None)
        except GatewayError as err:
            self._refuse(flow, call, err)
            return
        self._strip_agent_credentials(flow, credential, tunnel)
        if call.redaction is not None:
            for name in RANGE_HEADERS:  # the response must come back whole to be redacted
                flow.request.headers.pop(name, None)
        # What policy judged is what goes upstream: the canonical path (and host, outside a tunnel).
        flow.request.path = call.canonical_path + (f"?{call.request.query}" if call.request.query else "")
        if tunnel is None:
            flow.request.host = call.canonical_host
        elif flow.request.http_version.startswith("HTTP/1"):
            # Origin-form: an absolute-form target would name its own authority upstream, and an
            # origin server follows that rather than the Host header policy judged.
            flow.request.authority = ""
        flow.metadata[CALL_KEY] = call
        call.upstream_started = time.perf_counter()
        if mcp.takes_over(call):  # an MCP listing: the gateway exchanges it itself, to filter it whole
            flow.response = reply_flow_response(await mcp.exchange_direct(self.pipeline, call, credential))

    async def _mcp_batch(self, flow: http.HTTPFlow, call: Call, batch: list[Any], credential: str | None,
                         tunnel: _Tunnel | None) -> None:
        try:
            flow.response = reply_flow_response(await mcp.run_batch(
                self.pipeline, call, batch, credential=credential, identity=tunnel.identity if tunnel else None,
                send=mcp.DirectSender(self.pipeline.cfg, credential)))
        except Exception:  # noqa: BLE001 - never let a bug let a batch through
            log.exception("internal error on batch %s", call.call_id)
            flow.response = error_flow_response(GatewayError("internal gateway error"), call.call_id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._responseheaders(flow)
        except Exception:  # noqa: BLE001 - see request(); the body is not read yet: end the flow
            call: Call | None = flow.metadata.get(CALL_KEY)
            log.exception("internal error on call %s", call.call_id if call else "(none)")
            if call is not None:
                self.pipeline.fail(call, GatewayError("internal gateway error"))
            flow.kill()

    def _responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(CALL_KEY)
        if call is None or flow.response is None:
            return
        flow.response.headers[CALL_ID_HEADER] = call.call_id
        ctype = flow.response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        sse = None
        if call.redaction is not None:
            try:
                sse = self._plan_response_redaction(flow, call, ctype)
            except GatewayError as err:  # must be redacted, cannot be: the agent gets the error
                self.pipeline.fail(call, err)
                _answer_instead(flow, err, call.call_id)
                return
            if sse is None and not flow.response.stream:
                return  # buffered; the response hook redacts it
        elif not _small(flow.response):
            flow.response.stream = True  # nothing to redact: relay it, do not hold it
        if ctype in self._stream_types or flow.response.stream or sse is not None:
            counter = _StreamRelay(sse, flow)
            flow.metadata["agentgate.counter"] = counter
            flow.response.stream = mcp.tap(self.pipeline, call, flow.response.status_code, ctype,  # MCP: isError
                                           flow.response.headers.get("content-encoding"), counter)
            self.pipeline.streams.add(call, lambda: _cut_connection(flow))

    def _plan_response_redaction(self, flow: http.HTTPFlow, call: Call, ctype: str) -> Any:
        """An SSE redactor for event streams; otherwise buffer the body for the response hook
        (or, when it is too large to inspect and the proxy lets it pass, stream it as is)."""
        assert flow.response is not None
        encoding = flow.response.headers.get("content-encoding")
        try:
            self.pipeline.check_partial_response(call, flow.response.status_code, ctype)
            if ctype == "text/event-stream":
                return call.redaction.sse(encoding)
            limit = self.pipeline.cfg.redaction.max_inspect_bytes
            declared = flow.response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise NotRedactable("too_large", f"body exceeds {limit} bytes")
        except NotRedactable as exc:
            self.pipeline.unredactable(call, exc)  # raises unless passing is allowed
            flow.response.stream = True  # passing: relayed as it is, audited as such
            return None
        flow.response.stream = False
        return None

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._response(flow)
        except Exception:  # noqa: BLE001 - see request()
            self._internal_error(flow, flow.metadata.get(CALL_KEY))

    async def _response(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(CALL_KEY)
        if call is None or flow.response is None or call.finished:
            return
        self.pipeline.streams.discard(call)
        relay: _StreamRelay | None = flow.metadata.get("agentgate.counter")
        if relay is None and call.rpc is not None:  # MCP: records a buffered tool result's isError
            mcp.observe(self.pipeline, call, flow.response.status_code, flow.response.headers.get("content-type", ""),
                        flow.response.get_content(strict=False) or b"")
        if relay is not None and relay.sse is not None:
            self.pipeline.record_redaction(call, relay.sse.report)
            if relay.failure is not None:
                self.pipeline.fail(call, GatewayError(
                    f"stream cut: an event cannot be redacted ({relay.failure.reason})",
                    code="response_not_redactable", status=flow.response.status_code, outcome="redaction_failed"))
                return
        elif call.redaction is not None and relay is None:
            resp = flow.response
            try:
                body = await self.pipeline.redact(call, resp.raw_content or b"",
                                                  content_type=resp.headers.get("content-type", ""),
                                                  content_encoding=resp.headers.get("content-encoding"))
            except GatewayError as err:
                self._refuse(flow, call, err)
                return
            if body is not resp.raw_content:
                resp.raw_content = body
                if "content-length" in resp.headers:
                    resp.headers["content-length"] = str(len(body))
        self.pipeline.finish(call, status=flow.response.status_code, response_bytes=_sent(flow))

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        """An upgraded connection is a long-lived stream: a kill-switch must be able to cut it."""
        call: Call | None = flow.metadata.get(CALL_KEY)
        if call is not None:
            self.pipeline.streams.add(call, lambda: _cut_connection(flow))

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(CALL_KEY)
        if call is not None:
            self.pipeline.streams.discard(call)

    async def error(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(CALL_KEY)
        if call is None:
            call_id = await self._refused_by_proxy(flow)
        else:
            call_id = call.call_id
            self._failed(flow, call)
        self._answers[flow.client_conn] = call_id  # for the answer mitmproxy writes next, if any

    def _failed(self, flow: http.HTTPFlow, call: Call) -> None:
        """An admitted call mitmproxy reported an error for: audit why it ended."""
        if call.finished:
            return
        self.pipeline.streams.discard(call)
        relay: _StreamRelay | None = flow.metadata.get("agentgate.counter")
        if relay is not None and relay.failure is not None:
            call.response_bytes = relay.count
            if relay.sse is not None:
                self.pipeline.record_redaction(call, relay.sse.report)
            self.pipeline.fail(call, GatewayError(
                f"stream cut: an event cannot be redacted ({relay.failure.reason})",
                code="response_not_redactable", status=flow.response.status_code if flow.response else 0,
                outcome="redaction_failed"))
            return
        if call.killswitch_id:
            call.response_bytes = _sent(flow)
            status = flow.response.status_code if flow.response else 0
            self.pipeline.fail(call, GatewayError("stream cut: agent suspended", code="agent_suspended",
                                                  status=status, outcome="killed"))
            return
        message = flow.error.msg if flow.error else "unknown upstream failure"
        if _client_gone(message):
            call.response_bytes = _sent(flow)
            status = flow.response.status_code if flow.response else CLIENT_CLOSED_REQUEST
            self.pipeline.fail(call, client_closed(INCOMPLETE_RESPONSE, status))
            return
        self.pipeline.fail(call, UpstreamError(f"upstream failed: {message}", code="upstream_error"))

    async def _refused_by_proxy(self, flow: http.HTTPFlow) -> str:
        """mitmproxy refused a request the gateway never admitted (headers it would not take, a
        body over the limit, one the agent never finished sending): audit it, once. Returns the
        call id of its row ("" when the gateway answered it itself)."""
        if flow.response is not None:
            return ""  # answered by the gateway itself
        if audited := flow.metadata.get(AUDITED_KEY):
            return audited  # by requestheaders
        try:
            call = await self._unadmitted_call(flow)
            flow.metadata[AUDITED_KEY] = call.call_id
            self.pipeline.fail(call, _proxy_refusal(flow.error.msg if flow.error else "", self._body_limit))
            return call.call_id
        except Exception:  # noqa: BLE001 - an audit failure must not break mitmproxy's error path
            log.exception("could not audit a request the proxy refused")
            return ""

    def reserve_call_id(self, client: connection.Client) -> str:
        """A call id for a refusal mitmproxy answers before the hooks for it run."""
        self._reserved[client] = call_id = new_call_id()
        return call_id

    def answered_call_id(self, client: connection.Client, status: int, message: str) -> str:
        """The call id for mitmproxy's own error answer on ``client`` (addons/protocol_errors.py):
        the one the error hook recorded, or, when no hook saw the request, a row written now."""
        call_id = self._answers.pop(client, None)
        if call_id is not None:
            return call_id
        return self.refuse_unseen(client, GatewayError(clean_message(status, message), code=error_code(status),
                                                       status=status, outcome="rejected" if status < 500 else "error"))

    def refuse_unseen(self, client: connection.Client, err: GatewayError) -> str:
        """Audit a request mitmproxy refused before any hook saw it (a head it could not parse, no
        Host): attributed to the tunnel's agent when it came through one, else only to its
        address. Returns the call id."""
        tunnel = self.tunnels.get(client)
        call = Call(request=GatewayRequest.unparsed(
            "forward", client.peername[0] if client.peername else "",
            scheme="https" if tunnel else "http", host=tunnel.host if tunnel else ""))
        call.identity = tunnel.identity if tunnel else None
        self.pipeline.fail(call, err)
        return call.call_id

    async def _unadmitted_call(self, flow: http.HTTPFlow) -> Call:
        """A call for a request refused before the pipeline judged it, attributed to its agent
        when the tunnel or the Proxy-Authorization says who that is."""
        tunnel = self.tunnels.get(flow.client_conn)
        call = Call(request=self._gateway_request(flow, tunnel, with_body=False))
        if (reserved := self._reserved.pop(flow.client_conn, None)) is not None:
            call.call_id = reserved  # mitmproxy's answer named it already
        try:
            call.identity = tunnel.identity if tunnel else await self.pipeline.authenticate(
                "forward", flow.request.headers.get("proxy-authorization"))
        except GatewayError:
            pass  # refused all the same; the row says who it was when it can
        return call

    # -- translation -------------------------------------------------------------------
    def _gateway_request(self, flow: http.HTTPFlow, tunnel: _Tunnel | None = None, *,
                         with_body: bool = True) -> GatewayRequest:
        req = flow.request
        path, query = _split_path(req.data.path) if req.method != "CONNECT" else ("/", "")
        host = req.host
        connect_host = None
        host_header = req.host_header
        if tunnel is not None and host_header:
            # Inside a CONNECT tunnel the Host header (or :authority) must name the tunnel's target.
            connect_host = tunnel.host
            host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        # The body as sent: policy judges the bytes the upstream receives (mitmproxy's
        # get_content would decode any Python codec a Content-Encoding names, unbounded).
        body = req.raw_content if req.method != "CONNECT" and with_body else b""
        return GatewayRequest(
            mode="forward", method=req.method, scheme=req.scheme, host=host, port=req.port,
            path=path, query=query, headers=list(req.headers.items(multi=True)), body=body or b"",
            client_ip=flow.client_conn.peername[0] if flow.client_conn.peername else "",
            connect_host=connect_host,
        )

    def _internal_error(self, flow: http.HTTPFlow, call: Call | None) -> None:
        """A bug in a hook: refuse the flow (audited when there is a call), or at least kill it."""
        log.exception("internal error on call %s", call.call_id if call else "(not built)")
        try:
            if call is not None:
                self._refuse(flow, call, GatewayError("internal gateway error"))
                return
        except Exception:  # noqa: BLE001 - refusing failed too: the flow must still not pass
            log.exception("could not refuse call %s", call.call_id)
        flow.kill()

    @staticmethod
    def _strip_agent_credentials(flow: http.HTTPFlow, credential: str | None, tunnel: _Tunnel | None) -> None:
        """The agent's own token never goes upstream: Proxy-Authorization is dropped, and so is
        any Authorization value that carries the same token (Bearer or Basic)."""
        flow.request.headers.pop("proxy-authorization", None)
        own = _tokens(credential) | ({tunnel.token} if tunnel else set())
        values = flow.request.headers.get_all("authorization")
        kept = [v for v in values if not _tokens(v) & own]
        if len(kept) != len(values):
            flow.request.headers.set_all("authorization", kept)

    def _refuse(self, flow: http.HTTPFlow, call: Call, err: GatewayError) -> None:
        self.pipeline.fail(call, err)
        reply = mcp.refusal(call, err)  # an MCP request gets a JSON-RPC error
        flow.response = error_flow_response(err, call.call_id) if reply is None else reply_flow_response(reply)
