"""Decode graphs (pyllama4.graphs) on the CPU: everything but the capture itself.

EagerReplay stands in for torch.cuda.CUDAGraph: it re-runs the step on the static buffers, so
these tests check what a graph would replay — the padding rows, the scratch slots and table row,
the fixed-shape attention metadata built from device tensors only — against the eager step.
Tiny random Llama 4 models, fp32: logits within 1e-5 of the eager path's, greedy tokens equal.
The capture on a GPU (CUDA/HIP graphs with the paged-attention kernel) is tests/gpu's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Llama4ForCausalLM as HFLlama4
from transformers import Llama4TextConfig

from helpers import greedy_generate
from pyllama4.config import TextConfig
from pyllama4.graphs import EagerReplay, capture_sizes
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner
from tiny_models import LLAMA3_ROPE, TINY_TEXT

VOCAB = 512
CONTEXT = 96
LOGITS_TOL = 1e-5  # fp32: the dense graph attention sums over more (masked) keys than eager


@pytest.fixture(scope="module")
def model() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        **TINY_TEXT,
        vocab_size=VOCAB,
        interleave_moe_layer_step=2,  # dense and MoE layers
        attention_chunk_size=16,  # chunk-local layers in their own pool (context 96)
        floor_scale=8,
        max_position_embeddings=1024,
        rope_parameters=LLAMA3_ROPE,
    )
    hf = HFLlama4(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0, 0.1)
    ours = Llama4ForCausalLM(TextConfig.from_dict(cfg.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=False)
    return ours.eval()


def runner(model: Llama4ForCausalLM, **options) -> ModelRunner:
    defaults = {"kv_tokens": 2048, "page_size": 4, "max_running": 16, "max_step_tokens": 64}
    return ModelRunner(model, context_len=CONTEXT, **{**defaults, **options})


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, int(rng.integers(3, 30))).tolist() for _ in range(count)]


class CountingReplay(EagerReplay):
    replays = 0

    def replay(self) -> None:
        CountingReplay.replays += 1
        super().replay()


def test_capture_sizes_follow_the_ladder_and_end_at_the_maximum():
    assert capture_sizes(1) == (1,)
    assert capture_sizes(3) == (1, 2, 3)
    assert capture_sizes(8) == (1, 2, 4, 8)
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert capture_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    with pytest.raises(ValueError, match="at least 1"):
        capture_sizes(0)


@pytest.mark.parametrize("count", [3, 7])
def test_graph_decoding_gives_the_eager_tokens(model, count):
    """Greedy decoding of 3 and 7 prompts (padded to 4 and 8) for 40 tokens: contexts cross
    the chunk-local layers' chunks of 16 and pages of 4; every decode step replays a graph."""
    batch = prompts(count, seed=count)
    eager = greedy_generate(runner(model), batch, max_new_tokens=40)
    graphed = runner(model)
    graphed.capture_graphs(8, capture=CountingReplay)
    before = CountingReplay.replays
    assert greedy_generate(graphed, batch, max_new_tokens=40) == eager
    # Every decode step of this workload replayed (the scheduler batches all decodes at once
    # once the prompts are in, and 39 more tokens each take one step): at least 39 replays.
    assert CountingReplay.replays - before >= 39


def decode_plan(r: ModelRunner, batch: list[list[int]]):
    """Prefills `batch` on r and returns its first all-decode plan (not yet run) and the
    scheduler that made it."""
    sched = r.new_scheduler()
    for i, p in enumerate(batch):
        sched.add_request(i, np.asarray(p, dtype=np.int32), max_new_tokens=8)
    while True:
        plan = sched.schedule()
        if plan.num_decodes == plan.num_requests == len(batch):
            return plan, sched
        tokens = r.forward(plan).argmax(-1).to(torch.int32).numpy()
        sched.commit(tokens)


def test_padded_rows_touch_only_the_scratch_page_and_logits_match(model):
    """One decode step of 5 requests padded to 8: the logits equal the eager step's within
    LOGITS_TOL; the step writes the KV of exactly the plan's 5 slots (as the eager step, within
    LOGITS_TOL) and the scratch page (the 3 padding rows), nothing else."""
    batch = prompts(5, seed=11)
    eager, graphed = runner(model), runner(model)
    graphed.capture_graphs(8, capture=EagerReplay)
    plans = [decode_plan(r, batch)[0] for r in (eager, graphed)]
    assert graphed.graphs.size_for(plans[1]) == 8
    before = [k.clone() for k in graphed.cache.k]
    expected = eager.forward(plans[0])
    got = graphed.forward(plans[1])
    assert got.shape == expected.shape == (5, VOCAB)
    assert (got - expected).abs().max().item() <= LOGITS_TOL
    cache, plan = graphed.cache, plans[1]
    for layer, (k0, k1) in enumerate(zip(eager.cache.k, cache.k, strict=True)):
        local = cache.local_layers[layer]
        scratch = cache.scratch_slots[local]
        assert scratch == k1.shape[0] - cache.page_size  # the scratch page is the pool's last
        slots = torch.from_numpy(
            (plan.local_slots if local else plan.global_slots).astype(np.int64)
        )
        changed = (k1 != before[layer]).flatten(1).any(1).nonzero().flatten()
        real = changed[changed < scratch]
        assert set(real.tolist()) <= set(slots.tolist()), f"layer {layer}: wrote outside the plan"
        assert (changed >= scratch).any(), f"layer {layer}: the padding rows wrote no scratch slot"
        assert (k1[slots] - k0[slots]).abs().max().item() <= LOGITS_TOL


def test_plans_a_graph_does_not_fit_run_eagerly(model):
    """Prefill chunks and batches above the largest captured size never replay a graph."""
    r = runner(model)
    r.capture_graphs(2, capture=CountingReplay)
    assert r.graphs.sizes == (1, 2)
    batch = prompts(3, seed=5)
    plan, sched = decode_plan(r, batch)
    assert r.graphs.size_for(plan) is None  # 3 decodes > 2
    before = CountingReplay.replays
    r.forward(plan)
    assert CountingReplay.replays == before
    sched.add_request(99, np.arange(3, 20, dtype=np.int32), max_new_tokens=2)
    sched.abort(0)
    sched.commit(np.zeros(plan.num_samples, dtype=np.int32))
    mixed = sched.schedule()
    assert mixed.num_decodes < mixed.num_requests  # a prefill chunk rides along
    assert r.graphs.size_for(mixed) is None


class FailingAt4(EagerReplay):
    """Sizes are captured largest first (8, 4, 2, 1): the second capture fails."""

    captures = 0

    def __init__(self, step, pool):
        FailingAt4.captures += 1
        if FailingAt4.captures == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        super().__init__(step, pool)


def test_a_size_whose_capture_fails_is_left_out_and_logged(model, caplog):
    """A failed capture leaves that size out (its plans pad to the next size that captured);
    the warning names the sizes and the error."""
    r = runner(model)
    with caplog.at_level("WARNING", logger="pyllama4.graphs"):
        r.capture_graphs(8, capture=FailingAt4)
    assert r.graphs.sizes == (1, 2, 8)
    assert "batch sizes 4 run eagerly" in caplog.text
    assert "stream is capturing" in caplog.text
    plan, _ = decode_plan(r, prompts(3, seed=2))
    assert r.graphs.size_for(plan) == 8


def test_without_a_gpu_the_default_capture_declines_and_logs_why(model, caplog):
    r = runner(model)
    with caplog.at_level("WARNING", logger="pyllama4.runner"):
        r.capture_graphs(8)
    assert r.graphs is None
    assert "decode graphs not captured" in caplog.text and "no GPU" in caplog.text
