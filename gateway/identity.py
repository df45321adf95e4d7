"""Agent identity: verify the agent's JWT and turn it into an :class:`Identity`.

Security rules (RFC 8725):
* the algorithm comes from the configured allow-list, never from the token alone; ``none`` is
  always refused;
* keys are chosen by algorithm *family*: HS* only ever uses the configured HMAC secret, RS*/PS*
  only RSA public keys, ES* only EC keys of the matching curve, EdDSA only Ed25519/Ed448 keys,
  so a public key can never be abused as an HMAC secret;
* ``sub`` and ``exp`` are required; ``iss``/``aud`` are checked when configured; a lifetime
  longer than ``max_token_lifetime_seconds`` is refused;
* admin tokens are for their own audience (``admin_audience``, RFC 9068 / RFC 8707): the admin
  API requires it and agent verification refuses it, so neither kind of token passes for the other.

This runs for every request, so successful verifications are cached (bounded LRU keyed by a
digest of the token and the audience it was verified for) and ``exp`` is re-checked on every hit. JWKS keys are fetched with aiohttp,
cached, and refreshed when a token names an unknown ``kid`` (rate-limited).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from jwt.algorithms import get_default_algorithms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.config import ConfigError, IdentityConfig
from gateway.errors import Forbidden, Unauthenticated
from gateway.models import Identity
from gateway.registry import AgentRegistry

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 16 * 1024
MAX_JWKS_BYTES = 1 << 20
MIN_RSA_BITS = 2048

# Error codes ----------------------------------------------------------------------------
MISSING_TOKEN = "missing_token"
MALFORMED_TOKEN = "malformed_token"
BAD_SIGNATURE = "bad_signature"
ALG_NONE = "alg_none"
ALG_NOT_ALLOWED = "alg_not_allowed"
TOKEN_EXPIRED = "token_expired"
TOKEN_NOT_YET_VALID = "token_not_yet_valid"
WRONG_ISSUER = "wrong_issuer"
WRONG_AUDIENCE = "wrong_audience"
TOKEN_LIFETIME_TOO_LONG = "token_lifetime_too_long"
MISSING_CLAIM = "missing_claim"
UNKNOWN_KEY = "unknown_key"
UNREGISTERED_AGENT = "unregistered_agent"
AGENT_ID_CASE_MISMATCH = "agent_id_case_mismatch"


class IdentityError(Unauthenticated):
    """The agent's credential is missing or not acceptable (401, outcome ``unauthenticated``).

    ``code`` names the reason; the message never contains the token.
    """

    def __init__(self, message: str, *, code: str, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, status=status, headers=headers)


class UnregisteredAgent(Forbidden):
    """A valid token of an agent that is not in the registry (403, outcome ``denied``)."""

    code = UNREGISTERED_AGENT


# Bearer extraction ----------------------------------------------------------------------
_WHITESPACE = re.compile(r"\s")


def extract_bearer(value: str | None, kind: str = "agent") -> str:
    """The JWT from an ``Authorization``/``Proxy-Authorization`` value.

    Accepts ``Bearer <jwt>`` and ``Basic base64(user:jwt)`` (the JWT is the password, so
    clients that only speak proxy Basic auth can still present a token). ``kind`` names the
    token in refusals (``agent`` or ``admin``).
    """
    if value is None or not value.strip():
        raise IdentityError(f"no {kind} token presented", code=MISSING_TOKEN)
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    scheme = scheme.lower()
    if scheme == "bearer":
        token = rest
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise IdentityError("Basic credentials are not valid base64", code=MALFORMED_TOKEN) from None
        _, sep, token = decoded.partition(":")
        if not sep:
            raise IdentityError("Basic credentials must be user:token", code=MALFORMED_TOKEN)
    else:
        raise IdentityError("unsupported authorization scheme: use Bearer or Basic",
                            code=MALFORMED_TOKEN)
    if not token:
        raise IdentityError(f"no {kind} token presented", code=MISSING_TOKEN)
    if _WHITESPACE.search(token):  # \s is str.isspace (Py_UNICODE_ISSPACE), in C
        raise IdentityError(f"{kind} token contains whitespace", code=MALFORMED_TOKEN)
    return token


# Keys -----------------------------------------------------------------------------------
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def _family(alg: str) -> str:
    if alg.startswith("HS"):
        return "hmac"
    if alg.startswith(("RS", "PS")):
        return "rsa"
    if alg.startswith("ES"):
        return "ec"
    return "okp"  # EdDSA


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    """A cryptography public key object."""
    family: str
    curve: str | None = None
    kid: str | None = None
    alg: str | None = None
    """The JWK's ``alg``, when it pins one."""

    def fits(self, alg: str) -> bool:
        if self.family != _family(alg) or (self.alg is not None and self.alg != alg):
            return False
        return self.family != "ec" or self.curve == _CURVES.get(alg)


