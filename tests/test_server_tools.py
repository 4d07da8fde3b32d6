"""End to end: tool calling and structured outputs on the demo model behind
`pyllama4-serve --tool-call-parser pythonic`, through the official openai client.

The demo model (SmolLM2-135M) was never trained for tools or JSON: what makes every output below
valid is the grammar (xgrammar token masks), which is what these tests check — with sampling at
temperature 1.0 where the issue asks for it.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from server_checks import assert_idle

MODEL = "demo"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Seoul", "Rome", "Accra"]
QUESTIONS = [f"What's the weather in {c} right now?" for c in CITIES] + [
    f"What time is it in {c}?" for c in CITIES
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "languages": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "maxItems": 3,
        },
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "employed"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    live = launch_server(
        tmp_path_factory.mktemp("tools") / "server.log", "--tool-call-parser", "pythonic"
    )
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def concurrently(fn, items) -> list:
    """fn over items as concurrent requests (the server batches them)."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in SCHEMAS
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_always_gives_valid_calls(client):
    def call(i: int):
        return client.chat.completions.create(
            model=MODEL,
            messages=ask(QUESTIONS[i]),
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=i,
            max_tokens=160,
        )

    for r in concurrently(call, range(len(QUESTIONS))):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert_valid_calls(choice.message.tool_calls)


def test_a_named_tool_choice_calls_exactly_that_function(client):
    def call(i: int):
        return client.chat.completions.create(
            model=MODEL,
            messages=ask(QUESTIONS[i]),
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=1.0,
            seed=100 + i,
            max_tokens=120,
        )

    for r in concurrently(call, range(10)):
        calls = r.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_time"]
        assert_valid_calls(calls)


def test_json_schema_outputs_validate(client):
    prompts = [
        f"Describe a fictional person number {i} as JSON: name, age, languages, employed."
        for i in range(20)
    ]

    def call(i: int):
        return client.chat.completions.create(
            model=MODEL,
            messages=ask(prompts[i]),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
            temperature=1.0,
            seed=200 + i,
            max_tokens=200,
        )

    for r in concurrently(call, range(len(prompts))):
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_regex_and_ebnf(client, server):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("Give me a JSON object about cats."),
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0.8,
        seed=1,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(
        model=MODEL,
        prompt="Today's date is",
        max_tokens=20,
        extra_body={"regex": r" \d{4}-\d{2}-\d{2}"},
    )
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", r.choices[0].text)
    r = httpx.post(
        server + "/generate",
        json={
            "text": "Answer yes or no: is the sky blue?",
            "sampling_params": {"max_new_tokens": 8, "ebnf": 'root ::= " yes" | " no"'},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] in (" yes", " no")


def test_streamed_tool_calls_assemble_into_valid_calls(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask("What's the weather in Oslo and the time in Lima?"),
        tools=TOOLS,
        tool_choice="required",
        temperature=0.7,
        seed=7,
        max_tokens=200,
        stream=True,
    )
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"]
    assert calls and sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        assert call["id"] and call["name"] in SCHEMAS
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_forced_call_arguments_stream_as_they_are_written(client):
    """The call's id and name come first, then its arguments over several chunks; no chunk is
    empty; the streamed call equals the whole response's (same seed)."""
    request = dict(
        model=MODEL,
        messages=ask("What's the weather in Oslo?"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0.7,
        seed=3,
        max_tokens=120,
    )
    whole = client.chat.completions.create(**request).choices[0]
    deltas, reasons = [], []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            assert delta.role or delta.content or delta.tool_calls or choice.finish_reason
            deltas += delta.tool_calls or []
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert reasons == ["tool_calls"] == [whole.finish_reason]
    first, rest = deltas[0], deltas[1:]
    assert first.id and first.function.name == "get_weather"
    assert len(rest) >= 3 and all(d.id is None and d.function.name is None for d in rest)
    arguments = first.function.arguments + "".join(d.function.arguments for d in rest)
    (call,) = whole.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", arguments)
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_weather"])


def test_a_full_tool_round_trip(client, server):
    messages = ask("What's the weather in Paris?")
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=120,
    )
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append(
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature": 21, "sky": "sunny"}),
        }
    )
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=40
    )
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert_idle(server)


BAD = {
    "an invalid JSON schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
        "response_format",
    ),
    "an invalid regex": ({"regex": "(unclosed"}, "regex"),
    "two constraints": ({"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf"),
    "an unknown tool_choice": ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    "a tool_choice naming no tool": (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    "tool_choice without tools": ({"tool_choice": "required"}, "tool_choice"),
    "tool-call arguments that are not JSON": (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{"},
                        }
                    ],
                },
            ]
        },
        "messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_structured_requests_are_400s(server, client, case):
    fields, param = BAD[case]
    body = {"model": MODEL, "messages": ask("hi"), "max_tokens": 4, **fields}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=ask("ok"), max_tokens=2)


# tool_choice "auto": an EBNF grammar makes the demo model write what Llama 4 writes, so the
# server's pythonic parser is what turns it into tool_calls (or leaves it as content).
SPOKEN = 'Let me check. [get_weather(city="Paris", unit=\'celsius\'), get_time(timezone="UTC")]'
EXPECTED_CALLS = [
    ("get_weather", {"city": "Paris", "unit": "celsius"}),
    ("get_time", {"timezone": "UTC"}),
]


def forced(text: str) -> dict:
    return {"ebnf": "root ::= " + json.dumps(text)}


def test_auto_parses_pythonic_calls_with_prose_before_them(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("Weather in Paris and the time in UTC?"),
        tools=TOOLS,
        max_tokens=80,
        extra_body=forced(SPOKEN),
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == EXPECTED_CALLS


def test_auto_streams_prose_then_the_calls(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask("Weather in Paris and the time in UTC?"),
        tools=TOOLS,
        max_tokens=80,
        stream=True,
        extra_body=forced(SPOKEN),
    )
    content, calls, reasons = "", {}, []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                calls[d.index] = (d.function.name, json.loads(d.function.arguments))
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert content == "Let me check."
    assert [calls[i] for i in sorted(calls)] == EXPECTED_CALLS
    assert reasons == ["tool_calls"]


def test_calls_to_undeclared_functions_stay_text(client):
    text = '[send_email(to="bob@example.com")]'
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Mail Bob."), tools=TOOLS, max_tokens=40, extra_body=forced(text)
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text
    assert not r.choices[0].message.tool_calls
