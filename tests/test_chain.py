"""The per-instance hash chain and its verifier, against a real embedded ClickHouse (chDB)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from storage import schema
from storage.audit import _insert, call_to_row
from storage.chain import (GENESIS, Chain, Head, canonical, last_head, normalize, row_hash, verify,
                           verify_store)
from storage.store import Store
from tests.storage_helpers import make_call, select, store  # noqa: F401 (store: a fixture)

DB = "agentgate"
COL = {n: i for i, n in enumerate(schema.COLUMN_NAMES)}


def chained(n: int, instance: str = "gw-1", chain: Chain | None = None, **overrides: Any) -> list[tuple[Any, ...]]:
    chain = chain or Chain()
    return [chain.seal(call_to_row(make_call(**overrides), instance=instance)) for _ in range(n)]


async def insert(s: Store, rows: list[tuple[Any, ...]]) -> None:
    await s.run(_insert, DB, rows)


async def command(s: Store, sql: str, **params: Any) -> None:
    await s.run(lambda c: c.command(sql, parameters=params, settings={"mutations_sync": 2}))


def kinds(report: Any) -> list[tuple[str, int]]:
    return [(p.kind, p.seq) for p in report.problems]


# ------------------------------------------------------------------ sealing
def test_seal_links_rows_per_instance() -> None:
    chain = Chain()
    a1, b1, a2 = (chain.seal(call_to_row(make_call(), instance=i)) for i in ("a", "b", "a"))
    assert (a1[COL["seq"]], a1[COL["prev_hash"]]) == (1, GENESIS)
    assert (b1[COL["seq"]], b1[COL["prev_hash"]]) == (1, GENESIS)
    assert (a2[COL["seq"]], a2[COL["prev_hash"]]) == (2, a1[COL["row_hash"]])
    assert a2[COL["row_hash"]] == row_hash(a2) and len(a2[COL["row_hash"]]) == 64
    assert chain.heads["a"] == Head(2, a2[COL["row_hash"]])
    again = Chain({"a": Head(2, a2[COL["row_hash"]])})  # a restart continues from the head
    assert again.seal(call_to_row(make_call(), instance="a"))[COL["seq"]] == 3


def test_canonical_form() -> None:
    [r] = chained(1)
    values = dict(zip(schema.COLUMN_NAMES, r))
    assert canonical(values) == canonical(r)
    # A column added later (default value in old rows) does not change old hashes.
    assert canonical({**values, "some_new_column": ""}) == canonical(values)
    for name, value in (("status", 404), ("tool_name", "other"), ("prev_hash", "x"), ("seq", 9),
                        ("roles", []), ("decided_at", dt.datetime.now(dt.timezone.utc)),
                        ("redaction_counts", {"email": 1})):
        assert canonical({**values, name: value}) != canonical(values), name
    # Stored == hashed: floats become Float32, lone surrogates become valid UTF-8.
    raw = call_to_row(make_call(upstream_ms=0.1, tool_name="bad\udcff"), instance="x")
    norm = normalize(raw)
    assert norm[COL["upstream_ms"]] != 0.1 and abs(norm[COL["upstream_ms"]] - 0.1) < 1e-7
    assert norm[COL["tool_name"]] == "bad?" and norm[COL["tool_name"]].encode("utf-8")


async def test_every_column_hashes_the_same_after_a_round_trip(store: Store) -> None:
    rows = chained(3, upstream_ms=1 / 3, decided_at_ns=1_700_000_000_123_456_789, approval_id="ap-1",
                   tool_name="ünïcødé ✓ \udcff", redacted_paths=["$.a.b"], redaction_counts={"email": 2})
    await insert(store, rows)
    names = ", ".join(f"`{n}`" for n in schema.COLUMN_NAMES)
    back = await select(store, f"SELECT {names} FROM agentgate.calls FINAL ORDER BY seq")
    assert [row_hash(r) for r in back] == [r[COL["row_hash"]] for r in rows]


# ------------------------------------------------------------------ verify
async def test_verify_clean_and_paged(store: Store) -> None:
    chain = Chain()
    a = chained(40, "gw-a", chain)
    b = chained(5, "gw-b", chain)
    await insert(store, a[:20])
    await insert(store, b + a[20:])
    await insert(store, a[10:15])  # a replayed block: identical copies are not a problem
    await insert(store, [call_to_row(make_call(), instance="old")])  # written before the chain
    report = await store.run(verify, DB, page_rows=7)  # many pages and time windows
    assert report.ok, report.problems
    assert {k: (s.rows, s.first_seq, s.last_seq) for k, s in report.instances.items()} == \
        {"gw-a": (40, 1, 40), "gw-b": (5, 1, 5)}
    assert report.unchained_rows == 1
    only_b = await store.run(verify, DB, instance="gw-b")
    assert list(only_b.instances) == ["gw-b"] and only_b.ok
    assert await store.run(last_head, DB, "gw-a") == Head(40, a[-1][COL["row_hash"]])
    assert await store.run(last_head, DB, "nobody") is None


async def test_deleted_rows_are_reported_with_their_seq(store: Store) -> None:
    rows = chained(10)
    await insert(store, rows)
    await command(store, "DELETE FROM agentgate.calls WHERE seq IN (4, 5)")  # lightweight delete
    await command(store, "ALTER TABLE agentgate.calls DELETE WHERE seq = 8")
    report = await store.run(verify, DB, page_rows=3)
    assert kinds(report) == [("missing", 4), ("missing", 8)]
    gap = report.problems[0]
    assert (gap.seq_end, gap.call_id) == (5, str(rows[5][COL["call_id"]]))  # the row after the gap
    assert report.instances["gw-1"].problems == 2 and not report.ok

    await command(store, "DELETE FROM agentgate.calls WHERE seq = 10")  # the tail: only the gateway knows
    assert ("missing_tail", 10) not in kinds(await store.run(verify, DB))
    report = await store.run(verify, DB, expected_heads={"gw-1": 10})
    assert ("missing_tail", 10) in kinds(report)

    await command(store, "DELETE FROM agentgate.calls WHERE seq = 1")  # the head of a young chain
    assert ("missing", 1) in kinds(await store.run(verify, DB))


async def test_old_chain_head_may_have_expired(store: Store) -> None:
    old = make_call()
    old.ts_start_ns = int((dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=89, hours=12)).timestamp() * 1e9)
    chain = Chain({"gw-1": Head(41, "f" * 64)})  # rows 1..41 already dropped by the 90-day TTL
    await insert(store, [chain.seal(call_to_row(old, instance="gw-1"))])
    report = await store.run(verify, DB)
    assert report.ok and report.instances["gw-1"].head_expired and report.instances["gw-1"].first_seq == 42


async def test_altered_row_is_a_hash_mismatch(store: Store) -> None:
    rows = chained(6)
    await insert(store, rows)
    await command(store, "ALTER TABLE agentgate.calls UPDATE status = 200, outcome = 'allowed' WHERE seq = 3")
    report = await verify_store(store, page_rows=2)  # page by page on the store's worker
    assert kinds(report) == [("altered", 3)]
    assert report.problems[0].call_id == str(rows[2][COL["call_id"]])


async def test_rehashed_row_breaks_the_link(store: Store) -> None:
    """An attacker who alters a row and recomputes its row_hash breaks the next row's link."""
    rows = chained(5)
    forged = list(rows[1])
    forged[COL["outcome"]] = "allowed"
    forged[COL["row_hash"]] = ""
    forged[COL["row_hash"]] = row_hash(tuple(forged))
    await insert(store, rows)
    await command(store, "ALTER TABLE agentgate.calls UPDATE outcome = 'allowed', row_hash = {h:String} "
                         "WHERE seq = 2", h=forged[COL["row_hash"]])
    assert kinds(await store.run(verify, DB)) == [("broken_link", 3)]


