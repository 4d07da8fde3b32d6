"""/v1/completions with batched prompts and echo, as lm-evaluation-harness' `local-completions`
model sends them: loglikelihood requests (a batch of token-id lists, echo, max_tokens 1,
logprobs 1, temperature 0, seed) parsed as lm-eval parses them equal transformers' loglikelihoods.

The demo server runs float32 on the CPU; the reference is transformers reading the demo GGUF in
float32. Tolerance: 1e-3 absolute per token logprob (and per summed continuation).
"""

from __future__ import annotations

import json
from operator import itemgetter

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

MODEL = "demo"
TOL = 1e-3


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    live = launch_server(log, "--chunked-prefill-size", "16")  # prompts span several chunks
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token ids, as lm-eval encodes them."""
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " a large fish"),
        ("One, two, three, four, five, six, seven, eight, nine,", " ten"),
        ("Water boils at one hundred degrees", " Celsius at sea level."),
    ]
    return [(tokenizer.encode(c), tokenizer.encode(x)) for c, x in pairs]


def parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm_eval.models.openai_completions.LocalCompletionsAPI.parse_logprobs."""
    res = []
    for choice, ctxlen in zip(
        sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=True
    ):
        tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(
            tok == max(top.values()) for tok, top in zip(tokens_logprobs, top_logprobs, strict=True)
        )
        res.append((sum(tokens_logprobs), is_greedy))
    return res


def reference(hf_gguf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_gguf_model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_lm_eval_loglikelihood_requests_equal_transformers(server, tokenizer, hf_gguf_model):
    pairs = requests(tokenizer)
    payload = {
        "model": MODEL,
        "prompt": [c + x for c, x in pairs],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    out = httpx.post(server + "/v1/completions", json=payload, timeout=300).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == sum(len(c + x) for c, x in pairs)
    assert out["usage"]["completion_tokens"] == 4
    got = parse_logprobs(out, [len(c) for c, _ in pairs])
    for (context, cont), choice, (ll, greedy) in zip(pairs, out["choices"], got, strict=True):
        ids = context + cont
        ref = reference(hf_gguf_model, ids)
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(ids) + 1 and lps[0] is None
        assert choice["logprobs"]["top_logprobs"][0] is None
        for p in range(1, len(ids)):
            assert abs(lps[p] - ref[p - 1, ids[p]].item()) <= TOL, p
        want = sum(ref[p - 1, ids[p]].item() for p in range(len(context), len(ids)))
        assert abs(ll - want) <= TOL
        want_greedy = all(
            ref[p - 1].argmax().item() == ids[p] for p in range(len(context), len(ids))
        )
        assert greedy == want_greedy
        assert choice["text"].startswith(tokenizer.decode(ids))
        offsets = choice["logprobs"]["text_offset"]
        assert offsets[0] == 0 and all(
            b - a == len(t)
            for a, b, t in zip(offsets, offsets[1:], choice["logprobs"]["tokens"], strict=False)
        )


def test_score_only_with_max_tokens_0(server, tokenizer, hf_gguf_model):
    ids = tokenizer.encode("The capital of France is Paris")
    r = httpx.post(
        server + "/v1/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0},
        timeout=300,
    ).json()
    [choice] = r["choices"]
    assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
    assert r["usage"]["completion_tokens"] == 0
    ref = reference(hf_gguf_model, ids)
    assert abs(choice["logprobs"]["token_logprobs"][-1] - ref[-2, ids[-1]].item()) <= TOL
    bad = httpx.post(
        server + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_generate_until_batch_of_strings(client):
    """lm-eval's generate_until: a batch of strings, greedy, stop strings, seed; choices are
    prompt-major (index = i * n + j) and each equals the prompt sent alone."""
    prompts = ["The capital of France is", "1, 2, 3,", "Hello"]
    common = dict(model=MODEL, max_tokens=8, temperature=0, stop=["\n\n"], seed=1234)
    batch = client.completions.create(prompt=prompts, n=2, **common)
    assert [c.index for c in batch.choices] == list(range(6))
    alone = [client.completions.create(prompt=p, **common).choices[0].text for p in prompts]
    assert [c.text for c in batch.choices] == [t for t in alone for _ in range(2)]
    single = [client.completions.create(prompt=p, **common).usage for p in prompts]
    assert batch.usage.prompt_tokens == sum(u.prompt_tokens for u in single)


def test_streamed_echo_equals_the_whole_response(server):
    payload = {
        "model": MODEL,
        "prompt": ["Once upon a time", "The sky is"],
        "max_tokens": 5,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    offsets: dict[int, list[int]] = {}
    usage = None
    with httpx.stream("POST", server + "/v1/completions", json=payload, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                tokens.setdefault(c["index"], []).extend(c["logprobs"]["tokens"])
                offsets.setdefault(c["index"], []).extend(c["logprobs"]["text_offset"])
    whole = httpx.post(
        server + "/v1/completions", json={**payload, "stream": False}, timeout=300
    ).json()
    assert sorted(texts) == [0, 1, 2, 3]
    for c in whole["choices"]:
        assert texts[c["index"]] == c["text"]
        assert tokens[c["index"]] == c["logprobs"]["tokens"]
        assert offsets[c["index"]] == c["logprobs"]["text_offset"]
    assert usage == whole["usage"] | {"prompt_tokens_details": usage["prompt_tokens_details"]}


@pytest.mark.parametrize(
    "prompt",
    [[], [[]], ["a", [1, 2]], [1, "a"], [[1], 2]],
    ids=["empty", "empty-ids", "mixed-lists", "mixed-ids", "mixed-nested"],
)
def test_malformed_batches_are_400s(server, prompt):
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")


def test_a_batch_too_big_is_a_400(server):
    r = httpx.post(
        server + "/v1/completions",
        json={"model": MODEL, "prompt": ["a"] * 1025, "n": 2, "max_tokens": 1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "2048" in r.json()["error"]["message"]
