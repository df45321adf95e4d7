"""The one-pass input builder: what rego-cpp sees is exactly the JSON value we meant."""

from __future__ import annotations

import math
from typing import Any

import pytest
from regopy import Interpreter

from gateway.policy.rego_input import NeedsJsonTerm, build_input


def echo(value: Any) -> Any:
    """``input`` as rego-cpp evaluates it, back in Python."""
    interp = Interpreter()
    interp.set_input(build_input(value))
    return interp.query("x = input").results[0].bindings["x"]


@pytest.mark.parametrize("value", [
    {"plain": "text", "n": -(1 << 63), "m": (1 << 63) - 1, "f": 0.25, "t": True, "z": None},
    {'k"ey\\with\x00nul': ['v"al\\ue', "tab\there", "nul\x00x", "café 🙂"]},
    {"nested": [[], {}, [{"a": [1, [2, [3]]]}], ("tuple", "too")]},
])
def test_values_survive_exactly(value: Any) -> None:
    expected = {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v
                for k, v in value.items()}
    assert echo(value) == expected


def test_same_key_twice_uses_the_cache_correctly() -> None:
    assert echo({"a\x00": 1, "b": {"a\x00": 2}}) == {"a\x00": 1, "b": {"a\x00": 2}}


@pytest.mark.parametrize("value, error", [
    ({"n": 1 << 64}, NeedsJsonTerm),
    ({"f": math.inf}, ValueError),
    ({"f": math.nan}, ValueError),
    ({1: "non-string key"}, TypeError),
    ({"s": {1, 2}}, TypeError),
    ({"b": b"bytes"}, TypeError),
    ({"s": "\ud800"}, UnicodeError),
])
def test_non_json_values_are_refused(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        build_input(value)
