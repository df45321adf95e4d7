"""What a bundle reads of its input (gateway/policy/input_shape.py): the scan may only ever be
too wide, never too narrow, because a decision cached on too little of the input would be
reused for inputs the policy tells apart."""

from __future__ import annotations

from gateway.policy.input_shape import (InputShape, describe, nondeterministic_calls, project,
                                        read_paths)

FORMS = """\
package t

import rego.v1
import input.imported as imp

a if input.a.b == 1
b if input["x-y"].z
c if input.c[k] == k
d if { some v in input.d.e; v }
# a whole-line comment naming input.hidden is not code
f if input.f # a trailing comment naming input.trailing counts (too wide is harmless)
g := "text naming input.quoted"
h if data.input.not_the_root
i if my_input.x
j if inputs.y
k if input.k with input.w as 1
l if input.l.m
l if input.l
n if input [ "spaced" ]
"""


def test_a_step_the_scan_does_not_know_widens_to_the_whole_input() -> None:
    # `input [ "spaced" ]` is not a step the scan parses: the path stops at the bare root.
    assert read_paths({"t.rego": FORMS}) is None


def test_every_way_of_reading_input_is_found() -> None:
    source = FORMS.replace('n if input [ "spaced" ]\n', "")
    selection = read_paths({"t.rego": source})
    assert selection is not None
    assert sorted(describe(selection)) == sorted([
        "input.imported", "input.a.b", 'input["x-y"].z', "input.c", "input.d.e", "input.f",
        "input.trailing", "input.quoted", "input.k", "input.w", "input.l"])
    assert "hidden" not in selection and "not_the_root" not in selection and "x" not in selection


def test_a_bare_input_anywhere_means_all_of_it() -> None:
    assert read_paths({"a.rego": "package a\nx if input.a", "b.rego": "package b\ny := walk(input)"}) is None
    assert read_paths({"a.rego": "package a\nx := input"}) is None
    assert read_paths({"a.rego": "package a\nx if { input.a with input as {} }"}) is None


def test_projection_keeps_what_is_read_and_nothing_else() -> None:
    selection = read_paths({"p.rego": 'package p\nx if input.agent.id\ny if input.request.headers["mcp-session-id"]\n'
                                      "z if input.tool"})
    doc = {"agent": {"id": "a", "claims": {"jti": "1"}},
           "request": {"method": "GET", "headers": {"user-agent": "u", "mcp-session-id": "s"}},
           "tool": {"kind": "mcp", "arguments": {"q": 1}}, "context": {"time_ns": 5}}
    assert project(doc, selection) == {"agent": {"id": "a"}, "request": {"headers": {"mcp-session-id": "s"}},
                                       "tool": {"kind": "mcp", "arguments": {"q": 1}}}
    # Absent stays absent (undefined either way); a non-object where a path goes on is kept whole.
    assert project({"agent": "not-an-object", "request": {}}, selection) == {"agent": "not-an-object", "request": {}}
    assert project(doc, None) is doc


def test_builtins_that_change_between_identical_inputs_are_found() -> None:
    source = "package n\na := time.now_ns()\nb := rand . intn(\"x\", 3)\nc if print(input.a)\nd := http.send({})"
    assert nondeterministic_calls({"n.rego": source}) == ["http.send", "print", "rand.intn", "time.now_ns"]
    assert nondeterministic_calls({"n.rego": "package n\n# time.now_ns() in a comment\na := time.parse_ns(1)"}) == []


def test_shape_blocks_caching_for_per_call_values() -> None:
    assert InputShape.of({"p.rego": "package p\nx if input.request.method"}).cache_blocker is None
    reads_time = InputShape.of({"p.rego": "package p\nx if input.context.time_ns > 0"})
    assert "input.context.time_ns" in (reads_time.cache_blocker or "")
    reads_context = InputShape.of({"p.rego": "package p\nx if input.context.mode"})
    assert reads_context.cache_blocker is None
    reads_all = InputShape.of({"p.rego": "package p\nx if count(input) > 0"})
    assert reads_all.selection is None and reads_all.cache_blocker is not None
    calls_time = InputShape.of({"p.rego": "package p\nx if time.now_ns() > 0"})
    assert "time.now_ns" in (calls_time.cache_blocker or "")
