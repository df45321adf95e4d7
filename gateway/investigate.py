"""Answers for incident responders: the admin API's ``/v1/audit/*`` questions and ``agentgate audit ...``.

Endpoints (role ``responder`` or ``admin``; every use, and every refusal, is an admin event)::

    GET /v1/audit/timeline?agent=ID&since=2h[&until=][&limit=]
    GET /v1/audit/trace/{trace_id}[?since=][&limit=]
    GET /v1/audit/denied?since=24h[&agent=][&shadow=0][&limit=]
    GET /v1/audit/outside-policy?since=7d[&agent=][&limit=]
    GET /v1/audit/grants?agent=ID&since=30d[&roles=a,b]
    GET /v1/audit/export?since=...&format=jsonl|csv|ocsf[&until=][&agent=][&limit=]   (streamed)

The SQL is in :mod:`storage.queries`; the OCSF mapping in :mod:`storage.ocsf`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import io
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

from aiohttp import web
from clickhouse_connect.driver.exceptions import ClickHouseError

from gateway.admin_client import admin_call, admin_open, print_table
from gateway.errors import CALL_ID_HEADER, BadRequest, GatewayError
from storage import ocsf
from storage import queries as q
from storage.store import StoreError

if TYPE_CHECKING:
    from gateway.admin import AdminApi
    from gateway.models import Identity

log = logging.getLogger("agentgate.admin")
T = TypeVar("T")

ROLES = frozenset({"responder", "admin"})
DEFAULT_LIMIT = 1000
EXPORT_MAX_ROWS = 1_000_000
EXPORT_PAGE_ROWS = 5000
FORMATS = {"jsonl": "application/x-ndjson", "ocsf": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


# ============================================================================ admin API
def _row_json(row: Any) -> dict[str, Any]:
    doc = {f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name != "extra"}
    doc.update(getattr(row, "extra", None) or {})
    return {k: q.json_value(v) for k, v in doc.items()}


def _page_json(page: q.Page[Any], key: str) -> dict[str, Any]:
    return {key: [_row_json(r) for r in page.rows], "row_count": len(page.rows), "limit": page.limit,
            "truncated": page.truncated}


class Investigations:
    """The handlers; they borrow AdminApi's authorization, refusal recording, store, audit
    spool and events."""

    def __init__(self, api: "AdminApi") -> None:
        self.api = api

    # -- plumbing --------------------------------------------------------------------------
    async def _begin(self, request: web.Request, action: str, target: str = "") -> "Identity":
        actor = await self.api.authorize(request, ROLES, action, target)
        await self.api.fresh_audit()  # calls made a moment ago should be in the answer
        return actor

    async def _table(self) -> q.CallsTable:
        return await self.api.store.run(q.describe_calls, self.api.store.database)

    def _limit(self, request: web.Request, maximum: int, default: int) -> int:
        raw = request.query.get("limit")
        if raw is None:
            return min(default, maximum)
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest("'limit' must be a positive integer") from None
        if value < 1:
            raise BadRequest("'limit' must be a positive integer")
        return min(value, maximum)

    @staticmethod
    def _window(request: web.Request, default_since: str | None) -> q.Window:
        since = request.query.get("since", default_since)
        if not since:
            raise BadRequest("'since' is required: e.g. 2h, 24h, 7d or an ISO 8601 time")
        try:
            return q.Window.parse(since, request.query.get("until") or None)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    @staticmethod
    def _agent(request: web.Request) -> str | None:
        agent = request.query.get("agent", "").strip()
        return agent or None

    def _required_agent(self, request: web.Request) -> str:
        agent = self._agent(request)
        if agent is None:
            raise BadRequest("'agent' is required")
        return agent

    async def _answer(self, request: web.Request, action: str, target: str,
                      work: Callable[[], Awaitable[dict[str, Any]]]) -> web.Response:
        actor = await self._begin(request, action, target)
        detail = request.query_string[:2000]
        async with self.api.recording_refusals(actor, action, target, detail=detail):
            doc = await _store_errors(work())
        await self.api.events.record(actor, action, target, detail=detail)
        return web.json_response(doc, dumps=lambda d: json.dumps(d, ensure_ascii=False))

    # -- questions -------------------------------------------------------------------------
    async def timeline(self, request: web.Request) -> web.Response:
        async def work() -> dict[str, Any]:
            agent = self._required_agent(request)
            window = self._window(request, "24h")
            limit = self._limit(request, self.api.sql_row_limit, DEFAULT_LIMIT)
            page = await self.api.store.run(q.timeline, await self._table(), agent, window, limit=limit)
            return {"agent": agent, **_window_json(window), **_page_json(page, "calls")}
        return await self._answer(request, "audit.timeline", request.query.get("agent", ""), work)

    async def trace(self, request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]

        async def work() -> dict[str, Any]:
            window = self._window(request, None) if request.query.get("since") else None
            limit = self._limit(request, self.api.sql_row_limit, DEFAULT_LIMIT)
            table = await self._table()
            page = await self.api.store.run(q.trace, table, trace_id, limit=limit, window=window)
            return {"trace_id": trace_id, **trace_report(page.rows, table), **_page_json(page, "calls")}
        return await self._answer(request, "audit.trace", trace_id, work)

    async def denied(self, request: web.Request) -> web.Response:
        async def work() -> dict[str, Any]:
            window = self._window(request, "24h")
            shadow = request.query.get("shadow", "1") not in ("0", "false", "no")
            limit = self._limit(request, self.api.sql_row_limit, DEFAULT_LIMIT)
            page = await self.api.store.run(q.denied, await self._table(), window, limit=limit,
                                            agent_id=self._agent(request), include_shadow=shadow)
            return {**_window_json(window), "include_shadow": shadow, **_page_json(page, "groups")}
        return await self._answer(request, "audit.denied", request.query.get("agent", ""), work)

    async def outside_policy(self, request: web.Request) -> web.Response:
        async def work() -> dict[str, Any]:
            window = self._window(request, "7d")
            limit = self._limit(request, self.api.sql_row_limit, DEFAULT_LIMIT)
            page = await self.api.store.run(q.outside_policy, await self._table(), window, limit=limit,
                                            agent_id=self._agent(request))
            return {**_window_json(window), **_page_json(page, "groups")}
        return await self._answer(request, "audit.outside_policy", request.query.get("agent", ""), work)

    async def grants(self, request: web.Request) -> web.Response:
        async def work() -> dict[str, Any]:
            agent = self._required_agent(request)
            window = self._window(request, "30d")
            limit = self._limit(request, self.api.sql_row_limit, self.api.sql_row_limit)
            table = await self._table()
            if "roles" in request.query:
                roles = [r.strip() for r in request.query["roles"].split(",") if r.strip()]
                roles_source = "query"
            else:
                roles = await self.api.store.run(q.agent_roles, table, agent, window)
                roles_source = "latest call"
            model = q.grant_model(await self.api.engine.data(), agent, roles)
            page = await self.api.store.run(q.grants, table, agent, window, model, limit=limit)
            rows = page.rows
            return {
                "agent": agent, "roles": roles, "roles_source": roles_source,
                "grant_source": model.source if model else None,
                "policy_revision": getattr(self.api.engine, "revision", ""),
                **_window_json(window),
                "summary": {
                    "granted": sum(1 for r in rows if r.granted),
                    "used": sum(1 for r in rows if r.status == "used"),
                    "unused": [f"{r.system} {r.method}" for r in rows if r.status == "unused"],
                    "not_granted": [f"{r.system} {r.method}" for r in rows if r.status == "not_granted"],
                },
                **_page_json(page, "grants"),
            }
        return await self._answer(request, "audit.grants", request.query.get("agent", ""), work)

    async def export(self, request: web.Request) -> web.StreamResponse:
        action = "audit.export"
        actor = await self._begin(request, action)
        detail = request.query_string[:2000]
        async with self.api.recording_refusals(actor, action, "", detail=detail):
            fmt = request.query.get("format", "jsonl")
            if fmt not in FORMATS:
                raise BadRequest(f"'format' must be one of {', '.join(FORMATS)}")
            window = self._window(request, None)
            limit = self._limit(request, EXPORT_MAX_ROWS, EXPORT_MAX_ROWS)
            agent = self._agent(request)
            table = await _store_errors(self._table())
        # Durable before the first byte leaves: an export is never unlogged.
        await self.api.events.record(actor, action, agent or "", detail=detail)
        resp = web.StreamResponse(headers={
            "Content-Type": FORMATS[fmt], CALL_ID_HEADER: request.get("request_id", ""),
            "X-Agentgate-Export-Limit": str(limit),
            "Content-Disposition": f'attachment; filename="agentgate-calls.{"csv" if fmt == "csv" else "jsonl"}"'})
        await resp.prepare(request)
        writer = _Encoder(fmt, table.columns)
        if fmt == "csv":
            await resp.write(writer.header())
        sent, after = 0, None
        try:
            while sent < limit:
                size = min(EXPORT_PAGE_ROWS, limit - sent)
                _, rows = await self.api.store.run(q.export_page, table, window, after=after, limit=size,
                                                   agent_id=agent)
                if rows:
                    await resp.write(writer.encode(rows))
                    sent += len(rows)
                    after = (rows[-1]["ts_start"], str(rows[-1]["call_id"]))
                if len(rows) < size:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("audit export cancelled by the client after %d rows", sent)
            raise
        except Exception:  # noqa: BLE001 - headers are gone; end the stream short, visibly
            log.exception("audit export failed after %d rows", sent)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp


async def _store_errors(work: Awaitable[T]) -> T:
    """Store failures as a JSON 503 the CLI can show, not an aiohttp 500."""
    try:
        return await work
    except (StoreError, ClickHouseError, LookupError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise GatewayError(f"audit store: {first}", code="store_error", status=503) from None


def _window_json(window: q.Window) -> dict[str, Any]:
    return {"since": q.json_value(window.since), "until": q.json_value(window.until)}


def trace_report(calls: list[q.CallRow], table: q.CallsTable) -> dict[str, Any]:
    """What a responder reads first about a session: who, when, outcomes, each action and the
    data read before it, approvals, kill-switches and (when recorded) redactions."""
    def brief(c: q.CallRow) -> dict[str, Any]:
        return {"call_id": c.call_id, "ts_start": q.json_value(c.ts_start), "method": c.method,
                "target": c.target, "path": c.path, "status": c.status, "outcome": c.outcome,
                "response_bytes": c.response_bytes}

    outcomes: dict[str, int] = {}
    for c in calls:
        outcomes[c.outcome] = outcomes.get(c.outcome, 0) + 1
    redaction_cols = [col for col in q.OPTIONAL_TRACE_COLUMNS if table.has(col)]
    return {
        "summary": {
            "calls": len(calls), "agents": sorted({c.agent_id for c in calls}),
            "first": q.json_value(calls[0].ts_start) if calls else None,
            "last": q.json_value(calls[-1].ts_start) if calls else None, "outcomes": outcomes,
        },
        "actions": [{**brief(a.action), "approval_id": a.action.approval_id, "approver": a.action.approver,
                     "reasons": a.action.reasons, "reads_before": [brief(r) for r in a.reads_before]}
                    for a in q.actions_with_prior_reads(calls)],
        "approvals": [{"call_id": c.call_id, "approval_id": c.approval_id, "approver": c.approver,
                       "decided_at": q.json_value(c.decided_at), "outcome": c.outcome,
                       "reason": c.extra.get("approval_reason", "")} for c in calls if c.approval_id],
        "killswitches": [{"call_id": c.call_id, "killswitch_id": c.killswitch_id,
                          "reason": c.extra.get("killswitch_reason", "")} for c in calls if c.killswitch_id],
        "redactions": None if not redaction_cols else [
            {"call_id": c.call_id, **{col: q.json_value(c.extra.get(col)) for col in redaction_cols}}
            for c in calls if any(c.extra.get(col) for col in redaction_cols)],
    }


class _Encoder:
    def __init__(self, fmt: str, columns: tuple[str, ...]) -> None:
        self.fmt = fmt
        self.columns = columns

    def header(self) -> bytes:
        return self._csv([list(self.columns)])

    def encode(self, rows: list[dict[str, Any]]) -> bytes:
        if self.fmt == "csv":
            return self._csv([[_csv_cell(r.get(c)) for c in self.columns] for r in rows])
        if self.fmt == "ocsf":
            docs = (ocsf.to_ocsf(r) for r in rows)
        else:
            docs = ({k: q.json_value(v) for k, v in r.items()} for r in rows)
        return "".join(json.dumps(d, ensure_ascii=False, separators=(",", ":")) + "\n" for d in docs).encode()

    @staticmethod
    def _csv(rows: list[list[Any]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue().encode()


def _csv_cell(value: Any) -> Any:
    value = q.json_value(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


def register_routes(app: web.Application, api: "AdminApi") -> Investigations:
    """Add the ``/v1/audit/*`` questions to the admin app (call from ``AdminApi.app``)."""
    inv = Investigations(api)
    app.router.add_get("/v1/audit/timeline", inv.timeline)
    app.router.add_get("/v1/audit/trace/{trace_id}", inv.trace)
    app.router.add_get("/v1/audit/denied", inv.denied)
    app.router.add_get("/v1/audit/outside-policy", inv.outside_policy)
    app.router.add_get("/v1/audit/grants", inv.grants)
    app.router.add_get("/v1/audit/export", inv.export)
    return inv


# ============================================================================ CLI
def _get(args: argparse.Namespace, path: str, params: dict[str, Any]) -> Any:
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return admin_call(args, path + (f"?{query}" if query else ""), method="GET")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(_cell(v) for v in value)
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        return value[:23].replace("T", " ")  # an ISO time: to the millisecond, UTC
    return str(value)


def _table(columns: list[str], rows: list[dict[str, Any]]) -> None:
    print_table(columns, [[_cell(r.get(c)) for c in columns] for r in rows])


def _output(args: argparse.Namespace, doc: dict[str, Any], key: str, columns: list[str]) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    rows = doc[key]
    for r in rows:
        if "route" in r and "host" in r:
            r.setdefault("target", f"route:{r['route']}" if r["route"] else r["host"])
    _table(columns, rows)
    if doc.get("truncated"):
        print(f"(more rows matched: showing the first {doc['limit']}; narrow --since or raise --limit)")


def cmd_timeline(args: argparse.Namespace) -> int:
    doc = _get(args, "/v1/audit/timeline", {"agent": args.agent, "since": args.since, "until": args.until,
                                            "limit": args.limit})
    _output(args, doc, "calls", ["ts_start", "outcome", "method", "target", "path", "status", "approver",
                                 "killswitch_id", "trace_id", "reasons"])
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    doc = _get(args, f"/v1/audit/trace/{quote(args.trace_id, safe='')}", {"since": args.since, "limit": args.limit})
    _output(args, doc, "calls", ["ts_start", "agent_id", "outcome", "method", "target", "path", "status",
                                 "response_bytes", "approver", "killswitch_id", "reasons"])
    if args.json:
        return 0
    for action in doc["actions"]:
        who = f" by {action['approver']}" if action["approver"] else ""
        print(f"\n{action['method']} {action['target']} {action['path']} -> {action['outcome']}{who}")
        reads = action["reads_before"]
        print("  read before it:" if reads else "  read nothing through the gateway before it")
        for r in reads:
            print(f"    {r['method']} {r['target']} {r['path']} ({r['status']}, {r['response_bytes']} bytes)")
    for a in doc["approvals"]:
        print(f"approval {a['approval_id']}: {a['outcome']} by {a['approver'] or '-'} "
              f"at {_cell(a['decided_at']) or '-'} {a['reason']}".rstrip())
    for k in doc["killswitches"]:
        print(f"kill-switch {k['killswitch_id']}: {k['reason']}".rstrip())
    if doc.get("redactions"):
        for r in doc["redactions"]:
            print(f"redacted in {r['call_id']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "call_id"))
    return 0


def cmd_denied(args: argparse.Namespace) -> int:
    doc = _get(args, "/v1/audit/denied", {"since": args.since, "until": args.until, "agent": args.agent,
                                          "shadow": "0" if args.no_shadow else None, "limit": args.limit})
    _output(args, doc, "groups", ["agent_id", "outcome", "error_code", "calls", "first_seen", "last_seen",
                                  "reasons"])
    return 0


def cmd_outside_policy(args: argparse.Namespace) -> int:
    doc = _get(args, "/v1/audit/outside-policy", {"since": args.since, "until": args.until, "agent": args.agent,
                                                  "limit": args.limit})
    _output(args, doc, "groups", ["agent_id", "target", "tool_name", "methods", "calls", "shadow_calls",
                                  "first_seen", "last_seen", "reasons"])
    return 0


def cmd_grants(args: argparse.Namespace) -> int:
    doc = _get(args, "/v1/audit/grants", {"agent": args.agent, "since": args.since, "roles": args.roles})
    if not args.json:
        print(f"agent {doc['agent']}, roles {', '.join(doc['roles']) or '(none)'} (from {doc['roles_source']})")
        print(f"grants from: {doc['grant_source'] or 'no grant data in the policy bundle: usage only'}")
    _output(args, doc, "grants", ["system", "method", "status", "calls", "allowed_calls", "last_used", "targets"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    params = {k: v for k, v in {"since": args.since, "until": args.until, "format": args.format,
                                "agent": args.agent, "limit": args.limit}.items() if v not in (None, "")}
    resp = admin_open(args, f"/v1/audit/export?{urlencode(params)}")
    out: IO[bytes] = open(args.output, "wb") if args.output else sys.stdout.buffer
    lines = 0
    try:
        with resp:
            limit = int(resp.headers.get("X-Agentgate-Export-Limit") or 0)
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                lines += chunk.count(b"\n")
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    rows = lines - 1 if args.format == "csv" else lines
    if limit and rows >= limit:
        print(f"agentgate: export stopped at the {limit}-row limit; narrow --since/--until for the rest",
              file=sys.stderr)
    if args.output:
        print(f"{rows} rows written to {args.output}", file=sys.stderr)
    return 0


def register_cli(subparsers: Any, with_admin: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """Add ``timeline``, ``trace``, ``denied``, ``outside-policy``, ``grants`` and ``export`` to
    ``agentgate audit`` (``subparsers``: the audit command's sub-parsers)."""
    def common(p: argparse.ArgumentParser, since: str | None, *, required: bool = False,
               json_flag: bool = True) -> argparse.ArgumentParser:
        with_admin(p)
        p.add_argument("--since", default=since, required=required,
                       help="start: a duration back from now (2h, 24h, 7d, 30d) or an ISO 8601 time"
                            + (f" (default {since})" if since else ""))
        if json_flag:
            p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
        p.add_argument("--limit", type=int, help="at most this many rows")
        return p

    p = common(subparsers.add_parser("timeline", help="what one agent did, in order"), "24h")
    p.add_argument("--agent", required=True)
    p.add_argument("--until", help="end of the window (same forms as --since)")
    p.set_defaults(func=cmd_timeline)

    p = common(subparsers.add_parser("trace", help="every call of one trace / agent session"), None)
    p.add_argument("trace_id")
    p.set_defaults(func=cmd_trace)

    p = common(subparsers.add_parser("denied", help="refused calls grouped by agent and reason"), "24h")
    p.add_argument("--agent")
    p.add_argument("--until")
    p.add_argument("--no-shadow", action="store_true", help="leave out shadow-mode would_deny calls")
    p.set_defaults(func=cmd_denied)

    p = common(subparsers.add_parser("outside-policy", help="agents reaching for what their policy refuses"), "7d")
    p.add_argument("--agent")
    p.add_argument("--until")
    p.set_defaults(func=cmd_outside_policy)

    p = common(subparsers.add_parser("grants", help="granted versus used permissions of one agent"), "30d")
    p.add_argument("--agent", required=True)
    p.add_argument("--roles", help="comma-separated roles (default: the roles on the agent's latest call)")
    p.set_defaults(func=cmd_grants)

    p = common(subparsers.add_parser("export", help="calls as JSON lines, CSV or OCSF 6003 events"), None,
               required=True, json_flag=False)
    p.add_argument("--until")
    p.add_argument("--agent")
    p.add_argument("--format", choices=sorted(FORMATS), default="jsonl")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_export)
