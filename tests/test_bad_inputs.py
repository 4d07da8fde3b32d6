"""Bad input against a live demo server: a battery generated from a table (route x field x bad
value) where every answer is a 4xx with an OpenAI error body (or a 200 where the value is
valid), never a 5xx; then the specific rules: token ids above int32, JSON nested too deeply,
the output budget (0 is refused, unset is the rest of the context), the fields errors name, and
completions options that are not supported. The server is healthy and idle afterwards."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest

from pyllama4.server.json_depth import MAX_JSON_DEPTH
from server_checks import assert_idle

MODEL = "demo"
CONTEXT = 256
HELLO = [{"role": "user", "content": "hi"}]
TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}
PAST_CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("bad-inputs") / "server.log"
    live = launch_server(log, "--tool-call-parser", "pythonic", context_length=CONTEXT)
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=300) as client:
        yield client


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_text(depth: int) -> str:
    """JSON for nested(depth), written without recursion (json.dumps would recurse)."""
    return '{"a":' * depth + "1" + "}" * depth


DEEP = "\0deep\0"  # stands for nested_text(10_000) in a body


def post(http: httpx.Client, route: str, body: dict[str, Any]) -> httpx.Response:
    """POST the body, DEEP replaced by JSON 10,000 levels deep (in a string: by its text)."""
    text = json.dumps(body)
    text = text.replace(json.dumps(json.dumps(DEEP))[1:-1], json.dumps(nested_text(10_000))[1:-1])
    text = text.replace(json.dumps(DEEP), nested_text(10_000))
    return http.post(route, content=text, headers={"content-type": "application/json"})


# ---- the battery: route x field x bad value ----------------------------------------------

BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": HELLO, "max_tokens": 1},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 1}},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}
SAMPLING = (
    "n temperature top_p max_tokens stream stream_options stop seed frequency_penalty "
    "presence_penalty logit_bias user top_k min_p repetition_penalty min_tokens stop_token_ids "
    "ignore_eos skip_special_tokens response_format regex ebnf json_schema"
).split()
NATIVE = (
    "max_new_tokens temperature top_p top_k min_p frequency_penalty presence_penalty "
    "repetition_penalty min_new_tokens stop stop_token_ids ignore_eos skip_special_tokens n seed "
    "json_schema regex ebnf"
).split()
CHAT_ONLY = (
    "messages max_completion_tokens logprobs top_logprobs chat_template_kwargs "
    "add_generation_prompt continue_final_message tools tool_choice parallel_tool_calls"
).split()
FIELDS: dict[str, list[tuple[Any, ...]]] = {
    "/v1/chat/completions": [(f,) for f in ["model", *SAMPLING, *CHAT_ONLY]]
    + [
        ("messages", 0, "role"),
        ("messages", 0, "content"),
        ("messages", 0, "name"),
        ("response_format", "json_schema", "schema"),
        ("tools", 0, "function", "parameters"),
        ("tools", 0, "function", "name"),
        ("messages", 1, "tool_calls", 0, "function", "arguments"),
        ("messages", 1, "tool_calls", 0, "function", "name"),
    ],
    "/v1/completions": [
        (f,) for f in ["model", *SAMPLING, "prompt", "logprobs", "echo", "suffix", "best_of"]
    ],
    "/generate": [(f,) for f in ("text", "input_ids", "image_data", "sampling_params", "stream")]
    + [("sampling_params", f) for f in NATIVE],
    "/tokenize": [("prompt",), ("add_special_tokens",)],
    "/detokenize": [("tokens",)],
}
# What a path needs in the base body to exist (a response_format to put a schema in, ...).
NEEDS: dict[str, dict[str, Any]] = {
    "response_format": {"response_format": {"type": "json_schema", "json_schema": {}}},
    "tools": {"tools": [TOOL]},
    "messages": {"messages": [*HELLO, PAST_CALL]},
}
VALUES: dict[str, Any] = {
    "null": None,
    "true": True,
    "string": "x",
    "empty-string": "",
    "float": 1.5,
    "negative": -1,
    "zero": 0,
    "above-int32": 2**31,
    "above-int64": 10**30,
    "empty-list": [],
    "empty-object": {},
    "long-string": "x" * 200_000,
    "lone-surrogate": "a\ud800b",  # json.dumps escapes it: "a\\ud800b"
    "rtl-emoji-nul": "\u202eabc \U0001f600 a\x00b",
    "million-list": [1] * 1_000_000,
}
PLACEHOLDER = json.dumps("\0value\0")


def body_with(route: str, path: tuple[Any, ...]) -> str:
    """The route's base body (plus what the path needs), as JSON with a placeholder at path."""
    body = copy.deepcopy(BASES[route])
    body.update(copy.deepcopy(NEEDS.get(str(path[0]), {})) if len(path) > 1 else {})
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "\0value\0"
    return json.dumps(body)


