"""The core pipeline: the one place where the order of a call is written down.

    request → identity → kill-switch → policy → approval → upstream → redaction → audit

Front ends translate their own request/response objects and call, in this order:

* ``admit(call, credential)``: identity (then MCP recognition), kill-switch, policy (which also
  compiles the response redaction the decision asks for), approval, and the write-ahead audit
  record that must be in the spool before anything goes upstream; raises :class:`GatewayError` to refuse;
* the upstream exchange: ``run()`` does it for the route front end with :class:`Upstream`;
  the forward proxy lets mitmproxy do it (that is what TLS interception is for);
* ``redact(call, body, ...)`` on buffered responses, or ``call.redaction.sse()`` event by event
  on streams, then ``record_redaction``;
* ``finish(call, ...)``: exactly once per call, whatever happened — writes the audit row.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from typing import Any, Protocol

from pydantic import ValidationError

from gateway import mcp
from gateway.approvals import Approvals
from gateway.canonical import canonical_host, canonical_path, canonical_port, check_query
from gateway.config import Config, ProxyConfig, RouteConfig
from gateway.errors import BadRequest, Forbidden, GatewayError, Unauthenticated
from gateway.identity import IdentityError, JwtVerifier, extract_bearer
from gateway.killswitch import KillSwitches
from gateway.metrics import Metrics
from gateway.models import Call, Decision, GatewayRequest, Identity
from gateway.policy import PolicyEngine
from gateway.policy.input import build_input
from gateway.redaction import NotRedactable, RedactionReport, Redactor
from gateway.streams import OpenStreams
from storage.audit import call_to_row
from storage.spool import AuditSpool, AuditUnavailable

log = logging.getLogger("agentgate.pipeline")

RANGE_HEADERS = frozenset({"range", "if-range"})
"""Request headers dropped when the response must be redacted: it must come back whole."""
METHOD_OVERRIDE_HEADERS = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
"""Headers some frameworks read as the real method: a POST judged as a POST must not act as a DELETE."""

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class Upstream(Protocol):
    async def __call__(self, call: Call) -> Any: ...


def trace_id_for(request: GatewayRequest) -> str:
    """W3C ``traceparent`` trace id, else a sane ``X-Agent-Session``, else a new id."""
    tp = request.header("traceparent")
    if tp and (m := _TRACEPARENT.match(tp.strip().lower())) and m.group(1) != "0" * 32:
        return m.group(1)
    session = request.header("x-agent-session")
    if session and _SESSION_ID.match(session.strip()):
        return session.strip()
    return uuid.uuid4().hex


class Pipeline:
    def __init__(self, cfg: Config, *, verifier: JwtVerifier, engine: PolicyEngine,
                 audit: AuditSpool, metrics: Metrics, instance: str, killswitches: KillSwitches,
                 approvals: Approvals, streams: OpenStreams, redactor: Redactor) -> None:
        self.cfg = cfg
        self.verifier = verifier
        self.engine = engine
        self.audit = audit
        self.metrics = metrics
        self.instance = instance
        self.killswitches = killswitches
        self.approvals = approvals
        self.streams = streams
        self.redactor = redactor
        self._decision_hist = metrics.decision_seconds.labels(engine=engine.name)

    # -- the order -------------------------------------------------------------------
    async def admit(self, call: Call, *, credential: str | None = None,
                    identity: Identity | None = None) -> None:
        """identity → kill-switch → policy → approval → write-ahead record; raises GatewayError."""
        call.trace_id = call.trace_id or trace_id_for(call.request)  # batch elements share one
        call.request_bytes = len(call.request.body)
        call.identity = await self.authenticate(call.request.mode, credential, identity)
        mcp.classify(call, self.cfg.policy.inspect_body_bytes)  # MCP: input.tool, audit fields
        self.check_killswitch(call)
        await self._decide(call)
        await self._approval(call)
        await self._write_ahead(call)

    async def run(self, call: Call, upstream: Upstream, *, credential: str | None) -> Any:
        """Route front end: the whole pipeline around ``upstream``. Never raises GatewayError
        without having finished the call; the caller renders the error."""
        try:
            await self.admit(call, credential=credential)
            call.upstream_started = time.perf_counter()
            return await upstream(call)
        except GatewayError as err:
            self.fail(call, err)
            raise

    def fail(self, call: Call, err: GatewayError) -> None:
        """Record a refusal or failure on the call and finish it."""
        call.status = mcp.refusal_status(call, err)  # MCP refusals are JSON-RPC errors (HTTP 200)
        call.error_code = err.code
        call.outcome = err.outcome
        if err.message and not call.reasons:
            call.reasons.append(err.message)
        self.finish(call)

    def finish(self, call: Call, *, status: int | None = None, response_bytes: int | None = None) -> None:
        """Audit: exactly one row per call, built and written once the response is on its way."""
        if call.finished:
            return
        call.finished = True
        if status is not None:
            call.status = status
        if response_bytes is not None:
            call.response_bytes = response_bytes
        self.upstream_done(call)
        if not call.outcome:
            call.outcome = "allowed"
        call.ts_end_ns = call.ts_start_ns + int((time.perf_counter() - call.t0) * 1e9)
        self.metrics.requests.labels(mode=call.request.mode, outcome=call.outcome).inc()
        self.audit.submit_later(functools.partial(call_to_row, call, instance=self.instance))

    @staticmethod
    def upstream_done(call: Call) -> None:
        """Stop the upstream clock (once): the response is in hand, or the call is over.
        Redaction after this point counts as gateway time, not upstream time."""
        if call.upstream_started and not call.upstream_ms:
            call.upstream_ms = (time.perf_counter() - call.upstream_started) * 1000

    # -- stages ----------------------------------------------------------------------
    async def authenticate(self, mode: str, credential: str | None,
                           identity: Identity | None = None) -> Identity:
        """Verify the agent's JWT, or re-check an identity bound to a proxy connection."""
        try:
            if identity is not None:
                if identity.expires_at is not None and \
                        time.time() > identity.expires_at + self.cfg.identity.leeway_seconds:
                    raise IdentityError("the token bound to this connection has expired",
                                        code="token_expired")
                return identity
            return await self.verifier.verify(extract_bearer(credential))
        except Unauthenticated as err:
            if mode == "forward" and err.status == 401:
                err.status = 407
                err.headers = {"Proxy-Authenticate": 'Bearer realm="agentgate", Basic realm="agentgate"'}
            elif err.status == 401:  # RFC 6750 section 3: say which scheme, and whether a token was bad
                invalid = '' if err.code == "missing_token" else ', error="invalid_token"'
                err.headers = {"WWW-Authenticate": f'Bearer realm="agentgate"{invalid}'}
            raise

    def _front(self, call: Call) -> RouteConfig | ProxyConfig:
        """The settings of the call's route, or the forward proxy's."""
        route = call.request.route
        return self.cfg.routes[route] if route is not None else self.cfg.proxy

    def _enforce_and_fail_open(self, call: Call) -> tuple[bool, bool]:
        front = self._front(call)
        enforce = front.enforce if front.enforce is not None else self.cfg.policy.enforce
        return enforce, front.fail_open

    def path_segments(self, call: Call) -> list[str]:
        """The decoded segments of the call's path, as policy sees them."""
        literal = self._front(call).path_semicolons == "literal"
        return canonical_path(call.request.path, literal_semicolons=literal)[1]

    def _canonicalise(self, call: Call) -> tuple[int | None, list[str]]:
        req = call.request
        front = self._front(call)
        call.canonical_host = canonical_host(req.host)
        if req.connect_host is not None and canonical_host(req.connect_host) != call.canonical_host:
            raise BadRequest(
                f"Host header {req.host!r} does not match the CONNECT target {req.connect_host!r}",
                code="host_mismatch")
        call.canonical_path, segments = canonical_path(
            req.path, literal_semicolons=front.path_semicolons == "literal")
        check_query(req.query, literal_semicolons=front.query_semicolons == "literal")
        for name, value in req.headers:
            if name.lower() in METHOD_OVERRIDE_HEADERS and value.strip().upper() != req.method:
                raise BadRequest(f"{name}: {value.strip()[:20]!r} would make this {req.method} another method "
                                 "upstream than the one policy judges; send that method instead",
                                 code="method_override")
        return canonical_port(req.scheme, req.port), segments

    async def _decide(self, call: Call) -> None:
        port, segments = self._canonicalise(call)
        enforce, fail_open = self._enforce_and_fail_open(call)
        call.enforce = enforce
        call.engine = self.engine.name
        call.policy_revision = self.engine.revision
        doc = self.policy_input(call, port=port, segments=segments)
        started = time.perf_counter()
        try:
            # Each engine keeps its own time limit (the OPA client's timeout; the embedded engine
            # runs synchronously and cannot be interrupted), so decision_us is evaluation time,
            # not time spent queued behind a wrapper task.
            raw = await self.engine.evaluate(doc)
            decision = Decision.model_validate(raw)
        except Exception as exc:  # noqa: BLE001 - every failure of the engine fails closed
            decision = None
            problem = _describe_policy_failure(exc)
        finally:
            elapsed = time.perf_counter() - started
            call.decision_us = int(elapsed * 1e6)
            self._decision_hist.observe(elapsed)
        if decision is None:
            log.warning("policy error for call %s: %s", call.call_id, problem)
            call.reasons = ["policy_error", problem]
            if fail_open:
                call.fail_open = True
                call.outcome = "fail_open"
                self.metrics.fail_open.labels(mode=call.request.mode).inc()
                return
            raise Forbidden(f"policy_error: {problem}", code="policy_error", outcome="denied")
        call.decision = decision
        call.reasons = list(decision.reasons)
        if not decision.allow:
            if enforce:
                reason = "; ".join(decision.reasons) or "denied by policy"
                raise Forbidden(reason, code="policy_denied", outcome="denied")
            call.outcome = "would_deny"
        self._plan_redaction(call, decision)

    def policy_input(self, call: Call, *, port: int | None, segments: list[str]) -> dict[str, Any]:
        """The Rego input for ``call`` (gateway/policy/input.py), its agent's registry entry included."""
        registry, ident = self.verifier.registry, call.identity
        return build_input(call, port=port, segments=segments, inspect_limit=self.cfg.policy.inspect_body_bytes,
                           registration=registry.entry(ident.agent_id) if registry is not None and ident else None)

    def _plan_redaction(self, call: Call, decision: Decision) -> None:
        """Compile the decision's redaction before anything goes upstream: a redaction the
        gateway cannot apply (unknown detector, bad JSONPath) fails closed like any policy error."""
        if not (decision.redact.fields or decision.redact.detectors):
            return
        try:
            call.redaction = self.redactor.plan(decision.redact.fields, decision.redact.detectors)
        except ValueError as exc:  # UnknownDetector and InvalidFieldPath are ValueErrors
            call.reasons = ["policy_error", f"redaction cannot be applied: {exc}"]
            raise Forbidden(f"policy_error: redaction cannot be applied: {exc}", code="policy_error",
                            outcome="denied") from None

    # -- response stage: redaction ----------------------------------------------------
    async def redact(self, call: Call, body: bytes, *, content_type: str, content_encoding: str | None) -> bytes:
        """The body the agent may see. Raises GatewayError 502 ``response_not_redactable`` when
        it must be redacted but cannot be, unless the route or proxy lets it pass (audited)."""
        plan = call.redaction
        if plan is None:
            return body
        self.upstream_done(call)
        try:
            new, report = await plan.redact_body_async(body, content_type=content_type,
                                                       content_encoding=content_encoding)
        except NotRedactable as exc:
            self.unredactable(call, exc)
            return body
        except Exception as exc:  # noqa: BLE001 - a bug or a dead worker: the body must not pass
            # The type only: an exception's message may quote the body.
            log.error("redaction failed on call %s: %s", call.call_id, type(exc).__name__)
            call.reasons.append(f"redaction failed: {type(exc).__name__}")
            raise GatewayError("the response must be redacted but the redaction failed; refused",
                               code="response_not_redactable", status=502, outcome="redaction_failed") from None
        self.record_redaction(call, report)
        return new

    def check_partial_response(self, call: Call, status: int, content_type: str) -> None:
        """A byte range of a body cannot be redacted as the body would be (a slice of a JSON
        document can itself be valid JSON holding only the secret): refused, or passed where
        unredactable responses may pass. (Front ends drop RANGE_HEADERS from requests whose
        response must be redacted, so only an upstream that ignores that sends one.)"""
        if call.redaction is not None and (
                status == 206 or content_type.strip().lower().startswith("multipart/byteranges")):
            self.unredactable(call, NotRedactable("partial_content", "a byte range of the body"))

    def unredactable(self, call: Call, exc: NotRedactable) -> None:
        """Fail closed on a response that cannot be redacted, or record the audited pass."""
        if self._unredactable_setting(call) == "pass":
            call.reasons.append(f"response passed unredacted: {exc}")
            call.redaction_counts["unredacted"] = 1
            return
        raise GatewayError(f"the response must be redacted but cannot be ({exc.reason}); refused",
                           code="response_not_redactable", status=502, outcome="redaction_failed")

    def _unredactable_setting(self, call: Call) -> str:
        return self._front(call).unredactable

    def record_redaction(self, call: Call, report: RedactionReport) -> None:
        """Add a report (one body, or one stream's events) to the call's audited paths and counts."""
        room = self.cfg.redaction.max_report_paths - len(call.redacted_paths)
        call.redacted_paths.extend(report.paths[:max(room, 0)])
        for kind, n in report.counts.items():
            call.redaction_counts[kind] = call.redaction_counts.get(kind, 0) + n

    async def _write_ahead(self, call: Call) -> None:
        """No action reaches an upstream without a record of it in the spool (fsync'd as
        ``audit.spool_fsync`` says: storage/spool/__init__.py)."""
        try:
            await self.audit.begin(call_to_row(call, instance=self.instance))
        except AuditUnavailable as exc:
            raise GatewayError(f"audit unavailable: {exc}", code="audit_unavailable", status=503,
                               outcome="audit_unavailable") from None

    def check_killswitch(self, call: Call) -> None:
        """Raise 403 agent_suspended if a kill-switch matches the call's agent."""
        assert call.identity is not None
        switch = self.killswitches.match(call.identity)
        if switch is not None:
            call.killswitch_id = switch.id
            raise Forbidden(f"agent suspended by kill-switch {switch.id}: {switch.reason}",
                            code="agent_suspended", outcome="killed")

    async def _approval(self, call: Call) -> None:
        decision = call.decision
        if decision is None or not decision.require_approval or not call.enforce:
            return
        await self.approvals.hold(call)
        # The agent may have been killed while its call was held.
        self.check_killswitch(call)


def _describe_policy_failure(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "(root)" for e in exc.errors())
        return f"decision does not match the contract ({fields})"
    return f"{type(exc).__name__}: {exc}"[:500]
