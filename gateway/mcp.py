"""MCP awareness: JSON-RPC 2.0 bodies become tool calls that policy judges by name and arguments,
and the gateway answers them the way MCP clients understand. Front ends only translate.

Recognition (:func:`classify`, from ``Pipeline.admit`` once the agent is identified; bodies
of unauthenticated requests are not parsed): a body holding one JSON-RPC 2.0 message (request,
notification, or a response the client sends back) on any route or forwarded host makes the
call ``tool_kind = "mcp"``, as does a bodiless request carrying ``Mcp-Session-Id`` (the SSE GET
and the session-ending DELETE; ``method`` null). Policy then sees, with every HTTP field
unchanged::

    input.tool = {kind: "mcp", method, server, jsonrpc_id, batch}      server: route name, or
               + {name, arguments}  tools/call, prompts/get             canonical host (forward)
               + {uri}              resources/read|subscribe|unsubscribe

Bodies over ``policy.inspect_body_bytes`` or not JSON stay ``kind: "http"``; the example policy
denies POSTs to an MCP endpoint it could not read. ``Mcp-Method``/``Mcp-Name`` headers (protocol
2026-07-28) that contradict the body are refused (400 ``mcp_header_mismatch``): a server routing
by header could otherwise be steered past a decision made on the body.

Refusals after identity (:func:`refusal`) are JSON-RPC errors: HTTP 200, application/json,
``{"jsonrpc": "2.0", "id": <id>, "error": {"code", "message", "data": {"code", "call_id",
"reasons", "approval_id"?}}}`` plus X-Agentgate-Call-Id (and X-Agentgate-Approval-Id). Codes::

    policy_denied -32001   policy_error -32002   approval_pending -32003
    approval_denied -32004 agent_suspended -32005
    batch elements only: upstream failure -32010, unreadable answer -32011,
    malformed element -32600, internal error -32603, any other refusal -32000

Identity failures stay HTTP 401/407; a refused notification (no id) gets the usual 403 JSON.
Approval holds work as for any request; an approval of a ``tools/call`` is bound to the agent,
server, tool and arguments (gateway/approvals.py), not the JSON-RPC id, so a client's retry with
a new id after the hold timed out passes once approved.

Answers (:class:`ReplyHandler`): ``tools/list``, ``resources/list`` and ``prompts/list`` are
read whole (JSON or SSE, decoded if compressed) and every listed item is judged like a call to
it, on the listing request's input with ``input.tool = {kind: "mcp", method: "tools/call", name,
arguments: {}, server, ...}`` (resources: ``resources/read`` + ``uri``; prompts: ``prompts/get``
+ ``name``). Items whose decision is not allow are dropped (require_approval stays: the agent
may ask); a policy error hides the item (fail closed); in shadow mode nothing is hidden but the
audit says what would have been. An answer that cannot be read is replaced by error -32011.
Resource templates pass unfiltered. ``tools/call`` answers are observed, event by event when
streamed (bytes untouched), and the result's ``isError`` goes to the audit.

Batches (:func:`run_batch`): the mcp 2.x server rejects JSON-RPC batches, so the gateway splits
them. Each element is its own call (own call_id and audit row, the batch's trace_id), admitted
(approval holds included) and forwarded one at a time, in order, with ``Accept: application/json,
text/event-stream`` (from an SSE answer the message with the element's id is taken; other
events are dropped; the decision's redaction applies to each answer). Refused elements become
JSON-RPC errors in place and never reach the upstream. The answer is a JSON array in request order (notifications add nothing; nothing at
all: 202) with X-Agentgate-Call-Id listing the elements' call ids, comma separated, in order.
A batch refused as a whole (identity) is one audit row.

Forward mode: mitmproxy streams bodies over 1 MiB unseen, so listings are exchanged by the
gateway itself (:func:`exchange_direct`) and answered as application/json.

Audit: tool_kind ``mcp``, tool_name (tool or prompt name, resource URI), rpc_method, rpc_id
(strings as they are, numbers as JSON text), tool_arguments (JSON scrubbed with
:func:`gateway.redaction.scrub_value`, at most 4096 characters) and tool_error (``isError``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import yarl

from gateway.canonical import canonical_host, canonical_port
from gateway.errors import CALL_ID_HEADER, BadRequest, GatewayError, UpstreamError, error_body
from gateway.models import Call, Decision
from gateway.redaction import scrub_value
from gateway.redaction.codec import decode as decode_codings
from gateway.redaction.codec import encode as encode_codings
from gateway.redaction.codec import parse_encodings
from gateway.request_body import inspected_body

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.pipeline import Pipeline

log = logging.getLogger("agentgate.mcp")

JSON_AND_SSE = "application/json, text/event-stream"
APPROVAL_HEADER = "X-Agentgate-Approval-Id"
MAX_ARGUMENTS_CHARS = 4096
MAX_REPLY_BYTES = 16 << 20
"""An answer the gateway reads whole (listing, batch element) may be this large."""
MAX_EVENT_BYTES = 1 << 20
"""A streamed event larger than this is passed on unobserved."""

RPC_ERROR_CODES: dict[str, int] = {
    "policy_denied": -32001,
    "policy_error": -32002,
    "approval_pending": -32003,
    "approval_denied": -32004,
    "agent_suspended": -32005,
}
UPSTREAM_FAILED = -32010
UNREADABLE_ANSWER = -32011
OTHER_REFUSAL = -32000
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603

# Method -> the params key that names what it uses (mirrored by the Mcp-Name header).
NAME_BEARING: dict[str, str] = {
    "tools/call": "name", "prompts/get": "name",
    "resources/read": "uri", "resources/subscribe": "uri", "resources/unsubscribe": "uri",
}
WITH_ARGUMENTS = frozenset({"tools/call", "prompts/get"})


@dataclass(frozen=True, slots=True)
class Listing:
    items: str
    """The result member holding the list."""
    call_method: str
    """The method a listed item is judged as."""
    key: str
    """The item member naming it."""


LISTINGS: dict[str, Listing] = {
    "tools/list": Listing("tools", "tools/call", "name"),
    "resources/list": Listing("resources", "resources/read", "uri"),
    "prompts/list": Listing("prompts", "prompts/get", "name"),
}


# -- messages --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RpcMessage:
    """One JSON-RPC 2.0 message an agent sent."""

    method: str | None
    """None: a response the client sends back (to a server's request) or a bodiless request."""
    id: Any = None
    has_id: bool = False
    params: Any = None
    batch: bool = False

    @property
    def answerable(self) -> bool:
        """A request that gets a response (not a notification, not a response itself)."""
        return self.has_id and self.method is not None

    def param(self, key: str) -> Any:
        return self.params.get(key) if isinstance(self.params, dict) else None


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool)


