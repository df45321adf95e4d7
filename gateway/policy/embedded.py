"""In-process Rego evaluation with regopy (rego-cpp), compiled once, hot-reloaded atomically.

Evaluation is synchronous on the event loop: a decision costs tens of microseconds, less than
handing it to a thread would. Compilation (milliseconds) runs in a worker thread on a fresh
interpreter; the new ``CompiledPolicy`` replaces the old one with one assignment, so a decision
always runs entirely against one bundle and none is ever dropped by a reload.

Strings cross into rego-cpp JSON-escaped (see gateway/policy/rego_input.py): its C input API
stores strings verbatim and compares them with the *escaped* text of Rego literals, and it
truncates at NUL.

rego-cpp 1.5 aborts the whole process on some valid Rego (e.g. ``with input as {...}`` over a
rule that builds an object from other rules), so every bundle is first compiled in a child
process (:func:`preflight`): a bundle that would crash is refused like any compile error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from regopy import Bundle, Interpreter, LogLevel, RegoError
from watchfiles import awatch

from gateway.policy import PolicyEvalError, PolicyLoadError, PolicyUndefinedError, decision_ref
from gateway.policy.bundle import LoadedBundle, load_bundle, require_rule
from gateway.policy.decision_cache import DecisionCache
from gateway.policy.input_shape import InputShape, describe, project
from gateway.policy.rego_input import NeedsJsonTerm, build_input, json_term

if TYPE_CHECKING:
    from gateway.config import PolicyConfig

log = logging.getLogger("agentgate.policy")

# --------------------------------------------------------------------------- rego-cpp errors


@dataclass
class _SNode:
    kind: str
    text: str | None = None
    source: str | None = None
    offset: int | None = None
    children: list[_SNode] = field(default_factory=list)


_LEN_RE = re.compile(rb"(\d+):")
_LOC_RE = re.compile(rb"\|(\d+)\|(\d+)")


def _parse_sexpr(buf: bytes) -> list[_SNode]:
    """Parse rego-cpp's error AST dump: ``(kind [N:text][|offset|length] children...)``."""
    pos = 0

    def skip() -> None:
        nonlocal pos
        while pos < len(buf) and buf[pos] in b" \t\r\n":
            pos += 1

    def node() -> _SNode:
        nonlocal pos
        if buf[pos:pos + 1] != b"(":
            raise ValueError("expected '('")
        pos += 1
        start = pos
        while buf[pos] not in b" \t\r\n()":
            pos += 1
        out = _SNode(buf[start:pos].decode("utf-8", "replace"))
        if buf[pos:pos + 1] == b" ":
            pos += 1
            m = _LEN_RE.match(buf, pos)
            if m:
                n = int(m.group(1))
                pos = m.end()
                out.text = buf[pos:pos + n].decode("utf-8", "replace")
                pos += n
            m = _LOC_RE.match(buf, pos)
            if m:  # a location: [N:source]|offset|length[:token text of that length]
                out.source, out.text, out.offset = out.text, None, int(m.group(1))
                pos = m.end()
                if buf[pos:pos + 1] == b":":
                    n = int(m.group(2))
                    out.text = buf[pos + 1:pos + 1 + n].decode("utf-8", "replace")
                    pos += 1 + n
        while True:
            skip()
            if buf[pos:pos + 1] == b")":
                pos += 1
                return out
            if buf[pos:pos + 1] != b"(":  # a bare token such as a symbol table marker "{}"
                while buf[pos] not in b" \t\r\n()":
                    pos += 1
                continue
            out.children.append(node())

    nodes = []
    skip()
    while pos < len(buf):
        nodes.append(node())
        skip()
    return nodes


def _located(source: str | None, offset: int | None, modules: dict[str, str]) -> str:
    if source is None:
        return ""
    text = modules.get(source)
    if text is None or offset is None:
        return f"{source}: "
    raw = text.encode()
    line_start = raw.rfind(b"\n", 0, offset) + 1
    line_no = raw.count(b"\n", 0, offset) + 1
    col = len(raw[line_start:offset].decode("utf-8", "replace")) + 1
    return f"{source}:{line_no}:{col}: "


