"""The development signing key: an Ed25519 key in the data dir, trusted by the gateway,
used by ``agentgate token mint`` so a first run needs no identity provider."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import re
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

_RESERVED_CLAIMS = frozenset({"sub", "iat", "nbf", "exp", "jti", "iss", "aud"})
_TTL_RE = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _load_private(private_pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the dev signing key must be an Ed25519 private key")
    return key


def ensure_dev_key(path: Path) -> bytes:
    """Return the dev private key PEM at ``path``, creating it (mode 0600) on first call.

    Creation is atomic and race-safe: the key is written to a private temporary file and
    hard-linked into place, so concurrent first runs agree on one key.
    """
    path = Path(path)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        pass
    else:
        _load_private(pem)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("dev signing key %s is readable by other users; chmod 600 it", path)
        return pem

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Another process won the race: use its key.
            pem = path.read_bytes()
            _load_private(pem)
        except OSError:
            # Filesystems without hard links: fall back to an atomic rename.
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return pem


def public_pem(private_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a private key PEM."""
    return _load_private(private_pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def mint_token(
    private_pem: bytes,
    *,
    agent: str,
    team: str | None,
    roles: list[str],
    ttl_seconds: int,
    issuer: str | None,
    audience: str | None,
    team_claim: str = "team",
    roles_claim: str = "roles",
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign an EdDSA token with ``sub``, ``iat``, ``nbf``, ``exp`` and ``jti`` set. An admin token
    is one whose ``audience`` is the gateway's ``identity.admin_audience``."""
    if not agent:
        raise ValueError("agent id must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    now = int(time.time())
    payload: dict[str, Any] = {}
    if extra:
        clash = _RESERVED_CLAIMS.intersection(extra) | {team_claim, roles_claim}.intersection(extra)
        if clash:
            raise ValueError(f"extra claims may not override: {', '.join(sorted(clash))}")
        payload.update(extra)
    payload.update({"sub": agent, "iat": now, "nbf": now, "exp": now + int(ttl_seconds),
                    "jti": uuid.uuid4().hex})
    if team is not None:
        payload[team_claim] = team
    payload[roles_claim] = list(roles)
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    return jwt.encode(payload, _load_private(private_pem), algorithm="EdDSA", headers={"typ": "JWT"})


def parse_ttl(value: str) -> int:
    """Parse ``"3600"``, ``"45s"``, ``"30m"``, ``"1h"`` or ``"2d"`` into seconds."""
    match = _TTL_RE.match(str(value).strip().lower())
    if not match:
        raise ValueError(
            f"invalid TTL {value!r}: use seconds or a number followed by s, m, h or d "
            "(e.g. 3600, 45s, 30m, 1h, 2d)"
        )
    seconds = int(match.group(1)) * _TTL_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"invalid TTL {value!r}: must be greater than zero")
    return seconds