def as_message(value: Any, *, batch: bool = False) -> RpcMessage | None:
    """The JSON-RPC 2.0 message in a parsed JSON value, or None if it is not one."""
    if not isinstance(value, dict) or value.get("jsonrpc") != "2.0":
        return None
    has_id = "id" in value
    if has_id and not _valid_id(value["id"]):
        return None
    method = value.get("method")
    if isinstance(method, str):
        return RpcMessage(method, value.get("id"), has_id, value.get("params"), batch)
    if "method" not in value and has_id and ("result" in value or "error" in value):
        return RpcMessage(None, value["id"], True, None, batch)
    return None


class _Ambiguous(ValueError):
    """A JSON object naming a member twice: parsers disagree on which one counts."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _Ambiguous
    return doc


AMBIGUOUS = object()
"""What :func:`_load_json` returns for a body with duplicate member names."""


def _load_json(body: bytes, limit: int) -> Any:
    """The parsed body when it may be JSON-RPC (an object or array within ``limit``), else None;
    :data:`AMBIGUOUS` when an object in it names a member twice."""
    if not body or len(body) > limit or body.lstrip()[:1] not in (b"{", b"["):
        return None
    if b"jsonrpc" not in body and b"\\u" not in body:
        return None  # spares a parse for other JSON bodies (an escaped key still gets one)
    try:
        return json.loads(body, object_pairs_hook=_unique_members)
    except _Ambiguous:
        return AMBIGUOUS
    except (ValueError, RecursionError):
        return None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def rpc_id_text(msg: RpcMessage) -> str:
    if not msg.has_id:
        return ""
    return msg.id if isinstance(msg.id, str) else json.dumps(msg.id)


def arguments_text(arguments: Any) -> str:
    """Tool arguments for the audit: scrubbed of secrets and personal data, bounded."""
    try:
        text = json.dumps(scrub_value(arguments), separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return ""
    if len(text) <= MAX_ARGUMENTS_CHARS:
        return text
    cut = MAX_ARGUMENTS_CHARS - 8  # too long: a JSON string of the cut text (escaping may grow it)
    while len(out := json.dumps(text[:cut] + "…", ensure_ascii=False)) > MAX_ARGUMENTS_CHARS:
        cut -= len(out) - MAX_ARGUMENTS_CHARS
    return out


# -- recognition -----------------------------------------------------------------------------
def classify(call: Call, limit: int) -> None:
    """Mark an MCP call: ``call.rpc``, ``call.tool_input`` (``input.tool``) and audit fields.
    Raises BadRequest when ``Mcp-Method``/``Mcp-Name`` headers contradict the body."""
    req = call.request
    value = _load_json(inspected_body(req, limit)[0], limit)  # decoded when it carries a Content-Encoding
    if value is AMBIGUOUS:
        raise BadRequest("the JSON body names a member twice; servers may read it differently than "
                         "the gateway", code="ambiguous_json")
    in_batch = call.rpc is not None and call.rpc.batch  # set by run_batch on its element calls
    msg = as_message(value, batch=in_batch) if isinstance(value, dict) else None
    if msg is None:
        if req.body or req.header("mcp-session-id") is None:
            return
        msg = RpcMessage(None)
    _mark(call, msg)
    check_headers(call)
    if msg.method in WITH_ARGUMENTS and not isinstance(call.tool_input["arguments"], dict):  # type: ignore[index]
        raise BadRequest(f"{msg.method} arguments must be an object", code="invalid_mcp_params")


def _server(call: Call) -> str:
    req = call.request
    if req.route is not None:
        return req.route
    try:
        return canonical_host(req.host)
    except GatewayError:
        return req.host.lower()


def tool_document(call: Call, msg: RpcMessage) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": "mcp", "method": msg.method, "server": _server(call),
                           "jsonrpc_id": msg.id if msg.has_id else None, "batch": msg.batch}
    key = NAME_BEARING.get(msg.method or "")
    if key is not None:
        doc[key] = msg.param(key)
    if msg.method in WITH_ARGUMENTS:
        arguments = msg.param("arguments")
        doc["arguments"] = {} if arguments is None else arguments
    return doc


def _mark(call: Call, msg: RpcMessage) -> None:
    call.rpc = msg
    call.tool_kind = "mcp"
    call.rpc_method = msg.method or ""
    call.rpc_id = rpc_id_text(msg)
    call.tool_input = tool_document(call, msg)
    key = NAME_BEARING.get(msg.method or "")
    name = msg.param(key) if key else None
    call.tool_name = name if isinstance(name, str) else ""
    if msg.method in WITH_ARGUMENTS:
        call.tool_arguments = arguments_text(call.tool_input["arguments"])


_B64_HEADER = re.compile(r"^=\?base64\?(.*)\?=$")


def _header_value(raw: str) -> str | None:
    """An ``Mcp-Name`` value, undoing the SDK's ``=?base64?...?=`` form for non-ASCII names."""
    m = _B64_HEADER.match(raw.strip())
    if m is None:
        return raw.strip()
    try:
        return base64.b64decode(m.group(1), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def check_headers(call: Call) -> None:
    """Refuse ``Mcp-Method`` / ``Mcp-Name`` headers that say something else than the body."""
    msg = call.rpc
    if msg is None or msg.method is None or msg.batch:
        return
    method = call.request.header("mcp-method")
    if method is not None and method.strip() != msg.method:
        raise BadRequest(f"Mcp-Method header {method.strip()[:100]!r} does not match the body's "
                         f"method {msg.method[:100]!r}", code="mcp_header_mismatch")
    key = NAME_BEARING.get(msg.method)
    name = call.request.header("mcp-name")
    if key is not None and name is not None and _header_value(name) != msg.param(key):
        raise BadRequest(f"Mcp-Name header does not match the body's {key}", code="mcp_header_mismatch")


def batch_of(call: Call, limit: int) -> list[Any] | None:
    """The elements of a JSON-RPC batch body (every element a JSON-RPC object), else None."""
    body = inspected_body(call.request, limit)[0]
    if body.lstrip()[:1] != b"[":
        return None
    value = _load_json(body, limit)  # an ambiguous batch is left to classify(), which refuses it
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, dict) and v.get("jsonrpc") == "2.0" for v in value):
        return value
    return None


