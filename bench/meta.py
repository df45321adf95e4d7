"""What the numbers were measured on."""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import procs, wrk
from bench.options import Options


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _wrk_version() -> str | None:
    exe = wrk.wrk_path()
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "wrk"


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=procs.ROOT, capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def loadavg() -> str:
    """1, 5 and 15 minute load averages: other work on the machine skews every number."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def describe(opts: Options, pinning: procs.Pinning, use_wrk: bool) -> dict[str, Any]:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "cpus": pinning.available,
        "cpu_model": _cpu_model(),
        "python": f"{platform.python_version()} (-O)" if procs.PYTHONOPTIMIZE == "1" else platform.python_version(),
        "versions": {p: _version(p) for p in ("mitmproxy", "aiohttp", "regopy", "chdb", "pyjwt")},
        "wrk": _wrk_version(),
        "load_generator": ("wrk (direct, route, redact, small GETs of redact-large); built-in aiohttp generator "
                           "(direct-tls, forward, mitm, audit-lag phase, large calls of redact-large)")
                          if use_wrk else "built-in aiohttp generator (wrk not used)",
        "pinning": pinning.note,
        "options": options,
    }
