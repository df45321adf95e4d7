"""Data shared by the core and both front ends: who is calling, what they asked, what was decided."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

Mode = Literal["forward", "route"]


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified agent (or admin) identity. Never holds the raw token."""

    agent_id: str
    team: str | None = None
    roles: tuple[str, ...] = ()
    claims: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    """``exp`` as a UNIX time: a connection-bound identity stops being valid then."""


class Redaction(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    fields: list[str] = Field(default_factory=list)
    detectors: list[str] = Field(default_factory=list)


class Decision(BaseModel):
    """The decision contract read from ``data.agentgate.decision``.

    ``allow`` is required and must be a boolean: anything else is a contract violation and
    the gateway fails closed with reason ``policy_error``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)
    allow: StrictBool
    reasons: list[str] = Field(default_factory=list)
    require_approval: StrictBool = False
    approvers: list[str] = Field(default_factory=list)
    redact: Redaction = Field(default_factory=Redaction)


@dataclass(slots=True)
class GatewayRequest:
    """A request as a front end received it, before canonicalisation.

    ``headers`` keeps order and duplicates; ``body`` is the full request body as bytes.
    """

    mode: Mode
    method: str
    scheme: str
    host: str
    port: int
    path: str
    """Raw path as sent (percent-encoding intact), without the query string."""
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    client_ip: str = ""
    route: str | None = None
    connect_host: str | None = None
    """Forward mode, inside a CONNECT tunnel: the tunnel's target host (checked against Host)."""
    inspected: tuple[int, bytes, str | None] | None = field(default=None, init=False, repr=False, compare=False)
    """gateway/request_body.py's decoded body, kept: (limit, content, problem)."""

    @classmethod
    def unparsed(cls, mode: Mode, client_ip: str, *, scheme: str = "http", host: str = "") -> GatewayRequest:
        """A request refused before it could be read: only where it came from is known."""
        return cls(mode=mode, method="", scheme=scheme, host=host, port=0, path="", query="", headers=[],
                   body=b"", client_ip=client_ip)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None


def new_call_id() -> str:
    return str(uuid.uuid4())


@dataclass(slots=True)
class Call:
    """One call's state from arrival to its audit row. Front ends never build rows themselves."""

    request: GatewayRequest
    call_id: str = field(default_factory=new_call_id)
    trace_id: str = ""
    ts_start_ns: int = field(default_factory=time.time_ns)
    t0: float = field(default_factory=time.perf_counter)
    identity: Identity | None = None
    canonical_host: str = ""
    canonical_path: str = ""
    decision: Decision | None = None
    policy_revision: str = ""
    engine: str = ""
    enforce: bool = True
    fail_open: bool = False
    outcome: str = ""
    status: int = 0
    error_code: str = ""
    reasons: list[str] = field(default_factory=list)
    request_bytes: int = 0
    response_bytes: int = 0
    decision_us: int = 0
    upstream_ms: float = 0.0
    upstream_started: float = 0.0
    tool_kind: str = "http"
    tool_name: str = ""
    approval_id: str = ""
    approver: str = ""
    decided_at_ns: int = 0
    killswitch_id: str = ""
    redaction: Any = None
    """The response redaction plan (gateway.redaction.Plan) the decision asked for, if any."""
    redacted_paths: list[str] = field(default_factory=list)
    redaction_counts: dict[str, int] = field(default_factory=dict)
    # MCP / JSON-RPC (gateway/mcp.py)
    rpc: Any = None
    """The call's JSON-RPC message (gateway.mcp.RpcMessage) when it is an MCP call."""
    tool_input: dict[str, Any] | None = None
    """``input.tool`` for policy when it says more than ``{kind: tool_kind}``."""
    rpc_method: str = ""
    rpc_id: str = ""
    tool_arguments: str = ""
    """Tool arguments as scrubbed JSON, for the audit."""
    tool_error: bool = False
    """The tool result said ``isError``."""
    finished: bool = False
    ts_end_ns: int = 0
    """When the call finished (Pipeline.finish); its row is built after the response is sent."""