# -- refusals --------------------------------------------------------------------------------
@dataclass(slots=True)
class Reply:
    """An HTTP answer the gateway composed (front ends turn it into their response type)."""

    status: int
    headers: dict[str, str]
    body: bytes


def rpc_code(err: GatewayError) -> int:
    if err.code in RPC_ERROR_CODES:
        return RPC_ERROR_CODES[err.code]
    if isinstance(err, UpstreamError) or err.code.startswith("upstream"):
        return UPSTREAM_FAILED
    if err.status == 500:
        return INTERNAL_ERROR
    return OTHER_REFUSAL


def error_object(call: Call, err: GatewayError, code: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"code": err.code, "call_id": call.call_id, "reasons": list(call.reasons)}
    approval = err.headers.get(APPROVAL_HEADER) or call.approval_id
    if approval:
        data["approval_id"] = approval
    return {"code": rpc_code(err) if code is None else code, "message": f"agentgate: {err.message}",
            "data": data}


def error_message(rpc_id: Any, error: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "error": error}


def _as_rpc_error(call: Call, err: GatewayError) -> bool:
    msg = call.rpc
    return msg is not None and msg.answerable and err.code in RPC_ERROR_CODES


def refusal_status(call: Call, err: GatewayError) -> int:
    """The HTTP status the agent gets for ``err`` (what the audit records)."""
    if call.rpc is not None and call.rpc.batch:
        return 200
    return 200 if _as_rpc_error(call, err) else err.status


