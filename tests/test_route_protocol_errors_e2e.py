"""Route-mode requests that are not well-formed HTTP, or that never finish, end to end (real
gateway, real loopback upstream, raw sockets):

* a request aiohttp cannot parse gets the gateway's JSON 400 and an audit row, and neither quotes
  the request's bytes. Before, aiohttp answered it itself (``text/plain``, ``Server: Python/3.11
  aiohttp/3.x``) and nothing was audited;
* a body whose chunk framing breaks after its head was read is refused at once, and audited
  against its agent. Before, the handler waited for a body end that never came;
* a body that stops arriving is refused (408) after ``listen.body_timeout_seconds``, and a
  connection with no request in progress is closed after ``listen.idle_seconds``. Before, both
  held their connection for as long as the agent kept it open (aiohttp's keep-alive default was
  an hour).
"""
from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.http_server import parse_refusal
from tests.conftest import Gateway, Keys, Upstream, serving, wait_until
from tests.raw_http import address, exchange, read_response, split_response

MARK = "S3CRET-d41d8cd9"
"""Sent inside each malformed request; must appear in no answer, audit row or log line."""
BODY_TIMEOUT = 1
IDLE = 2


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with serving(None, tmp_path_factory.mktemp("proto-up"), Upstream(raw=True)) as up:
        yield up


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream) -> Gateway:
    return gateway_factory({"routes": {"c": {"upstream": upstream.url}},
                            "listen": {"body_timeout_seconds": BODY_TIMEOUT, "idle_seconds": IDLE}},
                           name="route-protocol-errors")


