"""Decode graphs captured with CUDA/HIP graphs on a GPU against eager steps.

Skipped without a GPU or the kernel library (the skip names which). A tiny random Llama 4 in
bf16 (Scout-like: chunk-local layers, QK-norm, MoE everywhere; head_dim 128 as the kernel
wants): greedy decoding of 5 prompts (padded to 8) with graphs equals eager decoding token for
token, and the memory Meter measures a warm-up's activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Llama4TextConfig

from helpers import greedy_generate
from pyllama4 import kernels
from pyllama4.config import TextConfig
from pyllama4.memory import CudaMeter, measure
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner

if not torch.cuda.is_available():
    pytest.skip("no GPU: torch.cuda.is_available() is False", allow_module_level=True)
if kernels.library() is None:
    pytest.skip(f"no GPU kernel library: {kernels.reason()}", allow_module_level=True)

CONTEXT = 512


@pytest.fixture(scope="module")
def model() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        hidden_size=256,
        intermediate_size=256,
        intermediate_size_mlp=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        num_local_experts=4,
        vocab_size=1024,
        attention_chunk_size=64,
        max_position_embeddings=4096,
    )
    ours = Llama4ForCausalLM(TextConfig.from_dict(cfg.to_dict()))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    return ours.to("cuda", torch.bfloat16).eval()


def runner(model: Llama4ForCausalLM) -> ModelRunner:
    return ModelRunner(model, context_len=CONTEXT, kv_tokens=8192, page_size=16, max_running=16)


def test_graph_decoding_gives_the_eager_tokens(model):
    rng = np.random.default_rng(0)
    batch = [rng.integers(3, 1024, int(rng.integers(5, 200))).tolist() for _ in range(5)]
    eager = greedy_generate(runner(model), batch, max_new_tokens=100)
    graphed = runner(model)
    graphed.capture_graphs(8)
    assert graphed.graphs is not None and graphed.graphs.sizes == (1, 2, 4, 8)
    assert greedy_generate(graphed, batch, max_new_tokens=100) == eager


def test_the_meter_measures_activations_and_graphs(model):
    report = measure(
        lambda tokens: ModelRunner(model, context_len=CONTEXT, kv_tokens=tokens),
        CudaMeter(torch.device("cuda")),
        fraction=0.9,
        step_tokens=256,
        rows=16,
        graph_max_bs=8,
    )
    assert report.activations > 256 * 256 * 2  # at least the hidden states of the prefill
    assert report.graphs >= 0 and report.used > 0 and report.kv_bytes > 0
