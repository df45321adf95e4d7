"""The audit schema: one column list, the migrations built from it, and how they are applied.

``COLUMNS`` is the single source of truth: the ``calls`` DDL, the writer's column names and
types, and :func:`storage.audit.call_to_row`'s tuple order all come from it. To add a column,
append it here and add a migration ``ALTER TABLE {db}.calls ADD COLUMN IF NOT EXISTS ...``
(fresh databases get it from version 1's CREATE, existing ones from the ALTER).

Every DDL statement is idempotent (``IF NOT EXISTS``), so applying a version twice, or two
gateways applying it at once, is harmless. A migration step is a DDL string or a callable
``step(client)`` for steps that must look before they act (version 3's engine change).

Tables and views (database ``agentgate`` by default):

* ``calls``: one row per call. A ``ReplacingMergeTree`` keyed ``(agent_id, ts_start, call_id)``
  (version 3): the spool replays rows after a crash or an outage, and a replayed row replaces
  its copy at the next merge. **Read it with ``FINAL``** (``SELECT ... FROM agentgate.calls
  FINAL``) for exact counts; without FINAL a replayed row may be counted twice until merged.
* ``calls_hourly``: a view of per-agent hourly call counts by outcome,
  ``SELECT hour, agent_id, outcome, calls FROM agentgate.calls_hourly``. It reads
  ``calls_hourly_state`` (AggregatingMergeTree of ``uniqExactState(call_id)``), which the
  materialized view ``calls_hourly_mv`` feeds from every insert into ``calls``. Counting
  distinct call ids keeps the counts exact when a row is replayed (a plain count would not).
* ``schema_version``, and the shared-state tables of storage/state_schema.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

DEFAULT_DATABASE = "agentgate"
CALLS_TABLE = "calls"
VERSION_TABLE = "schema_version"
HOURLY_VIEW = "calls_hourly"
HOURLY_STATE_TABLE = "calls_hourly_state"
HOURLY_MV = "calls_hourly_mv"
# calls is rebuilt under a temporary name (version 3); leftovers of a crash are finished later.
PRE_V3_PREFIX = "calls_pre_v3_"

OUTCOME_COMMENT = ("allowed, denied, unauthenticated, rejected, upstream_error, error ...; incomplete: "
                   "forwarded, but the gateway stopped before the call completed")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    comment: str


COLUMNS: tuple[Column, ...] = (
    Column("call_id", "UUID", "Gateway-assigned call id, also sent to the agent as X-Agentgate-Call-Id"),
    Column("trace_id", "String", "Trace id propagated from or generated for the request (W3C traceparent)"),
    Column("ts_start", "DateTime64(6, 'UTC')", "Wall-clock time the gateway received the request"),
    Column("ts_end", "DateTime64(6, 'UTC')", "Time the call finished (response sent or refused)"),
    Column("agent_id", "String", "Verified agent id from the JWT subject; empty if unauthenticated"),
    Column("team", "String", "Agent's team claim; empty if none"),
    Column("roles", "Array(String)", "Agent's role claims"),
    Column("mode", "LowCardinality(String)", "Front end: 'forward' (HTTP proxy) or 'route' (reverse-proxy route)"),
    Column("route", "String", "Route name in route mode; empty in forward mode"),
    Column("method", "LowCardinality(String)", "HTTP method"),
    Column("scheme", "LowCardinality(String)", "Upstream scheme: http or https"),
    Column("host", "String", "Canonical upstream host"),
    Column("port", "UInt16", "Upstream port"),
    Column("path", "String", "Canonical request path, without the query string"),
    Column("query", "String", "Query string with values of credential-like parameters replaced by [REDACTED]"),
    Column("tool_kind", "LowCardinality(String)", "Kind of tool call: http, mcp, ..."),
    Column("tool_name", "String", "Tool name when the request names one (e.g. an MCP tools/call)"),
    Column("request_bytes", "UInt64", "Request body size in bytes"),
    Column("response_bytes", "UInt64", "Response body size in bytes sent to the agent"),
    Column("status", "UInt16", "HTTP status returned to the agent; 0 if none was sent"),
    Column("outcome", "LowCardinality(String)", OUTCOME_COMMENT),
    Column("reasons", "Array(String)", "Policy reasons for the decision"),
    Column("error_code", "LowCardinality(String)", "Gateway error code when the gateway answered itself; empty otherwise"),
    Column("policy_revision", "String", "Revision of the policy bundle that decided"),
    Column("engine", "LowCardinality(String)", "Policy engine: embedded or opa"),
    Column("enforce", "UInt8", "1 if the decision was enforced, 0 in shadow mode"),
    Column("fail_open", "UInt8", "1 if the route lets calls through when the policy cannot decide"),
    Column("decision_us", "UInt32", "Policy evaluation time in microseconds"),
    Column("upstream_ms", "Float32", "Time spent waiting on the upstream in milliseconds"),
    Column("gateway_ms", "Float32", "Gateway's own time in milliseconds (total minus upstream)"),
    Column("client_ip", "String", "Agent's source address"),
    Column("gateway_instance", "String", "Gateway instance that handled the call"),
    # version 2: approvals and kill-switches
    Column("approval_id", "String", "Approval that held this call, if any"),
    Column("approver", "String", "Who decided that approval (admin JWT subject)"),
    Column("decided_at", "Nullable(DateTime64(6, 'UTC'))", "When that approval was decided"),
    Column("killswitch_id", "String", "Kill-switch that refused this call, if any"),
    # version 3: write-ahead spool and tamper evidence (storage/spool/, storage/chain.py)
    Column("seq", "UInt64", "Position of this row in its gateway instance's hash chain (1, 2, ...); 0 = not chained"),
    Column("prev_hash", "String", "row_hash of the previous row in this instance's chain; empty for seq 1"),
    Column("row_hash", "String", "Hex SHA-256 of this row's canonical encoding, prev_hash included (storage/chain.py)"),
    # version 4: response redaction (paths and counts only, never values)
    Column("redacted_paths", "Array(String)", "JSON paths redacted in the response (capped list), e.g. $.ticket.requester.email"),
    Column("redaction_counts", "Map(String, UInt32)", "Redactions per detector (and 'field' for JSONPath fields)"),
    # version 5: MCP / JSON-RPC (gateway/mcp.py)
    Column("rpc_method", "LowCardinality(String)", "JSON-RPC method of an MCP call (tools/call, tools/list ...); empty otherwise"),
    Column("rpc_id", "String", "JSON-RPC id of an MCP request (strings as sent, numbers as JSON); empty for notifications"),
    Column("tool_arguments", "String", "MCP tool (or prompt) arguments as JSON, secrets and personal data scrubbed, at most 4096 characters"),
    Column("tool_error", "UInt8", "1 if the MCP tool result said isError (a tool failure, not a transport error)"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
COLUMN_TYPES: tuple[str, ...] = tuple(c.type for c in COLUMNS)


def validate_database(name: str) -> str:
    """Database names are interpolated into DDL, so only plain identifiers are accepted."""
    if not _IDENT.match(name):
        raise ValueError(f"audit database name {name!r}: use letters, digits and '_' (not starting with a digit)")
    return name


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ttl_expression(ttl_days: int) -> str:
    return f"ts_start + INTERVAL {int(ttl_days)} DAY"


def calls_ddl(database: str, ttl_days: int, table: str = CALLS_TABLE) -> str:
    cols = ",\n    ".join(f"`{c.name}` {c.type} COMMENT {_quote(c.comment)}" for c in COLUMNS)
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.{table} (\n    {cols}\n)\n"
        # Keyed by call (agent_id and ts_start are fixed per call): a replayed row replaces its copy.
        "ENGINE = ReplacingMergeTree\n"
        "PARTITION BY toDate(ts_start)\n"
        "ORDER BY (agent_id, ts_start, call_id)\n"
        f"TTL {ttl_expression(ttl_days)}\n"
        # Whole daily parts expire together; a retried identical insert block is deduplicated.
        "SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000\n"
        "COMMENT 'One row per call through the agentgate gateway'"
    )


def version_table_ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.{VERSION_TABLE} "
        "(version UInt32, applied_at DateTime64(3)) ENGINE = MergeTree ORDER BY version"
    )


def _add_columns(database: str, names: tuple[str, ...]) -> list[str]:
    by_name = {c.name: c for c in COLUMNS}
    return [
        f"ALTER TABLE {database}.{CALLS_TABLE} ADD COLUMN IF NOT EXISTS `{n}` {by_name[n].type} "
        f"COMMENT {_quote(by_name[n].comment)}"
        for n in names
    ]


def hourly_ddl(database: str, ttl_days: int) -> list[str]:
    """calls_hourly: state table, the materialized view feeding it, and the view to read."""
    return [
        f"CREATE TABLE IF NOT EXISTS {database}.{HOURLY_STATE_TABLE} (\n"
        "    `hour` DateTime('UTC') COMMENT 'Start of the hour (UTC) of ts_start',\n"
        "    `agent_id` String COMMENT 'Verified agent id; empty if unauthenticated',\n"
        "    `outcome` LowCardinality(String) COMMENT 'Outcome of the calls',\n"
        "    `calls` AggregateFunction(uniqExact, UUID) COMMENT 'Distinct call ids (read with uniqExactMerge)'\n"
        ")\nENGINE = AggregatingMergeTree\nPARTITION BY toYYYYMM(hour)\nORDER BY (agent_id, hour, outcome)\n"
        f"TTL {hourly_ttl_expression(ttl_days)}\n"
        "COMMENT 'State of calls_hourly, fed by calls_hourly_mv; query the calls_hourly view'",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{HOURLY_MV} TO {database}.{HOURLY_STATE_TABLE} AS "
        f"{_hourly_select(database)}",
        f"CREATE VIEW IF NOT EXISTS {database}.{HOURLY_VIEW} AS "
        "SELECT hour, agent_id, outcome, uniqExactMerge(calls) AS calls "
        f"FROM {database}.{HOURLY_STATE_TABLE} GROUP BY hour, agent_id, outcome "
        "COMMENT 'Per-agent hourly call counts by outcome (exact: distinct call ids)'",
    ]


def _hourly_select(database: str) -> str:
    return ("SELECT toStartOfHour(toDateTime(ts_start, 'UTC')) AS hour, agent_id, outcome, "
            f"uniqExactState(call_id) AS calls FROM {database}.{CALLS_TABLE} GROUP BY hour, agent_id, outcome")


def hourly_ttl_expression(ttl_days: int) -> str:
    return f"hour + INTERVAL {int(ttl_days)} DAY"


def table_engine(client: Any, database: str, table: str) -> str | None:
    res = client.query(
        "SELECT engine FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": database, "t": table})
    return str(res.result_rows[0][0]) if res.result_rows else None


def _table_columns(client: Any, database: str, table: str) -> set[str]:
    res = client.query("SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
                       parameters={"db": database, "t": table})
    return {str(r[0]) for r in res.result_rows}


def convert_calls_to_replacing(client: Any, database: str, ttl_days: int) -> None:
    """Make ``calls`` a ReplacingMergeTree without losing a row, even while gateways insert.

    Swap first, copy after: an empty ReplacingMergeTree takes the name ``calls`` (EXCHANGE is
    atomic, so every insert lands in one table or the other), then the old rows are copied in
    from the temporary name and that table is dropped. A crash leaves a ``calls_pre_v3_*``
    table that the next run copies again; the copies are replaced away by call. Two gateways
    migrating at once each swap and copy; nothing is lost, duplicates are replaced.
    """
    if table_engine(client, database, CALLS_TABLE) != "ReplacingMergeTree":
        tmp = PRE_V3_PREFIX + uuid.uuid4().hex[:12]
        client.command(calls_ddl(database, ttl_days, table=tmp))
        client.command(f"EXCHANGE TABLES {database}.{CALLS_TABLE} AND {database}.{tmp}")
    leftovers = client.query(
        "SELECT name FROM system.tables WHERE database = {db:String} AND startsWith(name, {p:String}) "
        "ORDER BY name", parameters={"db": database, "p": PRE_V3_PREFIX}).result_rows
    for (name,) in leftovers:
        name = str(name)
        if not _IDENT.match(name):
            continue
        cols = ", ".join(f"`{c}`" for c in COLUMN_NAMES if c in _table_columns(client, database, name))
        try:
            if cols:
                client.command(f"INSERT INTO {database}.{CALLS_TABLE} ({cols}) SELECT {cols} FROM {database}.{name}")
            client.command(f"DROP TABLE IF EXISTS {database}.{name}")
        except Exception:
            if table_engine(client, database, name) is not None:
                raise  # still there: a real failure
            # Another gateway copied and dropped it meanwhile.


def backfill_hourly(client: Any, database: str) -> None:
    """Feed rows already in calls into calls_hourly_state (idempotent: uniqExact ignores repeats)."""
    client.command(f"INSERT INTO {database}.{HOURLY_STATE_TABLE} {_hourly_select(database)}")


Step = Union[str, Callable[[Any], None]]


def migrations(database: str, ttl_days: int) -> list[tuple[int, list[Step]]]:
    """Ordered (version, [DDL or step(client) ...]); a version is recorded once all its steps ran."""
    from storage.state_schema import state_tables_ddl, transitions_ddl

    return [
        (1, [calls_ddl(database, ttl_days)]),
        (2, _add_columns(database, ("approval_id", "approver", "decided_at", "killswitch_id"))
            + state_tables_ddl(database)),
        (3, _add_columns(database, ("seq", "prev_hash", "row_hash"))
            + [f"ALTER TABLE {database}.{CALLS_TABLE} COMMENT COLUMN `outcome` {_quote(OUTCOME_COMMENT)}",
               lambda client: convert_calls_to_replacing(client, database, ttl_days)]
            + hourly_ddl(database, ttl_days)
            + [lambda client: backfill_hourly(client, database)]),
        (4, _add_columns(database, ("redacted_paths", "redaction_counts"))),
        (5, _add_columns(database, ("rpc_method", "rpc_id", "tool_arguments", "tool_error"))),
        (6, [transitions_ddl(database)]),
    ]


_TTL_DAYS = re.compile(r"\bTTL\s+ts_start\s*\+\s*toIntervalDay\((\d+)\)")


def current_ttl_days(client: Any, database: str) -> int | None:
    """TTL of the calls table in days as ClickHouse reports it, or None if it has another form."""
    res = client.query(
        "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": database, "t": CALLS_TABLE},
    )
    if not res.result_rows:
        return None
    m = _TTL_DAYS.search(res.result_rows[0][0])
    return int(m.group(1)) if m else None


def applied_versions(client: Any, database: str) -> set[int]:
    res = client.query(f"SELECT DISTINCT version FROM {database}.{VERSION_TABLE}")
    return {int(r[0]) for r in res.result_rows}


def apply_migrations(client: Any, database: str, ttl_days: int) -> list[int]:
    """Bring ``database`` up to date on ``client`` (blocking). Returns the versions applied now.

    Also applies a changed ``ttl_days`` to the existing calls table with ALTER ... MODIFY TTL.
    """
    validate_database(database)
    if ttl_days < 1:
        raise ValueError(f"ttl_days must be >= 1, got {ttl_days}")
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(version_table_ddl(database))
    done = applied_versions(client, database)
    applied: list[int] = []
    for version, statements in migrations(database, ttl_days):
        if version in done:
            continue
        for step in statements:
            if callable(step):
                step(client)
            else:
                client.command(step)
        client.command(
            f"INSERT INTO {database}.{VERSION_TABLE} (version, applied_at) VALUES ({int(version)}, now64(3))"
        )
        applied.append(version)
    if current_ttl_days(client, database) != ttl_days:
        client.command(f"ALTER TABLE {database}.{CALLS_TABLE} MODIFY TTL {ttl_expression(ttl_days)}")
        if table_engine(client, database, HOURLY_STATE_TABLE) is not None:
            client.command(f"ALTER TABLE {database}.{HOURLY_STATE_TABLE} "
                           f"MODIFY TTL {hourly_ttl_expression(ttl_days)}")
    return applied
