"""The shipped pythonic Llama 4 tool chat template (pyllama4/chat_templates/llama4_pythonic.jinja).

Rendered by transformers' `apply_chat_template` with a real tokenizer that has Llama 4's special
tokens at their real ids (the tiny multimodal checkpoint of tiny_models.py). Without tools the
template must agree with transformers' built-in Llama 4 template, the reference for the layout.
"""

from __future__ import annotations

import ast
import json
from typing import Any

import pytest
from transformers import AutoTokenizer
from transformers.models.llama4.processing_llama4 import chat_template as HF_LLAMA4_TEMPLATE

from pyllama4.chat_templates import BUILTIN, builtin_template

TEMPLATE = builtin_template("llama4_pythonic")

BOS = "<|begin_of_text|>"
EOT = "<|eot|>"
GEN = "<|header_start|>assistant<|header_end|>\n\n"
DEFAULT_SYSTEM = (
    "You are a helpful assistant and an expert in composing functions. You answer questions from "
    "your own knowledge, and call the functions you are given when they help to answer."
)
FORMAT_LINE = "[func_name1(param1=value1, param2=value2), func_name2(...)]"
INSTRUCTIONS_TAIL = (
    "\n\nTo call one or more of these functions, reply with the calls only, in this exact format:\n"
    f"{FORMAT_LINE}\n"
    "Write each argument value as a Python literal. Call only the functions listed above, and put "
    "no other text in a reply that calls functions. If no call is needed, answer normally. "
    "Function results come back in ipython turns; use them in your answer."
)

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
SEARCH = {
    "name": "search",
    "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": SEARCH}]

# Two parallel calls covering every kind of argument value.
PARALLEL_ARGS: dict[str, Any] = {
    "text": 'say "hi"',
    "count": 3,
    "ratio": 0.25,
    "flag": True,
    "missing": None,
    "items": [1, "two", False],
    "options": {"deep": None, "on": True, "n": 2},
}
PARALLEL_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    },
    {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": PARALLEL_ARGS}},
]
PARALLEL_TEXT = (
    '[get_weather(city="Paris"), f(text="say \\"hi\\"", count=3, ratio=0.25, flag=True, '
    'missing=None, items=[1, "two", False], options={"deep": None, "on": True, "n": 2})]'
)


def tools_system(system_text: str, functions: list[dict]) -> str:
    """The expected system turn when tools are given."""
    return (
        f"<|header_start|>system<|header_end|>\n\n{system_text}\n\n"
        "You can call the following functions, listed in JSON format:\n\n"
        f"{json.dumps(functions, indent=4)}{INSTRUCTIONS_TAIL}{EOT}"
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_mm_dir):
    return AutoTokenizer.from_pretrained(tiny_mm_dir)


def render(tokenizer, messages, tools=None, template=TEMPLATE, gen: bool = True) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen
    )


def token_ids(tokenizer, messages, tools=None) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=TEMPLATE,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
    )
    return list(encoded["input_ids"])


def test_builtin_lookup():
    assert BUILTIN == ("llama4_pythonic",)
    assert TEMPLATE is not None and TEMPLATE.startswith("{#-")
    assert builtin_template("no_such_template") is None
    assert builtin_template("../__init__") is None


# ---- plain chat: the same as transformers' built-in Llama 4 template -------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hello!"}],
        [{"role": "user", "content": "Hello!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Bye."},
        ],
    ],
    ids=["system+user", "user", "multi-turn"],
)
def test_plain_chat_matches_transformers(tokenizer, messages):
    ours = render(tokenizer, messages)
    assert ours == render(tokenizer, messages, template=HF_LLAMA4_TEMPLATE)
    assert render(tokenizer, messages, gen=False) == render(
        tokenizer, messages, template=HF_LLAMA4_TEMPLATE, gen=False
    )


def test_plain_chat_exact(tokenizer):
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]
    assert render(tokenizer, messages) == (
        f"{BOS}<|header_start|>system<|header_end|>\n\nBe brief.{EOT}"
        f"<|header_start|>user<|header_end|>\n\nHi{EOT}{GEN}"
    )
    assert render(tokenizer, messages[1:], gen=False) == (
        f"{BOS}<|header_start|>user<|header_end|>\n\nHi{EOT}"
    )


def test_text_and_image_parts(tokenizer):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is this? "},
                {"type": "image"},
                {"type": "text", "text": "And this?"},
            ],
        }
    ]
    expected = (
        f"{BOS}<|header_start|>user<|header_end|>\n\n"
        f"<|image|>What is this? <|image|>And this?{EOT}{GEN}"
    )
    assert render(tokenizer, messages) == expected
    assert render(tokenizer, messages, template=HF_LLAMA4_TEMPLATE) == expected
    ids = token_ids(tokenizer, messages)
    assert ids.count(200090) == 2
    assert ids[0] == 200000 and ids.count(200000) == 1


# ---- tools in the system turn ---------------------------------------------------------------


def test_tools_without_system_message(tokenizer):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    text = render(tokenizer, messages, tools=TOOLS)
    assert text == (
        BOS
        + tools_system(DEFAULT_SYSTEM, [WEATHER, SEARCH])
        + f"<|header_start|>user<|header_end|>\n\nWeather in Paris?{EOT}{GEN}"
    )
    system_turn = text.split(EOT)[0]
    assert json.dumps([WEATHER, SEARCH], indent=4) in system_turn
    assert FORMAT_LINE in system_turn
    assert "no other text" in system_turn and "answer normally" in system_turn


