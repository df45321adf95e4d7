"""Route mode end to end: a real gateway process, real upstreams on 127.0.0.1, real JWTs."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.conftest import Gateway, Keys, Upstream, http

CALL_ID = "x-agentgate-call-id"
UPSTREAM_SECRET = "zendesk-secret-value-7f3a"


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream, tls_upstream: Upstream, tmp_path_factory) -> Gateway:
    secret_file = tmp_path_factory.mktemp("cred") / "token"
    secret_file.write_text(UPSTREAM_SECRET + "\n")
    return gateway_factory({
        "routes": {
            "plain": {"upstream": upstream.url + "/base"},
            "secure": {"upstream": tls_upstream.url, "ca_file": str(tls_upstream.ca_file)},
            "untrusted": {"upstream": tls_upstream.url},
            "withcred": {"upstream": upstream.url,
                         "credential": {"header": "Authorization", "prefix": "Bearer ", "file": str(secret_file)}},
            "envcred": {"upstream": upstream.url,
                        "credential": {"header": "X-Api-Key", "env": "TEST_UPSTREAM_KEY"}},
            "shadow": {"upstream": upstream.url, "enforce": False},
            "down": {"upstream": "http://127.0.0.1:9", "connect_timeout_seconds": 2},
        },
    }, env={"TEST_UPSTREAM_KEY": "env-secret-4411"}, name="routes")


def auth(keys: Keys, **kw) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.token(**kw)}"}


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] == code
    assert err["message"]
    assert err["call_id"] == resp.headers[CALL_ID]
    uuid.UUID(err["call_id"])
    return err


def test_allowed_get_is_forwarded_and_audited(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    token = keys.token("reader-bot", roles=["reader"], team="support")
    resp = http("GET", gw.route_url("plain", "/tickets/42?status=open&status=new"),
                headers={"Authorization": f"Bearer {token}", "traceparent":
                         "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert resp.status == 200
    echoed = resp.json()
    assert echoed["path"] == "/base/tickets/42"
    assert echoed["query"] == "status=open&status=new"
    assert "authorization" not in echoed["headers"], "the agent's JWT must never reach the upstream"
    assert token not in json.dumps(echoed)
    assert resp.headers["x-upstream"] == "yes"
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["agent_id"] == "reader-bot"
    assert row["team"] == "support"
    assert row["roles"] == ["reader"]
    assert row["mode"] == "route"
    assert row["route"] == "plain"
    assert row["method"] == "GET"
    assert row["scheme"] == "http"
    assert row["host"] == "127.0.0.1"
    assert row["port"] == upstream.port
    assert row["path"] == "/tickets/42"
    assert row["query"] == "status=open&status=new"
    assert row["status"] == 200
    assert row["outcome"] == "allowed"
    assert row["reasons"] == ["reader-bot may GET /tickets/42"]
    assert row["error_code"] == ""
    assert row["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert row["engine"] == "embedded"
    assert len(row["policy_revision"]) >= 8
    assert row["response_bytes"] == len(resp.body)
    assert row["upstream_ms"] > 0
    assert row["gateway_ms"] >= 0


def test_post_body_reaches_policy_and_upstream(gw: Gateway, keys: Keys) -> None:
    headers = {**auth(keys, roles=["writer"]), "Content-Type": "application/json"}
    ok = http("POST", gw.route_url("plain", "/items"), headers=headers, body=b'{"action": "create"}')
    assert ok.status == 200
    assert ok.json()["body"] == '{"action": "create"}'
    bad = http("POST", gw.route_url("plain", "/items"), headers=headers, body=b'{"action": "drop_tables"}')
    err = assert_error(bad, 403, "policy_denied")
    assert "drop tables" in err["message"]
    row = gw.audit_row(bad.headers[CALL_ID])
    assert row["outcome"] == "denied"
    assert row["request_bytes"] == len(b'{"action": "drop_tables"}')
    assert row["reasons"] == ["the body must not ask to drop tables"]


def test_denied_with_reasons_never_reaches_upstream(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    before = len(upstream.seen)
    resp = http("DELETE", gw.route_url("plain", "/admin/users/1"), headers=auth(keys, roles=["reader"]))
    err = assert_error(resp, 403, "policy_denied")
    assert "admin paths are off limits" in err["message"] and "writers only" in err["message"]
    assert len(upstream.seen) == before
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "denied"
    assert row["status"] == 403
    assert row["error_code"] == "policy_denied"
    assert row["reasons"] == ["admin paths are off limits", "writers only"]


def test_shadow_route_passes_and_audits_would_deny(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("shadow", "/admin/x"), headers=auth(keys))
    assert resp.status == 200
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "would_deny"
    assert row["enforce"] == 0
    assert row["reasons"] == ["admin paths are off limits"]


def test_missing_token_is_401_and_audited(gw: Gateway) -> None:
    resp = http("GET", gw.route_url("plain", "/x"))
    assert_error(resp, 401, "missing_token")
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "unauthenticated"
    assert row["agent_id"] == ""
    assert row["error_code"] == "missing_token"


def test_unknown_route_and_non_route_paths_are_404_and_audited(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("nope", "/x"), headers=auth(keys, agent="lost-bot"))
    assert_error(resp, 404, "unknown_route")
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["agent_id"] == "lost-bot"
    assert row["outcome"] == "rejected"
    resp = http("GET", f"http://{gw.routes}/elsewhere")
    assert_error(resp, 404, "not_found")
    assert gw.audit_row(resp.headers[CALL_ID])["error_code"] == "not_found"


def test_https_upstream_with_route_ca(gw: Gateway, keys: Keys, tls_upstream: Upstream) -> None:
    resp = http("GET", gw.route_url("secure", "/hello"), headers=auth(keys))
    assert resp.status == 200
    assert resp.json()["path"] == "/hello"
    row = gw.audit_row(resp.headers[CALL_ID])
    assert (row["scheme"], row["port"]) == ("https", tls_upstream.port)


def test_https_upstream_with_unknown_ca_fails_closed(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("untrusted", "/hello"), headers=auth(keys))
    assert_error(resp, 502, "upstream_tls_error")
    assert gw.audit_row(resp.headers[CALL_ID])["outcome"] == "upstream_error"


def test_upstream_down_is_502_and_audited(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("down", "/x"), headers=auth(keys))
    assert_error(resp, 502, "upstream_unreachable")
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "upstream_error"
    assert row["error_code"] == "upstream_unreachable"


def test_route_credential_is_injected_and_never_audited(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    token = keys.token(roles=["reader"])
    resp = http("GET", gw.route_url("withcred", "/me?api_key=leaked-in-query"),
                headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert upstream.seen[-1].headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    # The echo upstream reflects it back; the agent still does not get it (gateway/echo_guard.py).
    assert resp.json()["headers"]["authorization"] == "Bearer [REDACTED:credential]"
    resp2 = http("GET", gw.route_url("envcred", "/me"), headers={"Authorization": f"Bearer {token}"})
    assert upstream.seen[-1].headers["x-api-key"] == "env-secret-4411"
    assert resp2.json()["headers"]["x-api-key"] == "[REDACTED:credential]"
    assert "authorization" not in upstream.seen[-1].headers
    row = gw.audit_row(resp.headers[CALL_ID])
    assert "leaked-in-query" not in row["query"]
    dump = json.dumps(gw.sql("SELECT * FROM agentgate.calls"))
    for secret in (UPSTREAM_SECRET, "env-secret-4411", token, "leaked-in-query"):
        assert secret not in dump
        assert secret not in gw.logs()


def test_streamed_responses_are_relayed_whole(gw: Gateway, keys: Keys) -> None:
    sse = http("GET", gw.route_url("plain", "/sse"), headers=auth(keys))
    assert sse.status == 200
    assert sse.body == b"data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
    big = http("GET", gw.route_url("plain", "/big"), headers=auth(keys))
    assert big.status == 200 and len(big.body) == 3 << 20
    assert gw.audit_row(big.headers[CALL_ID])["response_bytes"] == 3 << 20


def test_session_header_becomes_trace_id(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("plain", "/x"), headers={**auth(keys), "X-Agent-Session": "sess-77"})
    assert gw.audit_row(resp.headers[CALL_ID])["trace_id"] == "sess-77"


@pytest.mark.parametrize("path", ["/admin", "/%61dmin/x", "/x/../admin", "/x/%2e%2e/admin", "//admin",
                                  "/x/%2E%2E/admin"])
def test_canonicalisation_defeats_allowlist_bypass(gw: Gateway, keys: Keys, upstream: Upstream, path: str) -> None:
    before = len(upstream.seen)
    resp = http("GET", gw.route_url("plain", path), headers=auth(keys))
    assert resp.status in (400, 403), resp.body
    assert len(upstream.seen) == before
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] in ("denied", "rejected")


@pytest.mark.parametrize("path", ["/files/a%2Fb", "/files/a%5cb", "/files/%00"])
def test_ambiguous_paths_are_refused(gw: Gateway, keys: Keys, path: str) -> None:
    resp = http("GET", gw.route_url("plain", path), headers=auth(keys))
    assert_error(resp, 400, "ambiguous_path")
    assert gw.audit_row(resp.headers[CALL_ID])["outcome"] == "rejected"


@pytest.mark.parametrize(("target", "code"), [
    ("/admin;x=1/users", "ambiguous_path"),  # Tomcat/Spring/Jetty: /admin/users
    ("/files/a%3Bx=1/b", "ambiguous_path"),  # a decoding hop makes it a raw ';'
    ("/files/%EF%BC%8E%EF%BC%8E/admin", "ambiguous_path"),  # "．．": ".." after NFKC
    ("/files/a%EF%BC%8Fb", "ambiguous_path"),  # "／": "/" after NFKC
    ("/files/%EF%BC%85%EF%BC%92%EF%BC%A5%EF%BC%85%EF%BC%92%EF%BC%A5/admin", "ambiguous_path"),  # "％２Ｅ％２Ｅ"
    ("/tickets?status=open;admin=1", "ambiguous_query"),  # two parameters for Rack and older Go/Python
])
def test_spellings_read_differently_upstream_are_refused(gw: Gateway, keys: Keys, upstream: Upstream,
                                                         target: str, code: str) -> None:
    before = len(upstream.seen)
    resp = http("GET", gw.route_url("plain", target), headers=auth(keys))
    err = assert_error(resp, 400, code)
    assert len(upstream.seen) == before
    row = gw.audit_row(err["call_id"])
    assert (row["status"], row["outcome"], row["error_code"]) == (400, "rejected", code)
    assert row["reasons"] == [err["message"]]


def test_canonical_path_is_what_upstream_gets(gw: Gateway, keys: Keys) -> None:
    resp = http("GET", gw.route_url("plain", "/a//b/./c/%7Euser"), headers=auth(keys))
    assert resp.status == 200
    assert resp.json()["path"] == "/base/a/b/c/~user"
    assert gw.audit_row(resp.headers[CALL_ID])["path"] == "/a/b/c/~user"


def test_gateway_never_logs_tokens(gw: Gateway, keys: Keys) -> None:
    token = keys.token("log-bot")
    http("GET", gw.route_url("plain", "/x"), headers={"Authorization": f"Bearer {token}x"})
    assert token not in gw.logs()
    assert os.path.exists(gw.log)
