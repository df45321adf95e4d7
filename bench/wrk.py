"""wrk (Debian's package) as the load generator, driven by a generated Lua script.

The script sets the method, headers and body, stops each thread after its share of the
request budget (and then interrupts wrk's main thread, which otherwise sleeps out ``-d``), and
prints one ``WRKJSON {...}`` line with the summary and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
from pathlib import Path

from bench import procs
from bench.stats import LoadResult

LUA = r"""
local ffi = require("ffi")
ffi.cdef[[ int getpid(void); int kill(int pid, int sig); ]]
wrk.method = %(method)s
wrk.path = %(path)s
%(headers)s
%(body)s
%(request)s
local limit = %(limit)d
local count = 0
function response(status, headers, body)
  count = count + 1
  if count >= limit then
    wrk.thread:stop()
    ffi.C.kill(ffi.C.getpid(), 2)
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,' ..
    '"timeout":%%d,"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d,"mean":%%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _lua_string(s: str | bytes) -> str:
    text = s.decode() if isinstance(s, bytes) else s
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


FRESH_PATHS = r"""
local fresh_count = 0
function request()
  fresh_count = fresh_count + 1
  return wrk.format(nil, %s .. fresh_count)
end
"""


def lua_script(method: str, path: str, headers: dict[str, str], body: bytes, per_thread_limit: int,
               fresh_paths: str | None = None) -> str:
    """``fresh_paths``: request ``i`` goes to ``path + fresh_paths + i`` (one wrk thread)."""
    return LUA % {
        "request": FRESH_PATHS % _lua_string(path + fresh_paths) if fresh_paths is not None else "",
        "method": _lua_string(method),
        "path": _lua_string(path),
        "headers": "\n".join(f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()),
        "body": f"wrk.body = {_lua_string(body)}" if body else "",
        "limit": max(1, per_thread_limit),
    }


async def run_wrk(base_url: str, *, method: str, path: str, headers: dict[str, str], body: bytes,
                  fresh_paths: str | None = None, connections: int, max_requests: int, max_seconds: float, script_dir: Path,
                  cpus: set[int] | None, threads: int = 1) -> LoadResult:
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed")
    threads = 1 if fresh_paths is not None else max(1, min(threads, connections))
    script = script_dir / f"wrk-{os.getpid()}-{id(headers)}.lua"
    script.write_text(lua_script(method, path, headers, body, math.ceil(max_requests / threads), fresh_paths))
    seconds = max(1, math.ceil(max_seconds))
    proc = await asyncio.create_subprocess_exec(
        exe, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
        "-s", str(script), base_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=procs.child_setup(cpus))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("wrk did not finish in time") from None
    finally:
        script.unlink(missing_ok=True)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {err.decode()[-500:]} {out.decode()[-500:]}")
    s = json.loads(line[len("WRKJSON "):])
    socket_errors = s["connect"] + s["read"] + s["write"] + s["timeout"]
    first_error = ""
    if s["status"]:
        first_error = f"{s['status']} non-2xx/3xx responses"
    elif socket_errors:
        first_error = f"socket errors: connect {s['connect']}, read {s['read']}, write {s['write']}, " \
                      f"timeout {s['timeout']}"
    return LoadResult(generator="wrk", connections=connections, requests=s["requests"],
                      errors=s["status"] + socket_errors, duration_s=s["duration_us"] / 1e6,
                      p50_us=s["p50"], p90_us=s["p90"], p99_us=s["p99"], max_us=s["max"], mean_us=s["mean"],
                      first_error=first_error)