def test_tools_with_system_message(tokenizer):
    messages = [
        {"role": "system", "content": "  You are a weather bot.\n"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    text = render(tokenizer, messages, tools=TOOLS)
    assert text == (
        BOS
        + tools_system("You are a weather bot.", [WEATHER, SEARCH])
        + f"<|header_start|>user<|header_end|>\n\nWeather in Paris?{EOT}{GEN}"
    )
    assert DEFAULT_SYSTEM not in text
    # The user's system text comes first, the instructions after it.
    system_turn = text.split(EOT)[0]
    assert system_turn.index("You are a weather bot.") < system_turn.index(FORMAT_LINE)


def test_bare_function_dicts_and_empty_tools(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    assert render(tokenizer, messages, tools=[WEATHER, SEARCH]) == render(
        tokenizer, messages, tools=TOOLS
    )
    assert render(tokenizer, messages, tools=[]) == render(tokenizer, messages)


# ---- past tool calls and tool results -------------------------------------------------------


def test_parallel_tool_calls_history(tokenizer):
    messages = [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": None, "tool_calls": PARALLEL_CALLS},
    ]
    text = render(tokenizer, messages, gen=False)
    assert text == (
        f"{BOS}<|header_start|>user<|header_end|>\n\nGo.{EOT}"
        f"<|header_start|>assistant<|header_end|>\n\n{PARALLEL_TEXT}{EOT}"
    )
    # The calls are valid Python, and their literals give back the arguments.
    weather, f = ast.parse(PARALLEL_TEXT, mode="eval").body.elts
    assert (weather.func.id, f.func.id) == ("get_weather", "f")
    assert {kw.arg: ast.literal_eval(kw.value) for kw in f.keywords} == PARALLEL_ARGS


def test_tool_call_variants(tokenizer):
    def assistant(**message: Any) -> str:
        messages = [{"role": "assistant", **message}]
        text = render(tokenizer, messages, gen=False)
        prefix = f"{BOS}<|header_start|>assistant<|header_end|>\n\n"
        assert text.startswith(prefix) and text.endswith(EOT)
        return text[len(prefix) : -len(EOT)]

    call = {"id": "c", "type": "function", "function": {"name": "now", "arguments": {}}}
    # Content before the calls is kept, glued to the list; a missing content key is fine.
    assert assistant(content="Checking.", tool_calls=[call]) == "Checking.[now()]"
    assert assistant(tool_calls=[call]) == "[now()]"
    # An empty tool_calls list is a plain message.
    assert assistant(content="Hello.", tool_calls=[]) == "Hello."
    # Bare {name, arguments} calls; string arguments: "" and "{}" are empty, others verbatim.
    assert assistant(content=None, tool_calls=[{"name": "now", "arguments": {}}]) == "[now()]"
    for arguments, inside in [("", ""), ("{}", ""), ('city="Paris"', 'city="Paris"')]:
        bare = {"function": {"name": "w", "arguments": arguments}}
        assert assistant(content=None, tool_calls=[bare]) == f"[w({inside})]"
    with pytest.raises(Exception, match="must be a mapping"):
        bad = {"function": {"name": "w", "arguments": '{"city": "Paris"}'}}
        assistant(content=None, tool_calls=[bad])


def test_tool_results_as_ipython(tokenizer):
    messages = [
        {"role": "tool", "tool_call_id": "call_1", "content": 'Sunny, "22" C'},
        {"role": "tool", "tool_call_id": "call_2", "content": {"temp": 22, "ok": True}},
        {"role": "ipython", "content": [1, 2]},
        {
            "role": "tool",
            "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}],
        },
    ]
    assert render(tokenizer, messages, gen=False) == (
        f'{BOS}<|header_start|>ipython<|header_end|>\n\nSunny, "22" C{EOT}'
        f'<|header_start|>ipython<|header_end|>\n\n{{"temp": 22, "ok": true}}{EOT}'
        f"<|header_start|>ipython<|header_end|>\n\n[1, 2]{EOT}"
        f"<|header_start|>ipython<|header_end|>\n\npart one, two{EOT}"
    )


def test_full_round_trip(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 22 C"},
    ]
    text = render(tokenizer, messages, tools=TOOLS)
    assert text == (
        BOS
        + tools_system(DEFAULT_SYSTEM, [WEATHER, SEARCH])
        + f"<|header_start|>user<|header_end|>\n\nWeather in Paris?{EOT}"
        + f'<|header_start|>assistant<|header_end|>\n\n[get_weather(city="Paris")]{EOT}'
        + f"<|header_start|>ipython<|header_end|>\n\nSunny, 22 C{EOT}"
        + GEN
    )
    ids = token_ids(tokenizer, messages, tools=TOOLS)
    assert ids[0] == 200000 and ids.count(200000) == 1
    assert ids.count(200005) == ids.count(200006) == 5  # system, user, assistant, ipython, gen
    assert ids.count(200008) == 4
    generation_prompt = tokenizer.encode(GEN, add_special_tokens=False)
    assert generation_prompt[0] == 200005 and 200006 in generation_prompt
    assert ids[-len(generation_prompt) :] == generation_prompt