def format_rego_error(message: str, modules: dict[str, str] | None = None) -> str:
    """Turn rego-cpp's error dump into ``file:line:col: message (code)`` lines."""
    modules = modules or {}
    try:
        roots = _parse_sexpr(message.encode())
    except (ValueError, IndexError):
        return message.strip()
    lines: list[str] = []

    def walk(n: _SNode) -> None:
        if n.kind == "error":
            msg = next((c.text for c in n.children if c.kind == "errormsg"), None) or "error"
            code = next((c.text for c in n.children if c.kind == "rego-errorcode" and c.text), None)
            lines.append(_located(n.source, n.offset, modules) + msg + (f" ({code})" if code else ""))
            return
        for c in n.children:
            walk(c)

    for root in roots:
        walk(root)
    return "\n".join(lines) if lines else message.strip()


# --------------------------------------------------------------------------- compiled policy


class CompiledPolicy:
    """One compiled bundle: an interpreter, its rego-cpp ``Bundle`` and entrypoints.

    ``evaluate`` is serialised by a lock: an interpreter holds one input at a time. The input
    is cut down to what the bundle reads (``shape``), and with ``cache_size`` decisions are
    reused for inputs already decided (gateway/policy/decision_cache.py) unless the bundle's
    decisions can change between identical inputs (``shape.cache_blocker``).
    """

    def __init__(self, loaded: LoadedBundle, interp: Interpreter, bundle: Bundle,
                 entrypoints: list[str], *, cache_size: int = 0) -> None:
        self.loaded = loaded
        self.revision = loaded.revision
        self.entrypoints = tuple(entrypoints)
        self.shape = InputShape.of(loaded.modules)
        self.cache = DecisionCache(cache_size) if cache_size and self.shape.cache_blocker is None \
            else None
        self._interp = interp
        self._bundle = bundle
        self._lock = threading.Lock()

    def evaluate(self, entrypoint: str, input: Any) -> Any:
        """The value of ``entrypoint`` for ``input`` (``None``: leave the input unset).

        Raises :class:`PolicyUndefinedError` if undefined, :class:`PolicyEvalError` on errors.
        The value may be shared with other calls (cached): callers must not modify it.
        """
        if input is None:
            return self._evaluate(entrypoint, None)
        doc = project(input, self.shape.selection)
        cache = self.cache
        key = cache.key(entrypoint, doc) if cache is not None else None
        if key is None:
            return self._evaluate(entrypoint, doc)
        with self._lock:
            value = cache.get(key)
        if value is None:
            value = self._evaluate(entrypoint, doc)
            with self._lock:
                cache.put(key, value)
        return value

    def _evaluate(self, entrypoint: str, input: Any) -> Any:
        where = decision_ref(entrypoint)
        with self._lock:
            try:
                if input is not None:
                    try:
                        self._interp.set_input(build_input(input))
                    except NeedsJsonTerm:
                        self._interp.set_input_term(json_term(input))
                output = self._interp.query_bundle_entrypoint(self._bundle, entrypoint)
            except json.JSONDecodeError as exc:
                # Some runtime errors come back as ok() output holding an error dump, which
                # regopy's Output then fails to parse as JSON: the dump is in exc.doc.
                raise PolicyEvalError(
                    f"{where}: {format_rego_error(exc.doc, self.loaded.modules)}") from None
            except RegoError as exc:
                raise PolicyEvalError(
                    f"{where}: {format_rego_error(str(exc), self.loaded.modules)}") from None
            except (TypeError, ValueError, OverflowError, UnicodeError, RecursionError) as exc:
                raise PolicyEvalError(f"{where}: input not usable: {exc}") from None
            if not output.ok():
                root = output.node()  # an error sequence; Node.__iter__ is lazy-broken, use at()
                errors = "; ".join(format_rego_error(root.at(i).json(), self.loaded.modules)
                                   for i in range(len(root)))
                raise PolicyEvalError(f"{where}: {errors or 'evaluation failed'}")
            results = output.results
        if len(results) != 1:
            raise PolicyEvalError(f"{where}: expected one result, got {len(results)}")
        expressions = results[0].expressions
        if not expressions:
            raise PolicyUndefinedError(f"{where} is undefined")
        return expressions[0]


PREFLIGHT_TIMEOUT_SECONDS = 60.0
_PREFLIGHT_SCRIPT = """
import json, sys
from regopy import Interpreter, LogLevel, RegoError
doc = json.loads(sys.stdin.buffer.read())
interp = Interpreter()
interp.log_level = LogLevel.NONE
try:
    for name, source in doc["modules"].items():
        interp.add_module(name, source)
    interp.add_data_json(doc["data"])
    interp.build(None, doc["entrypoints"])
except RegoError:
    pass  # an ordinary compile error: the in-process compile reports it in full
"""


