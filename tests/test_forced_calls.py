"""ForcedCallStream: forced tool calls (the grammar's JSON call list) read as they stream."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pyllama4.server.forced_calls import ForcedCallStream, read_forced_calls

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
PARAMETERS = st.dictionaries(st.text(), JSON_VALUES, max_size=4)
CALLS = st.lists(st.tuples(st.text(min_size=1, max_size=12), PARAMETERS), min_size=1, max_size=3)


def forced_text(calls: list[tuple[str, dict]], **dumps) -> str:
    return json.dumps([{"name": n, "parameters": a} for n, a in calls], **dumps)


def streamed(text: str, cuts: list[int]) -> dict[int, dict]:
    """The calls a client assembles from the pieces of text cut at these offsets."""
    stream, calls, at = ForcedCallStream(), {}, 0
    for cut in sorted(cuts) + [len(text)]:
        for piece in stream.push(text[at:cut]):
            if piece.name is not None:
                assert piece.index not in calls  # a call's name comes once, first
                calls[piece.index] = {"name": piece.name, "arguments": ""}
            calls[piece.index]["arguments"] += piece.arguments
        at = max(at, cut)
    return calls


@settings(max_examples=300, deadline=None)
@given(calls=CALLS, cuts=st.lists(st.integers(0, 400), max_size=12), ascii_only=st.booleans())
def test_any_cut_of_the_text_assembles_the_same_calls(calls, cuts, ascii_only):
    text = forced_text(calls, ensure_ascii=ascii_only)
    got = streamed(text, cuts)
    assert [got[i]["name"] for i in sorted(got)] == [n for n, _ in calls]
    for i, (_, parameters) in enumerate(calls):
        assert json.loads(got[i]["arguments"]) == parameters
    whole = read_forced_calls(text)
    assert [(c.name, c.arguments) for c in whole] == [
        (got[i]["name"], got[i]["arguments"]) for i in sorted(got)
    ]


def test_the_name_comes_before_any_argument_and_arguments_grow_with_the_text():
    text = forced_text([("get_weather", {"city": 'Oslo "Norway" {x}', "days": [1, 2]})])
    stream = ForcedCallStream()
    pieces = [piece for ch in text for piece in stream.push(ch)]
    assert pieces[0].name == "get_weather" and pieces[0].arguments == ""
    assert all(piece.name is None for piece in pieces[1:])
    assert len(pieces) > 10  # one piece per character of the arguments
    assert "".join(piece.arguments for piece in pieces) == json.dumps(
        {"city": 'Oslo "Norway" {x}', "days": [1, 2]}
    )


def test_whitespace_between_the_parts_is_allowed():
    text = '[ {\n "name" : "f" ,\n "parameters" : {"a": 1} } ,{"name":"g","parameters":{}} ]'
    calls = read_forced_calls(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]


def test_parameters_before_the_name_are_held_until_the_name():
    stream = ForcedCallStream()
    assert stream.push('[{"parameters": {"a": "b"}, ') == []
    pieces = stream.push('"name": "f"}]')
    assert [(p.index, p.name, p.arguments) for p in pieces] == [(0, "f", '{"a": "b"}')]


def test_a_cut_short_output_gives_the_arguments_so_far():
    calls = read_forced_calls('[{"name": "f", "parameters": {"city": "Os')
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"city": "Os')]


def test_text_of_another_shape_gives_no_calls():
    for text in ("Hello", '{"name": "f"}', "[1, 2]", '[{"name": 3}]', ""):
        assert read_forced_calls(text) == []