def _row(gw: Gateway, where: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    query = ("SELECT agent_id, route, mode, method, path, client_ip, status, error_code, outcome, reasons "
             f"FROM agentgate.calls FINAL WHERE {where}")
    wait_until(lambda: bool(found.extend(gw.sql(query)) or found), timeout=15, what=f"the audit row where {where}")
    assert len(found) == 1, found
    return found[0]


UNPARSABLE = {
    "not-http": b"GARBAGE " + MARK.encode() + b"\r\n\r\n",
    "request-line": f"GET /r/c/x?token={MARK} HTTP/1.1 trailing\r\nHost: gw\r\n\r\n".encode(),
    "header-name": f"GET /r/c/x HTTP/1.1\r\nAuthorization : Bearer {MARK}\r\n\r\n".encode(),
    "header-value": f"GET /r/c/x HTTP/1.1\r\nX-Note: a\x01{MARK}\r\n\r\n".encode(),
    "duplicate-content-length": (f"POST /r/c/x HTTP/1.1\r\nHost: gw\r\nX-Key: {MARK}\r\nContent-Length: 2\r\n"
                                 "Content-Length: 3\r\n\r\n{}").encode(),
    "chunk-size": f"POST /r/c/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{MARK}\r\n".encode(),
    "target": f"GET http://[{MARK} HTTP/1.1\r\n\r\n".encode(),
    "line-too-long": f"GET /r/c/{MARK}{'a' * 9000} HTTP/1.1\r\n\r\n".encode(),
    "tls-on-http": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + MARK.encode(),
}


@pytest.mark.parametrize("name", list(UNPARSABLE))
def test_a_request_aiohttp_cannot_parse_gets_json_and_an_audit_row(gw: Gateway, name: str) -> None:
    raw = exchange(address(gw.routes), UNPARSABLE[name])
    status, headers, body = split_response(raw)
    assert status == 400, raw[:300]
    assert (headers["content-type"], headers["server"]) == ("application/json", "agentgate"), headers
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request", error
    assert error["message"].startswith("the request could not be parsed as HTTP/1.1"), error
    assert error["call_id"] and headers["x-agentgate-call-id"] == error["call_id"]
    assert MARK.encode() not in raw
    row = gw.audit_row(error["call_id"])
    assert (row["mode"], row["route"], row["client_ip"], row["status"], row["error_code"], row["outcome"]) == (
        "route", "", "127.0.0.1", 400, "bad_request", "rejected"), row
    assert row["reasons"] == [error["message"]] and MARK not in json.dumps(row)
    assert MARK not in gw.logs()


def test_the_admin_listener_answers_unparsable_requests_in_json_too(gw: Gateway) -> None:
    status, headers, body = split_response(exchange(address(gw.admin), b"GARBAGE\r\n\r\n"))
    assert (status, headers["server"], json.loads(body)["error"]["code"]) == (400, "agentgate", "bad_request")


def test_chunk_framing_broken_after_the_head_is_refused_at_once(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    """``Expect: 100-continue`` makes the order certain: aiohttp answers 100 only once the
    request's handler runs, so the broken chunk arrives while the handler reads the body."""
    path = "/proto/broken-chunk"
    token = keys.token("framing-bot", roles=["writer"])
    with socket.create_connection(address(gw.routes), timeout=20) as sock:
        sock.sendall((f"POST /r/c{path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                      "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        sock.settimeout(10)
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"2\r\n{}\r\nzz\r\n")
        status, headers, body = read_response(sock, timeout=10)  # before the body timeout could end it
    assert status == 400, body
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["message"] == "the request could not be parsed as HTTP/1.1: Invalid character in chunk size"
    row = _row(gw, f"path = '{path}'")
    assert (row["agent_id"], row["route"], row["status"], row["error_code"], row["outcome"]) == (
        "framing-bot", "c", 400, "bad_request", "rejected"), row
    assert path not in upstream.paths()
    assert "Unhandled exception" not in gw.logs() and "Error handling request" not in gw.logs()


@pytest.mark.parametrize("framing,sent", [("Content-Length: 100\r\n", b'{"only": "part'),
                                          ("Transfer-Encoding: chunked\r\n", b'5\r\n{"a":\r\n')])
def test_a_body_that_stops_arriving_is_refused_408(gw: Gateway, keys: Keys, upstream: Upstream,
                                                   framing: str, sent: bytes) -> None:
    path = f"/proto/stalled-{framing.split(':')[0].lower()}"
    token = keys.token("slow-bot", roles=["writer"])
    with socket.create_connection(address(gw.routes), timeout=20) as sock:
        sock.sendall((f"POST /r/c{path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/json\r\n{framing}\r\n").encode() + sent)
        status, headers, body = read_response(sock, timeout=10)
    assert (status, headers["connection"], json.loads(body)["error"]["code"]) == (408, "close", "request_timeout")
    row = _row(gw, f"path = '{path}'")
    assert (row["agent_id"], row["route"], row["status"], row["error_code"], row["outcome"]) == (
        "slow-bot", "c", 408, "request_timeout", "rejected"), row
    assert row["reasons"] == [f"no request body bytes for {BODY_TIMEOUT} s"]
    assert path not in upstream.paths()


@pytest.mark.parametrize("sent", [b"", b"GET /r/c/proto/never-finished HTTP/1.1\r\nHost: gw\r\n"],
                         ids=["nothing", "half-a-head"])
def test_a_connection_with_no_request_in_progress_is_closed(gw: Gateway, sent: bytes) -> None:
    assert exchange(address(gw.routes), sent, timeout=IDLE + 10) == b""  # closed, without an answer


@pytest.mark.parametrize("message,reason", [
    ("Invalid header value char:\n\n  b'X-A: b\\x01c SECRET'\n          ^", "Invalid header value char"),
    ("Bad status line:\n  Expected CRLF after version:\n\n  b'GET /?t=SECRET HTTP/1.1 x'", "Bad status line"),
    ("Got more than 8190 bytes when reading: b'SECRETSECRET...'.", "Got more than 8190 bytes when reading"),
    ("Received HTTPS traffic on an HTTP port", "Received HTTPS traffic on an HTTP port"),
    ("SECRET", "Malformed request"),
    ("Bad status line 'GET /?t=SECRET HTTP/1.1 x'", "Malformed request"),  # aiohttp's Python parser
    ("Invalid HTTP header: b'Authorization : Bearer SECRET'", "Invalid HTTP header"),
    ("", "Malformed request"),
])
def test_parse_refusals_keep_only_aiohttps_reason(message: str, reason: str) -> None:
    assert parse_refusal(ValueError(), message).message == f"the request could not be parsed as HTTP/1.1: {reason}"
