"""Redaction settings (the ``[redaction]`` config section) and the library's errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KIB = 1 << 10
MIB = 1 << 20


class RedactionSettings(BaseModel):
    """How responses are redacted. Limits are in bytes; depth is JSON nesting depth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replacement: Literal["label", "pseudonym"] = "label"
    """``label``: ``[REDACTED:email]``; ``pseudonym``: ``[REDACTED:email:3f2a9c]`` (keyed HMAC-SHA256)."""
    pseudonym_key_env: str | None = None
    pseudonym_key_file: Path | None = None
    phone_region: str = "US"
    """Default region for phone numbers written without a country code."""
    max_inspect_bytes: int = Field(default=8 * MIB, ge=1)
    max_decoded_bytes: int = Field(default=32 * MIB, ge=1)
    max_json_depth: int = Field(default=128, ge=1, le=512)
    """Bounded so the recursive walk stays far below Python's recursion limit."""
    thread_threshold_bytes: int = Field(default=64 * KIB, ge=0)
    """Bodies from this size are redacted in a worker process, so the event loop stays free."""
    max_report_paths: int = Field(default=100, ge=0, le=10_000)

    @field_validator("phone_region")
    @classmethod
    def _region(cls, v: str) -> str:
        region = v.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {v!r} (expected an ISO 3166 code such as 'US')")
        return region

    @model_validator(mode="after")
    def _pseudonym_key(self) -> RedactionSettings:
        if self.replacement == "pseudonym" and not (self.pseudonym_key_env or self.pseudonym_key_file):
            raise ValueError("replacement = 'pseudonym' needs pseudonym_key_env or pseudonym_key_file")
        return self


class NotRedactable(Exception):
    """A body that must be redacted but cannot be: the caller fails closed.

    ``reason`` is a stable slug (``too_large``, ``decompression_limit``, ``undecodable``,
    ``invalid_utf8``, ``invalid_json``, ``json_too_deep``, ``unsupported_content_type``,
    ``unsupported_encoding``, ``sse_event_too_large``, ``fields_not_applicable``,
    ``partial_content``); ``detail`` is for humans and never contains body content.
    """

    def __init__(self, reason: str, detail: str = "", *, code: str = "response_not_redactable") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.code = code
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in the redaction worker process: arrive in the gateway with reason and code intact.
        return (NotRedactable, (self.reason, self.detail), {"code": self.code})


class UnknownDetector(ValueError):
    """A policy named a detector that does not exist."""


class InvalidFieldPath(ValueError):
    """A policy's ``redact.fields`` entry is not a valid JSONPath."""
