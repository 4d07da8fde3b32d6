"""server/tools.py: how a request's tools, tool_choice and structured-output fields become what the
template sees, the grammar that forces calls, and clear 400s."""

from __future__ import annotations

import json

import msgspec
import pytest

from pyllama4.server import protocol as p
from pyllama4.server.tools import RequestError, grammar_of, plan_tools, template_message

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Local time."}}


def chat(**fields) -> p.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=p.ChatCompletionRequest)


def schema_of(plan) -> dict:
    assert plan.grammar is not None and plan.grammar.kind == "json_schema"
    return json.loads(plan.grammar.source)


def test_no_tools_or_none_means_no_parsing_and_no_grammar():
    for req in (chat(), chat(tools=[WEATHER], tool_choice="none")):
        plan = plan_tools(req, "pythonic")
        assert (plan.names, plan.template_tools, plan.grammar) == (frozenset(), None, None)


def test_auto_parses_declared_names_without_a_grammar():
    plan = plan_tools(chat(tools=[WEATHER, CLOCK]), "pythonic")
    assert plan.names == {"get_weather", "get_time"} and plan.grammar is None
    assert [t["function"]["name"] for t in plan.template_tools] == ["get_weather", "get_time"]
    # A tool without parameters still shows the template an (empty) object schema.
    assert plan.template_tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_required_forces_a_list_of_calls_one_unless_parallel():
    schema = schema_of(plan_tools(chat(tools=[WEATHER, CLOCK], tool_choice="required"), "x"))
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert (
        schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    )
    single = schema_of(
        plan_tools(
            chat(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False), "x"
        )
    )
    assert single["maxItems"] == 1


def test_a_named_choice_forces_exactly_that_function():
    choice = {"type": "function", "function": {"name": "get_time"}}
    schema = schema_of(plan_tools(chat(tools=[WEATHER, CLOCK], tool_choice=choice), "x"))
    assert schema["maxItems"] == 1
    assert schema["items"]["properties"]["name"]["enum"] == ["get_time"]


@pytest.mark.parametrize(
    ("fields", "parser", "param", "words"),
    [
        ({"tools": [WEATHER]}, None, "tools", "--tool-call-parser"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "x", "tool_choice", "sometimes"),
        ({"tool_choice": "auto"}, "x", "tool_choice", "needs tools"),
        ({"tools": [WEATHER, WEATHER]}, "x", "tools", "twice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "x",
            "tool_choice",
            "not in tools",
        ),
        ({"tools": [{"type": "retrieval", "function": {"name": "r"}}]}, "x", "tools", "function"),
    ],
)
def test_tool_errors_name_the_field(fields, parser, param, words):
    with pytest.raises(RequestError, match=words) as e:
        plan_tools(chat(**fields), parser)
    assert e.value.param == param


def test_grammar_of_reads_one_constraint():
    assert grammar_of(chat(response_format={"type": "text"})) is None
    assert grammar_of(chat(response_format={"type": "json_object"})).kind == "json_object"
    spec = grammar_of(
        chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "null"}}})
    )
    assert (spec.kind, json.loads(spec.source)) == ("json_schema", {"type": "null"})
    assert grammar_of(chat(regex="a+")).source == "a+"
    with pytest.raises(RequestError, match="json_schema.schema"):
        grammar_of(chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}))
    with pytest.raises(RequestError, match="at most one") as e:
        grammar_of(chat(response_format={"type": "json_object"}, ebnf='root ::= "a"'))
    assert e.value.param == "ebnf"
    with pytest.raises(RequestError, match="xml"):
        grammar_of(chat(response_format={"type": "xml"}))


def test_past_tool_calls_reach_the_template_with_parsed_arguments():
    message = p.ChatMessage(
        "assistant",
        None,
        tool_calls=[p.ToolCall(p.FunctionCall("get_weather", '{"city": "Paris"}'), id="c1")],
    )
    out = template_message(1, message, "")
    assert out["tool_calls"] == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    result = template_message(2, p.ChatMessage("tool", "21 C", tool_call_id="c1"), "21 C")
    assert result == {"role": "tool", "content": "21 C", "tool_call_id": "c1"}
    with pytest.raises(RequestError, match=r"messages\[1\].tool_calls\[0\]"):
        template_message(
            1, p.ChatMessage("assistant", tool_calls=[p.ToolCall(p.FunctionCall("f", "{"))]), ""
        )
