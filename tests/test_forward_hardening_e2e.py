"""Forward proxy, byte by byte: what a hostile or sloppy client sends must neither bypass
identity, policy and redaction nor go unaudited (found by review; each test failed before its fix)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import UPSTREAM, Gateway, Keys, Upstream, _echo, start_upstream
from tests.raw_http import basic, in_tunnel, proxy_addr, read_response_head_only, through_proxy

CALL_ID = "x-agentgate-call-id"
BIG = 2 << 20  # 2 MiB: above the embedded mitmproxy's stream_large_bodies="1m"


@pytest.fixture(scope="module")
def gw(gateway_factory, tls_upstream: Upstream) -> Gateway:
    return gateway_factory({"proxy": {"upstream_ca_file": str(tls_upstream.ca_file)}}, name="forward-hardening")


def _big_echo(tmp_path_factory, name: str, tls=None):
    """The repo's recording echo upstream, accepting bodies up to 64 MiB (aiohttp's default is 1 MiB)."""
    up = Upstream(tls=tls)
    app = web.Application(client_max_size=64 << 20)
    app[UPSTREAM] = up
    app.router.add_route("*", "/{tail:.*}", _echo)
    return up, start_upstream(up, tmp_path_factory.mktemp(name), app)


@pytest.fixture(scope="module")
def big_upstream(tmp_path_factory) -> Upstream:
    up, stop = _big_echo(tmp_path_factory, "bigup")
    yield up
    stop()


@pytest.fixture(scope="module")
def big_tls_upstream(tmp_path_factory, tls_upstream: Upstream) -> Upstream:
    """Over TLS, with a certificate from tls_upstream's CA (which the gateway trusts)."""
    up, stop = _big_echo(tmp_path_factory, "bigtlsup", tls=tls_upstream.tls)
    yield up
    stop()


def _seen_paths(up: Upstream) -> list[str]:
    return [s.path for s in up.seen]


