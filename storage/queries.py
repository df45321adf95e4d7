"""The questions incident responders ask of the audit store, as parameterised ClickHouse SQL.

Every function here takes a clickhouse-connect client (run them on the store's worker with
``Store.run(fn, ...)``), binds user input as ClickHouse query parameters (``{name:Type}``,
never formatted into the SQL) and returns typed rows. Only the database name, validated as a
plain identifier, is interpolated.

``agentgate.calls`` is read ``FINAL`` whenever its engine supports it (a ReplacingMergeTree
keyed by call: a retried insert may leave a duplicate until the next merge); the engine is
looked up, so the same code reads a plain MergeTree, where ClickHouse refuses ``FINAL``.
docs/audit.md has the same queries as plain SQL for clickhouse-client.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

from storage import schema
from storage.state_schema import APPROVALS, KILLSWITCHES

UTC = dt.timezone.utc
TS = "DateTime64(6, 'UTC')"
# Outcomes of a call the gateway refused (the agent got an error, nothing reached the upstream).
REFUSED_OUTCOMES: tuple[str, ...] = (
    "denied", "killed", "approval_denied", "approval_expired", "unauthenticated", "rejected")
SHADOW_OUTCOME = "would_deny"
# Outcomes of a call the policy allowed: the permission was exercised.
GRANT_USED_OUTCOMES: tuple[str, ...] = ("allowed", "approved", "upstream_error", "incomplete")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Redaction summary columns another change may add to calls; used only if present.
OPTIONAL_TRACE_COLUMNS: tuple[str, ...] = ("redacted_paths", "redaction_counts")
_FINAL_ENGINES = re.compile(r"(Replacing|Collapsing|Summing|Aggregating|Coalescing)MergeTree")
_RELATIVE = re.compile(r"^(\d{1,7})\s*(s|m|h|d|w)$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_LOOKBACK = dt.timedelta(days=3660)
QUERY_SETTINGS: dict[str, Any] = {"max_execution_time": 60}

R = TypeVar("R")


# ---------------------------------------------------------------------------- time windows
def parse_since(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """``"2h"``, ``"24h"``, ``"7d"``, ``"30d"`` (also ``s``, ``m``, ``w``) before ``now``, or an
    ISO 8601 date/time (a time without a zone is UTC). Returns an aware UTC datetime."""
    raw = (text or "").strip()
    if not raw:
        raise ValueError("a time is required: e.g. 2h, 24h, 7d, 30d or 2024-05-01T12:00:00Z")
    now = now or dt.datetime.now(UTC)
    if m := _RELATIVE.match(raw):
        span = dt.timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()])
        if span > MAX_LOOKBACK:
            raise ValueError(f"{raw!r} reaches back more than {MAX_LOOKBACK.days} days")
        return now - span
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is neither a duration (2h, 24h, 7d, 30d) nor an ISO 8601 time") from None
    try:
        return utc(when)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError(f"{raw!r} is out of range") from None


def utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC datetime (naive values, as chDB returns them, are UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Window:
    """``since <= ts_start < until`` (``until`` None: up to now)."""

    since: dt.datetime
    until: dt.datetime | None = None

    @classmethod
    def parse(cls, since: str, until: str | None = None) -> "Window":
        start = parse_since(since)
        end = parse_since(until) if until else None
        if end is not None and end <= start:
            raise ValueError("'until' must be later than 'since'")
        return cls(start, end)

    def sql(self, column: str = "ts_start") -> str:
        cond = f"{column} >= {{since:{TS}}}"
        return cond + (f" AND {column} < {{until:{TS}}}" if self.until is not None else "")

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"since": self.since}
        if self.until is not None:
            out["until"] = self.until
        return out


# ---------------------------------------------------------------------------- the calls table
@dataclass(frozen=True, slots=True)
class CallsTable:
    """What this database's ``calls`` table looks like right now."""

    database: str
    final: bool
    columns: tuple[str, ...]

    @property
    def source(self) -> str:
        return f"{self.database}.{schema.CALLS_TABLE}" + (" FINAL" if self.final else "")

    def has(self, column: str) -> bool:
        return column in self.columns