def preflight(loaded: LoadedBundle, entrypoints: list[str]) -> None:
    """Compile ``loaded`` in a child process; raise :class:`PolicyLoadError` if rego-cpp crashes.

    Costs one interpreter start (~50 ms) per load; compilation is deterministic, so a bundle
    that survives here does not crash the gateway when compiled in-process.
    """
    payload = json.dumps({"modules": loaded.modules, "data": json_term(loaded.data),
                          "entrypoints": entrypoints}).encode()
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _PREFLIGHT_SCRIPT], input=payload,
                              capture_output=True, timeout=PREFLIGHT_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise PolicyLoadError(
            f"compiling the bundle took longer than {PREFLIGHT_TIMEOUT_SECONDS:g}s") from None
    except OSError as exc:
        raise PolicyLoadError(f"cannot run the bundle compile check: {exc}") from None
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        try:
            how = signal.Signals(-proc.returncode).name
        except ValueError:
            how = f"signal {-proc.returncode}"
    else:
        how = f"exit status {proc.returncode}"
    lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    detail = "; ".join(lines[-2:]) or "no message"
    raise PolicyLoadError(
        f"rego-cpp crashed compiling the bundle ({how}: {detail}). Known trigger in regopy 1.5: "
        "'with input as {...}' over rules built from other rules; set input one key at a time "
        "('with input.agent as ...') instead")


def compile_bundle(loaded: LoadedBundle, entrypoints: list[str], *,
                   check: bool = True, cache_size: int = 0) -> CompiledPolicy:
    """Compile ``loaded`` with a fresh interpreter (thread-safe: shares nothing).

    ``check``: run :func:`preflight` first (turns a rego-cpp abort into a PolicyLoadError);
    ``cache_size``: decisions the compiled policy may keep (0: none).
    """
    if check:
        preflight(loaded, entrypoints)
    interp = Interpreter()
    interp.log_level = LogLevel.NONE  # errors come back in the RegoError; don't print them
    try:
        for name, source in loaded.modules.items():
            interp.add_module(name, source)
        interp.add_data_json(json_term(loaded.data))
        bundle = interp.build(None, entrypoints)
    except RegoError as exc:
        raise PolicyLoadError(format_rego_error(str(exc), loaded.modules)) from None
    if not bundle.ok():
        raise PolicyLoadError("rego-cpp could not build the bundle")
    return CompiledPolicy(loaded, interp, bundle, entrypoints, cache_size=cache_size)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    changed: bool
    revision: str
    """The revision in force after the attempt (the old one if the attempt failed)."""
    error: str | None = None


