"""Admin API (aiohttp, its own port): health, readiness, metrics and read-only audit SQL.

Admin callers present a JWT verified by the same identity code as agents, but for its own
audience (``identity.admin_audience``): an agent's token is refused here whatever roles it
claims. The roles claim of an admin token decides what its holder may do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.admin_events import AdminEvents
from gateway.approvals import Approvals
from gateway.errors import CALL_ID_HEADER, BadRequest, Forbidden, GatewayError, error_body
from gateway.identity import JwtVerifier, extract_bearer
from gateway.investigate import register_routes
from gateway.killswitch import SCOPES, KillSwitches
from gateway.metrics import Metrics
from gateway.models import Identity
from gateway.policy import PolicyEngine
from storage.chain import verify_store
from storage.spool import AuditSpool, shipped_heads
from storage.store import QueryError, QueryRejected, Store

log = logging.getLogger("agentgate.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AUDIT_ROLES = frozenset({"responder", "admin"})
OPERATOR_ROLES = frozenset({"operator", "admin"})
APPROVER_ROLES = frozenset({"approver", "admin"})
_FRESHNESS_WAIT_SECONDS = 2.0


def json_error(err: GatewayError, request_id: str) -> web.Response:
    return web.Response(status=err.status, body=error_body(err.code, err.message, request_id),
                        content_type="application/json",
                        headers={CALL_ID_HEADER: request_id, **err.headers})


class AdminApi:
    def __init__(self, *, verifier: JwtVerifier, engine: PolicyEngine, store: Store,
                 audit: AuditSpool, metrics: Metrics, sql_row_limit: int, killswitches: KillSwitches,
                 approvals: Approvals, events: AdminEvents, approver_teams_claim: str) -> None:
        self.verifier = verifier
        self.engine = engine
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.sql_row_limit = sql_row_limit
        self.killswitches = killswitches
        self.approvals = approvals
        self.events = events
        self.approver_teams_claim = approver_teams_claim

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_post("/v1/audit/sql", self.audit_sql)
        app.router.add_post("/v1/audit/verify", self.audit_verify)
        app.router.add_get("/v1/killswitches", self.list_killswitches)
        app.router.add_post("/v1/killswitches", self.create_killswitch)
        app.router.add_delete("/v1/killswitches/{id}", self.revoke_killswitch)
        app.router.add_get("/v1/approvals", self.list_approvals)
        app.router.add_get("/v1/approvals/{id}", self.get_approval)
        app.router.add_post("/v1/approvals/{id}/approve", self.approve)
        app.router.add_post("/v1/approvals/{id}/deny", self.deny)
        register_routes(app, self)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        request["request_id"] = request_id
        try:
            resp = await handler(request)
        except GatewayError as err:
            return json_error(err, request_id)
        except web.HTTPException as exc:
            code = "not_found" if exc.status == 404 else "method_not_allowed" if exc.status == 405 else "bad_request"
            return json_error(GatewayError(exc.reason, code=code, status=exc.status), request_id)
        except Exception:  # noqa: BLE001 - a bug, or a store that is down: still a JSON answer
            log.exception("admin request %s %s failed (request %s)", request.method, request.path, request_id)
            return json_error(GatewayError("internal error; the gateway log has the details"), request_id)
        resp.headers[CALL_ID_HEADER] = request_id
        return resp

    async def authorize(self, request: web.Request, allowed: frozenset[str], action: str,
                        target: str = "") -> Identity:
        """The caller's identity if it holds one of ``allowed``; refusals are audited."""
        try:
            identity = await self.verifier.verify(extract_bearer(request.headers.get("Authorization"), "admin"),
                                                 agent=False)
        except GatewayError as err:
            await self.events.record(None, action, target, result="unauthenticated", detail=err.code)
            raise
        if not allowed.intersection(identity.roles):
            await self.events.record(identity, action, target, result="forbidden",
                                     detail=f"needs one of {sorted(allowed)}")
            raise Forbidden(f"this action needs one of the roles: {', '.join(sorted(allowed))}",
                            code="forbidden_role")
        return identity

    async def fresh_audit(self) -> None:
        """Give calls made a moment ago a brief chance to reach the store before a query reads it."""
        try:
            await asyncio.wait_for(self.audit.flush(), _FRESHNESS_WAIT_SECONDS)
        except TimeoutError:
            pass

    @contextlib.asynccontextmanager
    async def recording_refusals(self, actor: Identity, action: str, target: str, *, reason: str = "",
                                 detail: str = "") -> AsyncIterator[None]:
        """Record a GatewayError raised inside as a ``refused`` (4xx) or ``error`` (5xx) admin
        event (detail: its code, then ``detail``), and let it propagate."""
        try:
            yield
        except GatewayError as err:
            result = "refused" if err.status < 500 else "error"
            await self.events.record(actor, action, target, reason=reason, result=result,
                                     detail=f"{err.code}: {detail}" if detail else err.code)
            raise

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready: policy loaded and the audit can take records. ClickHouse being away is shown
        (the spool holds the backlog) but only blocks readiness when the audit is required and full."""
        audit = self.audit.status()
        store_ok = await self.store.ping()
        audit_ok = bool(audit["spool_writable"]) and not (audit["required"] and audit["full"])
        checks = {"policy": bool(self.engine.ready), "audit": audit_ok, "store": store_ok}
        ready = checks["policy"] and checks["audit"]
        return web.json_response(
            {"ready": ready, "checks": checks, "policy_revision": self.engine.revision, "audit": audit,
             "decision_cache": self.engine.cache_status(),
             "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
             "python_optimized": sys.flags.optimize > 0},
            status=200 if ready else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        audit = self.audit.status()
        self.metrics.audit_queue_depth.set(audit["depth"])
        self.metrics.audit_dropped.set(audit["dropped"])
        self.metrics.audit_spool_bytes.set(audit["bytes"])
        self.metrics.audit_spool_full.set(1 if audit["full"] else 0)
        self.metrics.audit_store_reachable.set(1 if audit["store_reachable"] else 0)
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def audit_verify(self, request: web.Request) -> web.Response:
        """Walk the hash chain of every instance (or ``?instance=``) and report tampering."""
        actor = await self.authorize(request, AUDIT_ROLES, "audit.verify")
        instance = request.query.get("instance") or None
        await self.fresh_audit()
        report = await verify_store(self.store, instance=instance,
                                    expected_heads=shipped_heads(self.audit.directory))
        await self.events.record(actor, "audit.verify", instance or "*",
                                 result="ok" if report.ok else "tampering_found")
        return web.json_response(report.as_dict())

    async def audit_sql(self, request: web.Request) -> web.Response:
        actor = await self.authorize(request, AUDIT_ROLES, "audit.sql")
        payload = await _json_body(request, 'body must be JSON: {"sql": "SELECT ..."}')
        sql = payload.get("sql")
        limit = payload.get("limit", self.sql_row_limit)
        if not isinstance(sql, str) or not sql.strip():
            raise BadRequest("missing 'sql' (a string)")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadRequest("'limit' must be a positive integer")
        limit = min(limit, self.sql_row_limit)
        await self.fresh_audit()  # calls made a moment ago should be visible to the responder
        try:
            columns, rows = await self.store.query_readonly(sql, limit=limit)
        except QueryRejected as exc:
            await self.events.record(actor, "audit.sql", "", result="refused", detail=sql[:2000])
            raise GatewayError(str(exc), code="query_not_allowed", status=400) from None
        except QueryError as exc:
            await self.events.record(actor, "audit.sql", "", result="error", detail=sql[:2000])
            raise GatewayError(str(exc), code="query_error", status=400) from None
        await self.events.record(actor, "audit.sql", "", detail=sql[:2000])
        return web.json_response({"columns": columns, "rows": rows, "row_count": len(rows),
                                  "limit": limit})

    # -- kill-switches -------------------------------------------------------------------------
    async def list_killswitches(self, request: web.Request) -> web.Response:
        actor = await self.authorize(request, OPERATOR_ROLES | AUDIT_ROLES, "killswitch.list")
        everything = request.query.get("all") in ("1", "true")
        switches = self.killswitches.all() if everything else self.killswitches.active()
        await self.events.record(actor, "killswitch.list", "", detail=request.query_string[:2000])
        return web.json_response({"killswitches": [s.to_json() for s in switches]})

    async def create_killswitch(self, request: web.Request) -> web.Response:
        # Who asks comes first: an unauthenticated attempt is recorded whatever its body holds.
        actor = await self.authorize(request, OPERATOR_ROLES, "killswitch.create")
        async with self.recording_refusals(actor, "killswitch.create", ""):
            payload = await _json_body(request, 'body must be JSON: {"scope": "agent", "target": "...", "reason": "..."}')
        scope, target, reason = payload.get("scope"), payload.get("target", ""), payload.get("reason", "")
        async with self.recording_refusals(actor, "killswitch.create", f"{scope}:{target}"[:200]):
            if scope not in SCOPES:
                raise BadRequest(f"'scope' must be one of {', '.join(SCOPES)}")
            if not isinstance(target, str) or (scope != "all" and not target.strip()):
                raise BadRequest(f"a {scope} kill-switch needs a 'target'")
            if not isinstance(reason, str) or not reason.strip():
                raise BadRequest("'reason' is required: say why, for whoever reads the audit")
        switch, stored = await self.killswitches.create(scope, target.strip(), reason.strip(), actor.agent_id)
        target = f"{switch.id} {switch.scope}:{switch.target}"
        if not stored:  # in force here, stored when the store is back; this event only in the log
            log.error("admin event not recorded (audit store unreachable): killswitch.create %s by %s, "
                      "reason %r", target, actor.agent_id, switch.reason)
            return web.json_response({**switch.to_json(), "stored": False,
                                      "warning": "in force on this replica; the audit store is unreachable, "
                                                 "so other replicas see it once it is stored"}, status=201)
        await self.events.record(actor, "killswitch.create", target, reason=switch.reason)
        return web.json_response({**switch.to_json(), "stored": True}, status=201)

    async def revoke_killswitch(self, request: web.Request) -> web.Response:
        switch_id = request.match_info["id"]
        actor = await self.authorize(request, OPERATOR_ROLES, "killswitch.revoke", switch_id)
        switch = self.killswitches.get(switch_id)
        async with self.recording_refusals(actor, "killswitch.revoke", switch_id):
            if switch is None:
                raise GatewayError(f"no kill-switch {switch_id}", code="not_found", status=404)
            if not switch.active:
                raise GatewayError(f"kill-switch {switch_id} was already revoked", code="already_revoked",
                                   status=409)
        reason = request.query.get("reason", "")
        revoked = await self.killswitches.revoke(switch, actor.agent_id)
        await self.events.record(actor, "killswitch.revoke", f"{switch.id} {switch.scope}:{switch.target}",
                                 reason=reason)
        return web.json_response(revoked.to_json())

    # -- approvals -----------------------------------------------------------------------------
    async def list_approvals(self, request: web.Request) -> web.Response:
        actor = await self.authorize(request, APPROVER_ROLES | AUDIT_ROLES, "approval.list")
        state = request.query.get("state")
        async with self.recording_refusals(actor, "approval.list", ""):
            if state not in (None, "pending", "approved", "denied", "consumed", "expired"):
                raise BadRequest("state must be pending, approved, denied, consumed or expired")
        # Approvals carry previews of held calls: who looked is part of the record.
        await self.events.record(actor, "approval.list", "", detail=request.query_string[:2000])
        return web.json_response({"approvals": [a.to_json() for a in self.approvals.list(state)]})

    async def get_approval(self, request: web.Request) -> web.Response:
        approval_id = request.match_info["id"]
        actor = await self.authorize(request, APPROVER_ROLES | AUDIT_ROLES, "approval.get", approval_id)
        approval = self.approvals.get(approval_id)
        async with self.recording_refusals(actor, "approval.get", approval_id):
            if approval is None:
                raise GatewayError(f"no approval {approval_id}", code="not_found", status=404)
        await self.events.record(actor, "approval.get", approval_id)
        return web.json_response(approval.to_json())

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, approve=True)

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, approve=False)

    async def _decide(self, request: web.Request, *, approve: bool) -> web.Response:
        approval_id = request.match_info["id"]
        action = "approval.approve" if approve else "approval.deny"
        actor = await self.authorize(request, APPROVER_ROLES, action, approval_id)
        payload = await _json_body(request, 'body must be JSON: {"reason": "..."}', allow_empty=True)
        reason = payload.get("reason", "")
        if not isinstance(reason, str) or (not approve and not reason.strip()):
            raise BadRequest("'reason' is required to deny")
        teams = actor.claims.get(self.approver_teams_claim)
        approver_teams = [str(t) for t in teams] if isinstance(teams, list) and "admin" not in actor.roles else None
        async with self.recording_refusals(actor, action, approval_id, reason=reason):
            decided = await self.approvals.decide(approval_id, approve=approve, reason=reason.strip(),
                                                  actor=actor, approver_teams=approver_teams)
        await self.events.record(actor, action, approval_id, reason=reason)
        return web.json_response(decided.to_json())


async def _json_body(request: web.Request, hint: str, *, allow_empty: bool = False) -> dict[str, Any]:
    if allow_empty and not request.can_read_body:
        return {}
    try:
        payload = await request.json()
    except ValueError:
        raise BadRequest(hint) from None
    if not isinstance(payload, dict):
        raise BadRequest(hint)
    return payload
