"""Tables for state shared by gateway replicas: kill-switches, approvals, admin events.

Kill-switches and approvals are ReplacingMergeTree tables keyed by id: every change inserts
the whole record again with a higher ``version``; readers take the latest with ``FINAL``.
Replicas poll them, so a switch flipped or an approval decided on one replica takes effect on
every replica within the poll interval.

An approval's changes must also be decided once across replicas (approve on one and deny on
another; one pass used by two retries at once). ClickHouse has no compare-and-set, but it drops
an insert whose ``insert_deduplication_token`` it has seen (on a plain MergeTree table when
``non_replicated_deduplication_window`` is set; on Replicated tables through Keeper): each change
first claims ``(approval id, new version)`` in ``approval_transitions`` with that token, and the
claim that is stored is the one that happened (``claim_transition``). Opening an approval is
claimed the same way, under a key naming the held request (gateway/approvals.py ``creation_key``).

A claimant that stops after its claim leaves the approvals row behind: readers also take the
newest claims (``newest_claims``) and write the rows they find missing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

KILLSWITCHES = "killswitches"
APPROVALS = "approvals"
ADMIN_EVENTS = "admin_events"
TRANSITIONS = "approval_transitions"
# Claims remembered for deduplication: far more than the approvals decided within their TTL.
DEDUP_WINDOW = 100_000

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


TRANSITION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("approval_id", "String"),
    ("version", "UInt64"),
    ("claimant", "String"),
    ("claimed_at", "DateTime64(6, 'UTC')"),
    ("record", "String"),
)


def transitions_ddl(database: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {database}.{TRANSITIONS} (\n    {_cols(TRANSITION_COLUMNS)}\n)\n"
            "ENGINE = MergeTree ORDER BY (approval_id, version)\n"
            "TTL toDateTime(claimed_at) + INTERVAL 30 DAY\n"
            f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}\n"
            "COMMENT 'Approval changes claimed once across replicas: the first claim of (approval_id, "
            "version) is the change that happened; record holds the approval as it became'")


class ClaimNotStored(RuntimeError):
    """The claim was dropped as a duplicate, yet no claim under its token is stored: ClickHouse
    still remembers the token of a claim that the table's TTL has removed since."""


def claim_transition(client: Any, database: str, approval_id: str, version: int, claimant: str,
                     record: str) -> tuple[str, str]:
    """Claim the change of ``approval_id`` to ``version``; (claimant, record) of the claim that holds.

    A store call. The insert carries a deduplication token naming the change, so of concurrent
    claims the first stored is the only one stored, on every replica's store connection."""
    now = dt.datetime.now(dt.timezone.utc)
    client.insert(TRANSITIONS, [(approval_id, version, claimant, now, record)], database=database,
                  column_names=[n for n, _ in TRANSITION_COLUMNS],
                  column_type_names=[t for _, t in TRANSITION_COLUMNS],
                  settings={"insert_deduplicate": 1, "async_insert": 0,
                            "insert_deduplication_token": f"{approval_id}@{version}"})
    rows = client.query(
        f"SELECT claimant, record FROM {database}.{TRANSITIONS} "
        "WHERE approval_id = {id:String} AND version = {v:UInt64} ORDER BY claimed_at, claimant LIMIT 1",
        parameters={"id": approval_id, "v": version}).result_rows
    if not rows:
        raise ClaimNotStored(f"the claim of approval {approval_id} version {version} was not stored")
    return str(rows[0][0]), str(rows[0][1])


def latest_claim(client: Any, database: str, approval_id: str) -> tuple[int, str] | None:
    """(version, record) of the highest version claimed under ``approval_id``, if any. A store call."""
    rows = client.query(
        f"SELECT version, record FROM {database}.{TRANSITIONS} WHERE approval_id = {{id:String}} "
        "ORDER BY version DESC, claimed_at, claimant LIMIT 1", parameters={"id": approval_id}).result_rows
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def newest_claims(client: Any, database: str, expired_for: int, claimed_within: int) -> list[str]:
    """The record of the highest version claimed under every key in the last ``claimed_within``
    seconds, for approvals that expire later than ``expired_for`` seconds ago. A store call."""
    return [str(r[0]) for r in client.query(
        f"SELECT record FROM {database}.{TRANSITIONS} "
        "WHERE claimed_at > now64(6) - toIntervalSecond({c:UInt64}) "
        "AND JSONExtractFloat(record, 'expires_at') > toUnixTimestamp64Micro(now64(6)) / 1e6 - {e:UInt64} "
        "ORDER BY approval_id, version DESC, claimed_at, claimant LIMIT 1 BY approval_id",
        parameters={"c": claimed_within, "e": expired_for}).result_rows]


def latest_rows(client: Any, database: str, table: str, names: tuple[str, ...],
                where: str = "") -> list[dict[str, Any]]:
    """The latest version of every record of a state table (``FINAL``), as dicts.

    A store call (module-level: it may run in the store process)."""
    sql = f"SELECT {', '.join(names)} FROM {database}.{table} FINAL" + (f" WHERE {where}" if where else "")
    return [dict(zip(names, r)) for r in client.query(sql).result_rows]
