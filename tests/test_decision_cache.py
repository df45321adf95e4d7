"""The embedded engine's decision cache and input projection, with real regopy.

The differential test is the one that matters: on the shipped bundle, the decision for the cut-down
input (and the cached decision, asked again) equals the decision rego-cpp gives for the whole input.
"""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import PolicyEvalError
from gateway.policy.bundle import load_bundle
from gateway.policy.embedded import CompiledPolicy, compile_bundle
from gateway.policy.input_shape import InputShape
from gateway.registry import AgentRegistry

POLICIES = Path(__file__).resolve().parent.parent / "policies"
DECISION = "agentgate/decision"


def shipped(cache_size: int = 4096) -> CompiledPolicy:
    registry = tomllib.loads((POLICIES / "agents.toml").read_text())["agents"]
    return compile_bundle(load_bundle(POLICIES, {"agents": registry}, include_tests=False), [DECISION],
                          check=False, cache_size=cache_size)


def _inputs(n: int, seed: int) -> list[dict[str, Any]]:
    """Calls across the example data: registered and unknown agents, every role, system, host,
    route and method, MCP messages naming catalogued and unknown items, bodies the approval
    rules read, and the per-call fields (claims, headers, time, trace) the bundle does not read."""
    rnd = random.Random(seed)
    registry = AgentRegistry.load(POLICIES / "agents.toml")
    gw = json.loads((POLICIES / "data.json").read_text())["gateway"]
    systems = gw["systems"]
    roles = list(gw["roles"]) + ["support-lead", "finance", "intruder"]
    agents = ["support-bot", "sales-bot", "ops-bot", "helper-bot", "ghost"]
    tools = [(kind, name) for kind in ("tools", "resources", "prompts")
             for name in gw["mcp"]["demo"].get(kind, {})] + [("tools", "unlisted_tool"), ("tools", 7)]
    bodies = [None, {"ticket": {"comment": {"body": "hi", "public": True}}},
              {"ticket": {"comment": {"body": "hi", "public": False}}},
              {"tickets": [{"status": "closed"}, {"status": "open"}]}, {"amount": 900}, [1, 2], "text",
              {"tickets": [{"comment": {"public": False}}, {"comment": {"public": True, "body": "x"}}]},
              {"ticket": {"status": "solved"}}]
    paths = ["/", "/mcp", "/tickets/1", "/api/v2/tickets/9", "/api/v2/tickets/9.json",
             "/api/v2/tickets/update_many.json", "/v1/refunds", "/services/data", "/rest/api/3/issue/OPS-1",
             "/chat.postMessage", "/v3/mail/send", "/admin/x"]
    out = []
    for i in range(n):
        system = rnd.choice([*systems, "unknown"])
        route: str | None = None
        if system == "unknown":
            host = rnd.choice(["api.unknown.example", "127.0.0.2"])
            route = rnd.choice([None, "nowhere"])
        elif rnd.random() < 0.5:
            host, route = "127.0.0.1", rnd.choice(systems[system]["routes"] + ["support-mcp"])
        else:
            host = rnd.choice(systems[system]["hosts"])
        granting = [r for r, spec in gw["roles"].items() if system in spec["grants"]]
        agent_roles = rnd.sample(roles, rnd.randint(0, 2))
        if granting and rnd.random() < 0.7:
            agent_roles.append(rnd.choice(granting))
        method = rnd.choice(["GET", "GET", "POST", "PUT", "PATCH", "DELETE"])
        path = rnd.choice(paths)
        tool: dict[str, Any] = {"kind": "http"}
        if rnd.random() < 0.3:
            kind, name = rnd.choice(tools)
            method, path = "POST", "/mcp"
            call = {"tools": "tools/call", "resources": "resources/read", "prompts": "prompts/get"}[kind]
            key = "uri" if kind == "resources" else "name"
            tool = {"kind": "mcp", "method": rnd.choice([call, call, "tools/list", "initialize"]), "server": "demo",
                    "jsonrpc_id": i, "batch": False, key: name,
                    "arguments": rnd.choice([{}, {"amount": 100}, {"amount": 900}])}
        headers = {"user-agent": f"agent/{i}", "traceparent": f"00-{i:032x}-{i:016x}-01"}
        if rnd.random() < 0.3:
            headers["mcp-session-id"] = rnd.choice(["s1", "s2"])
        body = rnd.choice(bodies)
        agent = rnd.choice(agents)
        out.append({
            "agent": {"id": agent, "team": rnd.choice(["support", "ops", None]), "roles": agent_roles,
                      "claims": {"sub": agent, "jti": f"j{i}", "iat": i, "exp": i + 60},
                      "registration": registry.entry(agent)},
            "request": {"method": method, "scheme": "https", "host": host, "port": None,
                        "path": path, "path_segments": [s for s in path.split("/") if s],
                        "query": {"page": [str(i)]}, "headers": headers, "body": body,
                        "body_size": 0 if body is None else len(json.dumps(body)), "body_truncated": False,
                        "body_error": None, "content_type": "application/json" if body is not None else ""},
            "route": route,
            "tool": tool,
            "context": {"time_ns": 1_700_000_000_000_000_000 + i, "mode": "route" if route else "forward",
                        "client_ip": "127.0.0.1", "trace_id": f"t{i}"},
        })
    return out


