"""bench/model_step.py: its byte and FLOP counting against hand arithmetic (Scout's
published layer sizes), and one end-to-end run on the CPU at a tiny shape."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyllama4

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "model_step.py"

_spec = importlib.util.spec_from_file_location("bench_model_step", SCRIPT)
ms = importlib.util.module_from_spec(_spec)
sys.modules["bench_model_step"] = ms
_spec.loader.exec_module(ms)

# Scout's layer sizes, in parameters.
ATTENTION = 2 * 5120 * 5120 + 2 * 5120 * 1024  # q, o + k, v = 62.91M
EXPERT = 3 * 5120 * 8192  # one routed expert or the shared expert = 125.83M
DENSE = 3 * 5120 * 16384  # dense MLP = 251.66M
LM_HEAD = 202048 * 5120
NORMS = 2 * 5120  # input and post-attention RMSNorm weights
KV_PER_KEY = 2 * 8 * 128 * 2  # K and V, 8 KV heads x 128, bf16


def test_hand_arithmetic_matches_peers():
    assert ATTENTION == 62_914_560 and round(ATTENTION / 1e6, 2) == 62.91
    assert round(EXPERT / 1e6, 2) == 125.83 and round(DENSE / 1e6, 2) == 251.66


@pytest.fixture(scope="module")
def scout():
    return ms.text_config("scout", 48)


@pytest.fixture(scope="module")
def maverick():
    return ms.text_config("maverick", 48)


def test_configs_have_the_real_layer_pattern(scout, maverick):
    assert all(scout.moe) and scout.num_local_experts == 16 and scout.use_qk_norm
    assert maverick.moe == tuple(i % 2 == 1 for i in range(48))
    assert maverick.num_local_experts == 128 and not maverick.use_qk_norm
    nope = [i for i in range(48) if not scout.use_rope[i]]
    assert nope == list(range(3, 48, 4)) and scout.chunked == tuple(scout.use_rope)
    few = ms.text_config("maverick", 3)  # the first 3 layers keep their meaning
    assert few.moe == (False, True, False) and few.use_rope == maverick.use_rope[:3]


def test_scout_batch1_layer_bytes_and_flops(scout):
    context = 1024  # keys attended: the context and the new token
    cost = ms.layer_cost(scout, 0, batch=1, context=context, weights="bf16")
    router = 5120 * 16
    weights = 2 * (ATTENTION + 2 * EXPERT + router + NORMS)
    assert cost.bytes == pytest.approx(weights + (context + 1) * KV_PER_KEY, rel=1e-12)
    # 2 FLOPs per weight the token multiplies; q.k and p.v: 2 * 40 heads * 128 each per key.
    flops = 2 * (ATTENTION + 2 * EXPERT + router) + 2 * 2 * 5120 * (context + 1)
    assert cost.flops == pytest.approx(flops, rel=1e-12)


def test_step_adds_lm_head_embedding_row_and_final_norm(scout):
    step = ms.step_cost(scout, 2, batch=1, context=0, weights="bf16")
    layers = sum(ms.layer_cost(scout, i, 1, 0, "bf16").bytes for i in range(2))
    assert step.bytes == pytest.approx(layers + 2 * (LM_HEAD + 5120 + 5120), rel=1e-12)


def test_maverick_dense_and_moe_layers(maverick):
    dense = ms.layer_cost(maverick, 0, batch=1, context=0, weights="bf16")
    assert dense.bytes == pytest.approx(2 * (ATTENTION + DENSE + NORMS) + KV_PER_KEY, rel=1e-12)
    moe = ms.layer_cost(maverick, 1, batch=1, context=0, weights="bf16")
    router = 5120 * 128
    moe_bytes = 2 * (ATTENTION + 2 * EXPERT + router + NORMS) + KV_PER_KEY
    assert moe.bytes == pytest.approx(moe_bytes, rel=1e-12)


def test_active_bytes_per_token_match_peers(scout, maverick):
    # §5: active per token = 48 * (62.91M + 2 * 125.83M) + 1.03B lm_head = 16.14B, both models.
    for config in (scout, maverick):
        params = ms.step_cost(config, 48, batch=1, context=0, weights="bf16").bytes / 2
        assert params == pytest.approx(16.14e9, rel=2e-3)


def test_expected_distinct_experts():
    # 2 tokens over 4 experts: the same expert with probability 1/4, so 1/4 * 1 + 3/4 * 2.
    assert ms.expected_experts(4, 1, 2) == pytest.approx(1.75)
    assert ms.expected_experts(16, 1, 1) == pytest.approx(1.0)
    assert ms.expected_experts(128, 1, 100) == pytest.approx(69.6, abs=0.05)  # PEERS §5
    assert ms.expected_experts(16, 1, 100) == pytest.approx(16.0, abs=0.03)  # all hit (B >~ 64)
    rng = np.random.default_rng(0)
    sampled = np.mean([len(set(rng.integers(0, 16, 16))) for _ in range(20000)])
    assert ms.expected_experts(16, 1, 16) == pytest.approx(sampled, abs=0.05)


def test_fp8_halves_weight_bytes(scout):
    bf16 = ms.layer_cost(scout, 0, batch=1, context=0, weights="bf16")
    fp8 = ms.layer_cost(scout, 0, batch=1, context=0, weights="fp8")
    # 1 byte per weight plus an fp32 scale per output channel; router, norms and KV stay bf16.
    scales = 4 * (5120 + 1024 + 1024 + 5120) + 2 * 4 * (2 * 8192 + 5120)
    bf16_rest = 2 * (5120 * 16 + NORMS) + KV_PER_KEY
    assert fp8.bytes == pytest.approx(ATTENTION + 2 * EXPERT + scales + bf16_rest, rel=1e-12)
    assert 0.5 < fp8.bytes / bf16.bytes < 0.51
    assert fp8.flops == bf16.flops


def test_prefill_cost(scout):
    tokens = 256
    cost = ms.prefill_cost(scout, 1, tokens, "bf16")
    router = 5120 * 16
    causal_keys = tokens * (tokens + 1) // 2
    flops = tokens * 2 * (ATTENTION + 2 * EXPERT + router) + 4 * 5120 * causal_keys
    assert cost.flops == pytest.approx(flops + 2 * 5120 * 202048, rel=1e-12)
    experts = 16 * (1 - (15 / 16) ** tokens)  # all 16, near enough
    weights = 2 * (ATTENTION + (1 + experts) * EXPERT + router + NORMS)
    head = 2 * (LM_HEAD + (tokens + 1) * 5120)
    assert cost.bytes == pytest.approx(weights + tokens * KV_PER_KEY + head, rel=1e-12)


def test_roofline_is_the_larger_of_the_two_bounds():
    cost = ms.Cost(bytes=4e9, flops=1e12)
    assert cost.roofline_s(2e12, 1e15) == pytest.approx(2e-3)  # memory-bound
    assert cost.roofline_s(2e12, 1e14) == pytest.approx(1e-2)  # compute-bound


def test_runs_end_to_end_on_the_cpu_at_a_tiny_shape():
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--layers", "2", "--batch", "2"]
    cmd += ["--context", "32", "--prefill-tokens", "16", "--steps", "2", "--warmup", "1"]
    cmd += ["--device", "cpu"]
    package_root = str(Path(pyllama4.__file__).resolve().parents[1])
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    )
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "## Model step at Llama 4 layer shapes: Scout (tiny shape), first 2 of 48" in out
    assert "- Command: `python bench/model_step.py --shape tiny --layers 2" in out
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2, out  # the decode table's row and the projection's
    assert "| prefill tokens | ms | tokens/s |" in out and "\n| 16 |" in out
    assert "### PROJECTION (not a measurement): Scout, 48 layers" in out
    assert "NOT meaningful for a GPU" in out
    assert "decode, batch 2" in r.stderr and "building layer 1" in r.stderr