def _classify(key: Any, *, kid: str | None = None, alg: str | None = None) -> _Key | None:
    """Wrap a public key with its family; None for key types we never verify with."""
    if hasattr(key, "public_key") and not isinstance(
        key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
              ed448.Ed448PublicKey)
    ):
        key = key.public_key()  # a private key: only its public half is used
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return None
        return _Key(key, "rsa", kid=kid, alg=alg)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _Key(key, "ec", curve=key.curve.name, kid=kid, alg=alg)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return _Key(key, "okp", kid=kid, alg=alg)
    return None


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)


def _load_pem_keys(data: bytes, source: str) -> list[_Key]:
    """Public keys (or certificates) from a PEM file; private keys are refused."""
    keys: list[_Key] = []
    for match in _PEM_BLOCK.finditer(data):
        label, block = match.group(1), match.group(0)
        try:
            if label == b"CERTIFICATE":
                obj: Any = x509.load_pem_x509_certificate(block).public_key()
            elif b"PRIVATE" in label:
                raise ConfigError(f"{source}: contains a private key; configure the public key only")
            else:
                obj = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise ConfigError(f"{source}: unreadable PEM block {label.decode()}: {exc}") from None
        classified = _classify(obj)
        if classified is None:
            raise ConfigError(f"{source}: unsupported key type or RSA key shorter than {MIN_RSA_BITS} bits")
        keys.append(classified)
    if not keys:
        raise ConfigError(f"{source}: no PEM public key found")
    return keys