ENCODED = {name: json.dumps(value) for name, value in VALUES.items()} | {
    "deep": nested_text(10_000)
}
CASES = [
    pytest.param(route, path, name, id=f"{route}:{'.'.join(map(str, path))}={name}")
    for route, paths in FIELDS.items()
    for path in paths
    for name in ENCODED
]


def assert_openai_error(r: httpx.Response) -> None:
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] == r.status_code


@pytest.mark.parametrize(("route", "path", "value"), CASES)
def test_a_bad_field_is_a_4xx_never_a_5xx(http, route, path, value):
    body = body_with(route, path).replace(PLACEHOLDER, ENCODED[value])
    r = http.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        assert_openai_error(r)


BODIES = {
    "not-json": b"{not json",
    "empty": b"",
    "array": b"[]",
    "string": b'"hi"',
    "deep-array": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": nested_text(100_000).encode(),
    "nan": b'{"model": "demo", "prompt": "hi", "temperature": NaN}',
    "bad-utf8": b'{"model": "demo", "prompt": "\xff\xfe"}',
}


@pytest.mark.parametrize("route", [*BASES, "/v1/models"])
@pytest.mark.parametrize("name", BODIES)
def test_a_bad_body_is_a_4xx(http, route, name):
    r = http.post(route, content=BODIES[name], headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text[:500]
    assert_openai_error(r)


@pytest.mark.parametrize("route", BASES)
def test_a_wrong_method_is_a_405(http, route):
    r = http.get(route)
    assert r.status_code == 405
    assert_openai_error(r)


def test_models_ignores_what_a_get_carries(http):
    r = http.request("GET", "/v1/models?limit=-1&x=%00", content=b"{not json")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL


# ---- token ids above int32 ---------------------------------------------------------------

BIG = 2**31


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("/v1/completions", {"prompt": [1, BIG]}, "prompt"),
        ("/v1/completions", {"prompt": [[1, BIG]]}, "prompt"),
        ("/v1/completions", {"stop_token_ids": [BIG]}, "stop_token_ids"),
        ("/v1/completions", {"logit_bias": {str(BIG): 1}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {str(10**40): 1}}, "logit_bias"),
        ("/generate", {"text": None, "input_ids": [1, BIG]}, "input_ids"),
        ("/generate", {"sampling_params": {"stop_token_ids": [BIG]}}, "sampling_params"),
        ("/detokenize", {"tokens": [BIG]}, "tokens"),
        ("/detokenize", {"tokens": [2**63]}, "tokens"),
    ],
)
def test_token_ids_above_int32_are_400s(http, route, fields, param):
    body = {k: v for k, v in {**BASES[route], **fields}.items() if v is not None}
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param)


# ---- JSON nested too deeply --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"chat_template_kwargs": DEEP}, "chat_template_kwargs"),
        ({"chat_template_kwargs": nested(MAX_JSON_DEPTH)}, "chat_template_kwargs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": DEEP}}},
            "response_format",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]}, "tools"),
        (
            {
                "messages": [
                    *HELLO,
                    {**PAST_CALL, "tool_calls": [{"function": {"name": "f", "arguments": DEEP}}]},
                ]
            },
            "messages",
        ),  # noqa: E501
        (
            {
                "messages": [
                    *HELLO,
                    {
                        **PAST_CALL,
                        "tool_calls": [{"function": {"name": "f", "arguments": json.dumps(DEEP)}}],
                    },
                ]
            },
            "messages",
        ),  # noqa: E501
        ({"json_schema": json.dumps({"type": "array", "items": DEEP})}, "json_schema"),
        (
            {"json_schema": json.dumps({"type": "array", "items": nested(MAX_JSON_DEPTH)})},
            "json_schema",
        ),  # noqa: E501
    ],
)
def test_deeply_nested_json_is_a_400_naming_the_field(http, fields, param):
    r = post(http, "/v1/chat/completions", {**BASES["/v1/chat/completions"], **fields})
    assert r.status_code == 400, r.text[:500]
    assert r.json()["error"]["param"] == param