def _outcome(policy: CompiledPolicy, doc: dict[str, Any], *, whole: bool) -> Any:
    try:
        return policy._evaluate(DECISION, doc) if whole else policy.evaluate(DECISION, doc)
    except PolicyEvalError as exc:
        return ("error", type(exc).__name__)


def test_cut_down_and_cached_decisions_equal_whole_input_decisions() -> None:
    policy = shipped()
    assert policy.cache is not None, "the shipped bundle must stay cacheable"
    docs = _inputs(1500, seed=7)
    whole = [_outcome(policy, d, whole=True) for d in docs]
    first = [_outcome(policy, d, whole=False) for d in docs]
    again = [_outcome(policy, d, whole=False) for d in docs]
    mismatches = [(d, w, f) for d, w, f in zip(docs, whole, first) if w != f]
    assert not mismatches, mismatches[:3]
    assert again == whole
    # The inputs cover allows, denials with different reasons, approvals and redactions.
    decisions = [w for w in whole if isinstance(w, dict)]
    assert {d["allow"] for d in decisions} == {True, False}
    assert any(d["require_approval"] for d in decisions) and any(d["redact"]["fields"] for d in decisions)
    assert len({json.dumps(d["reasons"]) for d in decisions}) > 20
    # Per-call fields (headers, claims, time, trace) are not read: repeats were served from the cache.
    assert policy.cache.hits >= len(docs)


def test_every_part_the_scan_keeps_changes_some_decision() -> None:
    """The inputs above can catch a scan that is too narrow: leaving out any one part of what the
    shipped bundle reads changes at least one of their decisions."""
    docs = _inputs(1500, seed=7)
    policy = shipped(cache_size=0)
    whole = [_outcome(policy, d, whole=True) for d in docs]
    selection = policy.shape.selection
    assert selection is not None
    parts = [(top, None) if below is None else (top, name)
             for top, below in selection.items() for name in (below or [None])]
    assert len(parts) >= 8
    for top, name in parts:
        narrower = json.loads(json.dumps(selection))
        if name is None:
            del narrower[top]
        else:
            del narrower[top][name]
        policy.shape = InputShape(narrower, None)
        changed = sum(_outcome(policy, d, whole=False) != w for d, w in zip(docs, whole))
        assert changed > 0, f"no generated input depends on input.{top}{'.' + name if name else ''}"


