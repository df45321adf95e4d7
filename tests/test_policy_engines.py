"""Both policy engines against small bundles written into tmp_path: real regopy, real watchfiles,
real HTTP to a loopback OPA-speaking test fixture."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import PolicyConfig
from gateway.policy import (PolicyEngine, PolicyEvalError, PolicyLoadError, PolicyUndefinedError,
                            make_engine)
from gateway.policy.bundle import bundle_revision, load_bundle, run_tests
from gateway.policy.embedded import EmbeddedEngine, ReloadResult
from gateway.policy.opa import OpaEngine
from tests.opa_fixture import OpaFixture, start_opa_fixture

WAIT = 15.0  # upper bound for any awaited event; tests normally finish far sooner

POLICY = """\
package agentgate

import rego.v1

default allow := false

allow if input.agent in data.allowed_agents

allow if data.agents[input.agent].trusted

reasons contains "admin paths are off limits" if startswith(input.path, "/admin")

reasons contains sprintf("agent %s is unknown", [input.agent]) if not allow

default allowed := false

allowed if {
	allow
	count(reasons) == 0
}

decision := {
	"allow": allowed,
	"reasons": sort(reasons),
	"version": data.meta.version,
	"path": input.path,
	"depth": data.deep.a.b.depth,
}

maybe := "yes" if input.flag

conflict := 1 if input.c

conflict := 2 if input.c
"""

DATA = {
    "data.json": '{"allowed_agents": ["alice", "q\\"uote", "nul\\u0000byte", "caf\\u00e9"]}',
    "meta/data.json": '{"version": 1}',
    "deep/a/b/data.json": '{"depth": 3}',
}
EXTRA = {"agents": {"bot": {"trusted": True}, "intruder": {"trusted": False}}}

INPUTS: list[dict[str, Any]] = [
    {"agent": "alice", "path": "/ok"},
    {"agent": "alice", "path": "/admin/users"},
    {"agent": "bot", "path": "/tools/search"},
    {"agent": "intruder", "path": "/tools/search"},
    {"agent": "mallory", "path": "/x"},
    {"agent": 'q"uote', "path": 'with "quotes" and \\ backslash'},
    {"agent": "nul\x00byte", "path": "/nul\x00/../admin"},
    {"agent": "nul", "path": "/x"},
    {"agent": "café", "path": "/ünï/çødé/🙂\n\t"},
    {"agent": "alice", "path": "/big", "n": 2**80, "f": 1.5, "list": [None, True, {"k": []}]},
]


def write_files(root: Path, files: dict[str, str]) -> None:
    """Write each file atomically (staged outside ``root``, then renamed in): one fs event each."""
    staging = root.parent / f".staging-{root.name}"
    staging.mkdir(exist_ok=True)
    for rel, text in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging / rel.replace("/", "__")
        tmp.write_text(text)
        os.replace(tmp, target)


def make_bundle(root: Path, policy: str = POLICY, **extra_files: str) -> Path:
    write_files(root, {"main.rego": policy, **DATA, **extra_files})
    return root


def cfg(root: Path, **kw: Any) -> PolicyConfig:
    kw.setdefault("hot_reload", False)
    return PolicyConfig(dir=root, **kw)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
async def embedded(bundle: Path) -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(cfg(bundle), EXTRA)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
async def opa_fixture(bundle: Path) -> AsyncIterator[OpaFixture]:
    async with start_opa_fixture(bundle) as fixture:
        yield fixture


@pytest.fixture
async def opa(bundle: Path, opa_fixture: OpaFixture) -> AsyncIterator[OpaEngine]:
    engine = OpaEngine(cfg(bundle, engine="opa", opa_url=opa_fixture.url, timeout_seconds=2), EXTRA)
    await engine.start()
    yield engine
    await engine.close()


async def edit(engine: EmbeddedEngine, files: dict[str, str]) -> ReloadResult:
    """Write ``files`` into the engine's bundle; return the reload attempt that follows."""
    fut = engine.next_reload()
    write_files(engine.cfg.dir, files)
    return await asyncio.wait_for(fut, WAIT)


