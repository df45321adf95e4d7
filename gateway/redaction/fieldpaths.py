"""``redact.fields``: JSONPath expressions (RFC 9535, parsed by python-jsonpath).

Paths made only of name, index and wildcard selectors, in child (``.a``, ``[0]``, ``[*]``) or
descendant (``..a``) segments — nearly every redaction path — are run as a small state machine
during the one walk the redactor makes anyway, so ``$..ssn`` costs a set lookup per node instead
of a second full traversal. Anything else (filters, slices ...) is evaluated by python-jsonpath
itself and its matches are merged in as a trie of concrete locations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from jsonpath import JSONPath, JSONPathEnvironment
from jsonpath.exceptions import JSONPathError, JSONPathRecursionError
from jsonpath.segments import JSONPathChildSegment, JSONPathRecursiveDescentSegment
from jsonpath.selectors import IndexSelector, NameSelector, WildcardSelector

from .settings import InvalidFieldPath, NotRedactable

_ENV = JSONPathEnvironment(strict=True)
State = tuple[tuple[int, int], ...]
END = object()
"""Trie marker: the location itself matched."""
_CACHE_MAX = 8192
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class _Seg:
    descend: bool
    names: frozenset[str]
    indices: tuple[int, ...]
    wildcard: bool

    def matches(self, key: str | int, length: int) -> bool:
        if self.wildcard:
            return True
        if isinstance(key, str):
            return key in self.names
        return any(i == key or (i < 0 and length + i == key) for i in self.indices)


def _fast_segments(path: JSONPath) -> tuple[_Seg, ...] | None:
    segs = []
    for seg in path.segments:
        if isinstance(seg, JSONPathRecursiveDescentSegment):
            descend = True
        elif isinstance(seg, JSONPathChildSegment):
            descend = False
        else:
            return None
        names: set[str] = set()
        indices: list[int] = []
        wildcard = False
        for sel in seg.selectors:
            if isinstance(sel, NameSelector):
                names.add(sel.name)
            elif isinstance(sel, IndexSelector):
                indices.append(sel.index)
            elif isinstance(sel, WildcardSelector):
                wildcard = True
            else:
                return None
        segs.append(_Seg(descend, frozenset(names), tuple(indices), wildcard))
    return tuple(segs)


def compile_path(expr: Any) -> JSONPath:
    if not isinstance(expr, str) or not expr.strip():
        raise InvalidFieldPath(f"invalid redaction field path {expr!r}: expected a JSONPath such as '$.customer.email'")
    try:
        path = _ENV.compile(expr.strip())
    except JSONPathError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidFieldPath(f"invalid redaction field path {expr!r}: {first}") from None
    if not isinstance(path, JSONPath):  # a compound (union) path; strict mode rejects these anyway
        raise InvalidFieldPath(f"invalid redaction field path {expr!r}: unions are not supported")
    return path


class FieldMatcher:
    """Compiled ``redact.fields``. Thread-safe: the caches only ever gain immutable entries."""

    def __init__(self, exprs: Sequence[str]) -> None:
        self.exprs = tuple(exprs)
        self._fast: list[tuple[_Seg, ...]] = []
        self._slow: list[JSONPath] = []
        for expr in self.exprs:
            path = compile_path(expr)
            segs = _fast_segments(path)
            if segs is None:
                self._slow.append(path)
            else:
                self._fast.append(segs)
        self.initial: State | None = tuple((p, 0) for p in range(len(self._fast))) or None
        self._step_cache: dict[tuple[State, str | None], State | None] = {}
        self._final_cache: dict[State, bool] = {}
        self._index_states: dict[State, bool] = {}
        self._default_cache: dict[State, State | None] = {}

    @property
    def has_slow(self) -> bool:
        return bool(self._slow)

    def is_final(self, state: State) -> bool:
        hit = self._final_cache.get(state)
        if hit is None:
            hit = any(i == len(self._fast[p]) for p, i in state)
            self._final_cache[state] = hit
        return hit

    def _uses_index(self, state: State) -> bool:
        hit = self._index_states.get(state)
        if hit is None:
            hit = any(i < len(self._fast[p]) and self._fast[p][i].indices for p, i in state)
            self._index_states[state] = hit
        return hit

    def step(self, state: State, key: str | int, length: int = 0) -> State | None:
        """States after moving from a node in ``state`` to its child ``key`` (None: no path can match)."""
        if isinstance(key, str):
            ck: tuple[State, str | None] | None = (state, key)
        else:
            ck = None if self._uses_index(state) else (state, None)
        if ck is not None:
            try:
                return self._step_cache[ck]
            except KeyError:
                pass
        nxt: set[tuple[int, int]] = set()
        for p, i in state:
            segs = self._fast[p]
            if i >= len(segs):
                continue
            seg = segs[i]
            if seg.descend:
                nxt.add((p, i))
            if seg.matches(key, length):
                nxt.add((p, i + 1))
        result = tuple(sorted(nxt)) or None
        if ck is not None:
            if len(self._step_cache) >= _CACHE_MAX:
                self._step_cache.clear()
            self._step_cache[ck] = result
        return result

    def step_list(self, state: State, length: int) -> tuple[State | None, dict[int, State | None]]:
        """Child states for a whole array at once: (state of most items, {index: state} for the
        items an index selector names). Keeps huge arrays at one dict lookup per item."""
        default = self._default_cache.get(state, _MISSING)
        if default is _MISSING:
            nxt = {(p, i) for p, i in state if i < len(self._fast[p]) and self._fast[p][i].descend}
            nxt |= {(p, i + 1) for p, i in state if i < len(self._fast[p]) and self._fast[p][i].wildcard}
            default = tuple(sorted(nxt)) or None
            if len(self._default_cache) >= _CACHE_MAX:
                self._default_cache.clear()
            self._default_cache[state] = default
        special: dict[int, State | None] = {}
        for p, i in state:
            segs = self._fast[p]
            if i < len(segs):
                for idx in segs[i].indices:
                    norm = idx if idx >= 0 else length + idx
                    if 0 <= norm < length and norm not in special:
                        special[norm] = self.step(state, norm, length)
        return default, special

    def slow_trie(self, root: Any) -> dict | None:
        """Locations matched by the non-simple paths, as a trie (``END`` marks a match)."""
        if not self._slow:
            return None
        trie: dict = {}
        try:
            for path in self._slow:
                for match in path.finditer(root):
                    node = trie
                    for part in match.parts:
                        node = node.setdefault(part, {})
                    node[END] = True
        except (JSONPathRecursionError, RecursionError):
            raise NotRedactable("json_too_deep", "too deeply nested for a field path") from None
        except JSONPathError as exc:
            raise NotRedactable("field_path_error", type(exc).__name__) from None
        return trie or None