def refusal(call: Call, err: GatewayError) -> Reply | None:
    """A refused MCP request as a JSON-RPC error, or None when HTTP's answer stays."""
    if not _as_rpc_error(call, err):
        return None
    assert call.rpc is not None
    body = _dumps(error_message(call.rpc.id, error_object(call, err)))
    headers = {**err.headers, CALL_ID_HEADER: call.call_id, "Content-Type": "application/json"}
    return Reply(200, headers, body)


def http_error(err: GatewayError, call_id: str) -> Reply:
    headers = {**err.headers, CALL_ID_HEADER: call_id, "Content-Type": "application/json"}
    return Reply(err.status, headers, error_body(err.code, err.message, call_id))


# -- event streams ---------------------------------------------------------------------------
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_LINE = re.compile(r"\r\n|\n|\r")


def split_events(buf: bytes, *, final: bool) -> tuple[list[bytes], bytes]:
    """Complete events (each with its blank line) and the unfinished rest."""
    events: list[bytes] = []
    start = 0
    for m in _EVENT_END.finditer(buf):
        if m.end() == len(buf) and buf.endswith(b"\r") and not final:
            break  # maybe the first half of a CRLF
        events.append(buf[start:m.end()])
        start = m.end()
    rest = buf[start:]
    if final and rest.strip():
        events.append(rest)
        rest = b""
    return events, rest


def event_data(event: bytes) -> str | None:
    """The joined ``data`` lines of one event, or None if it has none."""
    values = []
    for line in _LINE.split(event.decode("utf-8", "replace")):
        if line == "data" or line.startswith("data:"):
            value = line[5:]
            values.append(value[1:] if value.startswith(" ") else value)
    return "\n".join(values) if values else None


def with_data(event: bytes, data: str) -> bytes:
    """``event`` with its data lines replaced by one ``data:`` line (``data`` is one line)."""
    lines = [ln for ln in _LINE.split(event.decode("utf-8", "replace")) if ln]
    out, placed = [], False
    for line in lines:
        if line == "data" or line.startswith("data:"):
            if not placed:
                out.append(f"data: {data}")
                placed = True
            continue
        out.append(line)
    return ("\n".join(out) + "\n\n").encode()


