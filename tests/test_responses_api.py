"""End to end: OpenAI's Responses API (POST /v1/responses, GET / DELETE /v1/responses/{id}) on
the demo model behind `pyllama4-serve --tool-call-parser pythonic --api-key ...`, through the
official openai client (its `responses.create` and `responses.stream` helpers) and raw HTTP.

A Responses request is the chat request it stands for, so at temperature 0 its answer is the chat
completion of the same conversation: that is what most checks here compare against.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from pyllama4.server.asgi import HTTPError
from pyllama4.server.response_store import ResponseStore
from pyllama4.server.responses_output import draft_response
from pyllama4.server.responses_protocol import Response, ResponsesRequest
from pyllama4.server.responses_stream import ResponseEvents
from pyllama4.server.tools import ToolPlan
from server_checks import assert_idle

MODEL = "demo"
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {  # the Responses API's flat function tool
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": WEATHER_PARAMS,
    "strict": True,
}
CHAT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": WEATHER_PARAMS,
        "strict": True,
    },
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_END = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("responses") / "server.log"
    live = launch_server(
        log, "--tool-call-parser", "pythonic", "--api-key", KEY, "--public-metrics"
    )
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def chat_text(client, messages: list[dict], max_tokens: int, **extra) -> str:
    r = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, **extra
    )
    return r.choices[0].message.content


def test_create_answers_as_chat_does(client, server):
    question = "What is the capital of France?"
    r = client.responses.create(model=MODEL, input=question, temperature=0, max_output_tokens=24)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status == "completed" and r.error is None and r.incomplete_details is None
    assert r.model == MODEL and r.max_output_tokens == 24 and r.temperature == 0
    [message] = r.output
    assert message.type == "message" and message.role == "assistant"
    assert message.status == "completed" and message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    assert "Paris" in r.output_text
    assert r.output_text == chat_text(client, [{"role": "user", "content": question}], 24)
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 24
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0
    assert u.output_tokens_details.reasoning_tokens == 0
    assert_idle(server)


def test_instructions_and_message_items_are_the_chat_conversation(client):
    r = client.responses.create(
        model=MODEL,
        instructions="You answer in one short sentence.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
            {"type": "message", "role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Name another one."},
        ],
        temperature=0,
        max_output_tokens=16,
        metadata={"k": "v"},
    )
    expected = chat_text(
        client,
        [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Name another one."},
        ],
        16,
    )
    assert r.output_text == expected
    assert r.instructions == "You answer in one short sentence." and r.metadata == {"k": "v"}


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(
        model=MODEL, input="Say a number.", temperature=0, max_output_tokens=8
    )
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input="And another one?",
        temperature=0,
        max_output_tokens=12,
    )
    assert second.previous_response_id == first.id
    expected = chat_text(
        client,
        [
            {"role": "user", "content": "Say a number."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And another one?"},
        ],
        12,
    )
    assert second.output_text == expected
    assert second.usage.input_tokens > first.usage.total_tokens


def test_stream_helper_events_order_and_final_response(client, server):
    kwargs = dict(model=MODEL, input="What is the capital of France?", temperature=0)
    whole = client.responses.create(**kwargs, max_output_tokens=24, store=False)
    assert whole.status == "completed"  # get_final_response needs response.completed
    with client.responses.stream(**kwargs, max_output_tokens=24) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas
    assert kinds == TEXT_EVENTS + [e.type for e in deltas] + TEXT_END + ["response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(d.delta for d in deltas) == whole.output_text == final.output_text
    assert events[-2].item.content[0].text == whole.output_text
    assert final.status == whole.status and final.usage.output_tokens == whole.usage.output_tokens
    assert final.id.startswith("resp_") and final.id != whole.id
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.status == final.status
    assert_idle(server)


def test_the_wire_has_event_names_and_no_done_line(server):
    body = {"model": MODEL, "input": "Hi!", "max_output_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/responses", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    assert "[DONE]" not in text
    blocks = [b for b in text.split("\n\n") if b.strip()]
    for number, block in enumerate(blocks):
        event, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert event == f"event: {payload['type']}" and payload["sequence_number"] == number
    assert payload["type"] == "response.incomplete"


def test_the_response_id_carries_x_request_id(server):
    headers = AUTH | {"X-Request-Id": "trace-42"}
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, "store": False}
    r = httpx.post(server + "/v1/responses", json=body, headers=headers, timeout=60)
    assert r.json()["id"] == "resp_trace-42" and r.headers["x-request-id"] == "trace-42"


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(
        model=MODEL, input="Tell me a long story.", max_output_tokens=3, temperature=0
    )
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    with client.responses.stream(
        model=MODEL, input="Tell me a long story.", max_output_tokens=3, temperature=0
    ) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output[0].content[0].text == r.output_text


def test_a_tool_call_round_trip(client, server):
    first = client.responses.create(
        model=MODEL,
        input="What's the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=120,
    )
    assert first.status == "completed"
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    result = json.dumps({"temperature": 21, "sky": "sunny"})
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}],
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_output_tokens=30,
    )
    assert second.output[0].type == "message" and second.output_text
    expected = chat_text(
        client,
        [
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": result},
        ],
        30,
        tools=[CHAT_WEATHER],
        tool_choice="none",
    )
    assert second.output_text == expected
    assert_idle(server)


def test_streamed_required_tool_calls(client):
    with client.responses.stream(
        model=MODEL,
        input="What's the weather in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        temperature=0.7,
        max_output_tokens=200,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and kinds.count("response.function_call_arguments.done") == len(calls)
    for call in calls:
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [c.arguments for c in calls]
    expected = ["response.created", "response.in_progress"]
    for call in calls:  # a forced call's arguments stream as they are written
        deltas = [
            e.delta
            for e in events
            if e.type == "response.function_call_arguments.delta" and e.item_id == call.id
        ]
        assert len(deltas) > 1 and "".join(deltas) == call.arguments
        expected += ["response.output_item.added"]
        expected += ["response.function_call_arguments.delta"] * len(deltas)
        expected += ["response.function_call_arguments.done", "response.output_item.done"]
    assert kinds == expected + ["response.completed"]


def test_text_format_json_schema(client):
    r = client.responses.create(
        model=MODEL,
        input="Describe the weather in Rome as JSON.",
        text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER_PARAMS}},
        temperature=1.0,
        max_output_tokens=120,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), WEATHER_PARAMS)
    assert r.text.format.type == "json_schema"


def test_store_retrieve_delete(client, server):
    kept = client.responses.create(model=MODEL, input="Hello", max_output_tokens=4)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    client.responses.delete(kept.id)
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{server}/v1/responses/{kept.id}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"
    unkept = client.responses.create(model=MODEL, input="Hello", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


@pytest.mark.parametrize("previous", ["resp_nope", "deleted", "unstored"])
def test_an_unknown_previous_response_is_a_404(client, server, previous):
    if previous != "resp_nope":
        r = client.responses.create(
            model=MODEL, input="Hi", max_output_tokens=2, store=previous == "deleted"
        )
        previous = r.id
        if r.store:
            client.responses.delete(r.id)
    body = {"model": MODEL, "input": "Hi", "previous_response_id": previous}
    r = httpx.post(server + "/v1/responses", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["param"] == "previous_response_id" and previous in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == 404


BAD = {
    "a hosted tool": ({"tools": [{"type": "web_search_preview"}]}, "tools"),
    "a function tool without a name": ({"tools": [{"type": "function"}]}, "tools"),
    "an unknown item": ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    "an unknown role": ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
    "a file part": (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        "input",
    ),
    "an image on a text-only server": (
        {
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "http://x/a.png"}],
                }
            ]
        },
        "input",
    ),
    "a call output without call_id": (
        {"input": [{"type": "function_call_output", "output": "x"}]},
        "input",
    ),
    "a temperature out of range": ({"temperature": 3}, "temperature"),
    "a json_schema format without schema": (
        {"text": {"format": {"type": "json_schema", "name": "x"}}},
        "text",
    ),
    "an unknown format": ({"text": {"format": {"type": "yaml"}}}, "text"),
    "an invalid schema": (
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 7}}}},
        "text",
    ),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "a hosted tool_choice": (
        {"tools": [WEATHER], "tool_choice": {"type": "file_search"}},
        "tool_choice",
    ),
    "an output budget over the context": ({"max_output_tokens": 5000}, "max_output_tokens"),
    "background": ({"background": True}, "background"),
    "no input": ({"input": None}, "input"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_400s_naming_the_field(client, server, case):
    fields, param = BAD[case]
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **fields}
    r = httpx.post(server + "/v1/responses", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["code"] == 400 and error["message"]
    assert client.responses.create(model=MODEL, input="ok", max_output_tokens=2).status


def test_an_unknown_model_is_a_404(server):
    body = {"model": "gpt-4o", "input": "hi"}
    r = httpx.post(server + "/v1/responses", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_the_api_key_is_required(server):
    for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/resp_x")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            body = {"model": MODEL, "input": "hi"} if method == "POST" else None
            r = httpx.request(method, server + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    unkeyed = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unkeyed.responses.create(model=MODEL, input="hi", max_output_tokens=2)


@pytest.fixture(scope="module")
def mm_client(launch_server, tiny_mm_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("responses-mm") / "server.log"
    live = launch_server(log, "--enable-multimodal", model_dir=tiny_mm_dir)
    yield openai.OpenAI(base_url=live.base + "/v1", api_key="unused", max_retries=0)
    live.stop()


def test_an_input_image_is_chat_image_url_on_a_multimodal_server(mm_client):
    buffer = io.BytesIO()
    Image.new("RGB", (112, 56), (200, 30, 30)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    r = mm_client.responses.create(
        model=MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Describe the picture."},
                    {"type": "input_image", "image_url": url, "detail": "auto"},
                ],
            }
        ],
        temperature=0,
        max_output_tokens=4,
    )
    parts = [
        {"type": "text", "text": "Describe the picture."},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    chat = mm_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=4
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content


# ---- without a server: the stream of a response cut short, the store's bounds ---------------


def test_a_response_cut_short_ends_with_response_failed():
    draft = draft_response(ResponsesRequest(input="hi"), "resp_1", MODEL)
    events = ResponseEvents(draft, ToolPlan(frozenset(), None, None))
    out = events.start() + events.push("Hel", finished=False) + events.push("lo", finished=False)
    out += events.fail(HTTPError(503, "the server is shutting down", kind="service_unavailable"))
    kinds = [kind for kind, _ in out]
    deltas = ["response.output_text.delta"] * 2
    assert kinds == TEXT_EVENTS + deltas + TEXT_END + ["response.failed"]
    data = [json.loads(body) for _, body in out]
    assert [d["sequence_number"] for d in data] == list(range(len(out)))
    assert [d["type"] for d in data] == kinds
    failed = data[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "Hello"


def test_the_store_keeps_the_newest_within_its_bounds():
    def response(i: int) -> Response:
        return draft_response(ResponsesRequest(input=str(i)), f"resp_{i}", MODEL)

    store = ResponseStore(max_responses=3, max_bytes=1000)
    kept = [response(i) for i in range(5)]
    for r in kept:
        store.put(r, [], 100)
    assert [store.get(r.id) is not None for r in kept] == [False, False, True, True, True]
    store.put(response(5), [], 850)  # over the bytes: the oldest go until it fits
    assert [store.get(r.id) is not None for r in kept] == [False] * 4 + [True]
    store.put(response(6), [], 1001)  # too large on its own: not kept
    assert len(store.entries) == 2 and store.size == 950
    assert store.delete(kept[4].id) and not store.delete(kept[4].id) and store.size == 850
