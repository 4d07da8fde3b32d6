"""pyllama4.Engine: batching, prefix reuse, chunked prefill, retraction and sampling change
timing only, never tokens; streaming, stops and aborts behave; nothing leaks.

Tiny random Llama 4 models (Scout-like: chunk 8, QK-norm, llama3 RoPE, MoE everywhere) with the
demo model's real tokenizer (vocab 49152), fp32 on the CPU.
"""

from __future__ import annotations

import time

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


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def weights():
    hf = tiny_engine_model(VOCAB)
    return TextConfig.from_dict(hf.config.to_dict()), hf.state_dict()


def make_engine(
    weights, tokenizer, overlap: bool = True, enable_prefix_cache: bool = True, **runner
) -> Engine:
    config, state = weights
    model = Llama4ForCausalLM(config)
    model.load_state_dict(state, strict=False)
    options = {"kv_tokens": 4096, "page_size": 4, "max_step_tokens": 256, **runner}
    runner = ModelRunner(model.eval(), context_len=CONTEXT, **options)
    scheduler = runner.new_scheduler(enable_prefix_cache=enable_prefix_cache)
    return Engine(runner, tokenizer, scheduler=scheduler, overlap=overlap)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (count,), generator=g).tolist()
    return [torch.randint(100, VOCAB, (n,), generator=g).tolist() for n in lengths]


def assert_nothing_held(engine: Engine) -> None:
    s = engine.scheduler.stats()
    assert s.num_running == s.num_waiting == 0
    assert s.global_total - s.global_free == s.global_cached, "requests still hold global pages"
    assert s.local_total - s.local_free == s.local_cached, "requests still hold local pages"
    assert engine.scheduler.check() == ""


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_invariance(weights, tokenizer):
    engine = make_engine(weights, tokenizer)
    batch = prompts(32)
    together = tokens_of(engine.generate(batch, GREEDY))
    alone = [tokens_of(engine.generate([p], GREEDY))[0] for p in batch]
    assert together == alone
    assert all(len(t) == 12 for t in together)
    assert_nothing_held(engine)


def test_prefix_reuse_reports_cached_tokens_and_changes_nothing(weights, tokenizer):
    shared = prompts(1, seed=1)[0][:5] + list(range(200, 247))  # 52 tokens: six chunks of 8
    second = shared + [300, 301, 302]
    cached = make_engine(weights, tokenizer)
    first_out = cached.generate([shared], GREEDY)[0]
    second_out = cached.generate([second], GREEDY)[0]
    assert second_out.cached_tokens >= 48, "the shared prefix (whole chunks) was not reused"
    uncached = make_engine(weights, tokenizer, enable_prefix_cache=False)
    ref = uncached.generate([shared, second], GREEDY)
    assert [first_out.outputs[0].token_ids, second_out.outputs[0].token_ids] == tokens_of(ref)
    assert ref[1].cached_tokens == 0
    assert cached.stats().cache_hit_rate > 0
    assert_nothing_held(cached)
    assert_nothing_held(uncached)


@pytest.mark.parametrize("budget", [1, 7, 64])
def test_chunked_prefill_budgets_give_the_same_tokens(weights, tokenizer, budget):
    batch = prompts(6, seed=2)
    ref = tokens_of(make_engine(weights, tokenizer).generate(batch, GREEDY))
    engine = make_engine(weights, tokenizer, max_step_tokens=budget)
    assert tokens_of(engine.generate(batch, GREEDY)) == ref
    assert_nothing_held(engine)