async def reload_to(engine: EmbeddedEngine, files: dict[str, str]) -> None:
    """Write ``files`` and wait until the engine runs exactly what is now on disk."""
    write_files(engine.cfg.dir, files)
    target = bundle_revision(engine.cfg.dir)
    async with asyncio.timeout(WAIT):
        while engine.revision != target:
            await engine.next_reload()


# --------------------------------------------------------------------------- bundle loading


def test_data_json_nesting_and_revision(bundle: Path) -> None:
    (bundle / ".hidden").mkdir()
    (bundle / ".hidden" / "broken.rego").write_text("package broken\nthis is not rego\n")
    (bundle / ".hidden" / "data.json").write_text("not json")
    (bundle / "README.md").write_text("not part of the bundle")
    loaded = load_bundle(bundle, EXTRA)
    assert loaded.data == {
        "allowed_agents": ["alice", 'q"uote', "nul\x00byte", "café"],
        "meta": {"version": 1},
        "deep": {"a": {"b": {"depth": 3}}},
        "agents": EXTRA["agents"],
    }
    assert list(loaded.modules) == ["main.rego"]
    assert loaded.revision == bundle_revision(bundle)
    assert len(loaded.revision) == 16 and int(loaded.revision, 16) >= 0
    # Renaming a file changes the revision even with identical bytes.
    (bundle / "main.rego").rename(bundle / "policy.rego")
    assert bundle_revision(bundle) != loaded.revision


