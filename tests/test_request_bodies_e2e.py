"""Request bodies that are not plain and whole, in both modes, end to end (real gateway, real
loopback upstream, real JWTs):

* compressed (``Content-Encoding``): policy judges the inflated content, and the upstream gets
  the bytes the agent sent. Before, route mode handed the upstream aiohttp's inflated copy still
  labelled gzip (the upstream failed), and forward mode judged the compressed bytes (a body rule
  never saw them);
* never finished (the agent hangs up mid-body): nothing goes upstream and the call is audited
  as ``client_closed`` (499). Before, route mode left no audit row and logged a traceback, and
  forward mode audited a 400 ``bad_request``.

The gateway's own route answers name no Python or aiohttp version.
"""
from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import brotli
import pytest
import zstandard

from tests.conftest import Gateway, Keys, Upstream, http, serving, wait_until
from tests.raw_http import address, proxy_addr, read_response

CALL_ID = "x-agentgate-call-id"
CODINGS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress, "br": brotli.compress, "zstd": zstandard.ZstdCompressor().compress,
    "gzip, br": lambda b: brotli.compress(gzip.compress(b)),
}


@pytest.fixture(scope="module")
def raw_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with serving(None, tmp_path_factory.mktemp("raw-up"), Upstream(raw=True)) as up:
        yield up


@pytest.fixture(scope="module")
def gw(gateway_factory, raw_upstream: Upstream) -> Gateway:
    return gateway_factory({"routes": {"c": {"upstream": raw_upstream.url}}}, name="request-bodies")


def _post(gw: Gateway, upstream: Upstream, mode: str, path: str, token: str, body: bytes,
          headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST through the route (mode "route") or the forward proxy (absolute-form, "forward")."""
    if mode == "route":
        resp = http("POST", gw.route_url("c", path), headers={"Authorization": f"Bearer {token}", **headers},
                    body=body)
        return resp.status, resp.headers, resp.body
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(proxy_addr(gw), timeout=20) as sock:
        sock.sendall(f"POST http://127.0.0.1:{upstream.port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                     f"Proxy-Authorization: Bearer {token}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        return read_response(sock)


def _arrived(upstream: Upstream, path: str) -> bytes:
    (body,) = [s.body for s in upstream.seen if s.path == path]
    return body


@pytest.mark.parametrize("mode", ["route", "forward"])
@pytest.mark.parametrize("coding", list(CODINGS))
def test_compressed_body_is_judged_inflated_and_sent_as_it_came(gw: Gateway, keys: Keys, raw_upstream: Upstream,
                                                               mode: str, coding: str) -> None:
    token = keys.token("zip-bot", roles=["writer"])
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    tag = coding.replace(", ", "-")
    ok = CODINGS[coding](b'{"action": "create"}')
    status, _, body = _post(gw, raw_upstream, mode, f"/bodies/{mode}-{tag}-ok", token, ok, headers)
    assert status == 200, body[:300]
    assert _arrived(raw_upstream, f"/bodies/{mode}-{tag}-ok") == ok  # byte for byte, still compressed
    assert json.loads(body)["headers"]["content-encoding"] == coding
    status, _, body = _post(gw, raw_upstream, mode, f"/bodies/{mode}-{tag}-drop", token,
                            CODINGS[coding](b'{"action": "drop_tables"}'), headers)
    assert status == 403, body[:300]
    assert json.loads(body)["error"]["message"] == "the body must not ask to drop tables"
    assert f"/bodies/{mode}-{tag}-drop" not in raw_upstream.paths()


@pytest.mark.parametrize("mode", ["route", "forward"])
@pytest.mark.parametrize("coding", ["gzip", "quopri"])
def test_a_body_that_does_not_inflate_is_judged_as_sent(gw: Gateway, keys: Keys, raw_upstream: Upstream,
                                                        mode: str, coding: str) -> None:
    """Plain JSON that claims a coding (one the gateway knows, or not): an upstream that ignores
    the coding reads it as it is, so policy judges it as it is."""
    token = keys.token("zip-bot", roles=["writer"])
    path = f"/bodies/{mode}-claims-{coding}"
    status, _, body = _post(gw, raw_upstream, mode, path, token, b'{"action": "drop_tables"}',
                            {"Content-Type": "application/json", "Content-Encoding": coding})
    assert status == 403, body[:300]
    assert json.loads(body)["error"]["message"] == "the body must not ask to drop tables"
    assert path not in raw_upstream.paths()


def _send(gw: Gateway, raw: bytes) -> socket.socket:
    sock = socket.create_connection(address(gw.routes), timeout=20)
    sock.sendall(raw)
    return sock


def _row(gw: Gateway, path: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    query = ("SELECT agent_id, route, status, error_code, outcome, reasons FROM agentgate.calls FINAL "
             f"WHERE path = '{path}'")
    wait_until(lambda: bool(found.extend(gw.sql(query)) or found), timeout=15, what=f"the audit row of {path}")
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("name,framing,sent", [
    ("content-length", "Content-Length: 100\r\n", b'{"only": "part'),
    ("chunked", "Transfer-Encoding: chunked\r\n", b'5\r\n{"a":\r\n'),
])
def test_route_agent_hanging_up_mid_body_is_audited_as_client_closed(gw: Gateway, keys: Keys, raw_upstream: Upstream,
                                                                    name: str, framing: str, sent: bytes) -> None:
    path = f"/bodies/gave-up-{name}"
    token = keys.token("quitter-bot", roles=["writer"])
    with _send(gw, (f"POST /r/c{path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
                    f"Content-Type: application/json\r\n{framing}\r\n").encode() + sent):
        pass  # closed mid-body
    row = _row(gw, path)
    assert (row["agent_id"], row["route"], row["status"], row["error_code"], row["outcome"]) == (
        "quitter-bot", "c", 499, "client_closed", "client_closed"), row
    assert "before sending the whole request body" in row["reasons"][0], row
    assert path not in raw_upstream.paths()
    assert "Error handling request" not in gw.logs()


def test_the_gateways_own_route_answers_name_no_versions(gw: Gateway) -> None:
    """aiohttp's default ``Server: Python/3.x aiohttp/3.y`` is replaced on the route and admin
    listeners (a relayed answer keeps its upstream's own Server header)."""
    answers = [http("GET", gw.route_url("c", "/bodies/no-token")),  # 401, the gateway's
               http("GET", f"http://{gw.routes}/elsewhere"),  # 404, the gateway's
               gw.call_admin("GET", "/v1/killswitches")]  # 401, the admin API's
    assert [a.status for a in answers] == [401, 404, 401]
    assert [a.headers.get("server") for a in answers] == ["agentgate"] * 3
