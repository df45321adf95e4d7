"""Agent identity: JWT verification with real keys, a real JWKS server, the registry, the dev key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from aiohttp import web
from pydantic import ValidationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.config import ConfigError, IdentityConfig, load_config
from gateway.devkey import ensure_dev_key, mint_token, parse_ttl, public_pem
from gateway.errors import GatewayError, Unauthenticated
from gateway.identity import IdentityError, JwtVerifier, UnregisteredAgent, extract_bearer
from gateway.registry import AgentRegistry

HMAC_SECRET = "s3cret-" + "x" * 40


# Keys and tokens --------------------------------------------------------------------
@dataclass
class KeyPair:
    private: Any
    alg: str

    @property
    def public(self) -> Any:
        return self.private.public_key()

    @property
    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    def jwk(self, kid: str) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        data = json.loads(algo.to_jwk(self.public))
        return {**data, "kid": kid, "use": "sig", "alg": self.alg}


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def rsa_key2() -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def ec_key() -> KeyPair:
    return KeyPair(ec.generate_private_key(ec.SECP256R1()), "ES256")


@pytest.fixture(scope="module")
def ed_key() -> KeyPair:
    return KeyPair(ed25519.Ed25519PrivateKey.generate(), "EdDSA")


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "support-bot", "iat": now, "nbf": now, "exp": now + 600,
                            "team": "support", "roles": ["reader", "writer"]}
    for k, v in over.items():
        if v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def sign(key: Any, alg: str, payload: dict[str, Any] | None = None, **headers: Any) -> str:
    return jwt.encode(payload if payload is not None else claims(), key, algorithm=alg,
                      headers=headers or None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(secret: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token built by hand (pyjwt refuses PEM keys as HMAC secrets, attackers do not)."""
    signing_input = (b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + b64url(json.dumps(payload).encode()))
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


