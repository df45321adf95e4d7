"""Decision latency of the example bundle against the size of the agent registry.

    python bench/bench_decisions.py

Evaluates ``data.agentgate.decision`` with the gateway's embedded engine (decision cache off),
for a route GET of a registered agent, with the shipped registry (3 agents) and with 997 more
agents listed before it. Two bundles: the shipped one, which reads the agent's entry from
``input.agent.registration``, and the same bundle looking it up in ``data.agents`` instead
(what the shipped one did before). Prints p50/p99 µs and the ratio to the 3-agent registry of
the same bundle, in the same run. Runs in a few seconds.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.policy.bundle import load_bundle  # noqa: E402
from gateway.policy.embedded import compile_bundle  # noqa: E402
from gateway.registry import AgentRegistry  # noqa: E402

POLICIES = Path(__file__).resolve().parent.parent / "policies"
DECISION = "agentgate/decision"
AGENT = "support-bot"
CALLS = 3000
_INPUT_LOOKUP = "registered_systems := input.agent.registration.systems"
_DATA_LOOKUP = "registered_systems := data.agents[input.agent.id].systems"


def registries() -> dict[str, dict[str, Any]]:
    shipped = AgentRegistry.load(POLICIES / "agents.toml").as_data()
    # Listed (and sorting) before the agent under test: the worst case for a key search.
    extra = {f"agent-{i:04d}": {"owner": "x@example.com", "team": "t", "purpose": "", "environment": None,
                                "systems": ["slack"]} for i in range(1000 - len(shipped))}
    return {"3 agents": shipped, "1,000 agents": {**extra, **shipped}}


def bundle_dirs(root: Path) -> dict[str, Path]:
    data_lookup = root / "data-lookup"
    shutil.copytree(POLICIES, data_lookup)
    access = data_lookup / "agentgate" / "access.rego"
    source = access.read_text()
    assert _INPUT_LOOKUP in source, "access.rego no longer reads input.agent.registration as expected"
    access.write_text(source.replace(_INPUT_LOOKUP, _DATA_LOOKUP))
    return {"shipped (input.agent.registration)": POLICIES, "data.agents[input.agent.id]": data_lookup}


def route_get(registration: dict[str, Any] | None, n: int) -> dict[str, Any]:
    return {"agent": {"id": AGENT, "team": "support", "roles": ["support"], "claims": {},
                      "registration": registration},
            "request": {"method": "GET", "scheme": "http", "host": "127.0.0.1", "port": 80,
                        "path": f"/items/{n}", "path_segments": ["items", str(n)], "query": {},
                        "headers": {}, "body": None, "body_size": 0, "body_truncated": False,
                        "body_error": None, "content_type": ""},
            "route": "demo", "tool": {"kind": "http"},
            "context": {"time_ns": n, "mode": "route", "client_ip": "127.0.0.1", "trace_id": "t"}}


def measure(bundle: Path, agents: dict[str, Any]) -> tuple[float, float, list[str]]:
    policy = compile_bundle(load_bundle(bundle, {"agents": agents}, include_tests=False), [DECISION],
                            check=False, cache_size=0)
    docs = [route_get(agents.get(AGENT), n) for n in range(CALLS)]
    reasons = policy.evaluate(DECISION, docs[0])["reasons"]
    times = []
    for doc in docs:
        t0 = time.perf_counter()
        policy.evaluate(DECISION, doc)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6, reasons


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'bundle':<38}{'registry':<14}{'p50 µs':>8}{'p99 µs':>8}{'x 3 agents':>12}  decision")
        for label, bundle in bundle_dirs(Path(tmp)).items():
            base = None
            for size, agents in registries().items():
                p50, p99, reasons = measure(bundle, agents)
                base = base or p50
                print(f"{label:<38}{size:<14}{p50:>8.0f}{p99:>8.0f}{p50 / base:>12.2f}  {'; '.join(reasons)}")


if __name__ == "__main__":
    main()
