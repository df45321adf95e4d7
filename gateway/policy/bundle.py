"""Load a policy bundle directory the way ``opa run``/``opa test`` read one.

Every ``*.rego`` file below the root is a module (hidden files and directories are skipped);
every ``data.json`` is merged into ``data`` at the path of its directory relative to the root
(``data.json`` -> ``data``, ``foo/bar/data.json`` -> ``data.foo.bar``). Objects merge deeply; any
other overlap is a :class:`PolicyLoadError` naming both sources, as in OPA.

The few structural checks OPA's compiler makes and rego-cpp does not (the decision rule exists;
no rule is shadowed by a data document) are done here on the module text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.policy import PolicyLoadError

DATA_FILE = "data.json"
EXTRA_DATA_SOURCE = "<gateway data>"
_REVISION_HEX = 16

_PACKAGE_RE = re.compile(r"^package[ \t]+([^\s#]+)", re.MULTILINE)
_SEGMENT_RE = re.compile(r'([A-Za-z_]\w*)|\["((?:[^"\\]|\\.)*)"\]|\.')
# A rule head starts in column 0 (``name``, ``default name``), followed by what may follow a head.
_HEAD_RE = re.compile(
    r"^(?:default[ \t]+)?([A-Za-z_]\w*)(?=[ \t]*(\(|\[|\.|:=|=|\{|if\b|contains\b|#|$))",
    re.MULTILINE,
)
_NOT_HEADS = frozenset({"package", "import", "else", "not", "some", "every", "with", "as",
                        "true", "false", "null", "default"})


@dataclass(frozen=True)
class LoadedBundle:
    root: Path
    modules: dict[str, str]
    """Relative POSIX path -> Rego source."""
    data: dict[str, Any]
    """The merged data document, ``extra_data`` included."""
    revision: str
    data_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest test class

    name: str
    package: str
    passed: bool
    error: str | None = None


@dataclass
class _Merger:
    data: dict[str, Any] = field(default_factory=dict)
    owners: dict[tuple[str, ...], str] = field(default_factory=dict)

    def merge(self, path: tuple[str, ...], value: Any, source: str) -> None:
        if not path:
            if not isinstance(value, dict):
                raise PolicyLoadError(f"{source}: the root data document must be a JSON object")
            for key, item in value.items():
                self._merge_into(self.data, (key,), item, source)
            return
        parent = self.data
        for depth, key in enumerate(path[:-1], start=1):
            child = parent.setdefault(key, {})
            if not isinstance(child, dict):
                self._conflict(path[:depth], source)
            self.owners.setdefault(path[:depth], source)
            parent = child
        self._merge_into(parent, path, value, source)

    def _merge_into(self, parent: dict[str, Any], path: tuple[str, ...], value: Any,
                    source: str) -> None:
        key = path[-1]
        if key not in parent:
            parent[key] = value
            self.owners[path] = source
            return
        existing = parent[key]
        if isinstance(existing, dict) and isinstance(value, dict):
            for k, v in value.items():
                self._merge_into(existing, path + (k,), v, source)
            return
        self._conflict(path, source)

    def _conflict(self, path: tuple[str, ...], source: str) -> None:
        # A value inserted whole is owned at its own path: the nearest owned prefix set it.
        other = next((self.owners[path[:i]] for i in range(len(path), 0, -1)
                      if path[:i] in self.owners), "?")
        raise PolicyLoadError(
            f"data conflict at {_ref(path)}: set by both {other} and {source}")


def _ref(path: tuple[str, ...] | list[str]) -> str:
    return "data" + "".join(f".{p}" if re.fullmatch(r"[A-Za-z_]\w*", p) else f"[{json.dumps(p)}]"
                            for p in path)


def bundle_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every module and data file, sorted by relative path."""
    if not root.is_dir():
        raise PolicyLoadError(f"policy bundle directory not found: {root}")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not (name.endswith(".rego") or name == DATA_FILE):
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def _read(path: Path, rel: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(f"{rel}: cannot read: {exc.strerror or exc}") from None


def compute_revision(contents: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for rel, raw in contents:
        name = rel.encode()
        digest.update(len(name).to_bytes(8, "big") + name + len(raw).to_bytes(8, "big"))
        digest.update(raw)
    return digest.hexdigest()[:_REVISION_HEX]


def bundle_revision(root: str | os.PathLike[str]) -> str:
    root = Path(root)
    return compute_revision([(rel, _read(p, rel)) for rel, p in bundle_files(root)])


def is_test_module(rel: str) -> bool:
    return rel.endswith("_test.rego")


def load_bundle(root: str | os.PathLike[str], extra_data: dict[str, Any] | None = None,
                *, include_tests: bool = True) -> LoadedBundle:
    """Load a bundle dir. ``include_tests=False`` (what the gateway serves) leaves out
    ``*_test.rego`` modules: rego-cpp evaluates every module's rules into the decision's plan,
    and test modules made each decision about 7x slower on the example bundle."""
    root = Path(root)
    contents = [(rel, _read(path, rel)) for rel, path in bundle_files(root)]
    modules: dict[str, str] = {}
    merger = _Merger()
    sources: list[str] = []
    for rel, raw in contents:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyLoadError(f"{rel}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if rel.endswith(".rego"):
            if include_tests or not is_test_module(rel):
                modules[rel] = text
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyLoadError(
                f"{rel}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
        parent = rel.rpartition("/")[0]
        merger.merge(tuple(parent.split("/")) if parent else (), value, rel)
        sources.append(rel)
    if extra_data:
        merger.merge((), extra_data, EXTRA_DATA_SOURCE)
    if not modules:
        raise PolicyLoadError(f"no .rego modules in policy bundle directory {root}")
    loaded = LoadedBundle(root=root, modules=modules, data=merger.data,
                          revision=compute_revision(contents), data_sources=tuple(sources))
    _check_rules_vs_data(loaded)
    return loaded


# ----------------------------------------------------------------- module text inspection


def module_package(source: str) -> list[str] | None:
    """The package path of a module (``package a.b["c-d"]`` -> ``["a", "b", "c-d"]``)."""
    match = _PACKAGE_RE.search(source)
    if not match:
        return None
    text, parts, pos = match.group(1), [], 0
    while pos < len(text):
        seg = _SEGMENT_RE.match(text, pos)
        if not seg or seg.end() == pos:
            return None
        if seg.group(1) is not None:
            parts.append(seg.group(1))
        elif seg.group(2) is not None:
            parts.append(json.loads(f'"{seg.group(2)}"'))
        pos = seg.end()
    return parts or None


def rule_heads(source: str) -> dict[str, bool]:
    """Names of the rules a module defines -> whether any definition is a function."""
    heads: dict[str, bool] = {}
    package = _PACKAGE_RE.search(source)
    body = source[package.end():] if package else source
    for match in _HEAD_RE.finditer(body):
        name = match.group(1)
        if name in _NOT_HEADS:
            continue
        heads[name] = heads.get(name, False) or match.group(2) == "("
    return heads


def package_rules(loaded: LoadedBundle) -> dict[tuple[str, ...], dict[str, bool]]:
    """``package path -> {rule name: is_function}`` across all modules."""
    out: dict[tuple[str, ...], dict[str, bool]] = {}
    for source in loaded.modules.values():
        pkg = module_package(source)
        if pkg is None:
            continue
        rules = out.setdefault(tuple(pkg), {})
        for name, is_fn in rule_heads(source).items():
            rules[name] = rules.get(name, False) or is_fn
    return out


def require_rule(loaded: LoadedBundle, decision: str) -> None:
    """Refuse a bundle that does not define the decision rule at all (rego-cpp would answer
    ``undefined`` forever; OPA would too, but a renamed package deserves a load error)."""
    *pkg, rule = decision.strip("/").split("/")
    if rule not in package_rules(loaded).get(tuple(pkg), {}):
        raise PolicyLoadError(
            f"no module defines the decision rule {_ref(pkg + [rule])} "
            f"(modules: {', '.join(sorted(loaded.modules))})")


def _check_rules_vs_data(loaded: LoadedBundle) -> None:
    """OPA rejects a rule whose path a data document also defines; rego-cpp silently lets data win."""
    for pkg, rules in package_rules(loaded).items():
        node: Any = loaded.data
        for part in pkg:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        for name in rules:
            if name in node:
                raise PolicyLoadError(
                    f"rule {_ref(list(pkg) + [name])} conflicts with a data document at the same path")


# --------------------------------------------------------------------------- opa test


def discover_tests(loaded: LoadedBundle) -> list[tuple[str, str]]:
    """``(package dotted, test rule name)`` for every ``test_*`` rule that is not a function."""
    tests: list[tuple[str, str]] = []
    for pkg, rules in sorted(package_rules(loaded).items()):
        for name, is_fn in sorted(rules.items()):
            if name.startswith("test_") and not is_fn:
                tests.append((".".join(pkg), name))
    return tests


def run_tests(root: str | os.PathLike[str],
              extra_data: dict[str, Any] | None = None) -> list[TestResult]:
    """Evaluate every ``test_*`` rule like ``opa test``: passes only if it is exactly ``true``.

    Raises :class:`PolicyLoadError` if the bundle does not load or compile.
    """
    from gateway.policy.embedded import compile_bundle

    loaded = load_bundle(root, extra_data)
    tests = discover_tests(loaded)
    if not tests:
        return []
    entrypoints = {(pkg, name): "/".join(pkg.split(".") + [name]) for pkg, name in tests}
    compiled = compile_bundle(loaded, list(entrypoints.values()))
    results: list[TestResult] = []
    for (pkg, name), entrypoint in entrypoints.items():
        try:
            value = compiled.evaluate(entrypoint, None)
        except PolicyLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is a failed test
            results.append(TestResult(name, pkg, False, str(exc)))
            continue
        if value is True:
            results.append(TestResult(name, pkg, True))
        else:
            results.append(TestResult(name, pkg, False, f"evaluated to {json.dumps(value)}"))
    return results
