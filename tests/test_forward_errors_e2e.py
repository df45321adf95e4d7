"""The answers mitmproxy writes itself in forward mode (a request it cannot parse, a body over the
limit, an upstream it cannot reach) are the gateway's JSON errors, disclose no mitmproxy version,
and — when mitmproxy had a flow for them — are audited, once. Real gateway, real mitmproxy, real
loopback sockets (each test failed before addons/protocol_errors.py and the addon's error hook)."""
from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from mitmproxy.proxy.layers.http import _http1

from addons import protocol_errors
from tests.conftest import Gateway, Keys, Upstream, wait_until
from tests.raw_http import exchange, proxy_addr, read_response, split_response, tunnel

CALL_ID = "x-agentgate-call-id"
LIMIT = 1 << 20  # the smallest proxy.max_body_bytes the configuration takes


@pytest.fixture(scope="module")
def gw(gateway_factory) -> Gateway:
    return gateway_factory({"proxy": {"max_body_bytes": LIMIT}}, name="forward-errors")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: a connection to it is refused, and nothing else
    can take the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _json_error(status: int, headers: dict[str, str], body: bytes, expected: tuple[int, str]) -> dict[str, Any]:
    assert (status, headers.get("content-type")) == (expected[0], "application/json"), (status, headers, body[:300])
    assert int(headers["content-length"]) == len(body) and "server" not in headers, headers
    err = json.loads(body)["error"]
    assert err["code"] == expected[1] and err["message"] and "<" not in err["message"], err
    assert "mitmproxy" not in err["message"].lower(), err
    assert err["call_id"] and headers[CALL_ID] == err["call_id"], (headers, err)  # the audit row's
    return err


