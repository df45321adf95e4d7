"""Audit rows: building one from a finished call (and the ``incomplete`` row of a call that never
finished), and the insert the spool's shipper uses (storage/spool/)."""

from __future__ import annotations

import datetime as dt
import operator
import re
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from gateway.redaction import scrub_text
from storage import schema

if TYPE_CHECKING:
    from gateway.models import Call

REDACTED = "[REDACTED]"
SECRET_NAME_PARTS = ("token", "key", "secret", "password", "passwd", "pwd", "auth", "signature",
                     "sig", "session", "credential", "code", "jwt")
_JWT_VALUE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_SEPARATOR = re.compile(r"([&;])")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ONE_US = dt.timedelta(microseconds=1)
_IN_COLUMN_ORDER = operator.itemgetter(*schema.COLUMN_NAMES)


def _is_secret_name(raw_name: str) -> bool:
    name = unquote_plus(raw_name).lower()
    return any(part in name for part in SECRET_NAME_PARTS)


def redact_query(query: str) -> str:
    """Replace values of credential-like parameters (and JWT-looking values) with [REDACTED].

    Keeps the rest of the query string byte for byte; both '&' and ';' count as separators so
    a server that splits on either cannot smuggle a secret past the scrubber.
    """
    if not query:
        return ""
    pieces = _SEPARATOR.split(query)
    for idx in range(0, len(pieces), 2):
        name, eq, value = pieces[idx].partition("=")
        if not eq:
            continue
        if _is_secret_name(name) or _JWT_VALUE.match(unquote_plus(value)):
            pieces[idx] = f"{name}={REDACTED}"
    return "".join(pieces)


def _clamp(value: Any, hi: int) -> int:
    if type(value) is int and 0 <= value <= hi:
        return value
    try:
        return min(max(int(value), 0), hi)
    except (TypeError, ValueError):
        return 0


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        # Not expected (Call assigns uuid4); derive a stable id rather than lose the row.
        return uuid.uuid5(uuid.NAMESPACE_OID, str(value))


def _ts(ns: int) -> dt.datetime:
    return _EPOCH + _ONE_US * (ns // 1000)


def call_to_row(call: "Call", *, instance: str) -> tuple[Any, ...]:
    """One ``calls`` row for a finished call, in ``schema.COLUMN_NAMES`` order.

    The end time is taken now (unless the call carries ``ts_end_ns``), measured with the
    monotonic clock from ``call.t0`` so wall-clock steps cannot make ts_end < ts_start.
    """
    req = call.request
    ident = call.identity
    ts_end_ns = call.ts_end_ns
    if ts_end_ns:
        elapsed_ns = max(0, ts_end_ns - call.ts_start_ns)
    else:
        elapsed_ns = max(0, int((time.perf_counter() - call.t0) * 1e9))
        ts_end_ns = call.ts_start_ns + elapsed_ns
    upstream_ms = max(0.0, float(call.upstream_ms or 0.0))
    values: dict[str, Any] = {
        "call_id": _uuid(call.call_id),
        "trace_id": call.trace_id or "",
        "ts_start": _ts(call.ts_start_ns),
        "ts_end": _ts(ts_end_ns),
        "agent_id": ident.agent_id if ident else "",
        "team": (ident.team or "") if ident else "",
        "roles": [str(r) for r in ident.roles] if ident else [],
        "mode": req.mode,
        "route": req.route or "",
        "method": req.method,
        "scheme": req.scheme,
        "host": call.canonical_host or req.host.lower(),
        "port": _clamp(req.port, 65535),
        "path": call.canonical_path or req.path,
        "query": scrub_text(redact_query(req.query)) if req.query else "",
        "tool_kind": call.tool_kind or "",
        "tool_name": call.tool_name or "",
        "request_bytes": _clamp(call.request_bytes, 2**64 - 1),
        "response_bytes": _clamp(call.response_bytes, 2**64 - 1),
        "status": _clamp(call.status, 65535),
        "outcome": call.outcome or "",
        "reasons": [str(r) for r in call.reasons],
        "error_code": call.error_code or "",
        "policy_revision": call.policy_revision or "",
        "engine": call.engine or "",
        "enforce": 1 if call.enforce else 0,
        "fail_open": 1 if call.fail_open else 0,
        "decision_us": _clamp(call.decision_us, 2**32 - 1),
        "upstream_ms": upstream_ms,
        "gateway_ms": max(0.0, elapsed_ns / 1e6 - upstream_ms),
        "client_ip": req.client_ip or "",
        "gateway_instance": instance,
        "approval_id": call.approval_id,
        "approver": call.approver,
        "decided_at": _ts(call.decided_at_ns) if call.decided_at_ns else None,
        "killswitch_id": call.killswitch_id,
        # Filled in by the spool's hash chain (storage/chain.py); 0/empty = not chained.
        "seq": 0,
        "prev_hash": "",
        "row_hash": "",
        "redacted_paths": list(call.redacted_paths),
        "redaction_counts": dict(call.redaction_counts),
        "rpc_method": call.rpc_method,
        "rpc_id": call.rpc_id,
        "tool_arguments": call.tool_arguments,
        "tool_error": 1 if call.tool_error else 0,
    }
    return _IN_COLUMN_ORDER(values)


INCOMPLETE_OUTCOME = "incomplete"
INCOMPLETE_REASON = "gateway stopped before the call completed"
_COL = {name: i for i, name in enumerate(schema.COLUMN_NAMES)}


def incomplete_row(begin_row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row for a call whose request was forwarded but whose completion was never recorded
    (the gateway died): what was known before the upstream, outcome ``incomplete``, status 0.
    The end time is unknown, so ts_end = ts_start."""
    values = list(begin_row)
    values[_COL["outcome"]] = INCOMPLETE_OUTCOME
    values[_COL["status"]] = 0
    values[_COL["reasons"]] = [*begin_row[_COL["reasons"]], INCOMPLETE_REASON]
    values[_COL["ts_end"]] = begin_row[_COL["ts_start"]]
    values[_COL["response_bytes"]] = 0
    values[_COL["upstream_ms"]] = 0.0
    values[_COL["gateway_ms"]] = 0.0
    for name, empty in (("seq", 0), ("prev_hash", ""), ("row_hash", "")):
        values[_COL[name]] = empty
    return tuple(values)


def _insert(client: Any, database: str, rows: list[tuple[Any, ...]],
            settings: dict[str, Any] | None = None) -> None:
    client.insert(schema.CALLS_TABLE, rows, database=database, settings=settings,
                  column_names=schema.COLUMN_NAMES, column_type_names=schema.COLUMN_TYPES)


def _describe(exc: BaseException) -> str:
    """An error for the log: its type and first line, never the rows being inserted."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"
