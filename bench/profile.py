"""Where the gateway's time goes: py-spy samples it under route-mode load (``--profile``).

py-spy (``pip install py-spy``) records collapsed stacks of every busy thread; they are summed
by component (the first frame from the leaf up that names one), by leaf function (self time)
and by function anywhere on the stack (inclusive time).
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.phases import Env, Scenario, run_phase

COMPONENTS: tuple[tuple[str, str], ...] = (
    ("policy input (gateway/policy/input.py, regopy input marshalling)", r"policy/input\.py|rego_input|rego_set_input"),
    ("policy evaluation (regopy)", r"regopy/|policy/embedded\.py|policy/opa\.py"),
    ("decision validation (pydantic)", r"pydantic/"),
    ("identity (JWT)", r"gateway/identity\.py|jwt/"),
    ("audit: ClickHouse insert (chDB, worker thread)", r"chdb/|clickhouse_connect/|storage/store\.py"),
    ("audit: row building and queueing", r"storage/audit\.py"),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    ("canonical host/path", r"gateway/canonical\.py"),
    ("upstream client (aiohttp client)", r"aiohttp/client|aiohttp/connector|gateway/upstream\.py"),
    ("HTTP server (aiohttp web)", r"aiohttp/web|aiohttp/http_"),
    ("gateway pipeline and route glue", r"gateway/"),
    ("forward proxy (mitmproxy)", r"mitmproxy/"),
    ("event loop, sockets, other", r"."),
)
_COMPILED = [(name, re.compile(pattern)) for name, pattern in COMPONENTS]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _function(frame: str) -> str:
    m = _FRAME.match(frame)
    return f"{m['func']} ({m['file']})" if m else frame


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    components: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        total += n
        if frames:
            leaf[_function(frames[-1])] += n
        for func in {_function(f) for f in frames}:
            inclusive[func] += n
        for frame in reversed(frames):
            name = next((c for c, rx in _COMPILED if rx.search(frame)), None)
            if name and name != COMPONENTS[-1][0]:
                components[name] += n
                break
        else:
            components[COMPONENTS[-1][0]] += n

    def pct(counter: collections.Counter[str], k: int) -> list[dict[str, Any]]:
        return [{"name": name, "samples": c, "pct": round(100 * c / total, 1)} for name, c in counter.most_common(k)]

    generic = re.compile(r"runpy|asyncio/(runners|base_events|events)\.py|gateway/cli\.py|<module>|"
                         r"threading\.py|concurrent/futures")
    return {"samples": total, "components": pct(components, len(COMPONENTS)), "self": pct(leaf, top),
            "inclusive": [e for e in pct(inclusive, top * 3) if not generic.search(e["name"])][:top]}


async def profile_gateway(env: Env, scenario: Scenario, seconds: float) -> dict[str, Any]:
    assert scenario.pid is not None
    exe = py_spy_path()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw = env.workdir / f"profile-{scenario.config}.txt"
    load = asyncio.create_task(run_phase(env, scenario, connections=env.opts.connections,
                                         requests=env.opts.requests, seconds=seconds + 2, trace="bench-profile"))
    proc = await asyncio.create_subprocess_exec(
        exe, "record", "-p", str(scenario.pid), "-d", str(max(1, int(seconds))), "-r", "200", "-f", "raw",
        "-o", str(raw), "--nonblocking", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    result = await load
    if not raw.exists():
        raise RuntimeError(f"py-spy failed (exit {proc.returncode}): {err.decode()[-500:]}")
    env.opts.out.mkdir(parents=True, exist_ok=True)
    kept = env.opts.out / raw.name
    shutil.copyfile(raw, kept)
    return {"config": f"{scenario.config} {scenario.workload.name.upper()}", "seconds": seconds, "rate_hz": 200, "rps_during": round(result.rps, 1), "raw_file": str(kept),
            **summarise(raw.read_text())}
