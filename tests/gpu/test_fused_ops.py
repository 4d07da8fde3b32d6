"""The fused small ops (hip/fused_ops.hip, through pyllama4.kernels.fused) against their torch
references, on a GPU.

Skipped without a GPU or without the built kernel library (the skip names which). Inputs are
random normal bf16. The references are the torch path the model takes without the kernels,
run on the CPU from the same bf16 inputs; the tolerance is tests/gpu/fused_cases.py's: at most
1 bf16 step, on at most 0.1% of the elements (the device's cosf / sinf / expf and a norm's
summation order are fp32 detail the references leave open). Shapes: Scout's decode (hidden
5120, 40 query / 8 KV heads of 128, intermediate 8192) at 1, 16 and 100 tokens. Then a small
Llama 4 gives the same logits and captured residual streams with and without these kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gpu.fused_cases import (
    EPS,
    SCOUT_ROPE,
    SCOUT_THETA,
    assert_bf16_close,
    bf16_randn,
    rope_reference,
    temperature,
)

from pyllama4 import kernels
from pyllama4.kernels import fused
from pyllama4.layers.norm import RMSNorm
from pyllama4.layers.rope import inv_frequencies

if not torch.cuda.is_available():
    pytest.skip("no GPU: torch.cuda.is_available() is False", allow_module_level=True)
if kernels.library() is None:
    pytest.skip(f"no GPU kernel library: {kernels.reason()}", allow_module_level=True)
if fused._functions() is None:
    pytest.skip("the kernel library predates the fused ops (rebuild it)", allow_module_level=True)

TOKENS = [1, 16, 100]
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTER = 5120, 40, 8, 128, 8192


@pytest.mark.parametrize("tokens", TOKENS)
def test_add_rms_norm_matches_rmsnorm(tokens):
    x = bf16_randn(tokens, HIDDEN, seed=tokens, device="cuda")
    residual = bf16_randn(tokens, HIDDEN, seed=tokens + 1, scale=8.0, device="cuda")
    norm = RMSNorm(HIDDEN, EPS).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(bf16_randn(HIDDEN, seed=2).abs() + 0.5)
        total = residual.cpu() + x.cpu()
        ref, ref_plain = norm(total), norm(x.cpu())
    weight = norm.weight.detach().cuda()
    out, res = fused.add_rms_norm(x, residual, weight, EPS)
    assert res is residual
    assert torch.equal(residual.cpu(), total)
    assert_bf16_close(out, ref, "add + norm")
    out, same = fused.add_rms_norm(x, None, weight, EPS)
    assert same is x
    assert_bf16_close(out, ref_plain, "norm")


@pytest.mark.parametrize(
    ("rope", "qk_norm", "use_temperature"),
    [(True, True, False), (True, False, False), (False, False, True), (False, False, False)],
    ids=["rope-qknorm", "rope", "nope-temperature", "nope"],
)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_qk_norm_kv_write_matches_attention(tokens, rope, qk_norm, use_temperature):
    """Scout's heads, q / k / v row-strided views of one projection output, positions up to
    2^20, scattered slots; every other cache slot untouched."""
    pool = 4096
    qkv = bf16_randn(tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, seed=tokens, scale=2.0)
    sizes = [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    q, k, v = (part.view(tokens, -1, HEAD_DIM) for part in qkv.cuda().split(sizes, 1))
    g = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 1 << 20, (tokens,), generator=g)
    slots = torch.randperm(pool, generator=g)[:tokens]
    inv_freq = inv_frequencies(HEAD_DIM, SCOUT_THETA, SCOUT_ROPE) if rope else None
    scale = temperature(positions) if use_temperature else None
    k_cache = bf16_randn(pool, KV_HEADS, HEAD_DIM, seed=1, device="cuda")
    v_cache = bf16_randn(pool, KV_HEADS, HEAD_DIM, seed=2, device="cuda")
    ref_k_cache, ref_v_cache = k_cache.cpu(), v_cache.cpu()
    out = fused.rope_qk_norm_kv_write(
        q,
        k,
        v,
        k_cache,
        v_cache,
        slots.cuda(),
        positions.cuda(),
        None if inv_freq is None else inv_freq.cuda(),
        qk_norm,
        EPS,
        None if scale is None else scale.cuda(),
    )
    ref_q, ref_k = rope_reference(q.cpu(), k.cpu(), positions, inv_freq, qk_norm, scale)
    ref_k_cache.index_copy_(0, slots, ref_k)
    ref_v_cache.index_copy_(0, slots, v.cpu())
    assert_bf16_close(out, ref_q, "q")
    assert_bf16_close(k_cache, ref_k_cache, "k cache")
    assert torch.equal(v_cache.cpu(), ref_v_cache)


@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_mul_matches_swiglu(tokens):
    gate_up = bf16_randn(tokens, 2 * INTER, seed=tokens, scale=3.0, device="cuda")
    gate, up = gate_up[:, :INTER], gate_up[:, INTER:]
    ref = F.silu(gate.cpu()) * up.cpu()
    assert_bf16_close(fused.silu_mul(gate, up), ref, "gate_up halves")
    assert_bf16_close(fused.silu_mul(gate.contiguous(), up.contiguous()), ref, "separate")


def test_bad_arguments_are_refused_with_a_message():
    q = torch.zeros(1, 1, 258, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(4, 1, 258, dtype=torch.bfloat16, device="cuda")
    index = torch.zeros(1, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim 258 must be even, 2 to 256"):
        fused.rope_qk_norm_kv_write(q, q, q, cache, cache, index, index, None, False, EPS)


def test_the_model_gives_the_same_outputs_with_and_without_the_fused_ops(monkeypatch):
    """A small Llama 4 (head_dim 128, chunk 64: RoPE and NoPE layers, QK-norm, temperature),
    bf16 on the GPU: decode logits, and a prefill's final hidden states and the residual
    streams captured entering layers 0 and 2 (forward_with_aux), with the fused ops equal those
    without within bf16 tolerance (the same tokens are fed to both)."""
    from transformers import Llama4ForCausalLM as HFLlama4
    from transformers import Llama4TextConfig

    from pyllama4.config import TextConfig
    from pyllama4.model.llama4 import Llama4ForCausalLM
    from pyllama4.runner import ModelRunner
    from pyllama4.speculative.train.capture import prefill_capture

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=256,
        intermediate_size_mlp=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        num_local_experts=4,
        interleave_moe_layer_step=2,
        attention_chunk_size=64,
        max_position_embeddings=1024,
        floor_scale=16,  # temperature tuning visible at these positions
    )
    state = HFLlama4(cfg).state_dict()
    model = Llama4ForCausalLM(TextConfig.from_dict(cfg.to_dict()))
    model.load_state_dict(state, strict=False)
    model = model.to("cuda", torch.bfloat16).eval()

    def outputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        runner = ModelRunner(model, context_len=512, kv_tokens=4096, page_size=16)
        sched = runner.new_scheduler()
        for i in range(4):
            sched.add_request(i, np.arange(10 + 37 * i, dtype=np.int32) % 500, max_new_tokens=40)
        rows = []
        while sched.has_work():
            plan = sched.schedule()
            logits = runner.forward(plan)
            if plan.num_decodes == plan.num_requests:
                rows.append(logits.float())
            sched.commit(np.full(plan.num_samples, 7, dtype=np.int32))
        [(aux, hidden)] = prefill_capture(runner, [list(range(3, 200))], (0, 2))
        return torch.cat(rows), aux.float(), hidden.float()

    with_fused = outputs()
    monkeypatch.setattr(fused, "usable", lambda *tensors: False)
    without = outputs()
    for name, a, b in zip(("logits", "aux", "hidden"), with_fused, without, strict=True):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() <= 5e-2, name
