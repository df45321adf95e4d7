"""Tables for state shared by gateway replicas: kill-switches, approvals, admin events.

Kill-switches and approvals are ReplacingMergeTree tables keyed by id: every change inserts
the whole record again with a higher ``version``; readers take the latest with ``FINAL``.
Replicas poll them, so a switch flipped or an approval decided on one replica takes effect on
every replica within the poll interval.
"""

from __future__ import annotations

from typing import Any

KILLSWITCHES = "killswitches"
APPROVALS = "approvals"
ADMIN_EVENTS = "admin_events"

KILLSWITCH_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "String"),
    ("scope", "LowCardinality(String)"),
    ("target", "String"),
    ("reason", "String"),
    ("created_by", "String"),
    ("created_at", "DateTime64(6, 'UTC')"),
    ("revoked_by", "String"),
    ("revoked_at", "Nullable(DateTime64(6, 'UTC'))"),
    ("version", "UInt64"),
)

APPROVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "String"),
    ("state", "LowCardinality(String)"),
    ("agent_id", "String"),
    ("team", "String"),
    ("method", "LowCardinality(String)"),
    ("host", "String"),
    ("path", "String"),
    ("route", "String"),
    ("tool_name", "String"),
    ("arguments", "String"),
    ("reasons", "Array(String)"),
    ("approvers", "Array(String)"),
    ("request_hash", "String"),
    ("call_id", "String"),
    ("created_at", "DateTime64(6, 'UTC')"),
    ("expires_at", "DateTime64(6, 'UTC')"),
    ("decided_by", "String"),
    ("decided_role", "String"),
    ("decided_at", "Nullable(DateTime64(6, 'UTC'))"),
    ("decision_reason", "String"),
    ("consumed_at", "Nullable(DateTime64(6, 'UTC'))"),
    ("consumed_by_call", "String"),
    ("version", "UInt64"),
)

ADMIN_EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DateTime64(6, 'UTC')"),
    ("actor", "String"),
    ("roles", "Array(String)"),
    ("action", "LowCardinality(String)"),
    ("target", "String"),
    ("reason", "String"),
    ("result", "LowCardinality(String)"),
    ("detail", "String"),
    ("gateway_instance", "String"),
)


def _cols(columns: tuple[tuple[str, str], ...]) -> str:
    return ",\n    ".join(f"`{n}` {t}" for n, t in columns)


def state_tables_ddl(database: str) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {database}.{KILLSWITCHES} (\n    {_cols(KILLSWITCH_COLUMNS)}\n)\n"
        "ENGINE = ReplacingMergeTree(version) ORDER BY id\n"
        "COMMENT 'Kill-switches: one agent, one team, or all; latest version per id wins'",
        f"CREATE TABLE IF NOT EXISTS {database}.{APPROVALS} (\n    {_cols(APPROVAL_COLUMNS)}\n)\n"
        "ENGINE = ReplacingMergeTree(version) ORDER BY id\n"
        "COMMENT 'Approval holds: pending, approved, denied, expired, consumed; latest version per id wins'",
        f"CREATE TABLE IF NOT EXISTS {database}.{ADMIN_EVENTS} (\n    {_cols(ADMIN_EVENT_COLUMNS)}\n)\n"
        "ENGINE = MergeTree PARTITION BY toDate(ts) ORDER BY (ts, actor)\n"
        "COMMENT 'Every admin action and refused admin attempt'",
    ]


def latest_rows(client: Any, database: str, table: str, names: tuple[str, ...],
                where: str = "") -> list[dict[str, Any]]:
    """The latest version of every record of a state table (``FINAL``), as dicts.

    A store call (module-level: it may run in the store process)."""
    sql = f"SELECT {', '.join(names)} FROM {database}.{table} FINAL" + (f" WHERE {where}" if where else "")
    return [dict(zip(names, r)) for r in client.query(sql).result_rows]