def _policy(tmp_path: Path, source: str, cache_size: int = 16) -> CompiledPolicy:
    (tmp_path / "p.rego").write_text(source)
    return compile_bundle(load_bundle(tmp_path, include_tests=False), ["p/decision"], check=False,
                          cache_size=cache_size)


HEADER_POLICY = """\
package p

import rego.v1

default danger := false

danger if input.request.headers["x-danger"]

decision := {"allow": danger == false, "agent": input.agent.id}
"""


def test_what_the_policy_reads_keys_the_cache(tmp_path: Path) -> None:
    policy = _policy(tmp_path, HEADER_POLICY)
    calm = {"agent": {"id": "a", "claims": {"jti": "1"}}, "request": {"headers": {"accept": "x"}}}
    danger = {"agent": {"id": "a", "claims": {"jti": "2"}}, "request": {"headers": {"x-danger": True}}}
    assert policy.evaluate("p/decision", calm) == {"allow": True, "agent": "a"}
    assert policy.evaluate("p/decision", danger) == {"allow": False, "agent": "a"}
    assert policy.evaluate("p/decision", {**calm, "agent": {"id": "b"}}) == {"allow": True, "agent": "b"}
    assert policy.cache is not None and policy.cache.hits == 0
    # A different token (claims) and other headers: the same decision, from the cache.
    other_call = {"agent": {"id": "a", "claims": {"jti": "3"}}, "request": {"headers": {"accept": "y"}}}
    assert policy.evaluate("p/decision", other_call) == {"allow": True, "agent": "a"}
    assert policy.cache.hits == 1


def test_cache_is_bounded_and_errors_are_not_kept(tmp_path: Path) -> None:
    policy = _policy(tmp_path, 'package p\n\nimport rego.v1\n\ndecision := input.n if input.n != 0\n'
                               'decision := 1 if input.n == 0\ndecision := 2 if input.n == 0\n', cache_size=2)
    for n in (1, 2, 3, 1):
        assert policy.evaluate("p/decision", {"n": n}) == n
    assert policy.cache is not None and len(policy.cache) == 2 and policy.cache.hits == 0
    for _ in range(2):
        with pytest.raises(PolicyEvalError):
            policy.evaluate("p/decision", {"n": 0})  # conflicting values: an error every time
    assert policy.cache.hits == 0 and len(policy.cache) == 2


def test_per_call_reads_and_nondeterministic_builtins_turn_the_cache_off(tmp_path: Path) -> None:
    reads_time = _policy(tmp_path, "package p\n\nimport rego.v1\n\ndecision := input.context.time_ns % 2\n")
    assert reads_time.cache is None
    assert [reads_time.evaluate("p/decision", {"context": {"time_ns": t}}) for t in (1, 2, 3)] == [1, 0, 1]
    clock = _policy(tmp_path, "package p\n\nimport rego.v1\n\ndecision := time.now_ns()\n")
    assert clock.cache is None
    assert _policy(tmp_path, HEADER_POLICY, cache_size=0).cache is None


def test_huge_integers_still_reach_the_policy(tmp_path: Path) -> None:
    """Beyond int64 the input goes through the JSON term parser; the cache key is plain JSON."""
    policy = _policy(tmp_path, "package p\n\nimport rego.v1\n\ndecision := input.n > 2\n")
    assert policy.evaluate("p/decision", {"n": 2 ** 80}) is True
    assert policy.evaluate("p/decision", {"n": 2 ** 80}) is True and policy.cache is not None
    assert policy.cache.hits == 1


def test_loaded_bundle_is_unchanged_by_projection(tmp_path: Path) -> None:
    policy = _policy(tmp_path, HEADER_POLICY)
    doc = {"agent": {"id": "a", "claims": {"jti": "1"}}, "request": {"headers": {"x": "1"}}, "context": {}}
    before = json.dumps(doc)
    policy.evaluate("p/decision", doc)
    assert json.dumps(doc) == before  # the caller's input is not modified
