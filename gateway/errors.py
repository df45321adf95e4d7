"""Errors the gateway itself answers with: a status, a stable code and a message.

Every such response carries ``X-Agentgate-Call-Id`` and the body
``{"error": {"code", "message", "call_id"}}`` so an agent's failure can be traced to its audit row.
"""

from __future__ import annotations

import json
import re

CALL_ID_HEADER = "X-Agentgate-Call-Id"


class ProxyStartError(RuntimeError):
    """The forward proxy (mitmproxy) could not start. Defined here, not beside the proxy, so
    that the CLI can name it without importing mitmproxy."""


class GatewayError(Exception):
    """A refusal or failure with the HTTP status and error code the agent will see.

    ``outcome`` is the audit outcome recorded for the call (``denied``, ``unauthenticated`` ...).
    """

    status: int = 500
    code: str = "internal_error"
    outcome: str = "error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 outcome: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if outcome is not None:
            self.outcome = outcome
        self.headers = headers or {}


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"
    outcome = "rejected"


class Unauthenticated(GatewayError):
    """No usable agent credential. Status is 401 for routes, 407 for the forward proxy."""

    status = 401
    code = "unauthenticated"
    outcome = "unauthenticated"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"
    outcome = "denied"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"
    outcome = "upstream_error"


CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request the client abandoned; mitmproxy records the same."""


INCOMPLETE_BODY = "the agent closed the connection before sending the whole request body"
INCOMPLETE_RESPONSE = "the agent closed the connection before the whole response"


def request_too_large(limit: int | None) -> GatewayError:
    return GatewayError(f"request body larger than {limit} bytes", code="request_too_large", status=413,
                        outcome="rejected")


def client_closed(message: str, status: int = CLIENT_CLOSED_REQUEST) -> GatewayError:
    """The agent hung up (mid-request, or before the answer was whole): nobody is left to answer,
    and the audit row says so with outcome ``client_closed``."""
    return GatewayError(message, code="client_closed", status=status, outcome="client_closed")


def error_body(code: str, message: str, call_id: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "call_id": call_id}}).encode()


_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 /-]{2,80}")


def parser_reason(message: str | None) -> str:
    """The leading reason of an HTTP parser's error message, quoting none of the request.

    aiohttp's and mitmproxy's messages quote the offending bytes after a colon (a request line
    with its query string, a header line with its value): only the words before it are kept
    ("Invalid header value char", "Bad HTTP request line"), so no credential the agent sent
    reaches an answer, an audit row or a log line."""
    head = (message or "").split("\n", 1)[0].split(":", 1)[0].strip()
    return head if " " in head and _REASON.fullmatch(head) else "Malformed request"


def unparsable(reason: str) -> "BadRequest":
    """The refusal of a request whose head (or body framing) could not be parsed."""
    return BadRequest(f"the request could not be parsed as HTTP/1.1: {reason}")