def _is_sse(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def response_message(body: bytes, content_type: str, rpc_id: Any) -> dict[str, Any] | None:
    """The JSON-RPC response to ``rpc_id`` in a decoded JSON or SSE answer."""
    if _is_sse(content_type):
        events, _ = split_events(body, final=True)
        for event in events:
            found = _answer_in(event_data(event), rpc_id)
            if found is not None:
                return found
        return None
    return _answer_in(body.decode("utf-8", "replace"), rpc_id)


def _answer_in(text: str | None, rpc_id: Any) -> dict[str, Any] | None:
    if not text or text.lstrip()[:1] != "{":
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and value.get("id") == rpc_id and "method" not in value \
            and ("result" in value or "error" in value):
        return value
    return None


# -- answers ---------------------------------------------------------------------------------
class Unreadable(Exception):
    """An answer the gateway must read (a listing) but cannot."""


class ReplyHandler:
    """The MCP work on one call's answer: filter listings, record a tool result's ``isError``."""

    def __init__(self, pipeline: Pipeline, call: Call, content_type: str, content_encoding: str | None) -> None:
        assert call.rpc is not None
        self.pipeline = pipeline
        self.call = call
        self.msg = call.rpc
        self.listing = LISTINGS.get(self.msg.method or "")
        self.content_type = content_type
        self.content_encoding = content_encoding
        self._sse = _is_sse(content_type)
        self._buf = b""
        self._observing = self._sse and not content_encoding
        self._seen = False

    @property
    def buffered(self) -> bool:
        """A listing: the front end must hand over the whole answer (:meth:`body`)."""
        return self.listing is not None

    # -- whole answers
    async def body(self, data: bytes) -> bytes:
        """The answer to send, from the whole upstream answer (its codings kept). Never raises."""
        try:
            encs = parse_encodings(self.content_encoding)
            decoded, raws = decode_codings(data, encs, MAX_REPLY_BYTES) if encs else (data, [])
        except Exception:  # noqa: BLE001 - unknown or broken coding
            return self._unreadable(data, "an undecodable content coding")
        if self.listing is None:
            self.observe(decoded)
            return data
        processed = await self.process(decoded)
        return encode_codings(processed, encs, raws) if encs else processed

    async def process(self, decoded: bytes) -> bytes:
        """A decoded answer with the listing filtered (or replaced by an error if unreadable)."""
        if self.listing is None:
            self.observe(decoded)
            return decoded
        try:
            return await (self._filter_sse(decoded) if self._sse else self._filter_json(decoded))
        except Unreadable as exc:
            return self._unreadable(decoded, str(exc), encode=False)

    async def _filter_json(self, decoded: bytes) -> bytes:
        message = _answer_in(decoded.decode("utf-8", "replace"), self.msg.id)
        if message is None:
            raise Unreadable("no JSON-RPC response")
        return _dumps(await self.filter_message(message))

    async def _filter_sse(self, decoded: bytes) -> bytes:
        events, _ = split_events(decoded, final=True)
        out, found = bytearray(), False
        for event in events:
            message = _answer_in(event_data(event), self.msg.id)
            if message is None:
                out += event
                continue
            found = True
            out += with_data(event, _dumps(await self.filter_message(message)).decode())
        if not found:
            raise Unreadable("no JSON-RPC response in the event stream")
        return bytes(out)

    def _unreadable(self, data: bytes, why: str, *, encode: bool = True) -> bytes:
        if self.listing is None:
            return data  # only observed: pass it on
        log.warning("call %s: %s answer unreadable (%s); replaced by an error", self.call.call_id,
                    self.msg.method, why)
        self.call.reasons.append(f"{self.msg.method} answer could not be inspected: {why}")
        err = GatewayError(f"the {self.msg.method} answer could not be inspected ({why})",
                           code="mcp_unreadable_answer", status=502)
        text = _dumps(error_message(self.msg.id, error_object(self.call, err, UNREADABLE_ANSWER)))
        body = b"event: message\ndata: " + text + b"\n\n" if self._sse else text
        try:
            encs = parse_encodings(self.content_encoding) if encode else []
            return encode_codings(body, encs) if encs else body
        except Exception:  # noqa: BLE001
            return body

    # -- listings
    async def filter_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """The listing response with the items policy would not let the agent use removed."""
        listing = self.listing
        assert listing is not None
        result = message.get("result")
        if not isinstance(result, dict) or listing.items not in result:
            return message
        items = result[listing.items]
        if not isinstance(items, list):
            self.call.reasons.append(f"{self.msg.method}: {listing.items} is not a list; answered empty")
            return {**message, "result": {**result, listing.items: []}}
        doc = self._input_document()
        kept, hidden = [], []
        for item in items:
            if await self._usable(doc, listing, item):
                kept.append(item)
            else:
                name = item.get(listing.key) if isinstance(item, dict) else None
                hidden.append(name if isinstance(name, str) else "?")
        if not hidden:
            return message
        names = ", ".join(hidden[:20]) + (", ..." if len(hidden) > 20 else "")
        if not self.call.enforce:
            self.call.reasons.append(f"{self.msg.method}: would hide {len(hidden)} of {len(items)} ({names})")
            return message
        self.call.reasons.append(f"{self.msg.method}: hid {len(hidden)} of {len(items)} ({names})")
        return {**message, "result": {**result, listing.items: kept}}

    def _input_document(self) -> dict[str, Any]:
        call, req = self.call, self.call.request
        return self.pipeline.policy_input(call, port=canonical_port(req.scheme, req.port),
                                          segments=self.pipeline.path_segments(call))

    async def _usable(self, doc: dict[str, Any], listing: Listing, item: Any) -> bool:
        name = item.get(listing.key) if isinstance(item, dict) else None
        if not isinstance(name, str):
            return False
        tool = {"kind": "mcp", "method": listing.call_method, "server": _server(self.call),
                "jsonrpc_id": None, "batch": False, listing.key: name}
        if listing.call_method in WITH_ARGUMENTS:
            tool["arguments"] = {}
        doc["tool"] = tool
        started = time.perf_counter()
        try:
            raw = await asyncio.wait_for(self.pipeline.engine.evaluate(doc),
                                         self.pipeline.cfg.policy.timeout_seconds)
            return Decision.model_validate(raw).allow
        except Exception as exc:  # noqa: BLE001 - fail closed: the item is hidden
            self.call.reasons.append(f"policy_error while filtering {self.msg.method} ({name}): "
                                     f"{type(exc).__name__}")
            return False
        finally:
            self.call.decision_us += int((time.perf_counter() - started) * 1e6)

    # -- tool results
    def observe(self, decoded: bytes) -> None:
        """Record the tool result's ``isError`` from a whole decoded answer (tools/call)."""
        if self.msg.method != "tools/call":
            return
        content_type = self.content_type
        self._record(response_message(decoded, content_type, self.msg.id))

    def _record(self, message: dict[str, Any] | None) -> None:
        if message is None or self._seen:
            return
        self._seen = True
        result = message.get("result")
        if isinstance(result, dict):
            self.call.tool_error = result.get("isError") is True
            return
        error = message.get("error")
        if isinstance(error, dict):
            self.call.reasons.append(f"upstream JSON-RPC error {error.get('code')}")

    def feed(self, chunk: bytes) -> bytes:
        """A streamed chunk, passed on unchanged; complete events are observed as they pass."""
        if not self._observing or self.msg.method != "tools/call" or self._seen:
            return chunk
        events, self._buf = split_events(self._buf + chunk, final=False)
        for event in events:
            self._record(_answer_in(event_data(event), self.msg.id))
        if len(self._buf) > MAX_EVENT_BYTES:
            self._observing = False
            self._buf = b""
        return chunk

    def close(self) -> bytes:
        if self._observing and self._buf and not self._seen:
            events, _ = split_events(self._buf, final=True)
            for event in events:
                self._record(_answer_in(event_data(event), self.msg.id))
        self._buf = b""
        return b""


def reply_handler(pipeline: Pipeline, call: Call, status: int, content_type: str,
                  content_encoding: str | None) -> ReplyHandler | None:
    """The MCP work on an answer, or None when there is none (not MCP, not a 2xx answer to a
    listing or a tools/call)."""
    msg = call.rpc
    if msg is None or not msg.answerable or not 200 <= status < 300:
        return None
    if msg.method != "tools/call" and msg.method not in LISTINGS:
        return None
    return ReplyHandler(pipeline, call, content_type, content_encoding)


def tap(pipeline: Pipeline, call: Call, status: int, content_type: str, content_encoding: str | None,
        stream: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A mitmproxy ``response.stream`` callable that observes a streamed tools/call answer."""
    handler = reply_handler(pipeline, call, status, content_type, content_encoding)
    if handler is None or handler.buffered:
        return stream

    def observed(chunk: bytes) -> bytes:
        if chunk:
            handler.feed(chunk)
        else:
            handler.close()
        return stream(chunk)

    return observed


def observe(pipeline: Pipeline, call: Call, status: int, content_type: str, decoded: bytes) -> None:
    """Record ``isError`` from a whole, already decoded answer (forward mode, buffered)."""
    handler = reply_handler(pipeline, call, status, content_type, None)
    if handler is not None and not handler.buffered:
        handler.observe(decoded)


# -- exchanges the gateway makes itself ------------------------------------------------------
Sender = Callable[[Call], Awaitable[Reply]]

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})
_REPLY_DROP = _HOP_BY_HOP | {"content-length"}


async def read_reply(resp: aiohttp.ClientResponse, limit: int = MAX_REPLY_BYTES) -> Reply:
    """A whole upstream answer, at most ``limit`` bytes (raw: codings intact)."""
    body = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise UpstreamError(f"the upstream's answer is larger than {limit} bytes",
                                    code="upstream_too_large")
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        raise UpstreamError(f"upstream failed while answering: {type(exc).__name__}",
                            code="upstream_broken") from None
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in _REPLY_DROP}
    return Reply(resp.status, headers, bytes(body))


def route_sender(upstream: Callable[[Call], Awaitable[aiohttp.ClientResponse]]) -> Sender:
    """Send through the route front end's upstream (route credential injected there)."""
    async def send(call: Call) -> Reply:
        resp = await upstream(call)
        try:
            return await read_reply(resp)
        finally:
            resp.release()
    return send


class DirectSender:
    """Forward mode: the gateway's own request to the upstream a flow was going to."""

    _DROP = _HOP_BY_HOP | {"host", "content-length"}

    def __init__(self, cfg: Config, credential: str | None) -> None:
        self.credential = credential
        if not cfg.proxy.verify_upstream_tls:
            self.ssl: ssl.SSLContext | bool = False
        else:
            ctx = ssl.create_default_context()
            if cfg.proxy.upstream_ca_file:
                ctx.load_verify_locations(cafile=str(cfg.proxy.upstream_ca_file))
            self.ssl = ctx
        self.timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=cfg.proxy.connection_idle_seconds)

    def _headers(self, call: Call) -> list[tuple[str, str]]:
        out = []
        for name, value in call.request.headers:
            lname = name.lower()
            if lname in self._DROP or (lname == "authorization" and value == self.credential):
                continue  # never forward the agent's own JWT
            out.append((name, value))
        return out

    async def __call__(self, call: Call) -> Reply:
        req = call.request
        host = call.canonical_host
        url = yarl.URL.build(scheme=req.scheme, host=host, port=req.port, path=call.canonical_path,
                             query_string=req.query, encoded=True)
        try:
            async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=("User-Agent", "Accept-Encoding")) as session:
                async with session.request(req.method, url, headers=self._headers(call), data=req.body or None,
                                           ssl=self.ssl, timeout=self.timeout, allow_redirects=False) as resp:
                    return await read_reply(resp)
        except TimeoutError:
            raise UpstreamError(f"upstream {host} timed out", code="upstream_timeout", status=504) from None
        except aiohttp.ClientSSLError as exc:
            raise UpstreamError(f"TLS to upstream {host} failed: {exc}", code="upstream_tls_error") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"upstream {host} unreachable: {type(exc).__name__}",
                                code="upstream_unreachable") from None


