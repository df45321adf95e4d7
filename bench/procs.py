"""Child processes of the bench: start pinned to a core, wait for a ready line, read /proc."""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from storage.store_process import CHILD_MAIN

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
_LIVE: set[int] = set()
"""Children started by :func:`start` and not yet stopped (their CPU is the bench's own)."""


@dataclass
class Pinning:
    """Which cores the system under test and the load side (upstream + generator) run on."""

    proxy: set[int] | None
    load: set[int] | None
    note: str
    available: int = 0

    @classmethod
    def plan(cls, enabled: bool = True) -> "Pinning":
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled:
            return cls(None, None, f"no pinning (--no-pin); {len(cpus)} CPU(s) available", len(cpus))
        if len(cpus) < 2:
            return cls(None, None, f"no pinning: only {len(cpus)} CPU available", len(cpus))
        proxy, load = {cpus[0]}, set(cpus[1:])
        return cls(proxy, load, f"gateway / mitmproxy pinned to CPU {cpus[0]}; upstream, load generator "
                                f"and bench driver, and the gateway's store process (chDB), pinned to CPU(s) "
                                f"{','.join(map(str, sorted(load)))} "
                                f"(sched_setaffinity)", len(cpus))


def child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """preexec_fn for children: pin to ``cpus`` and die with the bench (PR_SET_PDEATHSIG), so a
    killed bench leaves no gateway, upstream or generator behind."""
    def setup() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def pin_self(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a running process (``sched_setaffinity(pid)`` moves only the thread
    whose id is ``pid``: the others, and the threads they start later, would stay where they were)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:
            pass  # a thread that just ended


def thread_affinities(pid: int) -> list[set[int]]:
    """The CPU set of every thread of a process."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.append(os.sched_getaffinity(int(task.name)))
        except ProcessLookupError:
            pass
    return out


@dataclass
class Child:
    """A started child process whose stdout is drained by a thread (it never blocks on a pipe)."""

    name: str
    proc: subprocess.Popen[str]
    ready_line: str
    log: Path
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> None:
        _LIVE.discard(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


PYTHONOPTIMIZE = "1"
"""Every Python process the bench starts runs with ``-O``, as the gateway ships: mitmproxy's
debug-only type checks (``if __debug__``) cost it ~10% of forward-mode throughput."""


def start(name: str, argv: Sequence[str], *, ready_prefix: str, log: Path, cpus: set[int] | None,
          timeout: float = 60.0, env: dict[str, str] | None = None) -> Child:
    """Start ``argv`` (cwd: the repo root) pinned to ``cpus``; wait for a stdout line starting
    with ``ready_prefix``. Raises RuntimeError with the log tail if it exits or times out."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["PYTHONOPTIMIZE"] = PYTHONOPTIMIZE  # as shipped (docker/Dockerfile, make run)
    full_env.update(env or {})
    err = open(log, "w")
    proc = subprocess.Popen(
        list(argv), cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=err, text=True,
        preexec_fn=child_setup(cpus))
    err.close()
    child = Child(name, proc, "", log)
    _LIVE.add(proc.pid)

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            child.lines.put(line.rstrip("\n"))

    threading.Thread(target=drain, name=f"drain-{name}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = child.lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line.startswith(ready_prefix):
            child.ready_line = line
            return child
    child.stop()
    raise RuntimeError(f"{name} did not start (exit {proc.poll()}):\n{child.tail()}")


_GRANDCHILDREN: set[int] = set()
"""Processes our children started that count as the bench's own (the gateway's store process)."""


def store_process(pid: int) -> int | None:
    """The gateway's embedded-ClickHouse child (storage/store_process.py), if it has one."""
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if CHILD_MAIN.encode() in cmdline:
                _GRANDCHILDREN.add(int(child))
                return int(child)
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU time of the bench, the children it reaped (wrk) and its live children."""
    stat = Path("/proc/self/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    total = sum(int(x) for x in f[11:15]) / CLK_TCK
    for pid in [*_LIVE, *_GRANDCHILDREN]:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class ForeignLoad:
    """How busy the machine was with work that is not this bench's, over a phase (in cores):
    other processes skew every number, so each phase reports it."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = busy_cpu_seconds()
        self.own0 = own_cpu_seconds()

    def cores(self) -> float:
        elapsed = time.monotonic() - self.t0
        foreign = (busy_cpu_seconds() - self.busy0) - (own_cpu_seconds() - self.own0)
        return round(max(0.0, foreign) / elapsed, 2) if elapsed > 0 else 0.0


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
