"""Prompt logprobs (SamplingParams.prompt_logprobs): each prompt token's logprob and the top ones
equal transformers' log_softmax of the full-prompt forward, whatever the chunking, prefix-cache
hits or the rest of the batch; requests that do not ask get exactly what they got before.

Tiny random Llama 4 (chunk-local attention with chunk 8, MoE), fp32 on the CPU; tolerance: 1e-4
absolute on every logprob.
"""

from __future__ import annotations

import anyio
import pytest
import torch
from transformers import AutoTokenizer

from pyllama4 import Engine, SamplingParams
from pyllama4.config import TextConfig
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner
from tiny_models import tiny_engine_model

VOCAB = 49152
CONTEXT = 160
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_engine_model(VOCAB)


def make_engine(hf_model, tokenizer, **runner) -> Engine:
    model = Llama4ForCausalLM(TextConfig.from_dict(hf_model.config.to_dict()))
    model.load_state_dict(hf_model.state_dict(), strict=False)
    options = {"kv_tokens": 4096, "page_size": 4, "max_step_tokens": 256, **runner}
    return Engine(ModelRunner(model.eval(), context_len=CONTEXT, **options), tokenizer)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, VOCAB, (n,), generator=g).tolist()


def reference(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax [len, vocab] of the full prompt's logits, float32."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check(entries, ids: list[int], ref: torch.Tensor, start: int, k: int) -> None:
    assert entries is not None and len(entries) == len(ids) - start
    for i, entry in enumerate(entries):
        p = start + i
        if p == 0:
            assert entry is None
            continue
        row = ref[p - 1]
        assert entry.token_id == ids[p]
        assert abs(entry.logprob - row[ids[p]].item()) <= TOL, p
        values, top_ids = row.topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist(), p
        for (_, lp), v in zip(entry.top, values.tolist(), strict=True):
            assert abs(lp - v) <= TOL


@pytest.mark.parametrize("step_tokens", [256, 16])  # one chunk; a 40-token prompt in 3 chunks
def test_prompt_logprobs_equal_transformers(hf_model, tokenizer, step_tokens):
    engine = make_engine(hf_model, tokenizer, max_step_tokens=step_tokens)
    ids = prompt(40, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=5)
    [out] = engine.generate([ids], params)
    check(out.prompt_logprobs, ids, reference(hf_model, ids), start=0, k=5)


def test_prefix_cache_hit_still_scores_every_position(hf_model, tokenizer):
    engine = make_engine(hf_model, tokenizer, max_step_tokens=16)
    ids = prompt(37, seed=2)
    ref = reference(hf_model, ids)
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    scored = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    [first] = engine.generate([ids], plain)
    [hit] = engine.generate([ids], plain)
    assert hit.cached_tokens > 0 and hit.prompt_logprobs is None  # the cache holds the prompt
    [again] = engine.generate([ids], scored)
    assert again.cached_tokens == 0
    check(again.prompt_logprobs, ids, ref, start=0, k=1)
    late = SamplingParams(
        temperature=0.0, max_tokens=2, prompt_logprobs=0, prompt_logprobs_start=21
    )
    [tail] = engine.generate([ids], late)
    assert 0 < tail.cached_tokens <= 20  # matched up to the position that scores token 21
    check(tail.prompt_logprobs, ids, ref, start=21, k=0)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == tail.outputs[0].token_ids


def test_mixed_batch(hf_model, tokenizer):
    """Requests that ask (with different starts and k) beside requests that do not, in chunks:
    the tokens of every request are those of a batch where nobody asks."""
    engine = make_engine(hf_model, tokenizer, max_step_tokens=24)
    prompts = [prompt(n, seed=10 + n) for n in (30, 5, 44, 12, 1)]
    asks = [(0, 3), None, (7, 2), None, (0, 0)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        if a is None
        else SamplingParams(
            temperature=0.0,
            max_tokens=4,
            ignore_eos=True,
            prompt_logprobs=a[1],
            prompt_logprobs_start=a[0],
        )
        for a in asks
    ]
    outs = engine.generate(prompts, params)
    plain = make_engine(hf_model, tokenizer, max_step_tokens=24).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    )
    for ids, a, out, base in zip(prompts, asks, outs, plain, strict=True):
        assert out.outputs[0].token_ids == base.outputs[0].token_ids
        if a is None:
            assert out.prompt_logprobs is None
        else:
            check(out.prompt_logprobs, ids, reference(hf_model, ids), start=a[0], k=a[1])


def test_every_output_carries_them_complete(hf_model, tokenizer):
    engine = make_engine(hf_model, tokenizer, max_step_tokens=16)
    ids = prompt(30, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=0, n=2)

    async def stream():
        async with engine:
            return [out async for out in engine.submit(ids, params)]

    outs = anyio.run(stream)
    assert len(outs) >= 2
    for out in outs:
        check(out.prompt_logprobs, ids, reference(hf_model, ids), start=0, k=0)


def test_bad_prompt_logprobs_are_refused(hf_model, tokenizer):
    engine = make_engine(hf_model, tokenizer)
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        engine.submit([5, 6, 7], SamplingParams(prompt_logprobs=1, prompt_logprobs_start=3))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=-1)


def test_logits_in_blocks(hf_model, tokenizer, monkeypatch):
    """Scored rows beyond a block of logits go to the reduction block by block."""
    monkeypatch.setattr("pyllama4.runner.LOGIT_BLOCK_ROWS", 7)
    engine = make_engine(hf_model, tokenizer, max_step_tokens=24)
    prompts = [prompt(n, seed=20 + n) for n in (40, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    for ids, out in zip(prompts, engine.generate(prompts, params), strict=True):
        check(out.prompt_logprobs, ids, reference(hf_model, ids), start=0, k=2)


def test_tensor_parallel_ranks_score_the_same(tmp_path, demo_dir, hf_model):
    """tp 2 (rank 1 a worker process): the worker computes the same logit rows as rank 0."""
    hf_model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(demo_dir).save_pretrained(tmp_path)
    ids = prompt(30, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    options = dict(dtype=torch.float32, kv_tokens=1024, page_size=4, max_step_tokens=8)
    two = Engine.from_checkpoint(tmp_path, progress=False, tp=2, **options)
    try:
        [out] = two.generate([ids], params)
    finally:
        two.close()
        torch.distributed.destroy_process_group()  # rank 0's, here: later tests start their own
    check(out.prompt_logprobs, ids, reference(hf_model, ids), start=0, k=3)


def test_retraction_does_not_score_twice(hf_model, tokenizer):
    """A KV pool too small for the batch retracts requests mid-way: their prompts are computed
    again, their prompt logprobs stay those of the first computation, one per position."""
    engine = make_engine(hf_model, tokenizer, kv_tokens=CONTEXT, max_step_tokens=32)
    prompts = [prompt(20 + 3 * i, seed=30 + i) for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    outs = engine.generate(prompts, params)
    assert engine.stats().num_retractions > 0
    for ids, out in zip(prompts, outs, strict=True):
        check(out.prompt_logprobs, ids, reference(hf_model, ids), start=0, k=1)


def test_speculative_decoding_refuses_prompt_logprobs():
    from pyllama4.engine.intake import check_prompt_logprobs

    with pytest.raises(ValueError, match="^prompt_logprobs: not supported with speculative"):
        check_prompt_logprobs(SamplingParams(prompt_logprobs=0), 5, speculative=True)
    check_prompt_logprobs(SamplingParams(), 5, speculative=True)
