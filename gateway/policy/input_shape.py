"""Which parts of the input a bundle can read, found in its source text.

Rego reaches the input document only through the root ``input``; every way to read it
(``input.a.b``, ``input["a"]``, ``some k in input.a``, ``import input.a as x``, passing
``input.a`` to a function, ``walk(input)``) names it in the source. The scan below takes each
``input`` token with the static path that follows it (``.name`` and ``["string"]`` steps) and
keeps that whole subtree: a dynamic step (``input.a[x]``), a bare ``input`` or anything it does
not understand stops the path there, so the result can only be too wide, never too narrow.
Tokens in strings and trailing comments are counted too (harmlessly wide); only whole-line
comments are skipped, which can never hide code.

Two uses (gateway/policy/embedded.py): the input handed to rego-cpp is cut down to what the
bundle reads (less to marshal), and that cut-down input keys the decision cache — a decision is
a pure function of it and the bundle's data unless the bundle calls a builtin whose answer
changes from call to call (:func:`nondeterministic_calls`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# A subtree to keep: name -> deeper selection, or None for everything below.
Selection = dict[str, "Selection | None"]

_FULL_LINE_COMMENT = re.compile(r"^[ \t]*#.*$", re.MULTILINE)
_INPUT = re.compile(r"(?<![A-Za-z0-9_.])input(?![A-Za-z0-9_])")
_DOT_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_INDEX_STEP = re.compile(r'\[[ \t]*("(?:[^"\\\n]|\\.)*")[ \t]*\]')
# Builtins whose result is not a function of input and data (time, randomness, the network,
# the runtime) or that have side effects a cached decision would skip (print, trace).
_NONDETERMINISTIC = re.compile(
    r"\b(time\s*\.\s*now_ns|rand\s*\.\s*intn|uuid\s*\.\s*rfc4122|http\s*\.\s*send|"
    r"opa\s*\.\s*runtime|net\s*\.\s*lookup_ip_addr|io\s*\.\s*jwt\s*\.\s*decode_verify|"
    r"crypto\s*\.\s*x509\s*\.\s*parse_and_verify_certificates\w*|print|trace)\s*\(")


def _code(source: str) -> str:
    return _FULL_LINE_COMMENT.sub("", source)


def _static_path(source: str, pos: int) -> list[str]:
    path: list[str] = []
    while True:
        m = _DOT_STEP.match(source, pos)
        if m:
            path.append(m.group(1))
            pos = m.end()
            continue
        m = _INDEX_STEP.match(source, pos)
        if m:
            try:
                step = json.loads(m.group(1))
            except ValueError:
                return path
            path.append(step)
            pos = m.end()
            continue
        return path


def _add(selection: Selection, path: list[str]) -> None:
    node = selection
    for i, step in enumerate(path):
        last = i == len(path) - 1
        if step in node:
            child = node[step]
            if child is None:
                return  # already whole
            if last:
                node[step] = None
                return
            node = child
        elif last:
            node[step] = None
        else:
            child = {}
            node[step] = child
            node = child


def read_paths(modules: dict[str, str]) -> Selection | None:
    """The parts of ``input`` the modules can read; ``None``: all of it."""
    selection: Selection = {}
    for source in modules.values():
        code = _code(source)
        for m in _INPUT.finditer(code):
            path = _static_path(code, m.end())
            if not path:
                return None
            _add(selection, path)
    return selection


def nondeterministic_calls(modules: dict[str, str]) -> list[str]:
    """Names of builtins the modules call whose answer a cache must not reuse."""
    found = {re.sub(r"\s+", "", m.group(1)) for source in modules.values()
             for m in _NONDETERMINISTIC.finditer(_code(source))}
    return sorted(found)


def project(value: Any, selection: Selection | None) -> Any:
    """``value`` with only the selected subtrees (the same object where all is selected)."""
    if selection is None or not isinstance(value, dict):
        return value
    return {name: project(value[name], below) for name, below in selection.items() if name in value}


def describe(selection: Selection | None, prefix: str = "input") -> list[str]:
    """``["input.agent.id", "input.request"]`` for a selection (for logs and docs)."""
    if selection is None:
        return [prefix]
    out: list[str] = []
    for name, below in selection.items():
        step = f".{name}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"[{json.dumps(name)}]"
        out.extend(describe(below, prefix + step))
    return out


def covers(selection: Selection | None, path: tuple[str, ...]) -> bool:
    """Whether ``path`` (or part of it, or something below it) is read."""
    node: Selection | None = selection
    for step in path:
        if node is None:
            return True
        if step not in node:
            return False
        node = node[step]
    return True


@dataclass(frozen=True)
class InputShape:
    """What a compiled bundle reads of the input, and whether its decisions can be reused."""

    selection: Selection | None
    cache_blocker: str | None
    """Why decisions cannot be cached (None: they can)."""

    @classmethod
    def of(cls, modules: dict[str, str]) -> InputShape:
        selection = read_paths(modules)
        blocker = None
        calls = nondeterministic_calls(modules)
        if calls:
            blocker = f"the bundle calls {', '.join(calls)}"
        else:
            for per_call in (("context", "time_ns"), ("context", "trace_id")):
                if covers(selection, per_call):
                    blocker = f"the bundle reads input.{'.'.join(per_call)}, new on every call"
                    break
        return cls(selection, blocker)
