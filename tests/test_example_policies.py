"""The shipped example bundle (policies/): its Rego unit tests pass under regopy, and its
decisions match the contract the gateway enforces."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from regopy import Interpreter

from gateway.models import Decision
from gateway.registry import AgentRegistry

POLICIES = Path(__file__).resolve().parent.parent / "policies"
PASS = '{"expressions":[true]}'
DECISION = "agentgate/decision"

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.M)
_TEST_RULE = re.compile(r"^(test_\w+)\s+if\b", re.M)


def modules() -> dict[str, str]:
    return {p.relative_to(POLICIES).as_posix(): p.read_text() for p in sorted(POLICIES.rglob("*.rego"))}


def registry() -> dict[str, Any]:
    return tomllib.loads((POLICIES / "agents.toml").read_text())["agents"]


def gateway_data() -> dict[str, Any]:
    return json.loads((POLICIES / "data.json").read_text())


def interpreter(extra_modules: dict[str, str] | None = None) -> Interpreter:
    rego = Interpreter()
    rego.add_data(gateway_data())
    rego.add_data({"agents": registry()})
    for name, source in {**modules(), **(extra_modules or {})}.items():
        rego.add_module(name, source)
    return rego


def rego_tests() -> list[str]:
    """``data.<package>.<rule>`` for every ``test_*`` rule in the bundle's ``*_test.rego``."""
    found = []
    for name, source in modules().items():
        if name.endswith("_test.rego"):
            package = _PACKAGE.search(source)
            assert package, f"{name}: no package"
            found += [f"data.{package.group(1)}.{rule}" for rule in _TEST_RULE.findall(source)]
    return found


def test_bundle_has_rego_tests() -> None:
    tests = rego_tests()
    assert len(tests) >= 40
    assert len(tests) == len(set(tests)), "duplicate test rule names would shadow each other"


def test_every_rego_test_passes() -> None:
    """Each package is queried once (``data.<package>``: one compile instead of one per rule);
    a test passes only if its rule is in that document with the value ``true``."""
    rego = interpreter()
    by_package: dict[str, list[str]] = {}
    for query in rego_tests():
        package, _, rule = query.removeprefix("data.").rpartition(".")
        by_package.setdefault(package, []).append(rule)
    failed = []
    for package, rules in by_package.items():
        document = json.loads(str(rego.query(f"data.{package}")))["expressions"][0]
        failed += [f"data.{package}.{rule} = {document.get(rule, 'undefined')}"
                   for rule in rules if document.get(rule) is not True]
    assert not failed, failed


def test_every_rego_test_passes_compiled() -> None:
    """The same through a compiled bundle, as `agentgate policy test` runs them."""
    tests = rego_tests()
    entrypoints = [q.removeprefix("data.").replace(".", "/") for q in tests]
    bundle = interpreter().build(None, entrypoints)
    runner = Interpreter()
    failed = {e: str(runner.query_bundle_entrypoint(bundle, e)) for e in entrypoints}
    failed = {e: out for e, out in failed.items() if out != PASS}
    assert not failed, failed


def test_a_failing_rego_test_is_reported_as_failing() -> None:
    """A test rule whose body is false is undefined, never true: pass and fail are distinguishable."""
    broken = """
package agentgate_broken_test

import rego.v1

import data.agentgate_test as t

# support may not PATCH salesforce, so this must fail.
test_expects_the_wrong_answer if {
	d := t.forward(t.support_bot, t.request("PATCH", "acme.my.salesforce.com", "/services/data"))
	d.allow == true
}

test_false if false
"""
    rego = interpreter({"broken_test.rego": broken})
    assert str(rego.query("data.agentgate_broken_test.test_expects_the_wrong_answer")) == "undefined"
    assert str(rego.query("data.agentgate_broken_test.test_false")) == "undefined"
    assert str(rego.query("data.agentgate_test.test_method_not_granted_is_denied")) == PASS


# -- direct decisions through the compiled entrypoint, as the embedded engine evaluates them ----


@pytest.fixture(scope="module")
def bundle() -> Any:
    return interpreter().build(None, [DECISION])


@pytest.fixture(scope="module")
def decide(bundle: Any) -> Any:
    def evaluate(agent: str, roles: list[str], method: str, host: str, path: str, *,
                 route: str | None = None, body: Any = None) -> dict[str, Any]:
        rego = Interpreter()
        rego.set_input({
            "agent": {"id": agent, "team": None, "roles": roles, "claims": {},
                      "registration": AgentRegistry.from_dict({"agents": registry()}).entry(agent)},
            "request": {
                "method": method, "scheme": "https", "host": host, "port": 443, "path": path,
                "path_segments": [s for s in path.split("/") if s], "query": {}, "headers": {},
                "body": body, "body_size": len(json.dumps(body)) if body is not None else 0,
                "body_truncated": False, "body_error": None,
                "content_type": "application/json" if body is not None else "",
            },
            "route": route,
            "tool": {"kind": "http"},
            "context": {"time_ns": 1, "mode": "route" if route else "forward",
                        "client_ip": "127.0.0.1", "trace_id": "t"},
        })
        output = rego.query_bundle_entrypoint(bundle, DECISION)
        result = json.loads(str(output))["expressions"][0]
        Decision.model_validate(result)  # the gateway's own contract check
        return result

    return evaluate