def test_retraction_under_a_tiny_pool_keeps_every_token(weights, tokenizer):
    batch = prompts(12, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = tokens_of(make_engine(weights, tokenizer).generate(batch, params))
    small = make_engine(weights, tokenizer, kv_tokens=CONTEXT, max_step_tokens=32)
    assert tokens_of(small.generate(batch, params)) == ref
    assert small.stats().num_retractions > 0
    assert_nothing_held(small)


def test_seeded_sampling_is_reproducible_alone_or_batched(weights, tokenizer):
    engine = make_engine(weights, tokenizer)
    p = prompts(1, seed=4)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = engine.generate([p], seeded)[0].outputs[0].token_ids
    others = prompts(7, seed=5)
    noise = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = engine.generate(others[:3] + [p] + others[3:], [noise] * 3 + [seeded] + [noise] * 4)
    assert batch[3].outputs[0].token_ids == alone
    other_seeds = [
        engine.generate([p], SamplingParams(temperature=1.0, seed=s, max_tokens=16))[0]
        for s in (1, 2, 3)
    ]
    assert len({tuple(o.outputs[0].token_ids) for o in other_seeds} | {tuple(alone)}) > 1
    assert_nothing_held(engine)


def test_n_completions_share_the_prompt_and_differ(weights, tokenizer):
    engine = make_engine(weights, tokenizer)
    p = prompts(1, seed=6)[0] + list(range(500, 540))
    out = engine.generate(
        [p], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.stats().cached_prompt_tokens > 0, "siblings did not reuse the prompt's KV"
    assert_nothing_held(engine)


def test_stop_strings_spanning_tokens_are_trimmed_and_never_streamed(weights, tokenizer):
    engine = make_engine(weights, tokenizer)
    p = prompts(1, seed=8)[0]
    full = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    text = full[0].outputs[0].text
    # A stop string that straddles a token boundary in the middle of the output.
    ids = full[0].outputs[0].token_ids
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    cut = next(i for i in range(3, len(ids)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    start = len(pieces[cut - 1]) - 1
    stop = text[start : start + 2]
    assert stop and text.index(stop) <= start
    first = text.index(stop)

    async def stream() -> list[str]:
        seen: list[str] = []
        async with engine:
            params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
            async for out in engine.submit(p, params):
                seen.append(out.outputs[0].delta_text)
                final = out
        assert final.outputs[0].finish_reason == "stop"
        assert final.outputs[0].stop_reason == stop
        assert final.outputs[0].text == text[:first]
        return seen

    seen = anyio.run(stream)
    assert "".join(seen) == text[:first]
    assert_nothing_held(engine)


def test_abort_in_flight_ends_the_request_and_frees_its_pages(weights, tokenizer):
    engine = make_engine(weights, tokenizer)

    async def main() -> None:
        async with engine:
            params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
            stream = engine.submit(prompts(1, seed=9)[0], params, request_id="x")
            other = engine.submit(prompts(1, seed=10)[0], GREEDY)
            async for out in stream:
                if out.finished:
                    assert out.outputs[0].finish_reason == "abort"
                    assert len(out.outputs[0].token_ids) < 100
                elif len(out.outputs[0].token_ids) >= 3:
                    assert engine.abort("x")
            finals = [out async for out in other]
            assert finals[-1].outputs[0].finish_reason == "length"
            assert not engine.abort("x")

    anyio.run(main)
    assert_nothing_held(engine)


def test_bad_requests_fail_at_submit_and_disturb_nothing(weights, tokenizer):
    engine = make_engine(weights, tokenizer)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([5, VOCAB], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        engine.submit(list(range(1, CONTEXT + 5)), GREEDY)
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit([5, 6], SamplingParams(logit_bias={VOCAB: 1.0}))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert tokens_of(engine.generate(prompts(2, seed=11), GREEDY))
    assert_nothing_held(engine)


def test_logprobs_and_metrics_are_reported(weights, tokenizer):
    engine = make_engine(weights, tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    out = engine.generate([prompts(1, seed=12)[0]], params)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for entry, token in zip(completion.logprobs, completion.token_ids, strict=True):
        assert entry.token_id == token and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0][0] == token  # greedy: the top token
        assert entry.top[0][1] == pytest.approx(entry.logprob)
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
    m = out.metrics
    assert 0 < m.ttft <= m.e2e and m.mean_itl is not None and m.mean_itl > 0
    stats = engine.stats()
    assert stats.generation_tokens >= 6 and stats.num_steps > 0 and stats.kv_usage >= 0


def test_abort_all_ends_every_request(weights, tokenizer):
    engine = make_engine(weights, tokenizer)

    async def main() -> None:
        async with engine:
            params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
            streams = [engine.submit(p, params) for p in prompts(3, seed=13)]
            first = await streams[0].__anext__()
            assert not first.finished
            assert engine.abort_all() == 3
            for stream in streams:
                finals = [out async for out in stream]
                assert finals[-1].outputs[0].finish_reason == "abort"
            assert engine.abort_all() == 0

    anyio.run(main)
    assert_nothing_held(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_the_core_counts_each_request_under_its_finish_reason(weights, tokenizer, overlap):
    """A stop string ends a request in the core as a stop, not an abort: the core's counters
    match the finish reasons the caller sees, each request counted once."""
    reference = make_engine(weights, tokenizer).generate(
        prompts(1, seed=31), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    )
    text = reference[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the reference text has no usable stop string"
    engine = make_engine(weights, tokenizer, overlap=overlap)
    common = {"temperature": 0.0, "ignore_eos": True}
    params = [
        SamplingParams(max_tokens=20, stop=[stop], **common),  # the stop string
        SamplingParams(max_tokens=5, **common),  # the length limit
        SamplingParams(max_tokens=7, n=2, **common),
    ]
    outputs = engine.generate(prompts(1, seed=31) + prompts(2, seed=32), params)
    reasons = [c.finish_reason for o in outputs for c in o.outputs]
    assert reasons == ["stop", "length", "length", "length"]
    assert outputs[0].outputs[0].stop_reason == stop

    async def abort_one() -> None:
        async with engine:
            params = SamplingParams(max_tokens=100, ignore_eos=True)
            stream = engine.submit(prompts(1, seed=33)[0], params, request_id="gone")
            await stream.__anext__()
            assert engine.abort("gone")
            assert [o async for o in stream][-1].outputs[0].finish_reason == "abort"

    anyio.run(abort_one)
    s = engine.scheduler.stats()
    assert (s.num_finished_stop, s.num_finished_length, s.num_aborted) == (1, 3, 1)
    assert_nothing_held(engine)


def mixed_workload(engine: Engine, stop: list[str]) -> list:
    """Greedy, penalised, min_tokens, seeded, logprobs, n=2 and stop-string requests at once."""
    batch = prompts(8, seed=21)
    common = {"max_tokens": 20, "ignore_eos": True}
    params = [
        SamplingParams(temperature=0.0, **common),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, **common),
        SamplingParams(temperature=0.0, presence_penalty=1.0, min_tokens=5, **common),
        SamplingParams(temperature=0.9, seed=7, **common),
        SamplingParams(temperature=0.0, logprobs=2, **common),
        SamplingParams(temperature=0.8, seed=3, n=2, **common),
        SamplingParams(temperature=0.0, stop=stop, **common),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, stop=stop, **common),
    ]
    return engine.generate(batch, params)


def test_overlap_changes_no_output(weights, tokenizer):
    """The same mixed workload with overlap on (the default) and off: the same tokens, text
    and finish reasons for every completion, logprobs within 1e-5, nothing held afterwards."""
    reference = mixed_workload(make_engine(weights, tokenizer, overlap=False), stop=[])
    text = reference[6].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a stop string from the middle
    assert stop.strip(), "the workload's text has no usable stop string"
    serial = mixed_workload(make_engine(weights, tokenizer, overlap=False), stop=[stop])
    engine = make_engine(weights, tokenizer, overlap=True)
    overlapped = mixed_workload(engine, stop=[stop])
    assert serial[6].outputs[0].finish_reason == "stop"
    for a, b in zip(serial, overlapped, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
            # Logprobs within 1e-5: the batches differ (a stop ends a request a step later).
            assert (x.logprobs is None) == (y.logprobs is None)
            for u, v in zip(x.logprobs or [], y.logprobs or [], strict=True):
                assert u.token_id == v.token_id and abs(u.logprob - v.logprob) <= 1e-5
    assert_nothing_held(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_text_is_made_while_the_next_step_computes(weights, tokenizer, monkeypatch, overlap):
    """With overlap, outputs are delivered (detokenized, streamed) while the model thread runs
    the next step; without, never. The steps are handed over as on a GPU: once the next step is
    queued (on the CPU, where a step computes while it is launched, once it is planned)."""
    engine = make_engine(weights, tokenizer, overlap=overlap)
    engine.steps._handover = "launch" if overlap else "commit"
    state = {"in_flight": False}
    during: list[bool] = []
    execute, deliver = engine.executor.execute, engine.steps.deliver

    def slow_execute(*args):
        state["in_flight"] = True
        try:
            result = execute(*args)
            time.sleep(0.005)  # the device still computing the queued step, as on a GPU
            return result
        finally:
            state["in_flight"] = False

    def watched_deliver(outputs):
        during.append(state["in_flight"])
        deliver(outputs)

    monkeypatch.setattr(engine.executor, "execute", slow_execute)
    monkeypatch.setattr(engine.steps, "deliver", watched_deliver)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = engine.generate(prompts(4, seed=22), params)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
    assert len(during) >= 16
    if overlap:
        assert sum(during) >= len(during) - 2  # all but the first and last steps' text
    else:
        assert not any(during)
