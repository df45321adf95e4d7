"""Route mode against a hostile or sloppy upstream and agent: redaction cannot be sidestepped
(byte ranges, content negotiation, stacked encodings, SSE fields) and hop-by-hop or session
headers do not cross (found by review; each test failed before its fix)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from http.client import HTTPConnection

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import Gateway, Keys, Upstream, http, serving
from tests.raw_http import address

CALL_ID = "x-agentgate-call-id"
EMAIL = "ada.lovelace@example.com"
SECRET = "hunter2-topsecret"
DOC = {"customer": {"name": "Ada", "ssn": "123-45-6789"}, "secret_field": SECRET}
SEEN: list[dict] = []


async def _hex(request: web.Request) -> web.Response:
    ct = request.query.get("ct", "text/plain; charset=hex")
    return web.Response(body=f"write to {EMAIL}".encode(), headers={"Content-Type": ct})


async def _double(request: web.Request) -> web.Response:
    body = gzip.compress(gzip.compress(f"write to {EMAIL}".encode()))
    h = CIMultiDict([("Content-Type", "text/plain"), ("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")])
    return web.Response(body=body, headers=h)


async def _identity_then_gzip(request: web.Request) -> web.Response:
    body = gzip.compress(f"write to {EMAIL}".encode())
    h = CIMultiDict([("Content-Type", "text/plain"), ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")])
    return web.Response(body=body, headers=h)


async def _hop(request: web.Request) -> web.Response:
    SEEN.append({k.lower(): v for k, v in request.headers.items()})
    return web.json_response({"headers": {k.lower(): v for k, v in request.headers.items()}},
                             headers={"Connection": "X-Internal-Token", "X-Internal-Token": "upstream-internal-123",
                                      "Set-Cookie": "session=upstream-session-abc; HttpOnly"})


async def _negotiate(request: web.Request) -> web.Response:
    """Content negotiation, as Rails/DRF/Spring APIs do: JSON by default, XML or CSV on request."""
    accept = request.headers.get("Accept", "")
    if "xml" in accept:
        xml = ("<doc><customer><name>Ada</name><ssn>123-45-6789</ssn></customer>"
               f"<secret_field>{SECRET}</secret_field></doc>")
        return web.Response(text=xml, content_type="application/xml")
    if "csv" in accept:
        return web.Response(text=f"name,secret_field\nAda,{SECRET}\n", content_type="text/csv")
    return web.json_response(DOC)


async def _sse_fields(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(f"id: {EMAIL}\nevent: {EMAIL}\n: {EMAIL}\ndata: hello\n\n".encode())
    await resp.write_eof()
    return resp


async def _endless(request: web.Request) -> web.StreamResponse:
    """Events until the reader is gone (at most 500, 10 ms apart): the gateway is bound to write
    to an agent that has hung up."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i in range(500):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)  # the upstream's pace, not the test's timing
    except ConnectionError:
        pass
    return resp


@pytest.fixture(scope="module")
def custom_upstream(tmp_path_factory) -> Upstream:
    d = tmp_path_factory.mktemp("files")
    (d / "data.json").write_text(json.dumps(DOC))
    app = web.Application()
    app.router.add_get("/pii/hex", _hex)
    app.router.add_get("/pii/double", _double)
    app.router.add_get("/pii/idgz", _identity_then_gzip)
    app.router.add_get("/hop", _hop)
    app.router.add_get("/pii/negotiate", _negotiate)
    app.router.add_get("/pii/sse", _sse_fields)
    app.router.add_get("/endless", _endless)
    app.router.add_static("/pii/files", d)  # a static file server: honours Range like any other
    with serving(app, tmp_path_factory.mktemp("cu")) as up:
        yield up


@pytest.fixture(scope="module")
def gw(gateway_factory, custom_upstream: Upstream, tmp_path_factory) -> Gateway:
    secret = tmp_path_factory.mktemp("cred") / "token"
    secret.write_text("route-secret-xyz")
    return gateway_factory({"routes": {
        "c": {"upstream": custom_upstream.url},
        "cred": {"upstream": custom_upstream.url, "credential": {"header": "X-Api-Key", "file": str(secret)}},
    }}, name="route-hardening")


def auth(keys: Keys) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.token('reader-bot', roles=['reader'])}"}


# 1. # An upstream charset that names a bytes-to-bytes codec crashes the redaction stage.
@pytest.mark.parametrize("ct", ["text/plain%3B%20charset=hex", "application/json%3B%20charset=rot13"])
def test_unusual_charset_gets_json_refusal_and_audit_row(gw: Gateway, keys: Keys, ct: str) -> None:
    resp = http("GET", gw.route_url("c", f"/pii/hex?ct={ct}"), headers=auth(keys))
    assert EMAIL.encode() not in resp.body
    assert resp.status == 502, (resp.status, resp.headers, resp.body)
    assert resp.headers["content-type"].startswith("application/json"), resp.body
    row = gw.audit_row(resp.json()["error"]["call_id"])
    assert row["outcome"] == "redaction_failed"