def takes_over(call: Call) -> bool:
    """Forward mode: the gateway makes this exchange itself (a listing it must read whole)."""
    msg = call.rpc
    return msg is not None and msg.answerable and msg.method in LISTINGS and call.request.mode == "forward"


async def exchange_direct(pipeline: Pipeline, call: Call, credential: str | None) -> Reply:
    """Forward an admitted listing, filter it, and answer it as application/json.

    Finishes the call only on failure; the front end finishes it once the answer is sent."""
    try:
        reply = await DirectSender(pipeline.cfg, credential)(call)
    except GatewayError as err:
        pipeline.fail(call, err)
        return http_error(err, call.call_id)
    return await _json_answer(pipeline, call, reply) or reply


async def _json_answer(pipeline: Pipeline, call: Call, reply: Reply) -> Reply | None:
    """The JSON-RPC answer in ``reply``, processed, as application/json; None if there is none."""
    msg = call.rpc
    assert msg is not None
    ctype, encoding = _header(reply.headers, "content-type"), _header(reply.headers, "content-encoding")
    try:
        encs = parse_encodings(encoding)
        decoded, _ = decode_codings(reply.body, encs, MAX_REPLY_BYTES) if encs else (reply.body, [])
    except Exception:  # noqa: BLE001 - unknown or broken coding: nothing readable
        decoded = b""
    handler = reply_handler(pipeline, call, reply.status, ctype, encoding)
    if handler is not None:
        decoded = await handler.process(decoded)
    message = response_message(decoded, ctype, msg.id)
    if message is None:
        return None
    headers = {k: v for k, v in reply.headers.items() if k.lower() not in ("content-type", "content-encoding")}
    headers["Content-Type"] = "application/json"
    return Reply(reply.status, headers, _dumps(message))