async def test_a_second_row_with_one_seq_is_reported(store: Store) -> None:
    rows = chained(4)
    other = Chain({"gw-1": Head(1, rows[0][COL["row_hash"]])}).seal(call_to_row(make_call(), instance="gw-1"))
    await insert(store, rows)
    await insert(store, [other])  # a forged, self-consistent row claiming seq 2
    report = await store.run(verify, DB)
    assert ("duplicate_seq", 2) in kinds(report)
    assert any(str(other[COL["call_id"]]) in p.detail for p in report.problems)


async def test_verify_uses_final_semantics_for_replacing_table(store: Store) -> None:
    """The dedup key of calls is the call: a replayed row with the same key is one row after merge."""
    rows = chained(3)
    await insert(store, rows)
    await insert(store, rows[1:])
    await store.run(lambda c: c.command("OPTIMIZE TABLE agentgate.calls FINAL"))
    assert await select(store, "SELECT count() FROM agentgate.calls") == [(3,)]
    assert (await store.run(verify, DB)).ok


# ------------------------------------------------------------------ the canonical form is fixed
def _every_type_row(text: str) -> tuple[Any, ...]:
    """A value in every column (non-ASCII text and a lone surrogate where ``text`` says so)."""
    import uuid

    out: list[Any] = []
    for c in schema.COLUMNS:
        t = c.type
        if c.name == "call_id":
            v: Any = uuid.UUID("12345678-1234-5678-1234-567812345678")
        elif "DateTime" in t:
            v = None if "Nullable" in t else dt.datetime(2026, 11, 24, 6, 0, 0, 123456, tzinfo=dt.timezone.utc)
        elif t.startswith("Array"):
            v = ["café", "plain", "lone \ud800 surrogate"]
        elif t.startswith("Map"):
            v = {"email": 2, "phone": 1}
        elif "Float" in t:
            v = 0.1
        elif "Int" in t or t == "Bool":
            v = 3 if c.name == "seq" else 7
        else:
            v = f"{c.name} {text}"
        out.append(v)
    return tuple(out)


def test_row_hash_of_a_known_row_never_changes() -> None:
    """Rows already in the store were hashed this way: a faster encoder must give the same bytes
    (values computed with the first chain implementation)."""
    assert row_hash(normalize(_every_type_row("ü \ud83d\ude00 text"))) == \
        "35937202b9f2f0e2a4f4d1a8a231c35b8bd24d99993823052c4f7f71a4c3a112"
    assert row_hash(normalize(_every_type_row("ascii"))) == \
        "2f4145799a48f2d37116c6dec961fa8e8ffae10819426a375a7b9ef13a27ac39"
