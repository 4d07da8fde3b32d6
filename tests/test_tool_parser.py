"""server/tool_parser.py: a corpus of model outputs with their (content, calls), the streaming
invariant (any split of any output streams to exactly the whole-text result), and properties:
generated call lists round-trip, arbitrary text never raises."""

from __future__ import annotations

import json
import keyword
from collections.abc import Collection
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllama4.server.tool_parser import ParsedOutput, ToolCall, ToolCallStream, parse_tool_calls

TOOLS = frozenset({"get_weather", "get_user_info", "search", "calc", "f", "g"})


def call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name, arguments)


# (output text, expected content, expected calls)
CORPUS: list[tuple[str, str | None, list[ToolCall]]] = [
    # Pythonic lists.
    (
        '[get_weather(city="San Francisco")]',
        None,
        [call("get_weather", city="San Francisco")],
    ),
    (
        "[get_weather(city=\"San Francisco\"), get_weather(city='Seattle')]",
        None,
        [call("get_weather", city="San Francisco"), call("get_weather", city="Seattle")],
    ),
    (
        "[get_user_info(user_id=7890, special='black')]",
        None,
        [call("get_user_info", user_id=7890, special="black")],
    ),
    (
        '[search(query="llama", filters={"year": 2024, "tags": ["ai", "ml"]})]',
        None,
        [call("search", query="llama", filters={"year": 2024, "tags": ["ai", "ml"]})],
    ),
    (
        "[f(a={'b': {'c': {'d': [1, [2, 3]], 'e': {}}}}, l=[])]",
        None,
        [call("f", a={"b": {"c": {"d": [1, [2, 3]], "e": {}}}}, l=[])],
    ),
    (
        "[f(point=(1, 2.5), single=(1,), empty=())]",
        None,
        [call("f", point=[1, 2.5], single=[1], empty=[])],
    ),
    (
        r"""[f(s="say \"hi\"\n", t='it\'s', u="C:\\path", v="\u00e9\t\x41")]""",
        None,
        [call("f", s='say "hi"\n', t="it's", u="C:\\path", v="\u00e9\tA")],
    ),
    ('[get_weather(city="Zürich 東京 🌧")]', None, [call("get_weather", city="Zürich 東京 🌧")]),
    (
        "[calc(a=-3, b=2.5, c=1e-3, d=-1.5E+10, e=0, f=+7, g=.5, h=1_000)]",
        None,
        [call("calc", a=-3, b=2.5, c=0.001, d=-1.5e10, e=0, f=7, g=0.5, h=1000)],
    ),
    ("[f(a=True, b=False, c=None)]", None, [call("f", a=True, b=False, c=None)]),
    ("[g()]", None, [call("g")]),
    ("[g(), f(a=1)]", None, [call("g"), call("f", a=1)]),
    ("[ f ( a = 1 , b = 'x' , ) , g ( ) , ]", None, [call("f", a=1, b="x"), call("g")]),
    (
        "[\n    get_weather(city='Oslo'),\n    get_weather(city='Bergen'),\n]",
        None,
        [call("get_weather", city="Oslo"), call("get_weather", city="Bergen")],
    ),
    (
        "[f(text=\"\"\"line 1\nline \"2''\"\"\", other='''''')]",
        None,
        [call("f", text="line 1\nline \"2''", other="")],
    ),
    (r'[f(pattern=r"\d+\.\d*", u=u"ok")]', None, [call("f", pattern=r"\d+\.\d*", u="ok")]),
    ("[f(a=\"\", b='')]", None, [call("f", a="", b="")]),
    (
        "[f(a=[1, 'two', [3.0, None]], b={'k': (True,)})]",
        None,
        [call("f", a=[1, "two", [3.0, None]], b={"k": [True]})],
    ),
    # Prose before the list; markers.
    (
        'Sure, let me check. [get_weather(city="Paris")]',
        "Sure, let me check.",
        [call("get_weather", city="Paris")],
    ),
    (
        "Let me look that up.\n\n[search(query='x')]\n",
        "Let me look that up.",
        [call("search", query="x")],
    ),
    ("Let's check: [g()]", "Let's check:", [call("g")]),
    (
        "Per [the docs](https://example.com), I call {it}: [f(a=1)]",
        "Per [the docs](https://example.com), I call {it}:",
        [call("f", a=1)],
    ),
    ("\n  Hi! [g()]", "\n  Hi!", [call("g")]),  # leading whitespace is kept
    ("  \n[g()]", None, [call("g")]),
    (
        '<|python_start|>[get_weather(city="Oslo")]<|python_end|>',
        None,
        [call("get_weather", city="Oslo")],
    ),
    ("<|python_start|>[f(a=1)]", None, [call("f", a=1)]),
    ("<|python_start|> \n[f(a=1)]\n<|python_end|>", None, [call("f", a=1)]),
    ("[f(a=1)]<|eot|>", None, [call("f", a=1)]),
    ("OK <|python_start|>[f(a=1)]<|python_end|>\n<|eom|>", "OK", [call("f", a=1)]),
    ('[f(s="<|eot|>")]', None, [call("f", s="<|eot|>")]),
    # JSON calls.
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [call("get_weather", city="Paris")],
    ),
    (
        '{"type": "function", "name": "f", "parameters": {"a": 1, "b": [true, false, null]}}',
        None,
        [call("f", a=1, b=[True, False, None])],
    ),
    ('{"name": "f", "arguments": {"a": -1.5e3}}', None, [call("f", a=-1500.0)]),
    (
        '{"name": "f", "arguments": "{\\"a\\": [1, {\\"b\\": \\"c\\"}]}"}',
        None,
        [call("f", a=[1, {"b": "c"}])],
    ),
    (
        '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]',
        None,
        [call("f", a=1), call("g")],
    ),
    (
        '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}',
        None,
        [call("f", a=1), call("g")],
    ),
    (
        '{"name": "f", "parameters": {"a": 1}}\n{"name": "g", "parameters": {}}\n',
        None,
        [call("f", a=1), call("g")],
    ),
    (
        '<|python_start|>{"type": "function", "name": "get_weather", '
        '"parameters": {"city": "Rome"}}<|python_end|>',
        None,
        [call("get_weather", city="Rome")],
    ),
    (
        'I will call the tool.\n{"name": "search", "parameters": {"query": "caf\\u00e9 ☕"}}',
        "I will call the tool.",
        [call("search", query="café ☕")],
    ),
    # Content: malformed, truncated, not literal, undeclared, trailing prose, plain text.
    ('[get_weather(city="Paris")', '[get_weather(city="Paris")', []),
    ('[get_weather(city="Paris"]', '[get_weather(city="Paris"]', []),
    ('<|python_start|>[get_weather(city="Pa', '<|python_start|>[get_weather(city="Pa', []),
    ('[get_weather("Paris")]', '[get_weather("Paris")]', []),
    ("[get_weather(city=paris)]", "[get_weather(city=paris)]", []),
    ("[calc(a=1+2)]", "[calc(a=1+2)]", []),
    ("[f(a=g())]", "[f(a=g())]", []),
    ("[a.b()]", "[a.b()]", []),
    ("[delete_everything(confirm=True)]", "[delete_everything(confirm=True)]", []),
    ("[f(a=1)] Hope that helps!", "[f(a=1)] Hope that helps!", []),
    ("[f(a=1), oops]", "[f(a=1), oops]", []),
    ("[f(a=1, a=2)]", "[f(a=1, a=2)]", []),
    ("[f(**{'a': 1})]", "[f(**{'a': 1})]", []),
    ("[f(a={1: 2})]", "[f(a={1: 2})]", []),
    ("[f(a={1, 2})]", "[f(a={1, 2})]", []),
    ("[f(a=b'x')]", "[f(a=b'x')]", []),
    ("[f(a=f'{x}')]", "[f(a=f'{x}')]", []),
    ("[f(a=1j)]", "[f(a=1j)]", []),
    ("[f(a=1e999)]", "[f(a=1e999)]", []),
    ("[f(a='x' # comment\n)]", "[f(a='x' # comment\n)]", []),
    ("[]", "[]", []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    (
        "See [the docs](https://example.com) for details.",
        "See [the docs](https://example.com) for details.",
        [],
    ),
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ("Use x = {'a': 1} < 2 here", "Use x = {'a': 1} < 2 here", []),
    ('The JSON {"a": 1} is an object.', 'The JSON {"a": 1} is an object.', []),
    ("   ", "   ", []),
    ("", None, []),
    ('{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),
    ('{"name": "f", "params": {}}', '{"name": "f", "params": {}}', []),
    ('{"name": "f", "arguments": "[1]"}', '{"name": "f", "arguments": "[1]"}', []),
    (
        '{"name": "f", "parameters": {}, "arguments": {}}',
        '{"name": "f", "parameters": {}, "arguments": {}}',
        [],
    ),
    (
        '{"type": "tool", "name": "f", "parameters": {}}',
        '{"type": "tool", "name": "f", "parameters": {}}',
        [],
    ),
    ('{"name": "f", "parameters": {"a": NaN}}', '{"name": "f", "parameters": {"a": NaN}}', []),
    ('{"name": "f", "parameters": {"a": 1}', '{"name": "f", "parameters": {"a": 1}', []),
    (
        '{"name": "f", "parameters": {}} and then',
        '{"name": "f", "parameters": {}} and then',
        [],
    ),
]

CORPUS_IDS = [f"{i}:{text[:30]!r}" for i, (text, _, _) in enumerate(CORPUS)]


def stream(
    text: str, cuts: list[int], tools: Collection[str] = TOOLS
) -> tuple[list[str], list[list[ToolCall]]]:
    """Push text cut at cuts, then finish: the content pieces and the calls of each step."""
    s = ToolCallStream(tools)
    bounds = [0, *sorted(cuts), len(text)]
    steps = [s.push(text[a:b]) for a, b in pairwise(bounds)] + [s.finish()]
    return [c for c, _ in steps], [calls for _, calls in steps]


def assert_streams_like_whole(text: str, cuts: list[int]) -> None:
    whole = parse_tool_calls(text, TOOLS)
    contents, calls = stream(text, cuts)
    assert "".join(contents) == (whole.content or "")
    assert [c for step in calls for c in step] == whole.calls


def test_corpus_size() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize(("text", "content", "calls"), CORPUS, ids=CORPUS_IDS)
def test_corpus(text: str, content: str | None, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(text, TOOLS) == ParsedOutput(content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), CORPUS, ids=CORPUS_IDS)
def test_corpus_streamed_one_character_at_a_time(
    text: str, content: str | None, calls: list[ToolCall]
) -> None:
    assert_streams_like_whole(text, list(range(1, len(text))))


@settings(max_examples=300)
@given(st.data())
def test_corpus_streamed_in_random_pieces(data: st.DataObject) -> None:
    text, _, _ = data.draw(st.sampled_from(CORPUS))
    assert_streams_like_whole(text, data.draw(st.lists(st.integers(0, len(text)))))


def test_arguments_json_keeps_unicode() -> None:
    assert (
        call("f", city="Zürich", n=[1, None]).arguments_json()
        == '{"city": "Zürich", "n": [1, null]}'
    )


def test_declared_tools_decide() -> None:
    assert parse_tool_calls("[f(a=1)]", []).calls == []
    assert parse_tool_calls("[f(a=1)]", ["f"]).calls == [call("f", a=1)]


def test_prose_streams_before_the_list() -> None:
    text = 'Sure, let me check. [get_weather(city="Paris")]'
    contents, calls = stream(text, list(range(1, len(text))))
    assert "".join(contents[:-1]) == "Sure, let me check."  # all of it from push
    assert contents[-1] == "" and calls[-1] == [call("get_weather", city="Paris")]


def test_text_with_brackets_streams_as_it_comes() -> None:
    text = "See [the docs](https://x.org) and {this}, then [1, 2]. Done."
    contents, _ = stream(text, list(range(1, len(text))))
    assert "".join(contents[:-1]) == text
    # Held back only while a bracket could still open a call list: " [the " ("[the (" could
    # go on as a call) until the "d".
    position = 0
    for i, piece in enumerate(contents[:-1]):
        position += len(piece)
        assert position >= i + 1 - len(" [the ")


def test_calls_come_with_finish() -> None:
    """Calls are returned by finish(), not as soon as their element is complete: until the end,
    more text (prose after the list, a bad element) can still make the whole output content, and
    a returned call cannot be taken back. So the guarantee is: no push returns a call, finish
    returns them all, and content before the list has been emitted by then."""
    for text in (
        "[f(a=1), g(b=2)]",
        '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}',
    ):
        for cuts in (list(range(1, len(text))), []):
            _, calls = stream(text, cuts)
            assert all(step == [] for step in calls[:-1])
            assert [c.name for c in calls[-1]] == ["f", "g"]
    # Why: the same prefix ends as content.
    assert parse_tool_calls("[f(a=1), g(b=2)] no", TOOLS).calls == []


def test_a_stream_is_reset_by_finish() -> None:
    s = ToolCallStream(TOOLS)
    assert s.push("Hi [f(a=1)") == ("Hi", [])
    assert s.finish() == (" [f(a=1)", [])
    assert s.push("[g()]") == ("", [])
    assert s.finish() == ("", [call("g")])


# Generated call lists round-trip.

names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
calls_lists = st.lists(
    st.builds(ToolCall, names, st.dictionaries(names, values, max_size=3)), min_size=1, max_size=3
)


def pythonic(calls: list[ToolCall]) -> str:
    return (
        "["
        + ", ".join(
            f"{c.name}(" + ", ".join(f"{k}={v!r}" for k, v in c.arguments.items()) + ")"
            for c in calls
        )
        + "]"
    )


def json_style(calls: list[ToolCall], separator: str, ascii_only: bool) -> str:
    return separator.join(
        json.dumps({"name": c.name, "parameters": c.arguments}, ensure_ascii=ascii_only)
        for c in calls
    )


@settings(max_examples=200)
@given(
    calls_lists,
    st.text(st.characters(blacklist_characters="[{<")),
    st.sampled_from(["pythonic", "json", "json list"]),
    st.sampled_from(["", "\n", "<|eot|>", " <|python_end|>\n<|eom|>"]),
    st.booleans(),
    st.data(),
)
def test_generated_calls_round_trip(
    calls: list[ToolCall],
    prose: str,
    style: str,
    tail: str,
    wrapped: bool,
    data: st.DataObject,
) -> None:
    if style == "pythonic":
        body = pythonic(calls)
    elif style == "json":
        body = json_style(
            calls, data.draw(st.sampled_from(["; ", "\n", ";"])), data.draw(st.booleans())
        )
    else:
        body = "[" + json_style(calls, ", ", ascii_only=False) + "]"
    text = prose + ("<|python_start|>" + body if wrapped else body) + tail
    tools = {c.name for c in calls}
    assert parse_tool_calls(text, tools) == ParsedOutput(prose.rstrip() or None, calls)
    contents, steps = stream(text, data.draw(st.lists(st.integers(0, len(text)))), tools)
    assert "".join(contents) == prose.rstrip()
    assert [c for step in steps for c in step] == calls


# Arbitrary text: never raises, and streams like the whole.

pieces = st.sampled_from(
    list("[](){}=\"',:;.+-\\ \n#")
    + ["f", "g", "x", "a", "1", "2.5", "e", "True", "None", "r", "null", '"name"', '"parameters"']
    + ["<|python_start|>", "<|python_end|>", "<|eot|>", "<|", '"""', "'''"]
)


@settings(max_examples=500)
@given(st.lists(pieces, max_size=40).map("".join), st.data())
def test_token_soup_never_raises_and_streams_like_whole(text: str, data: st.DataObject) -> None:
    assert_streams_like_whole(text, list(range(1, len(text))))
    assert_streams_like_whole(text, data.draw(st.lists(st.integers(0, len(text)))))


@settings(max_examples=300)
@given(st.text(), st.data())
def test_random_text_never_raises_and_streams_like_whole(text: str, data: st.DataObject) -> None:
    assert_streams_like_whole(text, data.draw(st.lists(st.integers(0, len(text)))))


def test_deep_nesting_is_content() -> None:
    deep = "[f(a=" + "[" * 200 + "]" * 200 + ")]"
    assert parse_tool_calls(deep, TOOLS) == ParsedOutput(deep, [])
    deep_json = '{"name": "f", "arguments": "' + "[" * 5000 + "]" * 5000 + '"}'
    assert parse_tool_calls(deep_json, TOOLS) == ParsedOutput(deep_json, [])
    assert_streams_like_whole(deep, list(range(1, len(deep))))


def test_long_call_streams_in_linear_time() -> None:
    text = "[search(query=" + repr("word " * 40_000) + ")]"
    contents, calls = stream(text, list(range(4, len(text), 4)))
    assert "".join(contents) == "" and calls[-1] == [call("search", query="word " * 40_000)]