def _header(headers: dict[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return ""


# -- batches ---------------------------------------------------------------------------------
def _element_call(call: Call, item: Any) -> Call:
    # Each element goes upstream as plain JSON: the batch's length and coding are not its own.
    headers = [(k, v) for k, v in call.request.headers
               if k.lower() not in ("accept", "content-length", "content-encoding")]
    headers.append(("Accept", JSON_AND_SSE))
    request = dataclasses.replace(call.request, body=_dumps(item), headers=headers)
    sub = Call(request=request)
    sub.trace_id = call.trace_id
    sub.rpc = RpcMessage(None, batch=True)  # classify() keeps the batch mark
    return sub


async def run_batch(pipeline: Pipeline, call: Call, items: list[Any], *, credential: str | None,
                    send: Sender, identity: Any = None) -> Reply:
    """Answer a JSON-RPC batch element by element (see the module docstring). Never raises."""
    from gateway.pipeline import trace_id_for

    call.trace_id = trace_id_for(call.request)
    call.request_bytes = len(call.request.body)
    call.tool_kind = "mcp"
    try:
        identity = await pipeline.authenticate(call.request.mode, credential, identity)
    except GatewayError as err:
        call.reasons.append(f"JSON-RPC batch of {len(items)} refused as a whole")
        pipeline.fail(call, err)
        return http_error(err, call.call_id)
    answers: list[dict[str, Any]] = []
    call_ids: list[str] = []
    session: str | None = None
    for item in items:
        sub = _element_call(call, item)
        call_ids.append(sub.call_id)
        answer, reply = await _run_element(pipeline, sub, item, credential, identity, send)
        if answer is not None:
            answers.append(answer)
        if reply is not None and session is None:
            session = _header(reply.headers, "mcp-session-id") or None
    headers = {CALL_ID_HEADER: ", ".join(call_ids), "Content-Type": "application/json"}
    if session:
        headers["Mcp-Session-Id"] = session
    if not answers:
        return Reply(202, headers, b"")
    return Reply(200, headers, _dumps(answers))


async def _run_element(pipeline: Pipeline, sub: Call, item: Any, credential: str | None, identity: Any,
                       send: Sender) -> tuple[dict[str, Any] | None, Reply | None]:
    """(the element's answer or None, the upstream's reply or None)."""
    msg = as_message(item, batch=True)
    if msg is None:
        err = BadRequest("not a valid JSON-RPC 2.0 message", code="invalid_request")
        sub.tool_kind = "mcp"
        pipeline.fail(sub, err)
        rpc_id = item.get("id") if isinstance(item, dict) and _valid_id(item.get("id")) else None
        return error_message(rpc_id, error_object(sub, err, INVALID_REQUEST)), None
    try:
        await pipeline.admit(sub, credential=credential, identity=identity)
        sub.upstream_started = time.perf_counter()
        reply = await send(sub)
    except GatewayError as err:
        pipeline.fail(sub, err)
        return (error_message(msg.id, error_object(sub, err)) if msg.answerable else None), None
    except Exception:  # noqa: BLE001 - never let a bug leave an element unaudited
        log.exception("internal error on batch element %s", sub.call_id)
        err = GatewayError("internal gateway error")
        pipeline.fail(sub, err)
        return (error_message(msg.id, error_object(sub, err, INTERNAL_ERROR)) if msg.answerable else None), None
    if not msg.answerable:
        pipeline.finish(sub, status=reply.status, response_bytes=len(reply.body))
        return None, reply
    answer = await _json_answer(pipeline, sub, reply)
    if answer is None:
        err = UpstreamError(f"the upstream answered HTTP {reply.status} without a JSON-RPC response",
                            code="upstream_no_answer")
        pipeline.fail(sub, err)
        return error_message(msg.id, error_object(sub, err, UNREADABLE_ANSWER)), reply
    try:  # the decision's response redaction applies to each element's answer
        body = await pipeline.redact(sub, answer.body, content_type="application/json", content_encoding=None)
    except GatewayError as err:
        pipeline.fail(sub, err)
        return error_message(msg.id, error_object(sub, err)), reply
    pipeline.finish(sub, status=reply.status, response_bytes=len(body))
    return json.loads(body), reply