def _rows(gw: Gateway, path: str, keys: Keys, upstream: Upstream) -> list[dict[str, Any]]:
    """The audit rows of ``path``, read once every row submitted before now is readable: the
    audit is written in order, so the row of a call made after them is the barrier."""
    token = keys.token("barrier-bot", roles=["reader"])
    with socket.create_connection(proxy_addr(gw), timeout=20) as sock:
        sock.sendall(f"GET http://127.0.0.1:{upstream.port}/barrier HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                     f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode())
        status, headers, _ = read_response(sock)
    assert status == 200
    gw.audit_row(headers[CALL_ID])
    return gw.sql("SELECT agent_id, status, error_code, outcome, call_id FROM agentgate.calls FINAL "
                  f"WHERE path = '{path}'")


def _poll_rows(gw: Gateway, path: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    query = (f"SELECT agent_id, status, error_code, outcome, host, call_id FROM agentgate.calls FINAL "
             f"WHERE path = '{path}'")
    wait_until(lambda: bool(found.extend(gw.sql(query)) or found), timeout=15, what=f"the audit row of {path}")
    return found


# (a) A request head mitmproxy cannot parse: answered before any flow exists. Audited through the
#     watched read_headers (before, only a log line recorded it, quoting the head).
MARK = "S3CRET-9e107d9d"


@pytest.mark.parametrize("head", [b"HELLO THERE NOT HTTP " + MARK.encode() + b"\r\n\r\n",
                                  f"GET http://example.test/?token={MARK} HTTP/1.1 junk\r\n\r\n".encode(),
                                  f"GET http://example.test/ HTTP/1.1\r\nProxy-Authorization Bearer {MARK}\r\n\r\n"
                                  .encode()], ids=["not-http", "request-line", "header-line"])
def test_an_unparsable_request_head_gets_json_400_and_an_audit_row(gw: Gateway, head: bytes) -> None:
    raw = exchange(proxy_addr(gw), head)
    assert b"mitmproxy" not in raw.lower() and MARK.encode() not in raw, raw
    status, headers, body = split_response(raw)
    err = _json_error(status, headers, body, (400, "bad_request"))
    assert err["message"].startswith("the request could not be parsed as HTTP/1.1: "), err
    assert err["call_id"] and headers[CALL_ID] == err["call_id"] and headers["connection"] == "close"
    row = gw.audit_row(err["call_id"])
    assert (row["agent_id"], row["mode"], row["client_ip"], row["status"], row["error_code"], row["outcome"]) == (
        "", "forward", "127.0.0.1", 400, "bad_request", "rejected"), row
    assert row["reasons"] == [err["message"]]
    assert MARK not in gw.logs()


def test_an_unparsable_head_in_a_tunnel_is_audited_for_its_agent(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    token = keys.token("garbled-bot", roles=["reader"])
    with tunnel(gw, f"127.0.0.1:{upstream.port}", token, gw.ca_file) as sock:
        sock.sendall(f"GET /errors/garbled?key={MARK} HTTP/1.1 junk\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status, headers, body = read_response(sock)
    err = _json_error(status, headers, body, (400, "bad_request"))
    assert MARK not in err["message"]
    row = gw.audit_row(err["call_id"])
    assert (row["agent_id"], row["host"], row["status"], row["error_code"]) == (
        "garbled-bot", "127.0.0.1", 400, "bad_request"), row
    assert MARK not in gw.logs()


def test_a_request_naming_no_destination_is_audited(gw: Gateway) -> None:
    """mitmproxy refuses an origin-form request with no Host before any hook runs."""
    status, headers, body = split_response(exchange(proxy_addr(gw), b"GET /errors/nowhere HTTP/1.1\r\n\r\n"))
    err = _json_error(status, headers, body, (400, "bad_request"))
    row = gw.audit_row(err["call_id"])
    assert (row["mode"], row["client_ip"], row["status"], row["error_code"], row["outcome"]) == (
        "forward", "127.0.0.1", 400, "bad_request", "rejected"), row
    assert row["reasons"] == ["HTTP request has no host header, destination unknown."]


def test_a_head_cut_off_by_the_agent_is_not_logged(gw: Gateway) -> None:
    """mitmproxy logged the bytes of a head the client closed before finishing; a token in them
    went into the gateway's log."""
    with socket.create_connection(proxy_addr(gw), timeout=20) as sock:
        sock.sendall(f"GET http://example.test/ HTTP/1.1\r\nProxy-Authorization: Bearer {MARK}-cut\r\n".encode())
    wait_until(lambda: "before its request head was complete" in gw.logs(), timeout=15, what="the log line")
    assert MARK not in gw.logs()


# (b) A body over proxy.max_body_bytes: declared (refused on its headers) or chunked (refused
#     once more than the limit has arrived). One audit row each, attributed to the agent.
@pytest.mark.parametrize("framing", ["declared", "chunked"])
def test_body_over_the_limit_gets_json_413_audited_once(gw: Gateway, keys: Keys, upstream: Upstream,
                                                        framing: str) -> None:
    token = keys.token(f"big-{framing}-bot", roles=["writer"])
    if framing == "declared":  # refused on its headers
        body_part = f"Content-Length: {LIMIT + 1}\r\n\r\n".encode()
    else:
        # One chunk one byte over the limit, and nothing after it: the proxy has read all that was
        # sent when it refuses, so it closes the connection cleanly after its answer.
        body_part = f"Transfer-Encoding: chunked\r\n\r\n{LIMIT + 1:x}\r\n".encode() + b"x" * (LIMIT + 1)
    with socket.create_connection(proxy_addr(gw), timeout=20) as sock:
        sock.sendall(f"POST http://127.0.0.1:{upstream.port}/errors/{framing} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: Bearer {token}\r\n".encode()
                     + body_part)
        err = _json_error(*read_response(sock), (413, "request_too_large"))
    rows = _rows(gw, f"/errors/{framing}", keys, upstream)
    assert [(r["agent_id"], r["status"], r["error_code"], r["outcome"], r["call_id"]) for r in rows] == [
        (f"big-{framing}-bot", 413, "request_too_large", "rejected", err["call_id"])]


# (c) An upstream nothing listens on: mitmproxy's 502, inside a tunnel and for plain HTTP.
def test_unreachable_upstream_in_tunnel_gets_json_502_audited_for_the_agent(gw: Gateway, keys: Keys,
                                                                           closed_port: int) -> None:
    token = keys.token("unreachable-bot", roles=["reader"])
    with tunnel(gw, f"127.0.0.1:{closed_port}", token, gw.ca_file) as sock:
        sock.sendall(f"GET /errors/unreachable-tls HTTP/1.1\r\nHost: 127.0.0.1:{closed_port}\r\n\r\n".encode())
        status, headers, body = read_response(sock)
    err = _json_error(status, headers, body, (502, "upstream_error"))
    (row,) = _poll_rows(gw, "/errors/unreachable-tls")
    assert (row["agent_id"], row["status"], row["error_code"], row["outcome"], row["host"], row["call_id"]) == (
        "unreachable-bot", 502, "upstream_error", "upstream_error", "127.0.0.1", err["call_id"])


def test_unreachable_upstream_plain_http_gets_json_502(gw: Gateway, keys: Keys, closed_port: int) -> None:
    token = keys.token("unreachable-bot", roles=["reader"])
    with socket.create_connection(proxy_addr(gw), timeout=20) as sock:
        sock.sendall(f"GET http://127.0.0.1:{closed_port}/errors/unreachable-plain HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{closed_port}\r\nProxy-Authorization: Bearer {token}\r\n\r\n".encode())
        err = _json_error(*read_response(sock), (502, "upstream_error"))
    (row,) = _poll_rows(gw, "/errors/unreachable-plain")
    assert (row["agent_id"], row["status"], row["error_code"], row["call_id"]) == (
        "unreachable-bot", 502, "upstream_error", err["call_id"])


# Headers mitmproxy refuses after it made a flow for them, and a body the agent never finished:
# the gateway never judged either, and audits both for the tunnel's agent.
def test_invalid_headers_in_tunnel_get_json_400_audited_for_the_agent(gw: Gateway, keys: Keys,
                                                                     upstream: Upstream) -> None:
    token = keys.token("sloppy-bot", roles=["reader"])
    with tunnel(gw, f"127.0.0.1:{upstream.port}", token, gw.ca_file) as sock:
        sock.sendall(f"POST /errors/bad-headers HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                     f"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello".encode())
        status, headers, body = read_response(sock)
    err = _json_error(status, headers, body, (400, "bad_request"))
    rows = _rows(gw, "/errors/bad-headers", keys, upstream)
    assert [(r["agent_id"], r["status"], r["error_code"], r["outcome"], r["call_id"]) for r in rows] == [
        ("sloppy-bot", 400, "bad_request", "rejected", err["call_id"])]
    assert "/errors/bad-headers" not in upstream.paths()


def test_body_never_finished_in_tunnel_is_audited_for_the_agent(gw: Gateway, keys: Keys,
                                                               upstream: Upstream) -> None:
    token = keys.token("quitter-bot", roles=["writer"])
    with tunnel(gw, f"127.0.0.1:{upstream.port}", token, gw.ca_file) as sock:
        sock.sendall(f"POST /errors/gave-up HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                     f"Content-Length: 100\r\n\r\nonly part of it".encode())
    (row,) = _poll_rows(gw, "/errors/gave-up")
    assert (row["agent_id"], row["status"], row["error_code"], row["outcome"]) == (
        "quitter-bot", 499, "client_closed", "client_closed"), row
    assert "/errors/gave-up" not in upstream.paths()


def test_agent_hanging_up_before_the_answer_is_client_closed_not_an_upstream_error(
        gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    """The upstream takes 2 s (its /slow path); the agent leaves once the call has reached it.
    Before, the row blamed the upstream (502 ``upstream_error``: "upstream failed: Client
    disconnected.")."""
    token = keys.token("impatient-bot", roles=["reader"])
    with socket.create_connection(proxy_addr(gw), timeout=20) as sock:
        sock.sendall(f"GET http://127.0.0.1:{upstream.port}/errors/impatient/slow HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: Bearer {token}\r\n\r\n".encode())
        wait_until(lambda: "/errors/impatient/slow" in upstream.paths(), timeout=15, what="the call upstream")
    (row,) = _poll_rows(gw, "/errors/impatient/slow")
    assert (row["agent_id"], row["status"], row["error_code"], row["outcome"]) == (
        "impatient-bot", 499, "client_closed", "client_closed"), row


# (d) The renderer itself, and the guard around the private function it replaces.
def test_install_replaces_mitmproxys_error_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_http1, "make_error_response", _http1.make_error_response)  # restored afterwards
    monkeypatch.setattr(_http1.Http1Server, "read_headers", _http1.Http1Server.read_headers)
    monkeypatch.setattr(_http1.Http1Server, "send", _http1.Http1Server.send)
    assert protocol_errors.install() and protocol_errors.install()  # idempotent
    assert _http1.make_error_response is protocol_errors.render_error
    for watched in (_http1.Http1Server.read_headers, _http1.Http1Server.send):
        assert watched.__wrapped__ is not None and not hasattr(watched.__wrapped__, "__wrapped__")  # wrapped once
    raw = _http1.make_error_response(502, "<b>mitmproxy's</b> " + "x" * 1000)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"server:" not in head.lower()
    assert f"content-length: {len(body)}".encode() in head.lower() and b"connection: close" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "upstream_error" and len(err["message"]) <= protocol_errors.MAX_MESSAGE
    assert "mitmproxy" not in err["message"]
    assert [protocol_errors.error_code(s) for s in (400, 407, 413, 504, 500)] == [
        "bad_request", "unauthenticated", "request_too_large", "upstream_timeout", "proxy_error"]


def test_install_leaves_an_unknown_mitmproxy_alone(caplog: pytest.LogCaptureFixture) -> None:
    def changed(status_code: int, message: str, headers: dict[str, str]) -> bytes:
        return b""

    lacking, other = ModuleType("lacking"), ModuleType("other")
    other.make_error_response = changed  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="agentgate.forward"):
        assert protocol_errors.install(lacking) is False
        assert protocol_errors.install(other) is False
    assert other.make_error_response is changed  # type: ignore[attr-defined]
    assert len([r for r in caplog.records if "make_error_response" in r.getMessage()]) == 2


def test_install_leaves_a_changed_read_headers_alone(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    class Http1Server:
        def read_headers(self, event, extra):  # not the (self, event) generator it watches
            return None

    module = ModuleType("changed")
    module.make_error_response = _http1.make_error_response  # type: ignore[attr-defined]
    module.Http1Server = Http1Server  # type: ignore[attr-defined]
    module.ResponseProtocolError = _http1.ResponseProtocolError  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="agentgate.forward"):
        assert protocol_errors.install(module) is False
    assert Http1Server.__dict__["read_headers"].__name__ == "read_headers"
    assert any("read_headers" in r.getMessage() for r in caplog.records)
