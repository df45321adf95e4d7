"""Where the gateway's time goes: py-spy samples it under route-mode load (``--profile``)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.phases import Env, Scenario, run_phase


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


async def profile_gateway(env: Env, scenario: Scenario, seconds: float) -> dict[str, Any]:
    assert scenario.pid is not None
    exe = py_spy_path()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw = env.workdir / "profile-route.txt"
    load = asyncio.create_task(run_phase(env, scenario, connections=env.opts.connections,
                                         requests=env.opts.requests, seconds=seconds + 2, trace="bench-profile"))
    proc = await asyncio.create_subprocess_exec(
        exe, "record", "-p", str(scenario.pid), "-d", str(max(1, int(seconds))), "-r", "200", "-f", "raw",
        "-o", str(raw), "--nonblocking", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    result = await load
    if not raw.exists():
        raise RuntimeError(f"py-spy failed (exit {proc.returncode}): {err.decode()[-500:]}")
    return {"seconds": seconds, "rps_during": round(result.rps, 1), "raw": raw.read_text()}
