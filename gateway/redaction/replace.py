"""Replacement text: ``[REDACTED:<kind>]`` or a keyed, stable pseudonym ``[REDACTED:<kind>:<6 hex>]``."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from .settings import RedactionSettings

MIN_KEY_BYTES = 16


def load_pseudonym_key(settings: RedactionSettings) -> bytes | None:
    """The HMAC key for pseudonyms, or None in label mode. Raises ValueError when unusable."""
    if settings.replacement != "pseudonym":
        return None
    key: bytes | None = None
    if settings.pseudonym_key_env:
        value = os.environ.get(settings.pseudonym_key_env)
        if value:
            key = value.encode()
    if key is None and settings.pseudonym_key_file is not None:
        try:
            key = Path(settings.pseudonym_key_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"redaction pseudonym key file unreadable: {exc.strerror}") from None
    if not key:
        raise ValueError("redaction pseudonym key is not set (pseudonym_key_env / pseudonym_key_file)")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"redaction pseudonym key must be at least {MIN_KEY_BYTES} bytes")
    return key


class Replacer:
    """Turns (kind, canonical value) into replacement text. Thread-safe (immutable)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None) -> None:
        self._key = key

    @property
    def pseudonymous(self) -> bool:
        return self._key is not None

    def __call__(self, kind: str, canonical: str) -> str:
        if self._key is None:
            return f"[REDACTED:{kind}]"
        digest = hmac.new(self._key, canonical.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return f"[REDACTED:{kind}:{digest[:6]}]"


LABEL = Replacer(None)
