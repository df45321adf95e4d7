"""A route's injected credential does not come back to the agent, whatever the upstream echoes
(gateway/echo_guard.py): headers, whole bodies, streams, event streams, JSON-RPC batches; a
content-coded answer that cannot be checked is refused. Real gateway, real upstream."""

from __future__ import annotations

import asyncio
import gzip
import json
from http.client import HTTPConnection
from urllib.parse import quote

import pytest
from aiohttp import web

from gateway.echo_guard import REPLACEMENT
from tests.conftest import Gateway, Keys, Upstream, http, serving
from tests.raw_http import address

SECRET = "route/Secret+xyz=0123456789"  # "/" and "+": JSON-escaped and percent-encoded forms differ
HIDDEN = REPLACEMENT.decode()
RELEASE = web.AppKey("release", asyncio.Event)


def _key(request: web.Request) -> str:
    return request.headers.get("X-Api-Key", "")


async def _headers(request: web.Request) -> web.Response:
    """httpbin's /headers: the request's headers as JSON."""
    return web.json_response({"headers": dict(request.headers)})


async def _forms(request: web.Request) -> web.Response:
    """The key as PHP's json_encode writes it (escaped slashes), and in a redirect's query."""
    key = _key(request)
    return web.Response(text=json.dumps({"auth": key}).replace("/", "\\/"), content_type="application/json",
                        headers={"X-Debug-Auth": f"key={key}", "Location": f"/next?key={quote(key, safe='')}"})


async def _stream(request: web.Request) -> web.StreamResponse:
    """No length: relayed as a stream; the key split across two writes."""
    key = _key(request).encode()
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    await resp.write(b"x" * 70_000 + b" key=" + key[:5])
    await resp.write(key[5:] + b" end")
    await resp.write_eof()
    return resp


async def _sse(request: web.Request) -> web.StreamResponse:
    """An event carrying the key, then a second one only once the test has read the first."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(f"data: {_key(request)}\n\n".encode())
    await asyncio.wait_for(request.app[RELEASE].wait(), 30)
    await resp.write(b"data: second\n\n")
    await resp.write_eof()
    return resp


async def _release(request: web.Request) -> web.Response:
    request.app[RELEASE].set()
    return web.Response(text="ok")


async def _gzip(request: web.Request) -> web.Response:
    """Coded although the gateway asked for identity (some servers do)."""
    text = f"key={_key(request)}" if request.query.get("echo") else "nothing to see"
    return web.Response(body=gzip.compress(text.encode()),
                        headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})


async def _gzip_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
    await resp.prepare(request)
    await resp.write(gzip.compress(b"nothing to see"))
    await resp.write_eof()
    return resp


async def _rpc(request: web.Request) -> web.Response:
    """A JSON-RPC server that returns the request's key as a tool result."""
    msg = await request.json()
    out = {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": [{"type": "text", "text": _key(request)}]}}
    return web.json_response(out, headers={"X-Debug-Auth": _key(request)})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Upstream:
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        app[RELEASE] = asyncio.Event()

    app.on_startup.append(on_startup)
    app.router.add_get("/headers", _headers)
    app.router.add_get("/forms", _forms)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/sse", _sse)
    app.router.add_get("/release", _release)
    app.router.add_get("/gzip", _gzip)
    app.router.add_get("/gzip-stream", _gzip_stream)
    app.router.add_post("/rpc", _rpc)
    with serving(app, tmp_path_factory.mktemp("echo-up")) as up:
        yield up


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream, tmp_path_factory) -> Gateway:
    secret = tmp_path_factory.mktemp("cred") / "token"
    secret.write_text(SECRET)
    return gateway_factory({"routes": {
        "plain": {"upstream": upstream.url},
        "cred": {"upstream": upstream.url, "credential": {"header": "X-Api-Key", "file": str(secret)}},
    }}, name="credential-echo")


def auth(keys: Keys, role: str = "reader") -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.token('echo-bot', roles=[role])}"}


def test_echoed_request_headers_are_cut_out_and_audited(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("cred", "/headers"), headers={**auth(keys), "Accept-Encoding": "gzip"})
    assert resp.status == 200, resp.body
    seen = resp.json()["headers"]
    assert seen["X-Api-Key"] == HIDDEN
    assert seen["Accept-Encoding"] == "identity"  # asked uncoded, so that an echo can be cut
    row = gw.audit_row(resp.headers["x-agentgate-call-id"])
    assert row["outcome"] == "allowed" and row["redaction_counts"] == {"credential_echo": 1}
    assert SECRET not in json.dumps(row, default=str)


def test_escaped_and_percent_encoded_forms_in_body_and_headers(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("cred", "/forms"), headers=auth(keys))
    assert resp.status == 200
    assert json.loads(resp.body) == {"auth": HIDDEN}
    assert resp.headers["x-debug-auth"] == f"key={HIDDEN}"
    assert resp.headers["location"] == f"/next?key={HIDDEN}"


def test_streamed_body_with_the_key_split_across_writes(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("cred", "/stream"), headers=auth(keys))
    assert resp.status == 200
    assert resp.body == b"x" * 70_000 + b" key=" + REPLACEMENT + b" end"


def test_event_stream_is_cut_and_not_held_up(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    conn = HTTPConnection(*address(gw.routes), timeout=30)
    conn.request("GET", "/r/cred/sse", headers=auth(keys))
    resp = conn.getresponse()
    assert resp.status == 200
    # The first event arrives while the upstream still holds the second: nothing waits for more.
    assert resp.readline() == f"data: {HIDDEN}\n".encode()
    assert resp.readline() == b"\n"
    assert http("GET", f"{upstream.url}/release").status == 200
    assert resp.read() == b"data: second\n\n"
    conn.close()


def test_coded_answer_with_the_key_is_refused(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("cred", "/gzip?echo=1"), headers=auth(keys))
    assert resp.status == 502, resp.body
    assert resp.json()["error"]["code"] == "credential_echoed"
    assert SECRET.encode() not in resp.body
    row = gw.audit_row(resp.json()["error"]["call_id"])
    assert row["outcome"] == "redaction_failed"
    assert SECRET not in json.dumps(row, default=str)


def test_coded_answer_without_the_key_passes_as_sent(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("cred", "/gzip"), headers=auth(keys))
    assert resp.status == 200 and resp.headers["content-encoding"] == "gzip"
    assert gzip.decompress(resp.body) == b"nothing to see"


def test_coded_stream_is_refused_as_uncheckable(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("cred", "/gzip-stream"), headers=auth(keys))
    assert resp.status == 502, resp.body
    assert resp.json()["error"]["code"] == "response_not_checkable"


def test_json_rpc_batch_elements_are_cut(gw: Gateway, keys: Keys) -> None:
    batch = [{"jsonrpc": "2.0", "id": i, "method": "tools/call",
              "params": {"name": "whoami", "arguments": {}}} for i in (1, 2)]
    resp = http("POST", gw.route_url("cred", "/rpc"), body=json.dumps(batch).encode(),
                headers={**auth(keys, "writer"), "Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    answers = resp.json()
    assert [a["result"]["content"][0]["text"] for a in answers] == [HIDDEN, HIDDEN], answers
    assert SECRET.encode() not in resp.body


def test_routes_without_an_injected_credential_are_untouched(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("plain", "/forms"), headers={**auth(keys), "X-Api-Key": SECRET})
    assert resp.status == 200
    assert resp.headers["x-debug-auth"] == f"key={SECRET}"  # the agent's own value: nothing to hide