def test_quickstart_calls(decide: Any) -> None:
    read = decide("support-bot", ["support"], "GET", "127.0.0.1", "/tickets/1", route="demo")
    assert read["allow"] is True
    assert read["reasons"] == ["role support may GET demo",
                               "customer contact details are redacted from ticket data"]
    assert read["redact"]["detectors"] == ["email", "phone"]
    assert "$..requester.email" in read["redact"]["fields"]

    delete = decide("support-bot", ["support"], "DELETE", "127.0.0.1", "/tickets/1", route="demo")
    assert delete == {"allow": False, "reasons": ["role support may not DELETE demo"],
                      "require_approval": False, "approvers": [],
                      "redact": {"fields": [], "detectors": []}}


def test_registry_from_agents_toml_applies(decide: Any) -> None:
    # support-bot's role grants jira, but agents.toml registers it for zendesk, slack and demo only.
    d = decide("support-bot", ["support"], "GET", "acme.atlassian.net", "/rest/api/3/issue/OPS-1")
    assert d["allow"] is False
    assert d["reasons"] == ["agent support-bot is not registered for jira"]
    unregistered = decide("helper-bot", ["support"], "GET", "acme.atlassian.net", "/rest/api/3/issue/OPS-1")
    assert unregistered["allow"] is True


def test_unknown_host_and_system_of_record(decide: Any) -> None:
    unknown = decide("ops-bot", ["ops"], "GET", "api.unknown.example", "/")
    assert unknown["reasons"] == ["host api.unknown.example is not an approved system"]
    sor = decide("ops-bot", ["ops"], "DELETE", "acme.atlassian.net", "/rest/api/3/issue/OPS-1")
    assert sor["allow"] is False
    assert "DELETE on jira is never allowed: it is a system of record" in sor["reasons"]


def test_approval_decision(decide: Any) -> None:
    d = decide("ops-bot", ["ops"], "POST", "api.stripe.com", "/v1/refunds", body={"charge": "ch_1"})
    assert d["allow"] is True
    assert d["require_approval"] is True
    assert d["approvers"] == ["finance"]


def test_input_without_agent_is_denied(bundle: Any) -> None:
    rego = Interpreter()
    rego.set_input({"request": {"method": "GET", "host": "slack.com"}, "route": None, "tool": {"kind": "http"}})
    d = json.loads(str(rego.query_bundle_entrypoint(bundle, DECISION)))["expressions"][0]
    assert d["allow"] is False


# -- data consistency ---------------------------------------------------------------------------


def test_data_and_registry_are_consistent() -> None:
    gw = gateway_data()["gateway"]
    systems = gw["systems"]
    assert set(systems) == {"zendesk", "slack", "salesforce", "jira", "sendgrid", "stripe", "demo"}
    assert set(gw["systems_of_record"]) == {"salesforce", "zendesk", "jira"}
    hosts = [h for s in systems.values() for h in s["hosts"]]
    routes = [r for s in systems.values() for r in s["routes"]]
    assert len(hosts) == len(set(hosts)) and len(routes) == len(set(routes)), "a host or route maps to two systems"
    assert all(h == h.lower() for h in hosts), "hosts are matched against canonical (lower-case) hosts"
    for role, spec in gw["roles"].items():
        assert set(spec["grants"]) <= set(systems), role
        for methods in spec["grants"].values():
            assert all(m in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"} for m in methods), role
    loaded = AgentRegistry.load(POLICIES / "agents.toml")  # the gateway's own loader accepts it
    assert set(loaded) == {"support-bot", "sales-bot", "ops-bot"}
    for agent_id, record in registry().items():
        assert set(record["systems"]) <= set(systems), agent_id


def test_registry_narrowing_reads_the_input_not_data_agents() -> None:
    """The bundle takes the agent's registry entry from input.agent.registration: looking it up
    in data.agents costs rego-cpp ~0.4 µs per agent listed before it on every decision."""
    rego = Interpreter()
    rego.add_data(gateway_data())
    rego.add_data({"agents": {}})
    for name, source in modules().items():
        rego.add_module(name, source)
    bundle = rego.build(None, [DECISION])

    def decide(registration: dict[str, Any] | None) -> dict[str, Any]:
        rego.set_input({
            "agent": {"id": "support-bot", "team": "support", "roles": ["support"], "claims": {},
                      "registration": registration},
            "request": {"method": "GET", "scheme": "https", "host": "acme.atlassian.net", "port": 443,
                        "path": "/rest/api/3/issue/OPS-1", "path_segments": ["rest", "api", "3", "issue", "OPS-1"],
                        "query": {}, "headers": {}, "body": None, "body_size": 0, "body_truncated": False,
                        "body_error": None, "content_type": ""},
            "route": None, "tool": {"kind": "http"},
            "context": {"time_ns": 1, "mode": "forward", "client_ip": "127.0.0.1", "trace_id": "t"}})
        return json.loads(str(rego.query_bundle_entrypoint(bundle, DECISION)))["expressions"][0]

    narrowed = decide({"owner": "alice@example.com", "team": "support", "purpose": "", "environment": None,
                       "systems": ["zendesk"]})
    assert narrowed["allow"] is False
    assert narrowed["reasons"] == ["agent support-bot is not registered for jira"]
    assert decide(None)["allow"] is True  # unregistered: judged by its roles alone
