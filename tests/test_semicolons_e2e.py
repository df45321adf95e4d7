"""The ';' opt-outs end to end (routes.<name>.path_semicolons / query_semicolons and the proxy's):
off by default; where set, ';' reaches the upstream exactly as policy saw it, and dot-segments and
NFKC separators are still refused (as are encoded control characters)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Gateway, Keys, Upstream, http
from tests.raw_http import through_proxy

CALL_ID = "x-agentgate-call-id"
LITERAL = {"path_semicolons": "literal", "query_semicolons": "literal"}


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream) -> Gateway:
    return gateway_factory({
        "routes": {"literal": {"upstream": upstream.url, **LITERAL}, "default": {"upstream": upstream.url}},
        "proxy": LITERAL,
    }, name="semicolons")


def _route(gw: Gateway, keys: Keys, route: str, target: str):
    return http("GET", gw.route_url(route, target), headers={"Authorization": f"Bearer {keys.token()}"})


def _forward(gw: Gateway, keys: Keys, up: Upstream, target: str) -> tuple[int, dict[str, str], bytes]:
    return through_proxy(gw, f"GET http://127.0.0.1:{up.port}{target} HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n"
                             f"Proxy-Authorization: Bearer {keys.token()}\r\n\r\n".encode())


def test_literal_route_forwards_semicolons_as_policy_saw_them(gw: Gateway, keys: Keys) -> None:
    resp = _route(gw, keys, "literal", "/items;color=red/x?a=1;b=2")
    assert resp.status == 200, resp.body
    assert (resp.json()["path"], resp.json()["query"]) == ("/items;color=red/x", "a=1;b=2")
    row = gw.audit_row(resp.headers[CALL_ID])
    assert (row["path"], row["query"], row["outcome"]) == ("/items;color=red/x", "a=1;b=2", "allowed")
    # The setting is the route's: another route on the same gateway still refuses.
    assert json.loads(_route(gw, keys, "default", "/items;color=red/x").body)["error"]["code"] == "ambiguous_path"
    assert json.loads(_route(gw, keys, "default", "/x?a=1;b=2").body)["error"]["code"] == "ambiguous_query"


def test_literal_proxy_forwards_semicolons_as_policy_saw_them(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    status, headers, body = _forward(gw, keys, upstream, "/items;color=red/y?a=1;b=2")
    assert status == 200, body[:200]
    assert (json.loads(body)["path"], json.loads(body)["query"]) == ("/items;color=red/y", "a=1;b=2")
    row = gw.audit_row(headers[CALL_ID])
    assert (row["mode"], row["path"], row["query"], row["outcome"]) == \
        ("forward", "/items;color=red/y", "a=1;b=2", "allowed")


@pytest.mark.parametrize("target", ["/files/..;/admin", "/files/%EF%BC%8E%EF%BC%8E;x/admin", "/files/a%EF%BC%8Fb;x"])
def test_literal_semicolons_still_refuse_dot_segments_and_separators(gw: Gateway, keys: Keys, upstream: Upstream,
                                                                     target: str) -> None:
    before = len(upstream.seen)
    resp = _route(gw, keys, "literal", target)
    assert resp.status == 400 and resp.json()["error"]["code"] == "ambiguous_path", resp.body
    status, headers, body = _forward(gw, keys, upstream, target)
    assert status == 400 and json.loads(body)["error"]["code"] == "ambiguous_path", body[:200]
    assert len(upstream.seen) == before
    assert gw.audit_row(headers[CALL_ID])["outcome"] == "rejected"


@pytest.mark.parametrize("target", ["/files/a%C2%85b", "/files/%c2%9f", "/files/a%25C2%2585b"])
def test_encoded_c1_controls_are_refused_and_audited(gw: Gateway, keys: Keys, upstream: Upstream,
                                                     target: str) -> None:
    """U+0080..U+009F (U+0085 NEL is a line break to some parsers), encoded once or twice, as
    encoded C0 controls are: a JSON 400, audited, never forwarded, whatever the ';' setting."""
    before = len(upstream.seen)
    for route in ("default", "literal"):
        resp = _route(gw, keys, route, target)
        assert resp.status == 400 and resp.headers["content-type"].startswith("application/json"), resp.body
        err = resp.json()["error"]
        assert err["code"] == "ambiguous_path" and "encoded control character" in err["message"], err
        row = gw.audit_row(err["call_id"])
        assert (row["mode"], row["status"], row["outcome"], row["error_code"]) == \
            ("route", 400, "rejected", "ambiguous_path")
    status, headers, body = _forward(gw, keys, upstream, target)
    assert status == 400 and json.loads(body)["error"]["code"] == "ambiguous_path", body[:200]
    row = gw.audit_row(headers[CALL_ID])
    assert (row["mode"], row["status"], row["outcome"]) == ("forward", 400, "rejected")
    assert len(upstream.seen) == before
