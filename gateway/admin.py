"""Admin API (aiohttp, its own port): health, readiness, metrics and read-only audit SQL.

Admin callers present a JWT verified by the same identity code as agents; the roles claim
decides what they may do.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.errors import CALL_ID_HEADER, Forbidden, GatewayError, error_body
from gateway.identity import JwtVerifier, extract_bearer
from gateway.metrics import Metrics
from gateway.models import Identity
from gateway.policy import PolicyEngine
from storage.audit import AuditWriter
from storage.store import QueryError, QueryRejected, Store

log = logging.getLogger("agentgate.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AUDIT_ROLES = frozenset({"responder", "admin"})
_FRESHNESS_WAIT_SECONDS = 2.0


def json_error(err: GatewayError, request_id: str) -> web.Response:
    return web.Response(status=err.status, body=error_body(err.code, err.message, request_id),
                        content_type="application/json",
                        headers={CALL_ID_HEADER: request_id, **err.headers})


class AdminApi:
    def __init__(self, *, verifier: JwtVerifier, engine: PolicyEngine, store: Store,
                 audit: AuditWriter, metrics: Metrics, sql_row_limit: int) -> None:
        self.verifier = verifier
        self.engine = engine
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.sql_row_limit = sql_row_limit

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_post("/v1/audit/sql", self.audit_sql)
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
        resp.headers[CALL_ID_HEADER] = request_id
        return resp

    async def require_roles(self, request: web.Request, allowed: frozenset[str]) -> Identity:
        identity = await self.verifier.verify(extract_bearer(request.headers.get("Authorization")),
                                             agent=False)
        if not allowed.intersection(identity.roles):
            raise Forbidden(f"this action needs one of the roles: {', '.join(sorted(allowed))}",
                            code="forbidden_role")
        return identity

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        store_ok = await self.store.ping()
        checks = {"policy": bool(self.engine.ready), "store": store_ok}
        ready = all(checks.values())
        return web.json_response(
            {"ready": ready, "checks": checks, "policy_revision": self.engine.revision,
             "audit_queue_depth": self.audit.depth},
            status=200 if ready else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        self.metrics.audit_queue_depth.set(self.audit.depth)
        self.metrics.audit_dropped.set(self.audit.dropped)
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def audit_sql(self, request: web.Request) -> web.Response:
        await self.require_roles(request, AUDIT_ROLES)
        try:
            payload: Any = await request.json()
        except ValueError:
            raise GatewayError("body must be JSON: {\"sql\": \"SELECT ...\"}", code="bad_request",
                               status=400) from None
        sql = payload.get("sql") if isinstance(payload, dict) else None
        limit = payload.get("limit", self.sql_row_limit) if isinstance(payload, dict) else None
        if not isinstance(sql, str) or not sql.strip():
            raise GatewayError("missing 'sql' (a string)", code="bad_request", status=400)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise GatewayError("'limit' must be a positive integer", code="bad_request", status=400)
        limit = min(limit, self.sql_row_limit)
        # Calls made a moment ago should be visible to the responder asking about them.
        try:
            await asyncio.wait_for(self.audit.flush(), _FRESHNESS_WAIT_SECONDS)
        except TimeoutError:
            pass
        try:
            columns, rows = await self.store.query_readonly(sql, limit=limit)
        except QueryRejected as exc:
            raise GatewayError(str(exc), code="query_not_allowed", status=400) from None
        except QueryError as exc:
            raise GatewayError(str(exc), code="query_error", status=400) from None
        return web.json_response({"columns": columns, "rows": rows, "row_count": len(rows),
                                  "limit": limit})