class EmbeddedEngine:
    """regopy engine; see the module docstring. Implements ``PolicyEngine``."""

    name = "embedded"

    def __init__(self, cfg: PolicyConfig, extra_data: dict[str, Any] | None = None, *,
                 debounce_ms: int = 400, step_ms: int = 50) -> None:
        self.cfg = cfg
        self.extra_data = dict(extra_data or {})
        self.entrypoint = cfg.decision
        self.revision = ""
        self.ready = False
        self.reload_count = 0
        """Successful reloads that changed the bundle."""
        self.reload_attempts = 0
        self.last_reload_error: str | None = None
        self.decisions = 0
        self.eval_ns_total = 0
        self.eval_ns_max = 0
        self._debounce_ms = debounce_ms
        self._step_ms = step_ms
        self._policy: CompiledPolicy | None = None
        self._reload_lock = asyncio.Lock()
        self._waiters: list[asyncio.Future[ReloadResult]] = []
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    # -- loading ------------------------------------------------------------------------

    def _compile(self) -> CompiledPolicy:
        loaded = load_bundle(self.cfg.dir, self.extra_data, include_tests=False)
        require_rule(loaded, self.entrypoint)
        return compile_bundle(loaded, [self.entrypoint], cache_size=self.cfg.decision_cache_size)

    def _install(self, policy: CompiledPolicy) -> None:
        self._policy = policy
        self.revision = policy.revision
        self.ready = True
        shape = policy.shape
        reads = ", ".join(describe(shape.selection))
        if policy.cache is not None:
            log.info("policy %s reads %s; decisions are cached (up to %d)", policy.revision, reads,
                     policy.cache.size)
        else:
            log.info("policy %s reads %s; decisions are not cached (%s)", policy.revision, reads,
                     shape.cache_blocker or "policy.decision_cache_size = 0")

    def cache_status(self) -> dict[str, Any]:
        """For /readyz: whether decisions of the bundle in force are reused, and how often."""
        policy = self._policy
        cache = policy.cache if policy is not None else None
        if cache is None:
            reason = policy.shape.cache_blocker if policy is not None else "no bundle loaded"
            return {"enabled": False, "reason": reason or "policy.decision_cache_size = 0"}
        return {"enabled": True, "size": cache.size, "entries": len(cache), "hits": cache.hits,
                "misses": cache.misses}

    async def data(self) -> dict[str, Any] | None:
        policy = self._policy
        return policy.loaded.data if policy is not None else None

    def load_sync(self) -> None:
        """Compile on the calling thread without watching (CLI ``policy eval``/``test``)."""
        self._install(self._compile())

    async def start(self) -> None:
        self._install(await asyncio.to_thread(self._compile))
        log.info("policy bundle %s loaded (revision %s)", self.cfg.dir, self.revision)
        if self.cfg.hot_reload and self._watcher is None:
            self._stop.clear()
            self._watcher = asyncio.create_task(self._watch(), name="policy-watcher")
            # awatch creates its inotify watcher synchronously in the task's first step; yield
            # once so that edits made as soon as start() returns are seen.
            await asyncio.sleep(0)

    async def close(self) -> None:
        self._stop.set()
        task, self._watcher = self._watcher, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:  # noqa: BLE001 - already logged by the task
                pass
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    # -- hot reload ---------------------------------------------------------------------

    def next_reload(self) -> asyncio.Future[ReloadResult]:
        """A future resolved by the next reload attempt (for tests and the admin API)."""
        fut: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    async def reload(self) -> ReloadResult:
        """Re-read the bundle; swap it in if it changed and compiles, else keep the old one."""
        async with self._reload_lock:
            self.reload_attempts += 1
            result = await self._reload_once()
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(result)
        return result

    async def _reload_once(self) -> ReloadResult:
        old = self._policy
        try:
            loaded = await asyncio.to_thread(load_bundle, self.cfg.dir, self.extra_data)
            if old is not None and loaded.revision == old.revision:
                self.last_reload_error = None
                return ReloadResult(ok=True, changed=False, revision=old.revision)
            require_rule(loaded, self.entrypoint)
            policy = await asyncio.to_thread(compile_bundle, loaded, [self.entrypoint],
                                             cache_size=self.cfg.decision_cache_size)
        except PolicyLoadError as exc:
            self.last_reload_error = str(exc)
            log.error("policy bundle %s refused, keeping revision %s:\n%s",
                      self.cfg.dir, self.revision or "(none)", exc)
            return ReloadResult(ok=False, changed=False, revision=self.revision, error=str(exc))
        self._install(policy)
        self.reload_count += 1
        self.last_reload_error = None
        log.info("policy bundle reloaded: revision %s -> %s",
                 old.revision if old else "(none)", policy.revision)
        return ReloadResult(ok=True, changed=True, revision=policy.revision)

    async def _watch(self) -> None:
        try:
            async for _changes in awatch(self.cfg.dir, debounce=self._debounce_ms,
                                         step=self._step_ms, stop_event=self._stop):
                await self.reload()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("policy bundle watcher for %s stopped; hot reload is off", self.cfg.dir)

    # -- evaluation ---------------------------------------------------------------------

    async def evaluate(self, input: dict[str, Any]) -> Any:
        return self.evaluate_sync(input)

    def evaluate_sync(self, input: dict[str, Any]) -> Any:
        policy = self._policy
        if policy is None:
            raise PolicyEvalError("policy engine is not started")
        started = time.perf_counter_ns()
        try:
            return policy.evaluate(self.entrypoint, input)
        finally:
            spent = time.perf_counter_ns() - started
            self.decisions += 1
            self.eval_ns_total += spent
            if spent > self.eval_ns_max:
                self.eval_ns_max = spent

    @property
    def mean_eval_us(self) -> float:
        return self.eval_ns_total / self.decisions / 1000 if self.decisions else 0.0
