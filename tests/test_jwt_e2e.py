"""The JWT rejection list through a real gateway: each case gets its own error code, in the
response and in its audit row, and nothing reaches the upstream (route and forward front ends)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time

import jwt
import pytest

from tests.conftest import Gateway, Keys, Upstream, http
from tests.raw_http import basic, proxy_addr, read_response_head_only, through_proxy

CALL_ID = "x-agentgate-call-id"


@pytest.fixture(scope="module")
def gw(gateway_factory, upstream: Upstream) -> Gateway:
    return gateway_factory({"routes": {"plain": {"upstream": upstream.url}}}, name="jwt")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict, payload: dict) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}."


def _claims(keys: Keys, **over) -> dict:
    now = int(time.time())
    claims = {"sub": "agent-x", "iat": now, "exp": now + 600, "iss": keys.issuer, "aud": keys.audience}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _hs256_with_rsa_public_key(keys: Keys) -> str:
    """The classic key-confusion attack: HS256 'signed' with the RSA public key as secret."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(keys)).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(keys.rsa_public_file.read_bytes(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(sig)}"


def cases(keys: Keys) -> list[tuple[str, str | None, int, str]]:
    """(name, Authorization header value, status, error code)."""
    ok = keys.token()
    h, p, s = ok.split(".")
    tampered = f"{h}.{_b64(json.dumps(_claims(keys, sub='someone-else')).encode())}.{s}"
    return [
        ("no token", None, 401, "missing_token"),
        ("not bearer", "Token opaque-credential", 401, "malformed_token"),  # not hex: cannot occur in a hash
        ("malformed", "Bearer not.a.jwt", 401, "malformed_token"),
        ("garbage", "Bearer %%%%", 401, "malformed_token"),
        ("bad signature", f"Bearer {tampered}", 401, "bad_signature"),
        ("alg none", f"Bearer {_unsigned({'alg': 'none', 'typ': 'JWT'}, _claims(keys))}", 401, "alg_none"),
        ("alg outside allow-list", f"Bearer {jwt.encode(_claims(keys), keys.hmac_secret, algorithm='HS512')}",
         401, "alg_not_allowed"),
        ("HS256 with RSA public key", f"Bearer {_hs256_with_rsa_public_key(keys)}", 401, None),
        ("expired", f"Bearer {keys.token(ttl=-3600)}", 401, "token_expired"),
        ("not yet valid", f"Bearer {keys.token(nbf=int(time.time()) + 3600)}", 401, "token_not_yet_valid"),
        ("wrong issuer", f"Bearer {keys.token(iss='https://evil.test')}", 401, "wrong_issuer"),
        ("wrong audience", f"Bearer {keys.token(aud='someone-else')}", 401, "wrong_audience"),
        ("no exp", f"Bearer {jwt.encode(_claims(keys, exp=None), keys.ed_private, algorithm='EdDSA')}",
         401, "missing_claim"),
        ("no sub", f"Bearer {jwt.encode(_claims(keys, sub=None), keys.ed_private, algorithm='EdDSA')}",
         401, "missing_claim"),
        # found by review: an admin token acted as an agent, and a century-long token was fine
        ("admin token", f"Bearer {keys.admin_token(roles=['admin'])}", 401, "wrong_audience"),
        ("admin token naming the agents' audience too",
         f"Bearer {keys.token(roles=['admin'], aud=[keys.audience, keys.admin_audience])}", 401, "wrong_audience"),
        ("lifetime too long", f"Bearer {keys.token(ttl=100 * 365 * 86400)}", 401, "token_lifetime_too_long"),
        ("lifetime too long, no iat", f"Bearer {keys.token(iat=None, ttl=86400 + 3600)}", 401,
         "token_lifetime_too_long"),
    ]