class FakeClock:
    """Time we can move forward without sleeping."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def write_pem(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}.pem"
    path.write_bytes(data)
    return path


@pytest.fixture
async def make_verifier() -> AsyncIterator[Callable[..., JwtVerifier]]:
    made: list[JwtVerifier] = []

    def factory(cfg: IdentityConfig, **kw: Any) -> JwtVerifier:
        v = JwtVerifier(cfg, **kw)
        made.append(v)
        return v

    yield factory
    for v in made:
        await v.close()


async def rejected(verifier: JwtVerifier, token: str, code: str, *, admin: bool = False) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        await verifier.verify(token, agent=not admin)
    err = info.value
    assert err.code == code, err.message
    assert err.status == 401 and err.outcome == "unauthenticated"
    assert isinstance(err, Unauthenticated)
    if len(token) > 8:
        assert token not in str(err) and token not in err.message
        for part in token.split("."):
            if len(part) > 8:
                assert part not in err.message
    return err


# Every key family -------------------------------------------------------------------
async def test_accepts_each_key_family(tmp_path, make_verifier, rsa_key, ec_key, ed_key, monkeypatch):
    monkeypatch.setenv("AG_TEST_HMAC", HMAC_SECRET)
    cfg = IdentityConfig(
        algorithms=["RS256", "PS256", "ES256", "EdDSA", "HS256"],
        public_key_files=[write_pem(tmp_path, rsa_key.public_pem), write_pem(tmp_path, ec_key.public_pem)],
        hmac_secret_env="AG_TEST_HMAC",
    )
    v = make_verifier(cfg, dev_public_key_pem=ed_key.public_pem)
    for key, alg in [(rsa_key.private, "RS256"), (rsa_key.private, "PS256"),
                     (ec_key.private, "ES256"), (ed_key.private, "EdDSA"), (HMAC_SECRET, "HS256")]:
        ident = await v.verify(sign(key, alg))
        assert ident.agent_id == "support-bot", alg
        assert ident.team == "support"
        assert ident.roles == ("reader", "writer")
        assert ident.claims["sub"] == "support-bot"
        assert ident.expires_at == float(ident.claims["exp"])


async def test_hmac_secret_from_file(tmp_path, make_verifier):
    secret_file = tmp_path / "hmac.txt"
    secret_file.write_text(HMAC_SECRET + "\n")
    v = make_verifier(IdentityConfig(algorithms=["HS256"], hmac_secret_file=secret_file))
    assert (await v.verify(sign(HMAC_SECRET, "HS256"))).agent_id == "support-bot"
    await rejected(v, sign("another-secret-" + "y" * 40, "HS256"), "bad_signature")


# The rejection list -----------------------------------------------------------------
@pytest.fixture
def ed_verifier(tmp_path, make_verifier, ed_key) -> JwtVerifier:
    cfg = IdentityConfig(algorithms=["EdDSA"], issuer="https://idp.example", audience="agentgate",
                         leeway_seconds=5)
    return make_verifier(cfg, dev_public_key_pem=ed_key.public_pem)


def ed_token(ed_key: KeyPair, **over: Any) -> str:
    return sign(ed_key.private, "EdDSA", claims(**{"iss": "https://idp.example", "aud": "agentgate", **over}))


async def test_valid_token_with_issuer_and_audience(ed_verifier, ed_key):
    assert (await ed_verifier.verify(ed_token(ed_key))).agent_id == "support-bot"
    # aud may be a list containing ours
    assert await ed_verifier.verify(ed_token(ed_key, aud=["other", "agentgate"]))


async def test_missing_and_malformed(ed_verifier):
    await rejected(ed_verifier, "", "missing_token")
    for bad in ["not-a-jwt", "a.b.c", "eyJhbGciOiJFZERTQSJ9.@@@.sig", "é.é.é", "a." * 10_000]:
        await rejected(ed_verifier, bad, "malformed_token")


async def test_bad_signature(ed_verifier, ed_key):
    token = ed_token(ed_key)
    head, payload, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "==")) | {"sub": "admin-bot"}
    await rejected(ed_verifier, f"{head}.{b64url(json.dumps(forged).encode())}.{sig}", "bad_signature")
    other = ed25519.Ed25519PrivateKey.generate()
    await rejected(ed_verifier, sign(other, "EdDSA", claims(iss="https://idp.example", aud="agentgate")),
                   "bad_signature")


async def test_alg_none_always_refused(tmp_path, make_verifier, ed_key):
    payload = claims(iss="https://idp.example", aud="agentgate")
    unsigned = jwt.encode(payload, None, algorithm="none")
    shouty = (b64url(json.dumps({"alg": "NONE"}).encode()) + "."
              + b64url(json.dumps(payload).encode()) + ".")
    v = make_verifier(IdentityConfig(algorithms=["EdDSA"]), dev_public_key_pem=ed_key.public_pem)
    await rejected(v, unsigned, "alg_none")
    await rejected(v, shouty, "alg_none")


async def test_alg_not_allowed(ed_verifier, rsa_key):
    await rejected(ed_verifier, sign(rsa_key.private, "RS256"), "alg_not_allowed")


async def test_time_claims(ed_verifier, ed_key):
    now = int(time.time())
    await rejected(ed_verifier, ed_token(ed_key, exp=now - 60), "token_expired")
    await rejected(ed_verifier, ed_token(ed_key, nbf=now + 3600), "token_not_yet_valid")
    await rejected(ed_verifier, ed_token(ed_key, iat=now + 3600), "token_not_yet_valid")
    await rejected(ed_verifier, ed_token(ed_key, exp="soon"), "malformed_token")
    await rejected(ed_verifier, ed_token(ed_key, exp=float("nan")), "malformed_token")
    await rejected(ed_verifier, ed_token(ed_key, exp=float("inf")), "malformed_token")
    await rejected(ed_verifier, ed_token(ed_key, exp=True), "malformed_token")
    # inside the 5 s leeway
    assert await ed_verifier.verify(ed_token(ed_key, exp=now - 2))
    assert await ed_verifier.verify(ed_token(ed_key, nbf=now + 2))


async def test_issuer_and_audience(ed_verifier, ed_key):
    await rejected(ed_verifier, ed_token(ed_key, iss="https://evil.example"), "wrong_issuer")
    await rejected(ed_verifier, ed_token(ed_key, iss=None), "wrong_issuer")
    await rejected(ed_verifier, ed_token(ed_key, aud="someone-else"), "wrong_audience")
    await rejected(ed_verifier, ed_token(ed_key, aud=None), "wrong_audience")


async def test_issuer_and_audience_unchecked_when_not_configured(make_verifier, ed_key):
    v = make_verifier(IdentityConfig(algorithms=["EdDSA"]), dev_public_key_pem=ed_key.public_pem)
    assert await v.verify(sign(ed_key.private, "EdDSA", claims(iss="anyone", aud="anything")))


# Admin tokens: their own audience (found by review: an agent token whose roles claim said
# "operator" could flip kill-switches, "approver" approve, "responder" read the audit) ------------
async def test_agent_tokens_never_pass_as_admin_tokens(ed_verifier, ed_key):
    for role in ("admin", "operator", "approver", "responder"):
        err = await rejected(ed_verifier, ed_token(ed_key, roles=[role]), "wrong_audience", admin=True)
        assert "'agentgate-admin'" in err.message
    await rejected(ed_verifier, ed_token(ed_key, roles=["admin"], aud=None), "wrong_audience", admin=True)
    # verified as an agent first: the cached verification is not an admin one
    agent = ed_token(ed_key, roles=["admin"])
    assert (await ed_verifier.verify(agent)).roles == ("admin",)
    await rejected(ed_verifier, agent, "wrong_audience", admin=True)


async def test_admin_tokens_never_pass_as_agent_tokens(ed_verifier, ed_key):
    admin = ed_token(ed_key, aud="agentgate-admin", roles=["responder"])
    assert (await ed_verifier.verify(admin, agent=False)).roles == ("responder",)
    # served from the cache for the admin API, refused for agents all the same
    assert (await ed_verifier.verify(admin, agent=False)).roles == ("responder",)
    err = await rejected(ed_verifier, admin, "wrong_audience")
    assert "admin tokens" in err.message
    # naming the agents' audience as well does not help
    both = ed_token(ed_key, aud=["agentgate", "agentgate-admin"])
    assert await ed_verifier.verify(both, agent=False)
    await rejected(ed_verifier, both, "wrong_audience")


async def test_admin_audience_applies_without_an_agent_audience(make_verifier, ed_key):
    """With identity.audience unset, agent tokens' aud is free, except for the admin audience;
    a configured admin_audience replaces the default."""
    v = make_verifier(IdentityConfig(algorithms=["EdDSA"], admin_audience="ops-console"),
                      dev_public_key_pem=ed_key.public_pem)
    assert await v.verify(sign(ed_key.private, "EdDSA", claims(aud="agentgate-admin")))
    assert await v.verify(sign(ed_key.private, "EdDSA", claims(aud=None)))
    await rejected(v, sign(ed_key.private, "EdDSA", claims(aud=["x", "ops-console"])), "wrong_audience")
    await rejected(v, sign(ed_key.private, "EdDSA", claims(aud=None)), "wrong_audience", admin=True)
    await rejected(v, sign(ed_key.private, "EdDSA", claims(aud="agentgate-admin")), "wrong_audience", admin=True)
    assert await v.verify(sign(ed_key.private, "EdDSA", claims(aud="ops-console")), agent=False)
    # aud must be a string or a list of strings (RFC 7519), whichever path reads it
    for bad in (7, {"ops-console": True}, [["ops-console"]]):
        await rejected(v, sign(ed_key.private, "EdDSA", claims(aud=bad)), "wrong_audience")
        await rejected(v, sign(ed_key.private, "EdDSA", claims(aud=bad)), "wrong_audience", admin=True)


def test_admin_audience_must_differ_from_the_agent_audience(tmp_path):
    assert IdentityConfig().admin_audience == "agentgate-admin"
    for same in ({"audience": "agentgate", "admin_audience": "agentgate"}, {"audience": "agentgate-admin"}):
        with pytest.raises(ValidationError, match="must differ"):
            IdentityConfig(**same)
    cfg = tmp_path / "agentgate.toml"
    cfg.write_text('[identity]\naudience = "shared"\nadmin_audience = "shared"\n')
    with pytest.raises(ConfigError, match=r"identity\.admin_audience and identity\.audience .*must differ"):
        load_config(cfg)
    cfg.write_text('[identity]\nadmin_audience = ""\n')
    with pytest.raises(ConfigError, match=r"identity\.admin_audience"):
        load_config(cfg)


# Maximum lifetime (found by review: a token with exp a century away was accepted) --------------
async def test_token_lifetime_is_bounded(make_verifier, ed_key):
    clock = FakeClock(1_700_000_000.0)
    now = int(clock.now)
    v = make_verifier(IdentityConfig(algorithms=["EdDSA"], leeway_seconds=5, max_token_lifetime_seconds=3600),
                      dev_public_key_pem=ed_key.public_pem, clock=clock)

    def tok(**over: Any) -> str:
        return sign(ed_key.private, "EdDSA", claims(**{"iat": now, "nbf": now, **over}))

    # with iat: exp - iat, both from the issuer's clock, so no leeway
    assert await v.verify(tok(exp=now + 3600))
    err = await rejected(v, tok(exp=now + 3601), "token_lifetime_too_long")
    assert "3600 seconds" in err.message and "identity.max_token_lifetime_seconds" in err.message
    await rejected(v, tok(exp=now + 100 * 365 * 86400), "token_lifetime_too_long")
    # an old iat counts: a day-old token with an hour left has lived too long
    await rejected(v, tok(iat=now - 86400, nbf=None, exp=now + 3600), "token_lifetime_too_long")
    # without iat: exp - now, with the leeway for an issuer clock ahead of ours
    assert await v.verify(tok(iat=None, exp=now + 3605))
    await rejected(v, tok(iat=None, exp=now + 3606), "token_lifetime_too_long")
    await rejected(v, tok(iat=None, nbf=None, exp=now + 100 * 365 * 86400), "token_lifetime_too_long")
    # admin tokens too
    await rejected(v, tok(aud="agentgate-admin", exp=now + 7200), "token_lifetime_too_long", admin=True)
    assert await v.verify(tok(aud="agentgate-admin", exp=now + 600), agent=False)


async def test_default_lifetime_is_a_day(make_verifier, ed_key):
    assert IdentityConfig().max_token_lifetime_seconds == 86400
    v = make_verifier(IdentityConfig(algorithms=["EdDSA"]), dev_public_key_pem=ed_key.public_pem)
    now = int(time.time())
    assert await v.verify(sign(ed_key.private, "EdDSA", claims(exp=now + 86400)))
    await rejected(v, sign(ed_key.private, "EdDSA", claims(exp=now + 86401)), "token_lifetime_too_long")
    await rejected(v, sign(ed_key.private, "EdDSA", claims(exp=now + 100 * 365 * 86400)), "token_lifetime_too_long")
    for bad in (0, -1):
        with pytest.raises(ValidationError, match="max_token_lifetime_seconds"):
            IdentityConfig(max_token_lifetime_seconds=bad)


async def test_missing_claims(ed_verifier, ed_key):
    await rejected(ed_verifier, ed_token(ed_key, sub=None), "missing_claim")
    await rejected(ed_verifier, ed_token(ed_key, sub=""), "missing_claim")
    await rejected(ed_verifier, ed_token(ed_key, exp=None), "missing_claim")


async def test_unknown_key(tmp_path, make_verifier, rsa_key, ec_key):
    # ES256 allowed but only an RSA key configured: no key of the family.
    v = make_verifier(IdentityConfig(algorithms=["RS256", "ES256", "HS256"],
                                     public_key_files=[write_pem(tmp_path, rsa_key.public_pem)]))
    await rejected(v, sign(ec_key.private, "ES256"), "unknown_key")
    # HS256 allowed but no secret configured.
    await rejected(v, sign(HMAC_SECRET, "HS256"), "unknown_key")
    # An EC key of the wrong curve for the algorithm is never used.
    p384 = ec.generate_private_key(ec.SECP384R1())
    v2 = make_verifier(IdentityConfig(algorithms=["ES256", "ES384"], public_key_files=[
        write_pem(tmp_path, p384.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))]))
    await rejected(v2, sign(ec_key.private, "ES256"), "unknown_key")
    assert await v2.verify(sign(p384, "ES384"))


async def test_hs256_signed_with_rsa_public_key_is_rejected(tmp_path, make_verifier, rsa_key, monkeypatch):
    """The classic key-confusion attack: the RSA public key PEM used as an HMAC secret."""
    forged = hand_signed_hs256(rsa_key.public_pem, claims())
    pem_file = write_pem(tmp_path, rsa_key.public_pem)
    only_rsa = make_verifier(IdentityConfig(algorithms=["RS256"], public_key_files=[pem_file]))
    await rejected(only_rsa, forged, "alg_not_allowed")
    both_no_secret = make_verifier(IdentityConfig(algorithms=["RS256", "HS256"], public_key_files=[pem_file]))
    await rejected(both_no_secret, forged, "unknown_key")
    monkeypatch.setenv("AG_TEST_HMAC", HMAC_SECRET)
    both_with_secret = make_verifier(IdentityConfig(algorithms=["RS256", "HS256"], public_key_files=[pem_file],
                                                    hmac_secret_env="AG_TEST_HMAC"))
    await rejected(both_with_secret, forged, "bad_signature")
    assert await both_with_secret.verify(sign(rsa_key.private, "RS256"))


async def test_rsa_token_not_verified_with_hmac_secret(make_verifier, monkeypatch):
    monkeypatch.setenv("AG_TEST_HMAC", HMAC_SECRET)
    v = make_verifier(IdentityConfig(algorithms=["RS256", "HS256"], hmac_secret_env="AG_TEST_HMAC"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await rejected(v, sign(other, "RS256"), "unknown_key")


# Configuration errors ---------------------------------------------------------------
def test_config_errors(tmp_path, monkeypatch, rsa_key):
    monkeypatch.setenv("AG_SHORT", "tooshort")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        JwtVerifier(IdentityConfig(algorithms=["HS256"], hmac_secret_env="AG_SHORT"))
    with pytest.raises(ConfigError, match="AG_UNSET_VAR"):
        JwtVerifier(IdentityConfig(algorithms=["HS256"], hmac_secret_env="AG_UNSET_VAR"))
    monkeypatch.setenv("AG_PEM", rsa_key.public_pem.decode())
    with pytest.raises(ConfigError, match="PEM"):
        JwtVerifier(IdentityConfig(algorithms=["HS256"], hmac_secret_env="AG_PEM"))
    private = rsa_key.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    with pytest.raises(ConfigError, match="private key"):
        JwtVerifier(IdentityConfig(algorithms=["RS256"], public_key_files=[write_pem(tmp_path, private)]))
    with pytest.raises(ConfigError, match="registry_file"):
        JwtVerifier(IdentityConfig(require_registered_agents=True))
    with pytest.raises(ConfigError, match="jwks_url"):
        JwtVerifier(IdentityConfig(jwks_url="ftp://idp.example/jwks"))


# Identity claims --------------------------------------------------------------------
async def test_roles_as_list_or_string_and_custom_claim_names(make_verifier, ed_key):
    cfg = IdentityConfig(algorithms=["EdDSA"], team_claim="org_team", roles_claim="scp")
    v = make_verifier(cfg, dev_public_key_pem=ed_key.public_pem)
    ident = await v.verify(sign(ed_key.private, "EdDSA", claims(org_team="billing", scp=["a", "b", "a"])))
    assert ident.team == "billing" and ident.roles == ("a", "b")
    ident = await v.verify(sign(ed_key.private, "EdDSA", claims(scp="read, write  admin,")))
    assert ident.roles == ("read", "write", "admin") and ident.team is None
    ident = await v.verify(sign(ed_key.private, "EdDSA", claims(scp=None)))
    assert ident.roles == ()
    await rejected(v, sign(ed_key.private, "EdDSA", claims(scp=[1, 2])), "malformed_token")
    await rejected(v, sign(ed_key.private, "EdDSA", claims(org_team=["x"])), "malformed_token")


# Registry ---------------------------------------------------------------------------
REGISTRY_TOML = """
[agents.support-bot]
owner = "alice@example.com"
team = "support"
purpose = "Answers customer tickets"
environment = "prod"
systems = ["zendesk", "slack"]
"""


def test_registry_load(tmp_path):
    path = tmp_path / "agents.toml"
    path.write_text(REGISTRY_TOML)
    reg = AgentRegistry.load(path)
    assert "support-bot" in reg and "ghost" not in reg and len(reg) == 1
    rec = reg.get("support-bot")
    assert rec is not None and rec.owner == "alice@example.com" and rec.systems == ("zendesk", "slack")
    assert reg.get("ghost") is None
    data = reg.as_data()
    assert json.loads(json.dumps(data)) == {"support-bot": {
        "owner": "alice@example.com", "team": "support", "purpose": "Answers customer tickets",
        "environment": "prod", "systems": ["zendesk", "slack"]}}


def test_registry_teams_for_kill_switches():
    """Casefolded, ids matched case-insensitively (a registry cannot list ids that differ only
    in case: test_agent_id_differing_from_the_registry_only_in_case_is_refused)."""
    reg = AgentRegistry.from_dict({"agents": {
        "Depot-Bot": {"owner": "a@example.com", "team": "Warehouse"},
        "loner": {"owner": "a@example.com"}}})
    assert reg.teams("DEPOT-BOT") == reg.teams("depot-bot") == frozenset({"warehouse"})
    assert reg.teams("loner") == reg.teams("ghost") == frozenset()


def test_registry_errors(tmp_path):
    path = tmp_path / "agents.toml"
    path.write_text(REGISTRY_TOML + 'colour = "blue"\n')
    with pytest.raises(ConfigError, match=r"agents\.support-bot\.colour: unknown key"):
        AgentRegistry.load(path)
    path.write_text("[agents.x]\nteam = 'a'\n")
    with pytest.raises(ConfigError, match=r"agents\.x\.owner"):
        AgentRegistry.load(path)
    path.write_text("[agentz.x]\nowner = 'a'\n")
    with pytest.raises(ConfigError, match="agentz: unknown key"):
        AgentRegistry.load(path)
    path.write_text("[agents.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        AgentRegistry.load(path)
    with pytest.raises(ConfigError, match="not found"):
        AgentRegistry.load(tmp_path / "missing.toml")


async def test_agent_id_differing_from_the_registry_only_in_case_is_refused(tmp_path, make_verifier, ed_key):
    """Kill-switches match agent ids case-insensitively; policy reads the registration by the
    exact id. A token whose id matches a registered agent only case-insensitively would be
    stopped as that agent but judged as an unregistered one (its registered systems not
    applied): it is refused, with or without require_registered_agents."""
    reg_file = tmp_path / "agents.toml"
    reg_file.write_text(REGISTRY_TOML)
    upper = sign(ed_key.private, "EdDSA", claims(sub="Support-Bot"))
    for required in (False, True):
        verifier = make_verifier(IdentityConfig(algorithms=["EdDSA"], registry_file=reg_file,
                                                require_registered_agents=required),
                                 dev_public_key_pem=ed_key.public_pem)
        for _ in range(2):  # and from the token cache
            with pytest.raises(GatewayError) as info:
                await verifier.verify(upper)
            assert (info.value.status, info.value.code, info.value.outcome) == (403, "agent_id_case_mismatch", "denied")
            assert "'support-bot'" in info.value.message
        assert (await verifier.verify(sign(ed_key.private, "EdDSA"))).agent_id == "support-bot"
    (tmp_path / "twins.toml").write_text('[agents.Bot]\nowner = "a@example.com"\n[agents.bot]\nowner = "b@example.com"\n')
    with pytest.raises(ConfigError, match="'Bot' and 'bot' differ only in case"):
        AgentRegistry.load(tmp_path / "twins.toml")


async def test_registry_required(tmp_path, make_verifier, ed_key):
    reg_file = tmp_path / "agents.toml"
    reg_file.write_text(REGISTRY_TOML)
    on = make_verifier(IdentityConfig(algorithms=["EdDSA"], registry_file=reg_file,
                                      require_registered_agents=True),
                       dev_public_key_pem=ed_key.public_pem)
    assert (await on.verify(sign(ed_key.private, "EdDSA"))).agent_id == "support-bot"
    ghost = sign(ed_key.private, "EdDSA", claims(sub="ghost-bot"))
    for _ in range(2):  # a cached identity is checked against the registry too
        with pytest.raises(GatewayError) as info:
            await on.verify(ghost)
        err = info.value
        assert isinstance(err, UnregisteredAgent) and not isinstance(err, IdentityError)
        assert (err.status, err.code, err.outcome) == (403, "unregistered_agent", "denied")
        assert ghost not in err.message
    # A registry swapped in at run time applies at once.
    on.registry = AgentRegistry.from_dict({"agents": {"ghost-bot": {"owner": "bob@example.com"}}})
    assert (await on.verify(ghost)).agent_id == "ghost-bot"

    off = make_verifier(IdentityConfig(algorithms=["EdDSA"], registry_file=reg_file),
                        dev_public_key_pem=ed_key.public_pem)
    assert (await off.verify(ghost)).agent_id == "ghost-bot"


# Cache ------------------------------------------------------------------------------
async def test_cache_hit_rechecks_expiry(make_verifier, ed_key):
    clock = FakeClock(time.time())
    v = make_verifier(IdentityConfig(algorithms=["EdDSA"], leeway_seconds=10),
                      dev_public_key_pem=ed_key.public_pem, clock=clock)
    token = sign(ed_key.private, "EdDSA", claims(exp=int(clock.now) + 60))
    first = await v.verify(token)
    assert await v.verify(token) is first
    assert v.stats["cache_hits"] == 1 and v.stats["cache_misses"] == 1
    clock.now += 65  # past exp, inside leeway
    assert await v.verify(token) is first
    clock.now += 10  # past exp + leeway
    await rejected(v, token, "token_expired")
    assert v.stats["cache_misses"] == 1, "the rejection must come from the cached entry"
    await rejected(v, token, "token_expired")  # and a fresh verification agrees
    assert v.stats["cache_misses"] == 2


async def test_failures_not_cached_and_cache_bounded(make_verifier, ed_key):
    v = make_verifier(IdentityConfig(algorithms=["EdDSA"]), dev_public_key_pem=ed_key.public_pem)
    bad = sign(ed25519.Ed25519PrivateKey.generate(), "EdDSA")
    await rejected(v, bad, "bad_signature")
    await rejected(v, bad, "bad_signature")
    assert v.stats["cache_misses"] == 2 and v.stats["cache_hits"] == 0
    v.cache_size = 3
    tokens = [sign(ed_key.private, "EdDSA", claims(sub=f"agent-{i}")) for i in range(5)]
    for t in tokens:
        await v.verify(t)
    assert len(v._cache) == 3
    await v.verify(tokens[-1])
    assert v.stats["cache_hits"] == 1
    await v.verify(tokens[0])  # evicted: verified again
    assert v.stats["cache_misses"] == 2 + 6


# JWKS -------------------------------------------------------------------------------
@dataclass
class JwksServer:
    keys: list[dict[str, Any]]
    url: str = ""
    fetches: int = 0
    status: int = 200


async def _serve_jwks(server: JwksServer, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    async def handler(request: web.Request) -> web.Response:
        server.fetches += 1
        if server.status != 200:
            return web.Response(status=server.status)
        return web.json_response({"keys": server.keys})

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}/jwks.json"
    return runner


@pytest.fixture
async def jwks_server(rsa_key) -> AsyncIterator[JwksServer]:
    server = JwksServer(keys=[rsa_key.jwk("k1")])
    runner = await _serve_jwks(server)
    yield server
    await runner.cleanup()


async def test_jwks_rotation_without_restart(make_verifier, jwks_server, rsa_key, rsa_key2, ec_key):
    mono = FakeClock(1000.0)
    v = make_verifier(IdentityConfig(algorithms=["RS256", "ES256"], jwks_url=jwks_server.url),
                      monotonic=mono)
    t1 = sign(rsa_key.private, "RS256", kid="k1")
    assert (await v.verify(t1)).agent_id == "support-bot"
    assert jwks_server.fetches == 1
    # A token with the right kid but signed by another key fails without a refetch.
    await rejected(v, sign(rsa_key2.private, "RS256", kid="k1"), "bad_signature")
    assert jwks_server.fetches == 1

    # The IdP rotates: k2 (and an EC key) appear, k1 is retired.
    jwks_server.keys = [rsa_key2.jwk("k2"), ec_key.jwk("e1")]
    mono.now += v.jwks_min_refresh_seconds + 1
    assert (await v.verify(sign(rsa_key2.private, "RS256", kid="k2"))).agent_id == "support-bot"
    assert await v.verify(sign(ec_key.private, "ES256", kid="e1"))
    assert jwks_server.fetches == 2
    # The key set changed, so the cached k1 verification is gone and k1 is now unknown.
    await rejected(v, t1, "unknown_key")


async def test_jwks_refreshed_in_background_when_stale(make_verifier, jwks_server, rsa_key, rsa_key2):
    mono = FakeClock(1000.0)
    v = make_verifier(IdentityConfig(algorithms=["RS256"], jwks_url=jwks_server.url, jwks_cache_seconds=60),
                      monotonic=mono)
    t1 = sign(rsa_key.private, "RS256", kid="k1")
    await v.verify(t1)
    jwks_server.keys = [rsa_key2.jwk("k2")]
    mono.now += 61
    assert await v.verify(t1)  # served from cache while the refresh runs
    assert v._bg_refresh is not None
    await asyncio.wait_for(v._bg_refresh, timeout=5)
    assert jwks_server.fetches == 2
    await rejected(v, t1, "unknown_key")


async def test_unknown_kid_flood_is_rate_limited(make_verifier, jwks_server, rsa_key):
    mono = FakeClock(1000.0)
    v = make_verifier(IdentityConfig(algorithms=["RS256"], jwks_url=jwks_server.url), monotonic=mono)
    assert await v.verify(sign(rsa_key.private, "RS256", kid="k1"))
    mono.now += v.jwks_min_refresh_seconds + 1
    flood = [sign(rsa_key.private, "RS256", kid=uuid.uuid4().hex) for _ in range(200)]
    results = await asyncio.gather(*(v.verify(t) for t in flood), return_exceptions=True)
    assert all(isinstance(r, IdentityError) and r.code == "unknown_key" for r in results)
    for t in flood[:50]:  # and sequentially
        await rejected(v, t, "unknown_key")
    assert jwks_server.fetches == 2  # the initial fetch plus one refresh for the whole flood


async def test_jwks_unavailable_fails_closed_then_recovers(make_verifier, jwks_server, rsa_key):
    jwks_server.status = 503
    mono = FakeClock(1000.0)
    v = make_verifier(IdentityConfig(algorithms=["RS256"], jwks_url=jwks_server.url), monotonic=mono)
    token = sign(rsa_key.private, "RS256", kid="k1")
    await rejected(v, token, "unknown_key")
    await rejected(v, token, "unknown_key")
    assert jwks_server.fetches == 1 and v.stats["jwks_fetch_errors"] == 1
    jwks_server.status = 200
    mono.now += v.jwks_min_refresh_seconds + 1
    assert await v.verify(token)


async def test_jwks_over_https_with_private_ca(tmp_path, make_verifier, rsa_key):
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = JwksServer(keys=[rsa_key.jwk("k1")])
    runner = await _serve_jwks(server, server_ctx)
    try:
        token = sign(rsa_key.private, "RS256", kid="k1")
        v = make_verifier(IdentityConfig(algorithms=["RS256"], jwks_url=server.url, jwks_ca_file=ca_file))
        assert await v.verify(token)
        # Without the private CA the server is not trusted: no keys, fail closed.
        untrusting = make_verifier(IdentityConfig(algorithms=["RS256"], jwks_url=server.url))
        await rejected(untrusting, token, "unknown_key")
        assert untrusting.stats["jwks_fetch_errors"] == 1
    finally:
        await runner.cleanup()


# Header extraction ------------------------------------------------------------------
def test_extract_bearer():
    tok = "aaa.bbb.ccc"
    assert extract_bearer(f"Bearer {tok}") == tok
    assert extract_bearer(f"bearer   {tok} ") == tok
    basic = base64.b64encode(f"any-user:{tok}".encode()).decode()
    assert extract_bearer(f"Basic {basic}") == tok
    assert extract_bearer("Basic " + base64.b64encode(f":{tok}".encode()).decode()) == tok
    cases = {
        None: "missing_token", "": "missing_token", "   ": "missing_token", "Bearer": "missing_token",
        "Basic " + base64.b64encode(b"user:").decode(): "missing_token",
        "Basic !!!notbase64": "malformed_token",
        "Basic " + base64.b64encode(b"no-colon").decode(): "malformed_token",
        "Basic " + base64.b64encode(b"u:\xff\xfe").decode(): "malformed_token",
        "Digest abc": "malformed_token", tok: "malformed_token",
        "Bearer aaa.bbb ccc": "malformed_token",
    }
    for value, code in cases.items():
        with pytest.raises(IdentityError) as info:
            extract_bearer(value)
        assert info.value.code == code, value
        assert "bbb" not in info.value.message


# Dev key ----------------------------------------------------------------------------
async def test_dev_key_and_minted_token(tmp_path, make_verifier):
    path = tmp_path / "data" / "nested" / "dev-signing-key.pem"
    pem = ensure_dev_key(path)
    assert path.read_bytes() == pem and pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_dev_key(path) == pem
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left

    token = mint_token(pem, agent="support-bot", team="support", roles=["reader"], ttl_seconds=3600,
                       issuer="agentgate-dev", audience="agentgate", extra={"env": "test"})
    cfg = IdentityConfig(issuer="agentgate-dev", audience="agentgate")
    v = make_verifier(cfg, dev_public_key_pem=public_pem(pem))
    ident = await v.verify(token)
    assert (ident.agent_id, ident.team, ident.roles) == ("support-bot", "support", ("reader",))
    c = ident.claims
    assert c["env"] == "test" and c["nbf"] == c["iat"] and c["exp"] - c["iat"] == 3600 and c["jti"]
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"

    with pytest.raises(ValueError, match="override"):
        mint_token(pem, agent="a", team=None, roles=[], ttl_seconds=60, issuer=None, audience=None,
                   extra={"sub": "admin"})
    with pytest.raises(ValueError, match="positive"):
        mint_token(pem, agent="a", team=None, roles=[], ttl_seconds=0, issuer=None, audience=None)


def test_dev_key_rejects_wrong_key_type(tmp_path, ec_key):
    path = tmp_path / "k.pem"
    path.write_bytes(ec_key.private.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    with pytest.raises(ValueError, match="Ed25519"):
        ensure_dev_key(path)


def test_parse_ttl():
    assert [parse_ttl(x) for x in ["1h", "30m", "45s", "2d", "3600", " 2H "]] == \
        [3600, 1800, 45, 172800, 3600, 7200]
    for bad in ["", "1x", "h", "-5m", "1.5h", "0", "0s"]:
        with pytest.raises(ValueError, match="TTL"):
            parse_ttl(bad)


async def test_jwks_skips_unusable_entries(make_verifier, jwks_server, rsa_key, monkeypatch):
    monkeypatch.setenv("AG_TEST_HMAC", HMAC_SECRET)
    oct_key = {"kty": "oct", "kid": "sym", "k": b64url(b"attacker-chosen-secret-" + b"z" * 20)}
    jwks_server.keys = [
        oct_key,
        {**rsa_key.jwk("enc"), "use": "enc"},
        {**rsa_key.jwk("nope"), "alg": "none"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not-an-object",
        rsa_key.jwk("k1"),
    ]
    v = make_verifier(IdentityConfig(algorithms=["RS256", "HS256"], jwks_url=jwks_server.url,
                                     hmac_secret_env="AG_TEST_HMAC"))
    assert await v.verify(sign(rsa_key.private, "RS256", kid="k1"))
    await rejected(v, sign(rsa_key.private, "RS256", kid="enc"), "unknown_key")
    # A symmetric key published in the JWKS is never an HMAC secret.
    await rejected(v, sign(b"attacker-chosen-secret-" + b"z" * 20, "HS256", kid="sym"), "bad_signature")