# 2. Field redaction bypassed with a Range request: the 206 slice is itself valid JSON.
def test_range_request_cannot_bypass_field_redaction(gw: Gateway, keys: Keys) -> None:
    full = http("GET", gw.route_url("c", "/pii/files/data.json"), headers=auth(keys))
    assert full.status == 200 and SECRET.encode() not in full.body  # redacted when fetched whole
    raw = json.dumps(DOC).encode()
    start = raw.index(b'"' + SECRET.encode())
    end = start + len(SECRET) + 1
    part = http("GET", gw.route_url("c", "/pii/files/data.json"),
                headers={**auth(keys), "Range": f"bytes={start}-{end}"})
    assert SECRET.encode() not in part.body, (part.status, part.headers, part.body)


# 3. Duplicate Content-Encoding headers: only the first is decoded before the detectors run;
# urllib3/requests (and httpx) apply every Content-Encoding header, so the agent reads plaintext.
def test_duplicate_content_encoding_cannot_hide_pii(gw: Gateway, keys: Keys) -> None:
    import urllib3
    r = urllib3.PoolManager().request("GET", gw.route_url("c", "/pii/double"), headers=auth(keys))
    assert EMAIL.encode() not in r.data, (r.status, dict(r.headers), r.data)


# 4. Headers nominated by Connection are hop-by-hop (RFC 9110 7.6.1) in both directions.
def test_connection_nominated_headers_are_dropped(gw: Gateway, keys: Keys) -> None:
    SEEN.clear()
    conn = HTTPConnection(*address(gw.routes), timeout=30)  # sends Connection as given (urllib replaces it)
    conn.request("GET", "/r/c/hop", headers={**auth(keys), "Connection": "keep-alive, X-Hop-Secret",
                                              "X-Hop-Secret": "agent-hop"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    leaks = {"request": SEEN[-1].get("x-hop-secret"), "response": resp.getheader("x-internal-token")}
    assert leaks == {"request": None, "response": None}, leaks


# 5. On a route whose credential the gateway injects, a session the upstream opens on its
#    strength is that credential: the agent neither receives the cookie nor sends its own.
def test_upstream_session_cookies_do_not_cross_a_credential_route(gw: Gateway, keys: Keys) -> None:
    SEEN.clear()
    resp = http("GET", gw.route_url("cred", "/hop"), headers={**auth(keys), "Cookie": "session=agent-made"})
    assert resp.status == 200
    assert "set-cookie" not in resp.headers and "cookie" not in SEEN[-1], (resp.headers, SEEN[-1])
    assert SEEN[-1]["x-api-key"] == "route-secret-xyz"
    plain = http("GET", gw.route_url("c", "/hop"), headers=auth(keys))  # no injected credential: as sent
    assert plain.headers.get("set-cookie", "").startswith("session=upstream-session-abc")


# 6. Field-path redaction silently skipped for non-JSON textual bodies the agent can ask for.
@pytest.mark.parametrize("accept", ["application/xml", "text/csv"])
def test_content_negotiation_cannot_skip_field_redaction(gw: Gateway, keys: Keys, accept: str) -> None:
    default = http("GET", gw.route_url("c", "/pii/negotiate"), headers=auth(keys))
    assert default.status == 200 and SECRET.encode() not in default.body  # JSON: redacted
    resp = http("GET", gw.route_url("c", "/pii/negotiate"), headers={**auth(keys), "Accept": accept})
    assert SECRET.encode() not in resp.body, (resp.status, resp.headers, resp.body)


# 7. SSE: only data lines are scanned; id/event/comment lines reach the agent unredacted.
def test_sse_non_data_fields_are_redacted(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("c", "/pii/sse"), headers=auth(keys))
    assert resp.status == 200
    assert EMAIL.encode() not in resp.body, resp.body


# 8. An agent that hangs up mid-stream is recorded as such, not as a broken upstream.
def test_agent_hanging_up_mid_stream_is_audited_as_such(gw: Gateway, keys: Keys) -> None:
    conn = HTTPConnection(*address(gw.routes), timeout=30)
    conn.request("GET", "/r/c/endless", headers=auth(keys))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline() == b"data: 0\n"
    call_id = resp.getheader(CALL_ID)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    row = gw.audit_row(call_id)
    assert (row["outcome"], row["error_code"], row["status"]) == ("client_closed", "client_closed", 200)


# 9. A method-override header would have the upstream act on another method than policy judged
#    (a POST allowed, acted on as a DELETE by frameworks that honour the header).
@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"])
def test_method_override_headers_are_refused(gw: Gateway, keys: Keys, header: str) -> None:
    SEEN.clear()
    resp = http("GET", gw.route_url("c", "/hop"), headers={**auth(keys), header: "DELETE"})
    assert resp.status == 400 and resp.json()["error"]["code"] == "method_override" and SEEN == []
    assert gw.audit_row(resp.headers[CALL_ID])["outcome"] == "rejected"
    same = http("GET", gw.route_url("c", "/hop"), headers={**auth(keys), header: "get"})  # says what it is
    assert same.status == 200