def describe_calls(client: Any, database: str) -> CallsTable:
    """Engine and columns of ``{database}.calls`` from system.tables / system.columns."""
    schema.validate_database(database)
    params = {"db": database, "t": schema.CALLS_TABLE}
    engine = client.query("SELECT engine FROM system.tables WHERE database = {db:String} AND name = {t:String}",
                          parameters=params).result_rows
    if not engine:
        raise LookupError(f"no table {database}.{schema.CALLS_TABLE}")
    cols = client.query("SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} "
                        "ORDER BY position", parameters=params).result_rows
    return CallsTable(database, bool(_FINAL_ENGINES.search(str(engine[0][0]))), tuple(str(r[0]) for r in cols))


def _query(client: Any, sql: str, params: Mapping[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    res = client.query(sql, parameters=dict(params), settings=QUERY_SETTINGS)
    return list(res.column_names), list(res.result_rows)


def json_value(value: Any) -> Any:
    """A row value as JSON: times as ISO 8601 UTC (``...Z``), UUIDs as strings."""
    if isinstance(value, dt.datetime):
        return utc(value).isoformat().replace("+00:00", "Z")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)  # Decimal, IP addresses, dates ...


def _value(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return utc(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def _rows(cls: type[R], columns: list[str], rows: Iterable[tuple[Any, ...]]) -> list[R]:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    out = []
    for row in rows:
        values = {c: _value(v) for c, v in zip(columns, row)}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        if "extra" in names:
            known["extra"] = extra
        out.append(cls(**known))
    return out


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError("limit must be a positive integer")
    return limit


@dataclass
class Page(Generic[R]):
    """Rows of one answer; ``truncated`` when more rows matched than ``limit``."""

    rows: list[R]
    limit: int
    truncated: bool


def _page(rows: list[R], limit: int) -> Page[R]:
    return Page(rows[:limit], limit, len(rows) > limit)


# ---------------------------------------------------------------------------- timeline / trace
CALL_COLUMNS: tuple[str, ...] = (
    "ts_start", "ts_end", "call_id", "trace_id", "agent_id", "team", "roles", "mode", "route", "method",
    "scheme", "host", "port", "path", "query", "tool_kind", "tool_name", "status", "outcome", "reasons",
    "error_code", "enforce", "fail_open", "policy_revision", "request_bytes", "response_bytes",
    "approval_id", "approver", "decided_at", "killswitch_id")


@dataclass(slots=True)
class CallRow:
    """One call as a responder reads it; ``extra`` holds optional columns (redaction summary,
    approval/kill-switch reasons) that this database has."""

    ts_start: dt.datetime
    ts_end: dt.datetime
    call_id: str
    trace_id: str
    agent_id: str
    team: str
    roles: list[str]
    mode: str
    route: str
    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    tool_kind: str
    tool_name: str
    status: int
    outcome: str
    reasons: list[str]
    error_code: str
    enforce: int
    fail_open: int
    policy_revision: str
    request_bytes: int
    response_bytes: int
    approval_id: str
    approver: str
    decided_at: dt.datetime | None
    killswitch_id: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """What the call reached: the route name in route mode, else the host."""
        return f"route:{self.route}" if self.route else self.host

    @property
    def is_read(self) -> bool:
        return self.method.upper() in READ_METHODS


def _call_select(table: CallsTable, optional: Sequence[str] = ()) -> str:
    return ", ".join(CALL_COLUMNS + tuple(c for c in optional if table.has(c)))


def timeline(client: Any, table: CallsTable, agent_id: str, window: Window, *, limit: int) -> Page[CallRow]:
    """What one agent did in the window, oldest first, with outcomes and reasons."""
    limit = _limit(limit)
    sql = (f"SELECT {_call_select(table)} FROM {table.source}\n"
           f"WHERE agent_id = {{agent:String}} AND {window.sql()}\n"
           "ORDER BY ts_start, call_id\nLIMIT {limit:UInt32}")
    cols, rows = _query(client, sql, {"agent": agent_id, "limit": limit + 1, **window.params()})
    return _page(_rows(CallRow, cols, rows), limit)


def trace(client: Any, table: CallsTable, trace_id: str, *, limit: int,
          window: Window | None = None) -> Page[CallRow]:
    """Every call of one trace/session in order, with the approval's and kill-switch's reasons
    (``extra``: approval_reason, killswitch_reason, and redaction columns when present)."""
    limit = _limit(limit)
    db = table.database
    inner = _call_select(table, OPTIONAL_TRACE_COLUMNS)
    where = "trace_id = {trace:String}" + (f" AND {window.sql()}" if window else "")
    sql = (f"SELECT c.*, a.decision_reason AS approval_reason, k.reason AS killswitch_reason\n"
           f"FROM (SELECT {inner} FROM {table.source} WHERE {where}\n"
           "      ORDER BY ts_start, call_id LIMIT {limit:UInt32}) AS c\n"
           f"LEFT JOIN (SELECT id, decision_reason FROM {db}.{APPROVALS} FINAL) AS a ON a.id = c.approval_id\n"
           f"LEFT JOIN (SELECT id, reason FROM {db}.{KILLSWITCHES} FINAL) AS k ON k.id = c.killswitch_id\n"
           "ORDER BY c.ts_start, c.call_id")
    params: dict[str, Any] = {"trace": trace_id, "limit": limit + 1, **(window.params() if window else {})}
    cols, rows = _query(client, sql, params)
    cols = [c.split(".", 1)[1] if c.startswith("c.") else c for c in cols]
    return _page(_rows(CallRow, cols, rows), limit)


@dataclass(slots=True)
class ActionContext:
    """A call that changed something, and the reads the session made before it."""

    action: CallRow
    reads_before: list[CallRow]


def actions_with_prior_reads(calls: Sequence[CallRow]) -> list[ActionContext]:
    """For each non-read call of a trace, the read calls that passed the gateway before it:
    the data the agent had retrieved when it acted."""
    out: list[ActionContext] = []
    reads: list[CallRow] = []
    for call in calls:
        if call.is_read:
            if call.outcome in GRANT_USED_OUTCOMES or call.outcome == SHADOW_OUTCOME:
                reads.append(call)
        else:
            out.append(ActionContext(call, list(reads)))
    return out


# ---------------------------------------------------------------------------- denied
@dataclass(slots=True)
class DeniedGroup:
    agent_id: str
    team: str
    outcome: str
    error_code: str
    reasons: list[str]
    calls: int
    traces: int
    first_seen: dt.datetime
    last_seen: dt.datetime
    last_call_id: str


def denied(client: Any, table: CallsTable, window: Window, *, limit: int, agent_id: str | None = None,
           include_shadow: bool = True) -> Page[DeniedGroup]:
    """Refused calls (and, with ``include_shadow``, shadow-mode ``would_deny`` calls) grouped by
    agent, outcome, error code and the policy's reasons; busiest first within an agent."""
    limit = _limit(limit)
    outcomes = list(REFUSED_OUTCOMES) + ([SHADOW_OUTCOME] if include_shadow else [])
    agent_filter = " AND agent_id = {agent:String}" if agent_id is not None else ""
    sql = ("SELECT agent_id, any(team) AS team, outcome, error_code, reasons, count() AS calls,\n"
           "       uniqExact(trace_id) AS traces, min(ts_start) AS first_seen, max(ts_start) AS last_seen,\n"
           "       toString(argMax(call_id, ts_start)) AS last_call_id\n"
           f"FROM {table.source}\n"
           f"WHERE {window.sql()} AND outcome IN {{outcomes:Array(String)}}{agent_filter}\n"
           "GROUP BY agent_id, outcome, error_code, reasons\n"
           "ORDER BY agent_id, calls DESC, last_seen DESC, outcome, error_code, reasons\n"
           "LIMIT {limit:UInt32}")
    params: dict[str, Any] = {"outcomes": outcomes, "limit": limit + 1, **window.params()}
    if agent_id is not None:
        params["agent"] = agent_id
    cols, rows = _query(client, sql, params)
    return _page(_rows(DeniedGroup, cols, rows), limit)


# ---------------------------------------------------------------------------- outside policy
@dataclass(slots=True)
class OutsidePolicyGroup:
    agent_id: str
    team: str
    mode: str
    host: str
    route: str
    tool_name: str
    calls: int
    shadow_calls: int
    first_seen: dt.datetime
    last_seen: dt.datetime
    methods: list[str]
    paths: list[str]
    reasons: list[str]

    @property
    def target(self) -> str:
        return f"route:{self.route}" if self.route else self.host


def outside_policy(client: Any, table: CallsTable, window: Window, *, limit: int,
                   agent_id: str | None = None) -> Page[OutsidePolicyGroup]:
    """Calls the policy refused (enforced ``denied`` with ``policy_denied``, or shadow
    ``would_deny``) grouped by agent and what they tried to reach: host, route, tool."""
    limit = _limit(limit)
    agent_filter = " AND agent_id = {agent:String}" if agent_id is not None else ""
    sql = ("SELECT agent_id, any(team) AS team, mode, host, route, tool_name, count() AS calls,\n"
           "       countIf(outcome = 'would_deny') AS shadow_calls,\n"
           "       min(ts_start) AS first_seen, max(ts_start) AS last_seen,\n"
           "       arraySort(groupUniqArray(20)(method)) AS methods,\n"
           "       arraySort(groupUniqArray(20)(path)) AS paths,\n"
           "       arraySort(groupUniqArrayArray(20)(reasons)) AS reasons\n"
           f"FROM {table.source}\n"
           f"WHERE {window.sql()}\n"
           "  AND ((outcome = 'denied' AND error_code = 'policy_denied') OR outcome = 'would_deny')"
           f"{agent_filter}\n"
           "GROUP BY agent_id, mode, host, route, tool_name\n"
           "ORDER BY agent_id, calls DESC, host, route, tool_name\n"
           "LIMIT {limit:UInt32}")
    params: dict[str, Any] = {"limit": limit + 1, **window.params()}
    if agent_id is not None:
        params["agent"] = agent_id
    cols, rows = _query(client, sql, params)
    return _page(_rows(OutsidePolicyGroup, cols, rows), limit)


# ---------------------------------------------------------------------------- grants
@dataclass(frozen=True, slots=True)
class System:
    """A system the policy data names, and the calls that reach it."""

    name: str
    hosts: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GrantModel:
    """What an agent's roles are granted, in the shape the grants query takes.

    ``systems`` maps calls to system names (route mode: by route, forward mode: by host);
    ``granted`` holds the (system, METHOD) pairs granted; ``source`` says where they came from.
    """

    systems: tuple[System, ...]
    granted: tuple[tuple[str, str], ...]
    source: str = ""


# An extractor reads the policy's data document for an agent and its roles; None: not its shape.
GrantExtractor = Callable[[Mapping[str, Any], str, Sequence[str]], "GrantModel | None"]


def gateway_roles_extractor(data: Mapping[str, Any], agent_id: str, roles: Sequence[str]) -> GrantModel | None:
    """The example bundle's shape (policies/data.json)::

        data.gateway.systems.<system> = {hosts: [host], routes: [route]}
        data.gateway.roles.<role>.grants.<system> = [METHOD]
        data.agents.<agent>.systems = [system]     (registry, optional: narrows the grants)

    Like policies/agentgate/access.rego: a registered agent keeps only its registered systems.
    """
    gw = data.get("gateway")
    if not isinstance(gw, Mapping) or not isinstance(gw.get("systems"), Mapping) \
            or not isinstance(gw.get("roles"), Mapping):
        return None
    systems = tuple(
        System(str(name), tuple(str(h).lower() for h in _list(spec.get("hosts"))),
               tuple(str(r) for r in _list(spec.get("routes"))))
        for name, spec in gw["systems"].items() if isinstance(spec, Mapping))
    pairs: set[tuple[str, str]] = set()
    for role in roles:
        spec = gw["roles"].get(role)
        grants = spec.get("grants") if isinstance(spec, Mapping) else None
        if isinstance(grants, Mapping):
            pairs.update((str(s), str(m)) for s, methods in grants.items() for m in _list(methods))
    source = f"data.gateway roles {', '.join(sorted(roles)) or '(none)'}"
    agents = data.get("agents")
    record = agents.get(agent_id) if isinstance(agents, Mapping) else None
    if isinstance(record, Mapping):
        allowed = {str(s) for s in _list(record.get("systems"))}
        pairs = {p for p in pairs if p[0] in allowed}
        source += f"; registry systems {', '.join(sorted(allowed)) or '(none)'}"
    return GrantModel(systems, tuple(sorted(pairs)), source)


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


GRANT_EXTRACTORS: list[GrantExtractor] = [gateway_roles_extractor]


def grant_model(data: Mapping[str, Any] | None, agent_id: str, roles: Sequence[str],
                extractors: Sequence[GrantExtractor] | None = None) -> GrantModel | None:
    """The first extractor that recognises ``data`` wins; None if none does (report usage only).
    Append to :data:`GRANT_EXTRACTORS` to teach the gateway another bundle's data shape."""
    if not data:
        return None
    for extract in extractors if extractors is not None else GRANT_EXTRACTORS:
        model = extract(data, agent_id, roles)
        if model is not None:
            return model
    return None


@dataclass(slots=True)
class GrantRow:
    """``status``: used | unused (granted, never exercised) | not_granted (tried, not granted) |
    used_not_granted (the policy allowed it though the data grants it not) | refused (no grant
    data: tried, never allowed)."""

    system: str
    method: str
    status: str
    granted: int
    calls: int
    allowed_calls: int
    refused_calls: int
    last_used: dt.datetime | None
    last_attempt: dt.datetime | None
    targets: list[str]


def agent_roles(client: Any, table: CallsTable, agent_id: str, window: Window | None = None) -> list[str]:
    """The roles on the agent's latest call (in the window if it has one there, else ever)."""
    for w in ([window] if window else []) + [None]:
        where = "agent_id = {agent:String}" + (f" AND {w.sql()}" if w else "")
        _, rows = _query(client, f"SELECT roles FROM {table.source} WHERE {where} "
                                 "ORDER BY ts_start DESC LIMIT 1", {"agent": agent_id, **(w.params() if w else {})})
        if rows:
            return [str(r) for r in rows[0][0]]
    return []


def grants(client: Any, table: CallsTable, agent_id: str, window: Window, model: GrantModel | None,
           *, limit: int) -> Page[GrantRow]:
    """Granted (system, method) pairs versus the agent's calls in the window: which grants it
    used (count, last use), which it never used, and what it tried without a grant. Calls map
    to systems through ``model.systems``; a call no system claims is shown by its target
    (``route:<name>`` or the host). Without a model: usage only."""
    limit = _limit(limit)
    systems = model.systems if model else ()
    host_keys = [h for s in systems for h in s.hosts]
    host_vals = [s.name for s in systems for _ in s.hosts]
    route_keys = [r for s in systems for r in s.routes]
    route_vals = [s.name for s in systems for _ in s.routes]
    granted = list(model.granted) if model else []
    sql = (
        "SELECT system, method,\n"
        "       multiIf({have_grants:UInt8} = 0, if(allowed_calls > 0, 'used', 'refused'),\n"
        "               granted = 1 AND allowed_calls > 0, 'used', granted = 1, 'unused',\n"
        "               allowed_calls > 0, 'used_not_granted', 'not_granted') AS status,\n"
        "       granted, calls, allowed_calls, refused_calls,\n"
        "       if(allowed_calls > 0, toNullable(last_allowed), NULL) AS last_used,\n"
        "       if(calls > 0, toNullable(last_call), NULL) AS last_attempt, targets\n"
        "FROM (\n"
        "    SELECT tupleElement(pair, 1) AS system, tupleElement(pair, 2) AS method, toUInt8(1) AS granted\n"
        "    FROM (SELECT arrayJoin(arrayZip({g_systems:Array(String)}, {g_methods:Array(String)})) AS pair)\n"
        ") AS g\n"
        "FULL OUTER JOIN (\n"
        "    SELECT system, method, count() AS calls,\n"
        "           countIf(outcome IN {used_outcomes:Array(String)}) AS allowed_calls,\n"
        "           calls - allowed_calls AS refused_calls,\n"
        "           maxIf(ts_start, outcome IN {used_outcomes:Array(String)}) AS last_allowed,\n"
        "           max(ts_start) AS last_call,\n"
        "           arraySort(groupUniqArray(10)(target)) AS targets\n"
        "    FROM (\n"
        "        SELECT if(route != '', concat('route:', route), host) AS target,\n"
        "               if(mode = 'route', transform(route, {route_keys:Array(String)}, {route_systems:Array(String)}, ''),\n"
        "                  transform(host, {host_keys:Array(String)}, {host_systems:Array(String)}, '')) AS mapped,\n"
        "               if(mapped != '', mapped, target) AS system, method, outcome, ts_start\n"
        f"        FROM {table.source}\n"
        f"        WHERE agent_id = {{agent:String}} AND {window.sql()}\n"
        "    )\n"
        "    GROUP BY system, method\n"
        ") AS u USING (system, method)\n"
        "ORDER BY system, method\n"
        "LIMIT {limit:UInt32}")
    params: dict[str, Any] = {
        "have_grants": 1 if model else 0, "g_systems": [s for s, _ in granted], "g_methods": [m for _, m in granted],
        "route_keys": route_keys, "route_systems": route_vals, "host_keys": host_keys, "host_systems": host_vals,
        "used_outcomes": list(GRANT_USED_OUTCOMES), "agent": agent_id, "limit": limit + 1, **window.params()}
    cols, rows = _query(client, sql, params)
    return _page(_rows(GrantRow, cols, rows), limit)


# ---------------------------------------------------------------------------- export
def export_page(client: Any, table: CallsTable, window: Window, *, after: tuple[dt.datetime, str] | None,
                limit: int, agent_id: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """One page of whole rows (every column the table has) in (ts_start, call_id) order, after
    the ``after`` key: callers page through a large export without holding the store."""
    limit = _limit(limit)
    cols = ", ".join(f"`{c}`" for c in table.columns)
    where = window.sql()
    params: dict[str, Any] = {"limit": limit, **window.params()}
    if after is not None:
        where += f" AND (ts_start, call_id) > ({{after_ts:{TS}}}, {{after_id:UUID}})"
        params.update(after_ts=after[0], after_id=uuid.UUID(after[1]))
    if agent_id is not None:
        where += " AND agent_id = {agent:String}"
        params["agent"] = agent_id
    sql = f"SELECT {cols} FROM {table.source}\nWHERE {where}\nORDER BY ts_start, call_id\nLIMIT {{limit:UInt32}}"
    names, rows = _query(client, sql, params)
    return names, [{c: _value(v) for c, v in zip(names, row)} for row in rows]
