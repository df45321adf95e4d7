"""What a redaction did: normalised paths and counts per detector, never values."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

DEFAULT_MAX_PATHS = 100
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def format_path(parts: Sequence[str | int], scrub: Callable[[str], str] | None = None, prefix: str = "") -> str:
    """``('tickets', 0, 'email')`` -> ``$.tickets[0].email``; odd keys use ``['...']``.

    ``scrub`` is applied to member names so a key that is itself sensitive (an e-mail used as
    a key) never reaches the report.
    """
    out = [prefix, "$"]
    for p in parts:
        if isinstance(p, int):
            out.append(f"[{p}]")
            continue
        name = scrub(p) if scrub is not None else p
        if _IDENT.match(name):
            out.append("." + name)
        else:
            out.append("['" + name.replace("\\", "\\\\").replace("'", "\\'") + "']")
    return "".join(out)


@dataclass
class RedactionReport:
    """Paths (capped at ``max_paths``; ``paths_dropped`` counts the rest) and counts per kind.

    Kinds are detector names, plus ``field`` for ``redact.fields`` matches.
    """

    paths: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    paths_dropped: int = 0
    max_paths: int = DEFAULT_MAX_PATHS

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.counts)

    def add_path(self, path: str) -> None:
        if len(self.paths) < self.max_paths:
            self.paths.append(path)
        else:
            self.paths_dropped += 1

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def merge(self, other: RedactionReport) -> RedactionReport:
        """Add ``other`` into this report (in place) and return self."""
        for p in other.paths:
            self.add_path(p)
        self.paths_dropped += other.paths_dropped
        for k, n in other.counts.items():
            self.count(k, n)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"paths": list(self.paths), "counts": dict(self.counts), "paths_dropped": self.paths_dropped}