# 1. Request bodies above 1 MiB are streamed upstream by mitmproxy before the `request` hook runs.
def test_large_body_without_any_token_never_reaches_upstream(gw: Gateway, big_upstream: Upstream) -> None:
    upstream = big_upstream
    marker = "/bigbody-notoken"
    body = b"x" * BIG
    status, headers, resp = through_proxy(gw, f"POST http://127.0.0.1:{upstream.port}{marker} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
              f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    # no token at all: must be 407 and the upstream must never see the request
    assert marker not in _seen_paths(upstream), f"unauthenticated request reached upstream (status {status})"
    assert status == 407, (status, resp[:200])


def test_large_body_policy_denied_in_tunnel_never_reaches_upstream(gw: Gateway, keys: Keys,
                                                                   big_tls_upstream: Upstream) -> None:
    tls_upstream = big_tls_upstream
    marker = "/admin/bigbody-denied"
    token = keys.token("reader-bot", roles=["reader"])  # POST and /admin are both denied for a reader
    body = json.dumps({"action": "drop_tables", "pad": "x" * BIG}).encode()
    status, headers, resp = in_tunnel(gw, f"127.0.0.1:{tls_upstream.port}", token,
                                      f"POST {marker} HTTP/1.1\r\nHost: 127.0.0.1:{tls_upstream.port}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    assert marker not in _seen_paths(tls_upstream), f"policy-denied request reached upstream (status {status})"
    assert status == 403


# 2. Absolute-form request target inside a TLS tunnel is sent upstream unchanged (authority kept).
def test_absolute_form_inside_tunnel_is_sent_origin_form(gw: Gateway, keys: Keys, tls_upstream: Upstream) -> None:
    token = keys.token("abs-bot", roles=["reader"])
    status, headers, resp = in_tunnel(gw, f"127.0.0.1:{tls_upstream.port}", token,
                                      f"GET http://evil.example/absform HTTP/1.1\r\nHost: 127.0.0.1:{tls_upstream.port}\r\n\r\n".encode())
    assert status == 200, (status, resp[:300])
    row = gw.audit_row(headers[CALL_ID])
    assert (row["host"], row["path"]) == ("127.0.0.1", "/absform")   # what policy judged
    got = json.loads(resp)["path"]  # the request target the upstream actually received
    assert got == "/absform", f"upstream received request target {got!r}, policy judged host 127.0.0.1"


# 3. The agent's own JWT in Authorization is forwarded unless it equals this request's Proxy-Authorization.
def test_agent_jwt_in_authorization_not_forwarded_inside_tunnel(gw: Gateway, keys: Keys,
                                                                tls_upstream: Upstream) -> None:
    token = keys.token("leaky-bot", roles=["reader"])
    status, headers, resp = in_tunnel(gw, f"127.0.0.1:{tls_upstream.port}", token,
                                      f"GET /leak1 HTTP/1.1\r\nHost: 127.0.0.1:{tls_upstream.port}\r\n"
              f"Authorization: Bearer {token}\r\n\r\n".encode())
    assert status == 200
    assert token not in resp.decode(), "the agent's JWT reached the upstream in Authorization"


def test_agent_jwt_basic_proxy_auth_bearer_authorization_plain_http(gw: Gateway, keys: Keys,
                                                                   upstream: Upstream) -> None:
    token = keys.token("leaky-bot2", roles=["reader"])
    status, headers, resp = through_proxy(gw, f"GET http://127.0.0.1:{upstream.port}/leak2 HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
              f"Proxy-Authorization: {basic(token)}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    assert status == 200
    assert token not in resp.decode(), "the agent's JWT reached the upstream in Authorization"


# 4. A response the decision says must be redacted, larger than 1 MiB (mitmproxy's stream_large_bodies)
#    but well under redaction.max_inspect_bytes (8 MiB), is streamed to the agent unredacted.
EMAIL = "ada.lovelace@example.com"


@pytest.fixture(scope="module")
def pii_big_upstream(tmp_path_factory) -> Upstream:
    async def pii(request: web.Request) -> web.StreamResponse:
        doc = json.dumps({"email": EMAIL, "pad": "x" * (int(request.query.get("kib", "1536")) << 10)}).encode()
        if request.query.get("chunked"):
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(doc), 256 << 10):
                await resp.write(doc[i:i + (256 << 10)])
            await resp.write_eof()
            return resp
        return web.Response(body=doc, content_type="application/json")
    up = Upstream()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", pii)
    stop = start_upstream(up, tmp_path_factory.mktemp("piibig"), app)
    yield up
    stop()


@pytest.mark.parametrize("chunked", ["", "1"])
def test_large_redacted_response_is_redacted_or_refused(gw: Gateway, keys: Keys, pii_big_upstream: Upstream,
                                                        chunked: str) -> None:
    token = keys.token("pii-bot", roles=["reader"])
    status, headers, resp = through_proxy(gw, f"GET http://127.0.0.1:{pii_big_upstream.port}/pii/big?chunked={chunked} HTTP/1.1\r\n"
              f"Host: 127.0.0.1:{pii_big_upstream.port}\r\nProxy-Authorization: Bearer {token}\r\n\r\n".encode())
    row = gw.audit_row(headers[CALL_ID]) if CALL_ID in headers else None
    assert EMAIL.encode() not in resp, (f"unredacted PII reached the agent: status {status}, "
                                        f"audit {row and (row['outcome'], row['redaction_counts'])}")


# 5. Inside a CONNECT tunnel, bytes that do not look like HTTP make mitmproxy (rawtcp=True by default)
#    relay the tunnel as raw TCP: no policy, no audit, any host:port the CONNECT named.
def test_tunnel_never_becomes_raw_tcp_relay(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    token = keys.token("raw-bot", roles=["reader"])  # a reader: DELETE and /admin are both denied
    s = socket.create_connection(proxy_addr(gw), timeout=20)
    s.sendall(f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
              f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode())
    assert read_response_head_only(s)[0] == 200
    # RFC 9112 §2.2: a server SHOULD ignore empty lines before the request line; mitmproxy's
    # next_layer sees "\r\nD" (not alphabetic) and picks a raw TCP layer.
    s.sendall(f"\r\nDELETE /admin/raw-tcp HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
              f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
    s.shutdown(socket.SHUT_WR)  # all sent: a raw relay answers with the upstream's reply, then closes
    s.settimeout(20)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    s.close()
    assert "/admin/raw-tcp" not in _seen_paths(upstream), \
        f"a policy-denied DELETE reached the upstream through a raw TCP tunnel: {answer[:200]!r}"


# 6. The request body is content-decoded (mitmproxy get_content, no size limit) before anything else,
#    authentication included: a small compressed body from anyone inflates in the gateway's memory.
def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_unauthenticated_compressed_body_is_not_inflated_without_limit(gw: Gateway, upstream: Upstream) -> None:
    import gzip
    inflated = 150 << 20  # 150 MiB of zeros
    body = gzip.compress(b"\0" * inflated, compresslevel=9)  # ~150 KB on the wire
    before = _hwm_kib(gw.proc.pid)
    status, headers, resp = through_proxy(gw, f"POST http://127.0.0.1:{upstream.port}/bomb HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
              f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    grew = (_hwm_kib(gw.proc.pid) - before) >> 10
    assert status == 407
    assert grew < 50, f"a {len(body)} byte unauthenticated request grew the gateway's peak RSS by {grew} MiB"


# 7. Policy judges the body after mitmproxy decoded it with whatever Python codec Content-Encoding
#    names (quopri, base64, hex, ...), but the upstream receives the raw bytes.
@pytest.mark.parametrize("coding", [None, "quopri"])
def test_policy_judges_the_body_the_upstream_receives(gw: Gateway, keys: Keys, upstream: Upstream,
                                                      coding: str | None) -> None:
    token = keys.token("writer-bot", roles=["writer"])
    raw = b'{"action":"drop_tables","act=69on":"noop"}'  # JSON: action = drop_tables (denied by the bundle)
    enc = f"Content-Encoding: {coding}\r\n" if coding else ""
    status, headers, resp = through_proxy(gw, f"POST http://127.0.0.1:{upstream.port}/jobs-{coding} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
              f"Proxy-Authorization: Bearer {token}\r\nContent-Type: application/json\r\n{enc}"
              f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    got = [json.loads(x.body) for x in upstream.seen if x.path == f"/jobs-{coding}"]
    assert status == 403 and not got, f"status {status}; upstream parsed {got}"


# 8. Inside a tunnel the Host check parses mitmproxy's comma-joined value of *all* Host headers.
@pytest.fixture(scope="module")
def hosts_upstream(tmp_path_factory, tls_upstream: Upstream) -> Upstream:
    async def hosts(request: web.Request) -> web.Response:
        return web.json_response({"hosts": request.headers.getall("Host", [])})
    up = Upstream(tls=tls_upstream.tls)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hosts)
    stop = start_upstream(up, tmp_path_factory.mktemp("hostsup"), app)
    yield up
    stop()


def test_second_host_header_inside_tunnel_is_refused(gw: Gateway, keys: Keys, hosts_upstream: Upstream) -> None:
    token = keys.token("dup-host-bot", roles=["reader"])
    status, headers, resp = in_tunnel(gw, f"127.0.0.1:{hosts_upstream.port}", token,
                                      f"GET /dup HTTP/1.1\r\nHost: 127.0.0.1:{hosts_upstream.port}\r\nHost: evil.example\r\n\r\n".encode())
    assert status == 400 and resp.startswith(b"{") and json.loads(resp)["error"]["code"] == "host_mismatch", \
        f"status {status}, call id {headers.get(CALL_ID)}: {resp[:200]!r}"


# 8b. Spellings an upstream reads differently from policy (';' path parameters and query
#     separators, Unicode that NFKC-normalises to a dot-segment or separator): a JSON 400, audited,
#     never forwarded; in plain HTTP and inside a tunnel alike.
AMBIGUOUS = [
    ("/admin;x=1/users", "ambiguous_path"),
    ("/files/a%3Bx=1/b", "ambiguous_path"),
    ("/files/%EF%BC%8E%EF%BC%8E/admin", "ambiguous_path"),
    ("/files/a%EF%BC%8Fb", "ambiguous_path"),
    ("/tickets?status=open;admin=1", "ambiguous_query"),
]


def _assert_refused_and_audited(gw: Gateway, up: Upstream, seen_before: int, code: str,
                                status: int, headers: dict[str, str], resp: bytes) -> None:
    assert status == 400 and resp.startswith(b"{"), (status, resp[:200])
    err = json.loads(resp)["error"]
    assert err["code"] == code and err["call_id"] == headers[CALL_ID], err
    assert len(up.seen) == seen_before, "a refused request reached the upstream"
    row = gw.audit_row(err["call_id"])
    assert (row["mode"], row["status"], row["outcome"], row["error_code"]) == ("forward", 400, "rejected", code)


@pytest.mark.parametrize(("target", "code"), AMBIGUOUS)
def test_ambiguous_spellings_are_refused_plain_http(gw: Gateway, keys: Keys, upstream: Upstream,
                                                    target: str, code: str) -> None:
    token, before = keys.token("spelling-bot", roles=["reader"]), len(upstream.seen)
    status, headers, resp = through_proxy(gw, f"GET http://127.0.0.1:{upstream.port}{target} HTTP/1.1\r\n"
                                              f"Host: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: Bearer {token}\r\n\r\n".encode())
    _assert_refused_and_audited(gw, upstream, before, code, status, headers, resp)


@pytest.mark.parametrize(("target", "code"), AMBIGUOUS)
def test_ambiguous_spellings_are_refused_in_tunnel(gw: Gateway, keys: Keys, tls_upstream: Upstream,
                                                   target: str, code: str) -> None:
    token, before = keys.token("spelling-bot", roles=["reader"]), len(tls_upstream.seen)
    status, headers, resp = in_tunnel(gw, f"127.0.0.1:{tls_upstream.port}", token,
                                      f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{tls_upstream.port}\r\n\r\n".encode())
    _assert_refused_and_audited(gw, tls_upstream, before, code, status, headers, resp)


# 9. A response that must be redacted but is too large to redact: the agent should get the
#    promised JSON error (502 response_not_redactable), not a dropped connection.
def test_too_large_to_redact_gets_json_error(gw: Gateway, keys: Keys, pii_big_upstream: Upstream) -> None:
    token = keys.token("pii-bot", roles=["reader"])
    status, headers, resp = through_proxy(gw, f"GET http://127.0.0.1:{pii_big_upstream.port}/pii/huge?kib=9216 HTTP/1.1\r\n"
              f"Host: 127.0.0.1:{pii_big_upstream.port}\r\nProxy-Authorization: Bearer {token}\r\n\r\n".encode())
    assert status == 502 and json.loads(resp)["error"]["code"] == "response_not_redactable", (status, resp[:200])
    assert gw.audit_row(headers[CALL_ID])["outcome"] == "redaction_failed"


# 10. Content-Encoding: rot13 makes mitmproxy's get_content(strict=False) raise TypeError (it only
#     swallows ValueError) in _gateway_request, which runs outside the request hook's try: mitmproxy
#     logs the addon error and forwards the flow — no identity, no policy, no audit.
def test_exception_in_request_hook_fails_closed(gw: Gateway, upstream: Upstream) -> None:
    marker = "/admin/rot13-notoken"
    body = b'{"action":"drop_tables"}'
    try:
        status, headers, resp = through_proxy(gw, (
            f"DELETE http://127.0.0.1:{upstream.port}{marker} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
            f"Content-Type: application/json\r\nContent-Encoding: rot13\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body)
    except (IndexError, ConnectionError):  # the proxy closed the connection without an answer
        status, headers, resp = 0, {}, b""
    assert marker not in _seen_paths(upstream), \
        f"unauthenticated, policy-denied DELETE reached the upstream: status {status}, call id {headers.get(CALL_ID)}"
    # the promise for every refusal: a JSON error with a call id, and an audit row
    assert status == 407 and json.loads(resp)["error"]["call_id"] == headers[CALL_ID], (status, resp[:200])
    assert gw.audit_row(headers[CALL_ID])["outcome"] == "unauthenticated"


# 11. A body declared larger than the gateway takes: refused before any of it is read, audited.
def test_request_declared_too_large_is_refused_and_audited(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    token = keys.token("big-bot", roles=["writer"])
    status, _, _ = through_proxy(gw, f"POST http://127.0.0.1:{upstream.port}/too-large HTTP/1.1\r\n"
                                     f"Host: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: Bearer {token}\r\n"
                                     f"Content-Length: {100 << 20}\r\n\r\n".encode())
    assert status == 413 and "/too-large" not in _seen_paths(upstream)
    rows = gw.sql("SELECT agent_id, status, error_code, outcome FROM agentgate.calls WHERE path = '/too-large'")
    assert rows == [{"agent_id": "big-bot", "status": 413, "error_code": "request_too_large",
                     "outcome": "rejected"}]


# 12. Nothing to redact: a large download is relayed as it arrives, up to proxy.max_body_bytes.
@pytest.fixture(scope="module")
def gw_small(gateway_factory, tls_upstream: Upstream) -> Gateway:
    return gateway_factory({"proxy": {"upstream_ca_file": str(tls_upstream.ca_file), "max_body_bytes": 1 << 20}},
                           name="forward-small-bodies")


def test_large_download_passes_up_to_the_limit(gw: Gateway, gw_small: Gateway, keys: Keys,
                                               pii_big_upstream: Upstream) -> None:
    token = keys.token("dl-bot", roles=["reader"])
    request = (f"GET http://127.0.0.1:{pii_big_upstream.port}/download?kib=2048 HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{pii_big_upstream.port}\r\nProxy-Authorization: Bearer {token}\r\n\r\n").encode()
    status, headers, body = through_proxy(gw, request)
    assert status == 200 and len(body) > 2 << 20 and json.loads(body)["pad"] == "x" * (2048 << 10)
    assert gw.audit_row(headers[CALL_ID])["response_bytes"] == len(body)
    status, _, _ = through_proxy(gw_small, request)
    assert status == 502  # larger than this gateway's proxy.max_body_bytes


# 12. Raw UTF-8 in a request target inside a tunnel (mitmproxy accepts it there) was read as
#     latin-1: the upstream got mojibake ("日" as "æ\x97¥", re-encoded) and the Unicode checks of
#     canonical.py never saw the characters sent.
def test_raw_utf8_path_reaches_upstream_as_sent(gw: Gateway, keys: Keys, tls_upstream: Upstream) -> None:
    token, port = keys.token("utf8-bot", roles=["reader"]), tls_upstream.port
    status, headers, resp = in_tunnel(gw, f"127.0.0.1:{port}", token,
                                      f"GET /utf8/日本 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert status == 200, resp[:300]
    assert tls_upstream.seen[-1].path == "/utf8/%E6%97%A5%E6%9C%AC"


def test_raw_utf8_dot_segment_in_disguise_is_refused(gw: Gateway, keys: Keys, tls_upstream: Upstream) -> None:
    token, before, port = keys.token("utf8-bot", roles=["reader"]), len(tls_upstream.seen), tls_upstream.port
    status, headers, resp = in_tunnel(gw, f"127.0.0.1:{port}", token,
                                      f"GET /api/．．/admin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    _assert_refused_and_audited(gw, tls_upstream, before, "ambiguous_path", status, headers, resp)