def test_data_objects_merge_deeply_and_conflicts_name_both_files(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", **{"meta/more/data.json": '{"x": 1}'})
    assert load_bundle(root).data["meta"] == {"version": 1, "more": {"x": 1}}

    write_files(root, {"meta/version/data.json": '{"major": 2}'})
    with pytest.raises(PolicyLoadError) as err:
        load_bundle(root)
    assert "data.meta.version" in str(err.value)
    assert "meta/data.json" in str(err.value) and "meta/version/data.json" in str(err.value)


def test_extra_data_conflict_and_rule_shadowed_by_data(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    with pytest.raises(PolicyLoadError, match=r"data\.allowed_agents.*<gateway data>"):
        load_bundle(root, {"allowed_agents": []})
    write_files(root, {"agentgate/data.json": '{"allow": true}'})
    with pytest.raises(PolicyLoadError, match=r"rule data\.agentgate\.allow conflicts with a data"):
        load_bundle(root)


def test_invalid_data_json_names_file_and_position(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", **{"meta/data.json": '{"version": 1,\n  oops}'})
    with pytest.raises(PolicyLoadError, match=r"meta/data\.json:2:3: invalid JSON"):
        load_bundle(root)


# --------------------------------------------------------------------------- both engines


async def test_engines_give_identical_decisions(embedded: EmbeddedEngine, opa: OpaEngine,
                                                opa_fixture: OpaFixture) -> None:
    engines: list[PolicyEngine] = [embedded, opa]
    for engine in engines:
        assert isinstance(engine, PolicyEngine) and engine.ready
    assert opa.revision == embedded.revision == bundle_revision(embedded.cfg.dir)
    assert opa_fixture.pushed == EXTRA  # the OPA engine put data.agents into OPA

    decisions = []
    for doc in INPUTS:
        a, b = await embedded.evaluate(doc), await opa.evaluate(doc)
        assert a == b, doc
        decisions.append(a)
    by_agent = {(d["path"], a["agent"]): d for d, a in zip(decisions, INPUTS)}
    assert by_agent[("/ok", "alice")] == {"allow": True, "reasons": [], "version": 1,
                                          "path": "/ok", "depth": 3}
    assert by_agent[("/admin/users", "alice")]["reasons"] == ["admin paths are off limits"]
    assert by_agent[("/tools/search", "bot")]["allow"] is True  # from extra_data
    assert by_agent[("/tools/search", "intruder")]["allow"] is False
    assert by_agent[("/x", "mallory")]["reasons"] == ["agent mallory is unknown"]
    # Strings survive exactly and compare exactly: quotes, NUL, non-ASCII.
    assert by_agent[('with "quotes" and \\ backslash', 'q"uote')]["allow"] is True
    assert by_agent[("/nul\x00/../admin", "nul\x00byte")]["allow"] is True
    assert by_agent[("/x", "nul")]["allow"] is False  # not truncated at NUL
    assert by_agent[("/ünï/çødé/🙂\n\t", "café")]["allow"] is True
    assert by_agent[("/big", "alice")]["allow"] is True
    assert embedded.decisions == len(INPUTS) and 0 < embedded.mean_eval_us < 5000
    assert all("?provenance=true" in p for m, p in opa_fixture.requests if m == "POST")
    # Both report their decision cache for /readyz; only the embedded engine has one.
    assert embedded.cache_status()["enabled"] is True
    assert opa.cache_status() == {"enabled": False,
                                  "reason": "the OPA engine sends every input to the server"}


async def test_engines_serve_their_policy_data(embedded: EmbeddedEngine, opa: OpaEngine,
                                              opa_fixture: OpaFixture) -> None:
    """What the grants report reads: the embedded engine's whole data document; from OPA, the
    data.gateway and data.agents it serves (this bundle has no data.gateway)."""
    data = await embedded.data()
    assert data is not None and data["agents"] == EXTRA["agents"] and data["meta"] == {"version": 1}
    assert await opa.data() == {"agents": EXTRA["agents"]}
    assert ("GET", "/v1/data/gateway") in opa_fixture.requests
    for mode in ("error", "garbage"):  # no data: the report shows usage only
        opa_fixture.mode = mode
        assert await opa.data() is None


@pytest.mark.parametrize("kind", ["embedded", "opa"])
async def test_undefined_and_runtime_errors_fail(kind: str, bundle: Path,
                                                 opa_fixture: OpaFixture) -> None:
    async def engine_for(decision: str) -> PolicyEngine:
        engine = make_engine(cfg(bundle, engine=kind, decision=decision, opa_url=opa_fixture.url),
                             EXTRA)
        await engine.start()
        return engine

    maybe = await engine_for("agentgate/maybe")
    try:
        assert await maybe.evaluate({"flag": True}) == "yes"
        with pytest.raises(PolicyUndefinedError, match=r"data\.agentgate\.maybe is undefined"):
            await maybe.evaluate({"flag": False})
        with pytest.raises(PolicyEvalError, match="not usable|JSON"):
            await maybe.evaluate({"flag": float("nan")})
    finally:
        await maybe.close()

    conflict = await engine_for("agentgate/conflict")
    try:
        with pytest.raises(PolicyUndefinedError):
            await conflict.evaluate({"c": False})
        with pytest.raises(PolicyEvalError, match="multiple outputs") as err:
            await conflict.evaluate({"c": True})
        assert not isinstance(err.value, PolicyUndefinedError)
    finally:
        await conflict.close()


async def test_not_started_engines_refuse(bundle: Path) -> None:
    for engine in (EmbeddedEngine(cfg(bundle)), OpaEngine(cfg(bundle, engine="opa"))):
        assert not engine.ready
        with pytest.raises(PolicyEvalError, match="not started"):
            await engine.evaluate({})


# --------------------------------------------------------------------------- embedded specifics


async def test_compile_error_on_start_is_load_error(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", **{"extra.rego": "package extra\n\n# é\nbad if { input.x == }\n"})
    engine = EmbeddedEngine(cfg(root))
    with pytest.raises(PolicyLoadError, match=r"extra\.rego:4:18: Invalid boolean operator"):
        await engine.start()
    assert not engine.ready and engine.revision == ""

    root2 = make_bundle(tmp_path / "c")
    with pytest.raises(PolicyLoadError, match=r"no module defines the decision rule data\.other\.decision"):
        await EmbeddedEngine(cfg(root2, decision="other/decision")).start()
    with pytest.raises(PolicyLoadError, match="not found"):
        await EmbeddedEngine(cfg(tmp_path / "missing")).start()


def test_sync_load_and_eval_for_the_cli(bundle: Path) -> None:
    engine = make_engine(cfg(bundle), EXTRA)
    assert isinstance(engine, EmbeddedEngine)
    engine.load_sync()
    assert engine.evaluate_sync({"agent": "bot", "path": "/p"})["allow"] is True
    with pytest.raises(PolicyUndefinedError):
        engine.evaluate_sync({"agent": "bot"})


async def test_hot_reload_changes_decisions(bundle: Path) -> None:
    engine = EmbeddedEngine(cfg(bundle, hot_reload=True), EXTRA, debounce_ms=300, step_ms=30)
    await engine.start()
    try:
        first = engine.revision
        doc = {"agent": "alice", "path": "/ok"}
        assert (await engine.evaluate(doc))["version"] == 1
        await reload_to(engine, {"meta/data.json": '{"version": 2}'})
        assert (await engine.evaluate(doc))["version"] == 2
        assert engine.revision != first and engine.reload_count >= 1
        await reload_to(engine, {"main.rego": POLICY.replace('"/admin"', '"/ok"')})
        assert (await engine.evaluate(doc))["reasons"] == ["admin paths are off limits"]

        # Same bytes again: an attempt that changes nothing.
        count = engine.reload_count
        result = await edit(engine, {"meta/data.json": '{"version": 2}'})
        assert result == ReloadResult(ok=True, changed=False, revision=engine.revision)
        assert engine.reload_count == count
    finally:
        await engine.close()


async def test_broken_edit_keeps_old_bundle_and_revision(bundle: Path) -> None:
    engine = EmbeddedEngine(cfg(bundle, hot_reload=True), EXTRA, debounce_ms=300, step_ms=30)
    await engine.start()
    try:
        good = engine.revision
        doc = {"agent": "alice", "path": "/ok"}
        before = await engine.evaluate(doc)

        result = await edit(engine, {"main.rego": POLICY + "\noops if { input.x == }\n"})
        assert not result.ok and result.revision == good
        assert result.error is not None and "main.rego:" in result.error
        assert "Invalid boolean operator" in (engine.last_reload_error or "")
        assert engine.revision == good and await engine.evaluate(doc) == before

        result = await edit(engine, {"meta/data.json": '{"version": '})
        assert not result.ok and "meta/data.json" in (result.error or "")
        assert engine.revision == good

        write_files(bundle, {"main.rego": POLICY})
        fixed = await edit(engine, {"meta/data.json": '{"version": 1}'})
        assert fixed == ReloadResult(ok=True, changed=False, revision=good)
        assert engine.last_reload_error is None and engine.reload_count == 0
    finally:
        await engine.close()


async def test_evaluations_never_fail_during_reloads(bundle: Path) -> None:
    engine = EmbeddedEngine(cfg(bundle, hot_reload=True), EXTRA, debounce_ms=200, step_ms=20)
    await engine.start()
    versions = [2, 3, 4, 5, 6]
    writer_done = asyncio.Event()
    results: list[int] = []

    async def writer() -> None:
        try:
            for v in versions:
                await reload_to(engine, {"meta/data.json": f'{{"version": {v}}}'})
                if v == 4:  # a refused edit in the middle changes nothing for the evaluator
                    assert not (await edit(engine, {"main.rego": POLICY + "\n!!\n"})).ok
                    assert not (await edit(engine, {"main.rego": POLICY})).changed
                # manual reloads racing the watcher are serialised too
                await asyncio.gather(engine.reload(), engine.reload())
        finally:
            writer_done.set()

    async def evaluator() -> None:
        doc = {"agent": "alice", "path": "/ok"}
        for _ in range(200_000):  # bound
            if writer_done.is_set() and len(results) >= 2000:
                return
            decision = await engine.evaluate(doc)
            assert decision["allow"] is True
            results.append(decision["version"])
            await asyncio.sleep(0)  # let the watcher and reloads interleave (not a timing wait)

    try:
        await asyncio.wait_for(asyncio.gather(writer(), evaluator()), WAIT * 3)
    finally:
        await engine.close()
    assert len(results) >= 2000
    assert results == sorted(results), "a decision ran against an older bundle after a newer one"
    assert results[-1] == versions[-1] and len(set(results)) >= 3
    assert engine.reload_count == len(versions)
    assert engine.last_reload_error is None


async def test_close_stops_watching(bundle: Path) -> None:
    engine = EmbeddedEngine(cfg(bundle, hot_reload=True), debounce_ms=100, step_ms=20)
    await engine.start()
    watcher = engine._watcher
    assert watcher is not None and not watcher.done()
    await engine.close()
    assert watcher.done() and not watcher.cancelled()  # stopped by its stop event, not killed
    write_files(bundle, {"meta/data.json": '{"version": 9}'})
    result = await engine.reload()  # a manual reload still works
    assert result.changed and engine.evaluate_sync({"agent": "a", "path": "/"})["version"] == 9


# --------------------------------------------------------------------------- opa test runner


def test_run_tests_reports_pass_and_fail(bundle: Path) -> None:
    write_files(bundle, {"tests/main_test.rego": """\
package agentgate_test

import rego.v1

import data.agentgate

# (regopy 1.5 aborts on `with input as {...}` over these rules: set input key by key.)
test_alice_allowed if {
	agentgate.decision.allow with input.agent as "alice" with input.path as "/x"
}

test_bot_trusted if {
	agentgate.allow with input.agent as "bot"
}

test_wrongly_expects_allow if {
	agentgate.decision.allow with input.agent as "eve" with input.path as "/"
}

test_undefined if {
	agentgate.maybe with input.flag as false
}

test_false := false

test_error if {
	agentgate.conflict with input.c as true
}

helper(x) := x
""", "tests/other_test.rego": "package other.nested_test\n\nimport rego.v1\n\ntest_ok if 1 + 1 == 2\n"})
    results = {(r.package, r.name): r for r in run_tests(bundle, EXTRA)}
    assert set(results) == {
        ("agentgate_test", "test_alice_allowed"), ("agentgate_test", "test_bot_trusted"),
        ("agentgate_test", "test_wrongly_expects_allow"), ("agentgate_test", "test_undefined"),
        ("agentgate_test", "test_false"), ("agentgate_test", "test_error"),
        ("other.nested_test", "test_ok"),
    }
    passed = {k[1] for k, r in results.items() if r.passed}
    assert passed == {"test_alice_allowed", "test_bot_trusted", "test_ok"}
    assert "undefined" in (results[("agentgate_test", "test_undefined")].error or "")
    assert "false" in (results[("agentgate_test", "test_false")].error or "")
    assert "multiple outputs" in (results[("agentgate_test", "test_error")].error or "")
    # Without the gateway's data the bot test fails.
    assert not next(r for r in run_tests(bundle) if r.name == "test_bot_trusted").passed


async def test_bundle_that_crashes_rego_cpp_is_refused_not_fatal(bundle: Path) -> None:
    crasher = {"crash_test.rego": """\
package crash_test

import rego.v1

import data.agentgate

test_whole_input if {
	agentgate.decision.allow with input as {"agent": "alice", "path": "/x"}
}
"""}
    engine = EmbeddedEngine(cfg(bundle, hot_reload=True), EXTRA, debounce_ms=300, step_ms=30)
    await engine.start()
    try:
        good = engine.revision
        result = await edit(engine, crasher)
        assert not result.ok and "rego-cpp crashed compiling the bundle (SIGABRT" in (result.error or "")
        assert engine.revision == good
        assert (await engine.evaluate({"agent": "alice", "path": "/ok"}))["allow"] is True
    finally:
        await engine.close()
    with pytest.raises(PolicyLoadError, match="rego-cpp crashed"):
        run_tests(bundle)


def test_run_tests_compile_error(bundle: Path) -> None:
    write_files(bundle, {"x_test.rego": "package x_test\n\ntest_a if {\n"})
    with pytest.raises(PolicyLoadError, match=r"x_test\.rego:3"):
        run_tests(bundle)


# --------------------------------------------------------------------------- OPA failure modes


async def test_opa_misbehaving_server_fails_closed(bundle: Path, opa_fixture: OpaFixture) -> None:
    doc = {"agent": "alice", "path": "/ok"}
    # Warm the fixture's compile cache with a patient client, so the 0.3 s budget below only
    # ever meets the misbehaviour under test, not a first compile on a busy machine.
    warm = OpaEngine(cfg(bundle, engine="opa", opa_url=opa_fixture.url, timeout_seconds=30))
    await warm.start()
    await warm.evaluate(doc)
    await warm.close()
    engine = OpaEngine(cfg(bundle, engine="opa", opa_url=opa_fixture.url, timeout_seconds=0.3))
    await engine.start()
    try:
        assert (await engine.evaluate(doc))["allow"] is True

        opa_fixture.mode = "error"
        with pytest.raises(PolicyEvalError, match="HTTP 500: internal_error: fixture told to fail"):
            await engine.evaluate(doc)

        opa_fixture.mode = "garbage"
        with pytest.raises(PolicyEvalError, match="invalid JSON"):
            await engine.evaluate(doc)

        opa_fixture.mode = "hang"
        with pytest.raises(PolicyEvalError, match=r"did not answer within 0\.3s"):
            await engine.evaluate(doc)
        assert opa_fixture.hanging == 1 and not engine.ready

        opa_fixture.mode = "ok"
        assert (await engine.evaluate(doc))["allow"] is True and engine.ready
    finally:
        await engine.close()


async def test_opa_unhealthy_or_unreachable_refuses_start(bundle: Path,
                                                          opa_fixture: OpaFixture) -> None:
    opa_fixture.mode = "unhealthy"
    with pytest.raises(PolicyLoadError, match="not healthy"):
        await OpaEngine(cfg(bundle, engine="opa", opa_url=opa_fixture.url)).start()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = OpaEngine(cfg(bundle, engine="opa", opa_url=f"http://127.0.0.1:{port}"))
    with pytest.raises(PolicyLoadError, match="unreachable"):
        await engine.start()
    await engine.close()


async def test_opa_going_away_fails_closed(bundle: Path) -> None:
    async with start_opa_fixture(bundle) as fixture:
        engine = OpaEngine(cfg(bundle, engine="opa", opa_url=fixture.url))
        await engine.start()
        assert engine.revision == fixture.revision
    try:
        with pytest.raises(PolicyEvalError, match="unreachable"):
            await engine.evaluate({"agent": "alice", "path": "/ok"})
        assert not engine.ready
    finally:
        await engine.close()


async def test_serving_bundle_leaves_out_test_modules(tmp_path: Path) -> None:
    """Rego tests are for `policy test`; compiled into the served bundle they only cost time."""
    root = make_bundle(tmp_path / "b", **{"main_test.rego": "package agentgate_test\nimport rego.v1\n"
                                                            "test_nothing if { true }\n"})
    engine = EmbeddedEngine(cfg(root), EXTRA)
    await engine.start()
    try:
        assert engine._policy is not None
        assert sorted(engine._policy.loaded.modules) == ["main.rego"]
    finally:
        await engine.close()
    results = run_tests(root, EXTRA)
    assert [(r.name, r.passed) for r in results] == [("test_nothing", True)]
