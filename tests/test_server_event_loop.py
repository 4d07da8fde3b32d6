"""The event loop stays free: /health answers while the server takes in heavy requests (a 50 MB
chat message, a 1 MB stop string), a text too long for the context is refused at once, and stop
strings have limits (400s naming "stop"). Live tests run the demo model's server; the rest check
the size bound and the off-loop tokenizer against transformers' tokenizer."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from pyllama4.sampling_params import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    OPENAI_MAX_STOP_STRINGS,
    SamplingParams,
)
from pyllama4.server.asgi import HTTPError
from pyllama4.server.tokenizing import TextCodec, max_chars_per_token

MODEL = "demo"
CHAT = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
# The acceptance is /health within 100 ms on a 2-core machine; asserted with a wide margin.
HEALTH_BOUND_S = 2.0

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    live = launch_server(tmp_path_factory.mktemp("server") / "server.log")
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def tok(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def health_during(base: str, path: str, body: dict[str, Any]) -> tuple[list[float], Any]:
    """/health latencies (s) while `body` is posted to `path`, and the heavy response."""
    result: dict[str, Any] = {}
    # Encoded before the /health calls start: encoding 50 MB holds this process's GIL, which
    # would stall the /health thread here, not the server.
    payload = json.dumps(body).encode()

    def heavy() -> None:
        try:
            result["response"] = httpx.post(base + path, content=payload, headers=JSON, timeout=300)
        except httpx.HTTPError as e:
            result["response"] = e

    thread = threading.Thread(target=heavy)
    thread.start()
    latencies = []
    with httpx.Client(timeout=30) as client:
        while thread.is_alive():
            start = time.perf_counter()
            assert client.get(base + "/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    thread.join()
    ms = [x * 1000 for x in latencies]
    if ms:
        median, worst = statistics.median(ms), max(ms)
        print(f"{path}: /health n={len(ms)} median {median:.1f} ms, max {worst:.1f} ms")
    return latencies, result["response"]


def assert_error(r: httpx.Response, status: int, param: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"]
    return error


# ---- live ------------------------------------------------------------------------------------


def test_health_answers_during_a_50mb_chat_message(server):
    content = "hello world " * ((50 << 20) // 12)
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    latencies, r = health_during(server, "/v1/chat/completions", body)
    assert_error(r, 400, "messages")
    assert max(latencies, default=0) < HEALTH_BOUND_S


def test_health_answers_during_a_1mb_stop_string(server):
    body = {**CHAT, "n": 4, "stop": ["x" * (1 << 20)]}
    latencies, r = health_during(server, "/v1/chat/completions", body)
    assert "characters" in assert_error(r, 400, "stop")["message"]
    assert max(latencies, default=0) < HEALTH_BOUND_S


@pytest.mark.parametrize(
    ("path", "field", "param"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x"}, "prompt"),
        ("/generate", {"text": "x"}, "text"),
        ("/tokenize", {"prompt": "x"}, "prompt"),
    ],
)
def test_a_text_too_long_for_the_context_is_refused_at_once(server, path, field, param):
    """20 MB of text cannot be 1024 tokens: a 400 before tokenizing (which takes minutes here)."""
    body = {key: (v * (20 << 20) if v == "x" else v) for key, v in field.items()}
    start = time.perf_counter()
    r = httpx.post(server + path, json=body, timeout=300)
    elapsed = time.perf_counter() - start
    assert "context length" in assert_error(r, 400, param)["message"]
    assert elapsed < 60, elapsed  # tokenizing it would take minutes on this machine


def test_a_text_under_the_bound_but_over_the_context_is_refused(server):
    r = httpx.post(server + "/tokenize", json={"prompt": "hello " * 5000}, timeout=60)
    assert "over the context length 1024" in assert_error(r, 400, "prompt")["message"]


def test_stop_limits(server):
    chat, generate = server + "/v1/chat/completions", server + "/generate"
    many = [f"s{i}" for i in range(OPENAI_MAX_STOP_STRINGS + 1)]
    assert_error(httpx.post(chat, json={**CHAT, "stop": many}), 400, "stop")
    completions = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "stop": many}
    assert_error(httpx.post(server + "/v1/completions", json=completions), 400, "stop")
    long = "y" * (MAX_STOP_CHARS + 1)
    assert_error(httpx.post(chat, json={**CHAT, "stop": long}), 400, "stop")
    ok = httpx.post(chat, json={**CHAT, "stop": ["z" * MAX_STOP_CHARS] * 2 + ["a", "b"]})
    assert ok.status_code == 200, ok.text
    sp = {"max_new_tokens": 1, "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}
    assert_error(httpx.post(generate, json={"text": "hi", "sampling_params": sp}), 400, "stop")
    sp["stop"] = sp["stop"][:MAX_STOP_STRINGS]
    assert httpx.post(generate, json={"text": "hi", "sampling_params": sp}).status_code == 200


def test_offloaded_routes_still_tokenize_as_before(server, tok):
    text = "<|im_start|>user\nHello   world 12345 ünïcödé 日本語<|im_end|>"
    for special in (True, False):
        body = {"prompt": text, "add_special_tokens": special}
        got = httpx.post(server + "/tokenize", json=body).json()["tokens"]
        assert got == tok(text, add_special_tokens=special)["input_ids"]
    back = httpx.post(server + "/detokenize", json={"tokens": got}).json()["text"]
    assert back == tok.decode(got)
    bad = httpx.post(server + "/detokenize", json={"tokens": [10**9]})
    assert_error(bad, 400, "tokens")
    r = httpx.post(
        server + "/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1}
    )
    assert r.json()["usage"]["prompt_tokens"] == len(tok(text)["input_ids"])


# ---- the size bound and the tokenizer ----------------------------------------------------------


def test_the_size_bound_is_sound_on_the_demo_tokenizer(tok):
    """No text has fewer tokens than characters / bound (worst cases: the longest tokens)."""
    bound = max_chars_per_token(tok.backend_tokenizer)
    assert bound is not None and bound >= 16
    longest = sorted(tok.get_vocab(), key=len)[-50:]
    rng = random.Random(0)
    texts = [tok.convert_tokens_to_string([t]) * 20 for t in longest]
    texts += ["<|im_end|>" * 50, " " * 5000, "\n" * 5000, "a" * 5000]
    texts += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(2000)) for _ in range(5)]
    for text in texts:
        assert len(tok(text, add_special_tokens=False)["input_ids"]) * bound >= len(text)


def test_no_bound_for_a_tokenizer_that_can_drop_text():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace: no tokens for "   "
    assert max_chars_per_token(t) is None
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert max_chars_per_token(t) is not None
    t.normalizer = normalizers.NFKC()
    assert max_chars_per_token(t) is None


def test_text_codec_refuses_by_length_without_tokenizing(tok):
    codec = TextCodec(tok, limit=10)
    codec.check_size("x" * (10 * codec.chars_per_token), "prompt")
    with pytest.raises(HTTPError) as e:
        codec.check_size("x" * (10 * codec.chars_per_token + 1), "prompt")
    assert e.value.status == 400 and e.value.param == "prompt"


def test_stop_limits_in_sampling_params():
    SamplingParams(stop=["s"] * (MAX_STOP_STRINGS - 1) + ["y" * MAX_STOP_CHARS])
    for stop in (["s"] * (MAX_STOP_STRINGS + 1), ["y" * (MAX_STOP_CHARS + 1)], [""]):
        with pytest.raises(ValueError, match="^stop: "):
            SamplingParams(stop=stop)