def test_every_rejection_has_its_code_in_response_and_audit(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    before = len(upstream.seen)
    for name, value, status, code in cases(keys):
        headers = {"Authorization": value} if value is not None else {}
        resp = http("GET", gw.route_url("plain", "/x"), headers=headers)
        assert resp.status == status, (name, resp.body)
        err = resp.json()["error"]
        if code is not None:
            assert err["code"] == code, (name, err)
        else:
            assert err["code"] in ("bad_signature", "alg_not_allowed", "unknown_key"), (name, err)
        challenge = 'Bearer realm="agentgate"' + ("" if code == "missing_token" else ', error="invalid_token"')
        assert resp.headers.get("www-authenticate") == challenge, (name, resp.headers)  # RFC 6750
        row = gw.audit_row(resp.headers[CALL_ID])
        assert (row["outcome"], row["error_code"], row["status"]) == ("unauthenticated", err["code"], status), name
        assert row["agent_id"] == ""
        if value:
            assert value.split()[-1] not in json.dumps(row), "a token must never land in the audit"
    assert len(upstream.seen) == before


def test_each_configured_algorithm_is_accepted(gw: Gateway, keys: Keys) -> None:
    for alg in ("EdDSA", "RS256", "HS256"):
        resp = http("GET", gw.route_url("plain", "/x"),
                    headers={"Authorization": f"Bearer {keys.token(f'{alg}-bot', alg=alg)}"})
        assert resp.status == 200, (alg, resp.body)
        assert gw.audit_row(resp.headers[CALL_ID])["agent_id"] == f"{alg}-bot"


def test_unregistered_agent_refused_when_registry_required(gateway_factory, keys: Keys, upstream: Upstream,
                                                           tmp_path) -> None:
    registry = tmp_path / "agents.toml"
    registry.write_text('[agents.known-bot]\nowner = "alice@example.com"\nteam = "support"\n')
    gw = gateway_factory({"routes": {"plain": {"upstream": upstream.url}},
                          "identity": {"registry_file": str(registry), "require_registered_agents": True}},
                         name="registry")
    known = http("GET", gw.route_url("plain", "/x"), headers={"Authorization": f"Bearer {keys.token('known-bot')}"})
    assert known.status == 200
    stranger = http("GET", gw.route_url("plain", "/x"), headers={"Authorization": f"Bearer {keys.token('stranger')}"})
    assert stranger.status == 403
    assert stranger.json()["error"]["code"] == "unregistered_agent"
    row = gw.audit_row(stranger.headers[CALL_ID])
    assert row["error_code"] == "unregistered_agent"
    # Known-Bot is known-bot to a kill-switch, but not to policy: refused, and audited as such.
    twin = http("GET", gw.route_url("plain", "/x"), headers={"Authorization": f"Bearer {keys.token('Known-Bot')}"})
    assert twin.status == 403 and twin.json()["error"]["code"] == "agent_id_case_mismatch"
    assert gw.audit_row(twin.headers[CALL_ID])["error_code"] == "agent_id_case_mismatch"


def test_forward_proxy_refuses_admin_and_overlong_tokens(gw: Gateway, keys: Keys, upstream: Upstream) -> None:
    """The forward front end goes through the same identity step: on a plain request and on a
    CONNECT, an admin token or a century-long token is refused (407) and never reaches upstream."""
    target = f"127.0.0.1:{upstream.port}"
    before = len(upstream.seen)
    both = [keys.audience, keys.admin_audience]  # an admin token also naming the agents' audience
    for token, code in [(keys.admin_token("fwd-admin", roles=["admin"]), "wrong_audience"),
                        (keys.token("fwd-admin2", roles=["admin"], aud=both), "wrong_audience"),
                        (keys.token("fwd-forever", ttl=100 * 365 * 86400), "token_lifetime_too_long")]:
        status, headers, body = through_proxy(gw, f"GET http://{target}/fwd HTTP/1.1\r\nHost: {target}\r\n"
                                                  f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode())
        assert status == 407 and json.loads(body)["error"]["code"] == code, (code, status, body[:200])
        row = gw.audit_row(headers[CALL_ID])
        assert (row["mode"], row["outcome"], row["error_code"]) == ("forward", "unauthenticated", code)
        with socket.create_connection(proxy_addr(gw), timeout=20) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                         f"Proxy-Authorization: {basic(token)}\r\n\r\n".encode())
            status, headers, _ = read_response_head_only(sock)
        assert status == 407, code
        assert gw.audit_row(headers[CALL_ID])["error_code"] == code
    assert len(upstream.seen) == before
