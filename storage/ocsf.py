"""An audit row as an OCSF API Activity event (class_uid 6003), for SIEMs.

Targets OCSF schema 1.3.0 (metadata.version). The mapping, field by field, is in docs/audit.md.
The policy's decision goes into ``actor.authorizations[]`` (``policy.is_applied`` false for a
shadow-mode denial), followed by the human approval or kill-switch that acted on the call;
gateway fields without an OCSF attribute go into ``unmapped``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from typing import Any

from storage.queries import json_value

OCSF_VERSION = "1.3.0"
CATEGORY_UID = 6  # Application Activity
CLASS_UID = 6003  # API Activity
PRODUCT_NAME = "agentgate"
VENDOR_NAME = "agentgate"
POLICY_NAME = "agentgate/decision"

ACTIVITIES: dict[int, str] = {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}
_METHOD_ACTIVITY = {"POST": 1, "GET": 2, "HEAD": 2, "PUT": 3, "PATCH": 3, "DELETE": 4}
SEVERITIES: dict[int, str] = {1: "Informational", 2: "Low", 3: "Medium", 4: "High"}
_OUTCOME_SEVERITY = {
    "allowed": 1, "approved": 1,
    "would_deny": 2, "approval_expired": 2, "rejected": 2, "upstream_error": 2, "error": 2, "incomplete": 2,
    "denied": 3, "approval_denied": 3, "unauthenticated": 3, "fail_open": 3,
    "killed": 4,
}
# The call went through the gateway (shadow-mode denials included).
PASSED_OUTCOMES = frozenset({"allowed", "approved", "fail_open", "would_deny"})
# The policy was evaluated and allowed the call (later stages may still have refused it).
_POLICY_ALLOWED = frozenset({"allowed", "approved", "approval_denied", "approval_expired", "upstream_error",
                             "incomplete"})
_APPROVAL_DECISION = {"approved": "approved", "approval_denied": "denied", "approval_expired": "expired"}

# Attributes every event carries: OCSF base-event requirements plus API Activity's own.
REQUIRED: tuple[str, ...] = (
    "activity_id", "category_uid", "class_uid", "type_uid", "time", "severity_id", "metadata",
    "actor", "api", "src_endpoint")

_MAPPED = frozenset({
    "call_id", "trace_id", "ts_start", "ts_end", "agent_id", "team", "roles", "method", "scheme", "host",
    "port", "path", "query", "status", "error_code", "policy_revision", "client_ip", "tool_name"})


def activity_id(method: str) -> int:
    """POST 1 Create, GET/HEAD 2 Read, PUT/PATCH 3 Update, DELETE 4 Delete, anything else 99."""
    return _METHOD_ACTIVITY.get((method or "").upper(), 99)


def _product_version() -> str | None:
    try:
        return importlib_metadata.version(PRODUCT_NAME)
    except importlib_metadata.PackageNotFoundError:
        return None


_PRODUCT: dict[str, Any] = {"name": PRODUCT_NAME, "vendor_name": VENDOR_NAME}
if (_version := _product_version()) is not None:
    _PRODUCT["version"] = _version


def _ms(value: Any) -> int | None:
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return int(value.timestamp() * 1000)


def _compact(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop empty strings, empty lists/objects and None, recursively."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            v = _compact(v)
        if v is None or v == "" or v == [] or v == {}:
            continue
        out[k] = v
    return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _authorizations(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    outcome = str(row.get("outcome") or "")
    error_code = str(row.get("error_code") or "")
    revision = str(row.get("policy_revision") or "")
    policy: dict[str, Any] = {"uid": revision, "name": POLICY_NAME, "version": revision}
    out: list[dict[str, Any]] = []
    if outcome == "would_deny":
        out.append({"decision": "denied", "policy": {**policy, "is_applied": False,
                                                     "desc": "shadow mode: denial recorded, not enforced"}})
    elif outcome == "fail_open":
        out.append({"decision": "allowed", "policy": {**policy, "is_applied": False,
                                                      "desc": "policy could not decide; the route fails open"}})
    elif outcome == "denied":
        desc = "policy error: failed closed" if error_code == "policy_error" else ""
        out.append({"decision": "denied", "policy": {**policy, "is_applied": True, "desc": desc}})
    elif outcome in _POLICY_ALLOWED or (revision and outcome not in ("killed", "unauthenticated", "rejected")):
        out.append({"decision": "allowed", "policy": {**policy, "is_applied": True}})
    approval_id = str(row.get("approval_id") or "")
    if approval_id:
        approver = str(row.get("approver") or "")
        out.append({"decision": _APPROVAL_DECISION.get(outcome, "pending"),
                    "policy": {"uid": approval_id, "name": "agentgate/approval",
                               "desc": f"decided by {approver}" if approver else "", "is_applied": True}})
    killswitch_id = str(row.get("killswitch_id") or "")
    if killswitch_id:
        out.append({"decision": "denied", "policy": {"uid": killswitch_id, "name": "agentgate/killswitch",
                                                     "is_applied": True}})
    return out


def _actor(row: Mapping[str, Any]) -> dict[str, Any]:
    agent = str(row.get("agent_id") or "")
    if not agent:
        user: dict[str, Any] = {"name": "(unauthenticated)", "type_id": 0, "type": "Unknown"}
    else:
        user = {"uid": agent, "name": agent, "type_id": 99, "type": "AI Agent",
                "groups": [{"name": str(r), "type": "role"} for r in row.get("roles") or ()],
                "org": {"ou_name": str(row.get("team") or "")}}
    return {"user": user, "authorizations": [_compact(a) for a in _authorizations(row)]}


def to_ocsf(row: Mapping[str, Any]) -> dict[str, Any]:
    """One ``agentgate.calls`` row (column name -> value, as clickhouse-connect returns them)
    as an OCSF 6003 event (a JSON-ready dict)."""
    method = str(row.get("method") or "").upper()
    act = activity_id(method)
    outcome = str(row.get("outcome") or "")
    status = int(row.get("status") or 0)
    error_code = str(row.get("error_code") or "")
    reasons = [str(r) for r in row.get("reasons") or ()]
    success = outcome in PASSED_OUTCOMES and 0 < status < 400
    severity = _OUTCOME_SEVERITY.get(outcome, 2)
    host, port, path = str(row.get("host") or ""), int(row.get("port") or 0), str(row.get("path") or "")
    scheme, query = str(row.get("scheme") or ""), str(row.get("query") or "")
    route = str(row.get("route") or "")
    call_id = str(row.get("call_id") or "")
    start, end = _ms(row.get("ts_start")), _ms(row.get("ts_end"))
    client_ip = str(row.get("client_ip") or "")
    default_port = {"http": 80, "https": 443}.get(scheme)
    netloc = host if not port or port == default_port else f"{host}:{port}"
    url_string = f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "") if scheme and host else ""
    event: dict[str, Any] = {
        "activity_id": act,
        "activity_name": ACTIVITIES[act],
        "category_uid": CATEGORY_UID,
        "category_name": "Application Activity",
        "class_uid": CLASS_UID,
        "class_name": "API Activity",
        "type_uid": CLASS_UID * 100 + act,
        "type_name": f"API Activity: {ACTIVITIES[act]}",
        "time": start,
        "start_time": start,
        "end_time": end,
        "duration": (end - start) if start is not None and end is not None else None,
        "severity_id": severity,
        "severity": SEVERITIES[severity],
        "status_id": 1 if success else 2,
        "status": "Success" if success else "Failure",
        "status_code": str(status) if status else "",
        "status_detail": error_code or outcome,
        "message": f"{outcome}: {'; '.join(reasons)}" if reasons else outcome,
        "metadata": {"product": dict(_PRODUCT), "version": OCSF_VERSION, "uid": call_id,
                     "correlation_uid": str(row.get("trace_id") or ""), "log_name": "agentgate.calls",
                     "original_time": json_value(row.get("ts_start"))},
        "actor": _actor(row),
        "api": {
            "operation": str(row.get("tool_name") or "") or f"{method} {path}",
            "request": {"uid": call_id},
            "response": {"code": status, "error": error_code, "message": "; ".join(reasons)},
            "service": {"name": route or host},
        },
        "src_endpoint": {"ip": client_ip} if client_ip else {"name": "unknown"},
        "dst_endpoint": {"hostname": host, "port": port or None, "ip": host if _is_ip(host) else None},
        "http_request": {"http_method": method,
                         "url": {"hostname": host, "path": path, "port": port or None, "scheme": scheme,
                                 "query_string": query, "url_string": url_string}},
        "http_response": {"code": status} if status else None,
        "unmapped": {k: json_value(v) for k, v in row.items() if k not in _MAPPED},
    }
    compact = _compact(event)
    # Required objects stay even when their content is empty.
    compact.setdefault("api", {"operation": f"{method} {path}", "request": {"uid": call_id}})
    compact["api"].setdefault("request", {"uid": call_id})
    return compact


def missing_required(event: Mapping[str, Any]) -> list[str]:
    """Required attributes (and required members of required objects) absent from ``event``."""
    missing = [k for k in REQUIRED if event.get(k) in (None, "", {}, [])]
    meta = event.get("metadata") or {}
    missing += [f"metadata.{k}" for k in ("product", "version") if not meta.get(k)]
    if not (meta.get("product") or {}).get("name"):
        missing.append("metadata.product.name")
    api = event.get("api") or {}
    if not api.get("operation"):
        missing.append("api.operation")
    return missing