def _parse_jwks(doc: Any) -> list[_Key]:
    """Verification keys from a JWKS document, parsed with PyJWK; unusable entries are skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("JWKS document has no 'keys' list")
    keys: list[_Key] = []
    for entry in doc["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        kty, use, alg = entry.get("kty"), entry.get("use"), entry.get("alg")
        if kty == "oct" or (use is not None and use != "sig"):
            continue  # symmetric keys never come from a JWKS; encryption keys are not for us
        if alg is not None and (alg == "none" or alg not in get_default_algorithms()):
            continue
        try:
            # OKP keys need an explicit algorithm for Ed448 when the JWK carries no "alg".
            jwk = jwt.PyJWK(entry, algorithm=alg or ("EdDSA" if kty == "OKP" else None))
        except Exception as exc:  # noqa: BLE001 - one bad entry must not discard the whole set
            log.warning("JWKS key kid=%r skipped: %s", kid, exc)
            continue
        classified = _classify(jwk.key, kid=kid, alg=alg)
        if classified is None:
            log.warning("JWKS key kid=%r skipped: unsupported type or too short", kid)
            continue
        keys.append(classified)
    return keys


def _load_hmac_secret(cfg: IdentityConfig) -> bytes | None:
    hs_algs = [a for a in cfg.algorithms if a.startswith("HS")]
    if cfg.hmac_secret_env and cfg.hmac_secret_file:
        raise ConfigError("identity: set only one of hmac_secret_env and hmac_secret_file")
    if cfg.hmac_secret_env:
        value = os.environ.get(cfg.hmac_secret_env)
        if value is None:
            raise ConfigError(f"identity.hmac_secret_env: environment variable {cfg.hmac_secret_env} is not set")
        secret = value.encode()
    elif cfg.hmac_secret_file:
        try:
            secret = cfg.hmac_secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"identity.hmac_secret_file {cfg.hmac_secret_file}: {exc.strerror}") from None
    else:
        if hs_algs:
            log.warning("identity: %s allowed but no HMAC secret configured", ", ".join(hs_algs))
        return None
    if not hs_algs:
        return None
    need = max(_HMAC_MIN_BYTES[a] for a in hs_algs)
    if len(secret) < need:
        raise ConfigError(f"identity: the HMAC secret must be at least {need} bytes for {', '.join(hs_algs)}")
    if secret.lstrip().startswith(b"-----BEGIN") or secret.startswith(b"ssh-"):
        raise ConfigError("identity: the HMAC secret looks like a PEM/SSH key; use a random secret")
    return secret


def _ssl_context(cfg: IdentityConfig) -> ssl.SSLContext | bool:
    if cfg.jwks_ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(cfg.jwks_ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"identity.jwks_ca_file {cfg.jwks_ca_file}: {exc}") from None


def _check_jwks_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"identity.jwks_url: expected an http(s) URL, got {url!r}")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            log.warning("identity.jwks_url uses plain http: keys can be tampered with in transit")


# Claims ---------------------------------------------------------------------------------
def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # json.loads accepts NaN/Infinity: an exp of NaN would never expire.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IdentityError(f"token claim '{name}' must be a number", code=MALFORMED_TOKEN)
    return float(value)


def _audiences(claims: dict[str, Any]) -> tuple[str, ...]:
    """``aud`` as a tuple (RFC 7519: a string or an array of strings); anything else is refused."""
    value = claims.get("aud")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise IdentityError("token audience ('aud') must be a string or a list of strings", code=WRONG_AUDIENCE)


def _roles(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items: Iterable[str] = re.split(r"[\s,]+", value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = (v.strip() for v in value)
    else:
        raise IdentityError("token roles claim must be a list of strings or a string",
                            code=MALFORMED_TOKEN)
    return tuple(dict.fromkeys(r for r in items if r))


_JWT_ERRORS: list[tuple[type[Exception], str, str]] = [
    (jwt.InvalidSignatureError, BAD_SIGNATURE, "token signature is invalid"),
    (jwt.InvalidIssuerError, WRONG_ISSUER, "token issuer is not accepted"),
    (jwt.InvalidAlgorithmError, ALG_NOT_ALLOWED, "token algorithm is not allowed"),
    (jwt.InvalidKeyError, UNKNOWN_KEY, "no usable key for this token"),
    (jwt.ExpiredSignatureError, TOKEN_EXPIRED, "token has expired"),
    (jwt.ImmatureSignatureError, TOKEN_NOT_YET_VALID, "token is not yet valid"),
]


def _map_jwt_error(exc: jwt.PyJWTError) -> IdentityError:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        if exc.claim == "iss":
            return IdentityError("token has no issuer ('iss')", code=WRONG_ISSUER)
        return IdentityError(f"token is missing the '{exc.claim}' claim", code=MISSING_CLAIM)
    for cls, code, message in _JWT_ERRORS:
        if isinstance(exc, cls):
            return IdentityError(message, code=code)
    return IdentityError("token is malformed", code=MALFORMED_TOKEN)


# The verifier ---------------------------------------------------------------------------
_JWT = jwt.PyJWT()


class JwtVerifier:
    """Verifies agent JWTs against the configured keys; one instance per gateway.

    ``session_factory`` returns the aiohttp ``ClientSession`` used for JWKS fetches; the verifier
    owns and closes it. ``clock`` (wall time, for exp/nbf/iat) and ``monotonic`` (cache ages and
    the JWKS rate limit) exist so tests can move time without sleeping.
    """

    cache_size: int = 10_000
    jwks_min_refresh_seconds: float = 5.0
    """At most one JWKS fetch per this many seconds, so a flood of random kids cannot hammer it."""

    def __init__(
        self,
        cfg: IdentityConfig,
        *,
        dev_public_key_pem: bytes | None = None,
        registry: AgentRegistry | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._allowed = frozenset(cfg.algorithms)
        self._clock = clock
        self._monotonic = monotonic
        self._hmac = _load_hmac_secret(cfg)
        self._options: dict[str, Any] = {
            "verify_signature": True,
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,  # checked on our clock
            "verify_iss": cfg.issuer is not None,
            "verify_aud": False,  # checked by _check_audience: agent and admin tokens differ
            "verify_sub": True, "verify_jti": True,
            "require": [],
            "enforce_minimum_key_length": True,
        }

        static: list[_Key] = []
        for path in cfg.public_key_files:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"identity.public_key_files {path}: {exc.strerror}") from None
            static.extend(_load_pem_keys(data, str(path)))
        if dev_public_key_pem is not None:
            static.extend(_load_pem_keys(dev_public_key_pem, "dev signing key"))
        self._static = tuple(static)

        if registry is None and cfg.registry_file is not None:
            registry = AgentRegistry.load(cfg.registry_file)
        if cfg.require_registered_agents and registry is None:
            raise ConfigError("identity.require_registered_agents needs identity.registry_file")
        self.registry = registry

        self._jwks_url = cfg.jwks_url
        if self._jwks_url:
            _check_jwks_url(self._jwks_url)
        self._ssl = _ssl_context(cfg) if self._jwks_url else True
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._jwks: tuple[_Key, ...] = ()
        self._jwks_doc: Any = None
        self._jwks_fetched_at: float | None = None
        self._jwks_last_attempt: float | None = None
        self._jwks_lock = asyncio.Lock()
        self._bg_refresh: asyncio.Task[None] | None = None

        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()
        self._generation = 0
        """Bumped whenever the key set changes; a verification that raced it is not cached."""
        self.stats = {"cache_hits": 0, "cache_misses": 0, "jwks_fetches": 0, "jwks_fetch_errors": 0}

        if not (self._hmac or self._static or self._jwks_url):
            log.warning("identity: no verification keys configured; every token will be refused")

    # Public API -----------------------------------------------------------------------
    async def verify(self, token: str, *, agent: bool = True) -> Identity:
        """The verified identity behind ``token``, or IdentityError/UnregisteredAgent.

        ``agent=False`` is for admin API callers (people): the token must be for
        ``admin_audience``, and they are not in the agent registry. Agent tokens must not be.
        """
        if not token:
            raise IdentityError(f"no {'agent' if agent else 'admin'} token presented", code=MISSING_TOKEN)
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise IdentityError("token is malformed", code=MALFORMED_TOKEN)
        if self._jwks_url:
            await self._jwks_keep_fresh()

        digest = hashlib.sha256(token.encode()).digest()
        if not agent:  # an entry says "verified for this audience": admin and agent entries never mix
            digest = b"admin:" + digest
        hit = self._cache.get(digest)
        if hit is not None:
            identity, exp = hit
            if exp <= self._clock() - self.cfg.leeway_seconds:
                self._cache.pop(digest, None)
                raise IdentityError("token has expired", code=TOKEN_EXPIRED)
            self._cache.move_to_end(digest)
            self.stats["cache_hits"] += 1
            if agent:
                self._check_registered(identity)
            return identity

        self.stats["cache_misses"] += 1
        generation = self._generation
        claims = await self._verify_signature_and_claims(token)
        self._check_audience(claims, admin=not agent)
        self._check_times(claims)
        identity = self._identity(claims)
        if generation == self._generation:
            self._cache[digest] = (identity, identity.expires_at or 0.0)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if agent:
            self._check_registered(identity)
        return identity

    async def close(self) -> None:
        if self._bg_refresh is not None:
            self._bg_refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._bg_refresh
            self._bg_refresh = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def clear_cache(self) -> None:
        self._cache.clear()
        self._generation += 1

    # Verification ---------------------------------------------------------------------
    def _header(self, token: str) -> tuple[str, str | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise IdentityError("token is malformed", code=MALFORMED_TOKEN) from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not alg:
            raise IdentityError("token header has no algorithm", code=MALFORMED_TOKEN)
        if alg.lower() == "none":
            raise IdentityError("unsigned tokens (alg 'none') are never accepted", code=ALG_NONE)
        if alg not in self._allowed:
            raise IdentityError(f"token algorithm {alg[:16]!r} is not allowed", code=ALG_NOT_ALLOWED)
        if kid is not None and not isinstance(kid, str):
            raise IdentityError("token header 'kid' must be a string", code=MALFORMED_TOKEN)
        return alg, kid

    async def _verify_signature_and_claims(self, token: str) -> dict[str, Any]:
        alg, kid = self._header(token)
        if _family(alg) == "hmac":
            if self._hmac is None:
                raise IdentityError(f"no HMAC secret configured for {alg}", code=UNKNOWN_KEY)
            claims = self._decode(token, self._hmac, alg)
            if claims is None:
                raise IdentityError("token signature is invalid", code=BAD_SIGNATURE)
            return claims

        tried = False
        for key in self._candidates(alg, kid):
            tried = True
            claims = self._decode(token, key.key, alg)
            if claims is not None:
                return claims
        if kid is not None and self._jwks_url and not any(k.kid == kid for k in self._jwks):
            await self._jwks_refresh(force=True)
            for key in self._jwks:
                if key.kid == kid and key.fits(alg):
                    tried = True
                    claims = self._decode(token, key.key, alg)
                    if claims is not None:
                        return claims
        if tried:
            raise IdentityError("token signature is invalid", code=BAD_SIGNATURE)
        if kid is not None:
            raise IdentityError("no key is configured for the token's key id", code=UNKNOWN_KEY)
        raise IdentityError(f"no key is configured for {alg}", code=UNKNOWN_KEY)

    def _candidates(self, alg: str, kid: str | None) -> list[_Key]:
        """Keys to try: the JWKS key named by ``kid`` if there is one, else every key of the
        family (PEM keys carry no kid, so a kid we do not know may still be one of them)."""
        if kid is not None:
            named = [k for k in self._jwks if k.kid == kid and k.fits(alg)]
            if named:
                return named
            return [k for k in self._static if k.fits(alg)]
        return [k for k in (*self._static, *self._jwks) if k.fits(alg)]

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any] | None:
        """Claims if ``key`` verifies the signature; None if it does not; IdentityError else."""
        try:
            claims: dict[str, Any] = _JWT.decode(
                token, key, algorithms=[alg], options=self._options,  # type: ignore[arg-type]
                issuer=self.cfg.issuer,
            )
        except jwt.InvalidSignatureError:
            return None
        except jwt.PyJWTError as exc:
            raise _map_jwt_error(exc) from None
        return claims

    def _check_times(self, claims: dict[str, Any]) -> None:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise IdentityError("token is missing the 'sub' claim", code=MISSING_CLAIM)
        exp = _number(claims, "exp")
        if exp is None:
            raise IdentityError("token is missing the 'exp' claim", code=MISSING_CLAIM)
        nbf, iat = _number(claims, "nbf"), _number(claims, "iat")
        now, leeway = self._clock(), self.cfg.leeway_seconds
        if exp <= now - leeway:
            raise IdentityError("token has expired", code=TOKEN_EXPIRED)
        if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
            raise IdentityError("token is not yet valid", code=TOKEN_NOT_YET_VALID)
        # exp - iat are both the issuer's clock: no skew to allow for. Without iat, exp is measured
        # from our clock, which may be behind the issuer's by up to the leeway.
        limit = self.cfg.max_token_lifetime_seconds
        lifetime = exp - iat if iat is not None else exp - now - leeway
        if lifetime > limit:
            raise IdentityError(f"token lifetime exceeds the maximum of {limit} seconds "
                                "(identity.max_token_lifetime_seconds)", code=TOKEN_LIFETIME_TOO_LONG)

    def _check_audience(self, claims: dict[str, Any], *, admin: bool) -> None:
        """Admin tokens must name ``admin_audience``; agent tokens must not, and must name
        ``audience`` when it is configured."""
        audiences = _audiences(claims)
        admin_audience = self.cfg.admin_audience
        if admin:
            if admin_audience not in audiences:
                raise IdentityError(f"admin API tokens must have the audience {admin_audience!r}",
                                    code=WRONG_AUDIENCE)
            return
        if admin_audience in audiences:
            raise IdentityError(f"admin tokens (audience {admin_audience!r}) are not accepted as agent tokens",
                                code=WRONG_AUDIENCE)
        if self.cfg.audience is not None:
            if not audiences:
                raise IdentityError("token has no audience ('aud')", code=WRONG_AUDIENCE)
            if self.cfg.audience not in audiences:
                raise IdentityError("token audience is not accepted", code=WRONG_AUDIENCE)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        team = claims.get(self.cfg.team_claim)
        if team is not None and not isinstance(team, str):
            raise IdentityError("token team claim must be a string", code=MALFORMED_TOKEN)
        return Identity(
            agent_id=claims["sub"],
            team=team or None,
            roles=_roles(claims.get(self.cfg.roles_claim)),
            claims=claims,
            expires_at=float(claims["exp"]),
        )

    def _check_registered(self, identity: Identity) -> None:
        registry, agent_id = self.registry, identity.agent_id
        if registry is not None and agent_id not in registry:
            listed = registry.listed_as(agent_id)
            if listed is not None:
                # Kill-switches would stop this agent as the listed one, but policy would not see
                # its registration (input.agent.registration): refuse rather than judge it unlisted.
                raise Forbidden(f"agent {agent_id[:128]!r} is registered as {listed[:128]!r}: the token's "
                                "agent id must match the registry exactly", code=AGENT_ID_CASE_MISMATCH,
                                outcome="denied")
        if self.cfg.require_registered_agents and (registry is None or agent_id not in registry):
            raise UnregisteredAgent(f"agent {agent_id[:128]!r} is not registered")

    # JWKS -----------------------------------------------------------------------------
    async def _jwks_keep_fresh(self) -> None:
        """First use: fetch and wait. Later, when the cache is stale: refresh in the background
        while the current keys keep serving (a slow JWKS server never stalls requests)."""
        now = self._monotonic()
        if self._jwks_fetched_at is None:
            if self._jwks_last_attempt is None or now - self._jwks_last_attempt >= self.jwks_min_refresh_seconds:
                await self._jwks_refresh(force=False)
            return
        if now - self._jwks_fetched_at >= self.cfg.jwks_cache_seconds and (
            self._bg_refresh is None or self._bg_refresh.done()
        ):
            self._bg_refresh = asyncio.create_task(self._jwks_refresh(force=False))

    async def _jwks_refresh(self, *, force: bool) -> None:
        """Fetch the JWKS unless fresh (``force`` skips that check) or rate-limited.

        Single-flight: concurrent callers wait for the one fetch in progress.
        """
        async with self._jwks_lock:
            now = self._monotonic()
            if (not force and self._jwks_fetched_at is not None
                    and now - self._jwks_fetched_at < self.cfg.jwks_cache_seconds):
                return
            if self._jwks_last_attempt is not None and now - self._jwks_last_attempt < self.jwks_min_refresh_seconds:
                return
            self._jwks_last_attempt = now
            self.stats["jwks_fetches"] += 1
            try:
                doc = await self._fetch_jwks()
                keys = _parse_jwks(doc)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the previous keys
                self.stats["jwks_fetch_errors"] += 1
                log.warning("JWKS fetch from %s failed (keeping %d cached keys): %s",
                            self._jwks_url, len(self._jwks), exc)
                return
            self._jwks_fetched_at = now
            if doc != self._jwks_doc:
                self._jwks_doc = doc
                self._jwks = tuple(keys)
                self.clear_cache()
                log.info("JWKS loaded: %d keys (kids: %s)", len(keys),
                         ", ".join(sorted(k.kid or "-" for k in keys)))

    async def _fetch_jwks(self) -> Any:
        assert self._jwks_url is not None
        if self._session is None or self._session.closed:
            self._session = self._session_factory() if self._session_factory else aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.cfg.jwks_timeout_seconds)
        async with self._session.get(self._jwks_url, ssl=self._ssl, timeout=timeout,
                                     headers={"Accept": "application/json"},
                                     allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
        return json.loads(body)
