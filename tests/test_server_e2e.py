"""End to end: `python -m pyllama4.launch_server` on the demo model, on 127.0.0.1, driven by the
official openai client and raw HTTP for the error cases; with --tp 1 and --tp 3."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyllama4.server.asgi import MAX_BODY_BYTES
from server_checks import assert_idle, metric

MODEL = "demo"


@pytest.fixture(scope="module", params=[1, 3], ids=["tp1", "tp3"])
def server(launch_server, tmp_path_factory, request):
    """The demo model on one process, and sharded over 3 (its 9 heads and 3 KV heads split
    in 3; tensor parallelism over gloo on the CPU): every test here runs against both."""
    flags = ("--tp", str(request.param)) if request.param > 1 else ()
    live = launch_server(tmp_path_factory.mktemp("server") / "server.log", *flags)
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_answers_a_factual_question(client, server):
    r = client.chat.completions.create(
        model=MODEL, messages=ask("What is the capital of France?"), temperature=0, max_tokens=24
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming_with_usage(client):
    kwargs = dict(
        model=MODEL, messages=ask("Write a haiku about rain."), temperature=0, max_tokens=20
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completions_streaming_and_not(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    full = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices
    )
    assert streamed == full and full


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_stream_of_n_completions_ends_each_once(client, route):
    """n=2 streamed: the second completion starts a step after the first (once the prompt is
    cached), so the first ends a step earlier; each index carries one finish_reason."""
    kwargs = dict(model=MODEL, n=2, max_tokens=5, temperature=0, stream=True)
    kwargs["extra_body"] = {"ignore_eos": True}
    if route == "chat":
        chunks = client.chat.completions.create(messages=ask("Count to ten."), **kwargs)
    else:
        chunks = client.completions.create(prompt="One, two,", **kwargs)
    reasons: dict[int, list[str]] = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                reasons[choice.index].append(choice.finish_reason)
    assert reasons == {0: ["length"], 1: ["length"]}


def test_n_logprobs_stop_and_seed(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("Name a colour."),
        n=2,
        temperature=1.0,
        seed=3,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
        assert all(t.logprob <= 0 for t in c.logprobs.content)
    again = client.chat.completions.create(
        model=MODEL,
        messages=ask("Name a colour."),
        n=2,
        temperature=1.0,
        seed=3,
        max_tokens=8,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    full = client.completions.create(model=MODEL, prompt="1, 2, 3,", temperature=0, max_tokens=12)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", temperature=0, max_tokens=12, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_repeated_prefix_reports_cached_tokens(client):
    long = "Here is a long shared context about the history of bread. " * 8
    for _ in range(2):
        r = client.chat.completions.create(
            model=MODEL, messages=ask(long + "Summarise."), temperature=0, max_tokens=4
        )
    assert r.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"model": "demo", "messages": "hi"}', 400, "messages"),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], '
            b'"temperature": -1}',
            400,
            "temperature",
        ),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "top_p": 2}',
            400,
            "top_p",
        ),
        (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 0}', 400, "n"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404, "nope"),
        (b'{"model": "demo"}', 400, "messages"),
        (b'{"model": "demo", "messages": []}', 400, "messages"),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            400,
            "content part",
        ),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], '
            b'"max_tokens": 5000}',
            400,
            "1024",
        ),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, words):
    r = httpx.post(
        server + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    error = r.json()["error"]
    assert words in error["message"] and error["type"] and error["code"] == status


def test_oversized_and_overlong_requests_then_the_server_still_works(server, client):
    r = httpx.post(server + "/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1))
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(
        server + "/v1/completions", json={"model": MODEL, "prompt": "word " * 2000, "max_tokens": 4}
    )
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert ok.choices[0].text is not None
    assert_idle(server)


def test_clients_that_drop_mid_stream_free_everything(server, client):
    async def drop_one() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            body = {
                "model": MODEL,
                "prompt": "Once upon a time",
                "max_tokens": 200,
                "stream": True,
                "ignore_eos": True,
            }
            async with http.stream("POST", server + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"text"' in line:
                        return  # leave after the first token: the connection closes

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(drop_one)

    anyio.run(main)
    assert_idle(server)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices


def test_models_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert metric(server, "pyllama4_generation_tokens_total") > 0


def test_native_generate_matches_completions(server, client):
    prompt = "The three primary colours are"
    ref = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10)
    body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 10}}
    out = httpx.post(server + "/generate", json=body, timeout=60).json()
    assert out["text"] == ref.choices[0].text
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) == 10
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    streamed = []
    with httpx.stream("POST", server + "/generate", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed.append(json.loads(line[6:])["text"])
    assert streamed[-1] == out["text"]  # cumulative text
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False))


def test_tokenize_detokenize_and_openapi(server):
    toks = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()
    assert toks["count"] == len(toks["tokens"]) > 0
    text = httpx.post(server + "/detokenize", json={"tokens": toks["tokens"]}).json()["text"]
    assert text == "Hello world"
    doc = httpx.get(server + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/generate"} <= set(doc["paths"])
    assert "ChatCompletionRequest" in doc["components"]["schemas"]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
CHAT_FIELDS = [
    "model",
    "messages",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "stream",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "ignore_eos",
    "frequency_penalty",
    "presence_penalty",
    "stream_options",
    "chat_template_kwargs",
    "max_tokens",
]


@st.composite
def fuzzed_bodies(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/generate"]))
    body: dict = {"model": MODEL, "max_tokens": 2}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif path == "/v1/completions":
        body["prompt"] = "hi"
    else:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    for field in draw(st.lists(st.sampled_from(CHAT_FIELDS), max_size=3, unique=True)):
        if field != "max_tokens":  # keep generations short: the fuzz is about parsing
            body[field] = draw(JSON_VALUES)
    if draw(st.booleans()):
        body["n"] = draw(st.integers(-2, 3))
    if draw(st.integers(0, 9)) == 0:
        return path, draw(st.binary(max_size=64))
    return path, json.dumps(body).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=fuzzed_bodies())
def test_fuzzed_requests_never_get_a_5xx(server, request):
    path, body = request
    r = httpx.post(
        server + path, content=body, timeout=60, headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["code"] == r.status_code and error["message"]


def test_the_server_is_idle_after_the_fuzz(server):
    assert_idle(server)


def test_api_key_is_required_when_set(launch_server, tmp_path):
    live = launch_server(tmp_path / "server.log", "--api-key", "sekret")
    base = live.base
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        for headers in ({}, {"authorization": "Bearer wrong"}):
            r = httpx.post(base + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        assert client.completions.create(**body).choices
    finally:
        live.stop()


def test_a_full_queue_answers_503_with_retry_after(launch_server, tmp_path):
    """With one request running and one waiting (--max-running-requests 1,
    --max-queued-requests 1), every further request is refused at once with 503 and
    Retry-After, and the two accepted ones stream on untouched; their clients leaving frees
    everything. No deadline on generation: the running request asks for 1000 tokens, far more
    than it can make while the test sends four requests, and is cancelled, not awaited."""
    args = ("--max-running-requests", "1", "--max-queued-requests", "1")
    live = launch_server(tmp_path / "server.log", *args)
    base = live.base
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 1000, "ignore_eos": True}
    stream = {**body, "stream": True}

    def tokens(lines):  # the next SSE data line of a stream
        return next(line for line in lines if line.startswith("data: "))

    def queued(n: int) -> bool:
        deadline = time.monotonic() + 60
        while metric(base, "pyllama4_num_queue_reqs") != n and time.monotonic() < deadline:
            time.sleep(0.05)
        return metric(base, "pyllama4_num_queue_reqs") == n

    try:
        with httpx.Client(base_url=base, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json=stream) as running:
                assert running.status_code == 200
                running_lines = running.iter_lines()
                tokens(running_lines)  # it runs
                with http.stream("POST", "/v1/completions", json=stream) as waiting:
                    assert waiting.status_code == 200
                    assert queued(1)
                    for _ in range(4):
                        r = http.post("/v1/completions", json=body)
                        assert r.status_code == 503, r.text
                        assert r.headers["retry-after"] and r.json()["error"]["code"] == 503
                    assert metric(base, "pyllama4_num_running_reqs") == 1 and queued(1)
                    tokens(running_lines)  # still streaming
        assert_idle(base)  # both clients left: both aborted, every page back
    finally:
        live.stop()
