"""The lock files: the gateway's own (requirements.lock, what the Docker image installs) carries
no test tooling, and the test lock (the .venv of make run / make test) pins the same packages to
the same versions and hashes, so what is tested is what ships."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def read_lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """package -> (version, hashes)."""
    pins: dict[str, tuple[str, set[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if m := _PIN.match(line):
            current = _name(m[1])
            pins[current] = (m[2], set())
        elif current is not None and (h := _HASH.search(line)):
            pins[current][1].add(h[1])
    return {k: (v, frozenset(h)) for k, (v, h) in pins.items()}


def test_runtime_lock_is_the_test_lock_without_test_tooling() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, full = read_lock(ROOT / "requirements.lock"), read_lock(ROOT / "requirements-test.lock")
    assert all(hashes for _, hashes in full.values()), "every pin is hash-checked"
    assert {_name(r) for r in project["dependencies"]} <= runtime.keys()
    test_only = {_name(r) for r in project["optional-dependencies"]["test"]}
    assert test_only <= full.keys() and not test_only & runtime.keys()
    assert "pytest" not in runtime
    for name, pin in runtime.items():
        assert full.get(name) == pin, f"{name}: the locks disagree"