def test_nesting_up_to_the_limit_is_served(http):
    kwargs = nested(MAX_JSON_DEPTH - 2)  # the body and chat_template_kwargs add two levels
    body = {**BASES["/v1/chat/completions"], "chat_template_kwargs": {"x": kwargs}}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


# ---- the output budget -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        (
            "/v1/chat/completions",
            {"max_tokens": None, "max_completion_tokens": 0},
            "max_completion_tokens",
        ),  # noqa: E501
        (
            "/v1/chat/completions",
            {"max_tokens": 2, "max_completion_tokens": 0},
            "max_completion_tokens",
        ),  # noqa: E501
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": -3}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/generate", {"sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
        (
            "/generate",
            {"sampling_params": {"max_new_tokens": -1}},
            "sampling_params.max_new_tokens",
        ),  # noqa: E501
    ],
)
def test_a_zero_or_negative_budget_is_a_400_naming_the_field(http, route, fields, param):
    body = {k: v for k, v in {**BASES[route], **fields}.items() if v is not None}
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def generated(http, route: str, body: dict[str, Any]) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of one request."""
    r = http.post(route, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    if route == "/generate":
        return out["meta_info"]["prompt_tokens"], out["meta_info"]["completion_tokens"]
    return out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO}),
        ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
        ("/generate", {"text": "hi", "sampling_params": {}}),
    ],
)
def test_an_unset_budget_is_the_rest_of_the_context(http, route, body):
    if route == "/generate":
        body["sampling_params"].update(ignore_eos=True, temperature=0)
    else:
        body.update(ignore_eos=True, temperature=0)
    prompt, completion = generated(http, route, body)
    assert prompt + completion == CONTEXT


def test_max_completion_tokens_wins_over_max_tokens(http):
    body = {"model": MODEL, "messages": HELLO, "ignore_eos": True}
    assert (
        generated(
            http, "/v1/chat/completions", {**body, "max_completion_tokens": 3, "max_tokens": 9}
        )[1]
        == 3
    )  # noqa: E501
    assert generated(http, "/v1/chat/completions", {**body, "max_tokens": 2})[1] == 2


# ---- the fields errors name --------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("/v1/chat/completions", {"regex": "(unclosed"}, "regex"),
        ("/v1/chat/completions", {"ebnf": "root ::= ("}, "ebnf"),
        ("/v1/chat/completions", {"json_schema": '{"type": 7}'}, "json_schema"),
        ("/v1/chat/completions", {"json_schema": "{not json"}, "json_schema"),
        (
            "/v1/chat/completions",
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}
                ],  # noqa: E501
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
            "response_format",
        ),
        ("/v1/completions", {"regex": "(unclosed"}, "regex"),
        ("/v1/completions", {"prompt": "word " * 2 * CONTEXT}, "prompt"),
        ("/v1/completions", {"prompt": [1] * CONTEXT}, "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "word " * 2 * CONTEXT}]},
            "messages",
        ),  # noqa: E501
        ("/generate", {"sampling_params": {"regex": "(unclosed"}}, "sampling_params.regex"),
        ("/generate", {"text": None, "input_ids": [1] * CONTEXT}, "input_ids"),
        ("/generate", {"text": "word " * 2 * CONTEXT}, "text"),
    ],
)
def test_errors_name_the_field_at_fault(http, route, fields, param):
    body = {k: v for k, v in {**BASES[route], **fields}.items() if v is not None}
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ---- completions options that are not supported ------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True}, None),
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"best_of": 2, "n": 1}, "best_of"),
        ({"echo": False}, None),
        ({"suffix": None}, None),
        ({"suffix": ""}, None),
        ({"best_of": 1}, None),
        ({"best_of": 2, "n": 2}, None),
    ],
)
def test_unsupported_completions_options_are_refused(http, fields, param):
    r = http.post("/v1/completions", json={**BASES["/v1/completions"], **fields})
    if param is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert "not supported" in r.json()["error"]["message"]


def test_after_all_that_the_server_is_healthy_and_idle(server, http):
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json=BASES["/v1/completions"]).status_code == 200
    assert_idle(server)
