"""The CPU matmul paths: oneDNN-packed bf16 linears and experts (pyllama4.layers.cpu_linear), the
MoE's expert-by-expert CPU dispatch, and the CPU dtype choice.

Tolerances: a packed bf16 product and F.linear's both sum bf16 products in fp32 and round once to
bf16, so they differ by at most 2 bf16 ulps of the output's scale (2 * 2**(floor(log2 max|y|) -
7)); whole models are held to test_llama4_model's bf16 criterion (>= 90% of positions within 0.05
max abs of the reference logits; the rest are routing flips at near-tied router logits). The MoE's
expert-by-expert path equals the grouped path bit for bit on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_llama4_model import PagedRun, hf_logits, ours_from, random_hf_model, sequences
from torch import nn

from pyllama4.layers import cpu_linear, ffn
from pyllama4.layers.cpu_linear import (
    PackedExperts,
    PackedLinear,
    cpu_auto_dtype,
    fast_bf16_flag,
    packing_available,
    prepare_cpu,
)

needs_packing = pytest.mark.skipif(
    not packing_available(), reason="no native bf16 (avx512_bf16 / amx_bf16) or no oneDNN"
)


def bf16_ulps(y: torch.Tensor, n: float) -> float:
    """n bf16 ulps at the scale of max |y|."""
    return n * 2.0 ** (math.floor(math.log2(y.float().abs().max().item())) - 7)


@needs_packing
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_within_bf16_rounding(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(256, 320, bias=bias).to(torch.bfloat16)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        want, got = F.linear(x, linear.weight, linear.bias), packed(x)
        got_3d = packed(x.view(1, rows, 256))
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want.float()).abs().max().item() <= bf16_ulps(want, 2)
    assert torch.equal(got_3d.view(rows, -1), got)


@needs_packing
def test_packed_linear_follows_its_weight():
    """The packed copy is re-derived after load_state_dict, an in-place write or a reassignment;
    the state_dict is nn.Linear's."""
    linear = nn.Linear(64, 128, bias=False).to(torch.bfloat16)
    packed = PackedLinear.from_linear(linear)
    assert packed.weight is linear.weight
    assert list(packed.state_dict()) == ["weight"]
    x = torch.randn(4, 64, dtype=torch.bfloat16)

    def check() -> None:
        with torch.inference_mode():
            want = F.linear(x, packed.weight)
            assert (packed(x).float() - want.float()).abs().max().item() <= bf16_ulps(want, 2)

    check()
    packed.load_state_dict({"weight": torch.randn(128, 64, dtype=torch.bfloat16)})
    check()
    with torch.no_grad():
        packed.weight.mul_(-2)
    check()
    packed.weight = nn.Parameter(torch.randn(128, 64, dtype=torch.bfloat16))
    check()


def test_packed_linear_falls_back_outside_cpu_bf16_inference():
    """fp32, or a weight that wants gradients with autograd on: F.linear exactly."""
    linear = nn.Linear(64, 128, bias=False)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(3, 64)
    assert torch.equal(packed(x), F.linear(x, linear.weight))
    bf = nn.Linear(64, 128, bias=False).to(torch.bfloat16)
    out = PackedLinear.from_linear(bf)(x.bfloat16())
    assert out.requires_grad and torch.equal(out, F.linear(x.bfloat16(), bf.weight))


def moe_module(top_k: int, dtype: torch.dtype, seed: int = 0) -> ffn.MoE:
    torch.manual_seed(seed)
    moe = ffn.MoE(hidden_size=64, intermediate_size=32, num_experts=4, top_k=top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    return moe.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_expert_by_expert_equals_grouped(top_k, dtype, monkeypatch):
    """The CPU's expert-by-expert dispatch gives the grouped matmuls' bits, with an idle expert
    (positive inputs and a negative router row for expert 3: never chosen)."""
    moe = moe_module(top_k, dtype)
    with torch.no_grad():
        moe.router.weight[3] = -1
    x = torch.rand(23, 64, dtype=dtype) + 0.1
    moe.experts.prefers_one_by_one = True  # as packed experts: one by one at any batch
    with torch.inference_mode():
        chosen = torch.topk(moe.router(x), top_k, dim=-1).indices.unique().tolist()
        assert len(chosen) < 4, chosen
        assert moe._one_by_one(x)
        one_by_one = moe(x)
        monkeypatch.setattr(ffn, "CPU_EXPERT_LOOP", False)
        assert not moe._one_by_one(x)
        grouped = moe(x)
    assert torch.equal(one_by_one, grouped)


def test_the_cpu_runs_few_rows_one_by_one_and_many_grouped():
    moe = moe_module(1, torch.float32)
    assert moe._one_by_one(torch.zeros(3, 64))  # fewer rows than the 4 experts
    assert not moe._one_by_one(torch.zeros(4, 64))
    assert moe._one_by_one(torch.zeros(4, 64, device="meta")) is False  # not the CPU


@needs_packing
@pytest.mark.parametrize("top_k", [1, 2])
def test_packed_experts_equal_plain_experts_within_bf16(top_k):
    moe = moe_module(top_k, torch.bfloat16, seed=1)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = moe(x)
        # the experts and the shared expert's down_proj (gate/up: 32 outputs; router: 4)
        assert prepare_cpu(moe) == 2
        assert isinstance(moe.experts, PackedExperts)
        packed = moe(x)
    assert (packed.float() - plain.float()).abs().max().item() <= bf16_ulps(plain, 4)


@needs_packing
def test_prepared_model_keeps_its_parameters_and_state_dict():
    hf = random_hf_model("maverick", seed=2)
    model = ours_from(hf.to(torch.bfloat16), torch.bfloat16)
    before = model.state_dict()
    params = dict(model.named_parameters())
    assert prepare_cpu(model) > 0
    assert prepare_cpu(model) == 0  # idempotent
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in model.named_parameters())
    kinds = {type(m) for m in model.modules()}
    assert PackedLinear in kinds and PackedExperts in kinds
    assert any(type(m) is ffn.Router for m in model.modules())  # 4 outputs: unpacked


@needs_packing
def test_prepared_model_logits_stay_close_to_transformers_bf16():
    """test_llama4_model's bf16 criterion, against transformers' bf16 logits and against the
    unprepared model's."""
    hf = random_hf_model("scout", seed=3)
    seqs = sequences(5, [20, 33, 41])
    hf16 = hf.to(torch.bfloat16)
    runs = {}
    for prepared in (False, True):
        model = ours_from(hf16, torch.bfloat16)
        if prepared:
            assert prepare_cpu(model) > 0
        runs[prepared] = run = PagedRun(model, page_size=8, step_tokens=4096)
        for rid, seq in enumerate(seqs):
            run.add(rid, seq, prompt_len=len(seq) - 1)
        with torch.inference_mode():
            run.step()
    vs_hf16, vs_plain = [], []
    for rid, seq in enumerate(seqs):
        n = len(seq) - 1
        ours, plain = (
            torch.stack([runs[p].logits[rid, i] for i in range(n)]).float() for p in (True, False)
        )
        vs_hf16 += (ours - hf_logits(hf16, seq)[:n].float()).abs().amax(-1).tolist()
        vs_plain += (ours - plain).abs().amax(-1).tolist()
    for name, diffs in (("HF bf16", vs_hf16), ("the unprepared model", vs_plain)):
        close = sum(d <= 0.05 for d in diffs) / len(diffs)
        assert close >= 0.9, f"only {close:.0%} of positions within 0.05 of {name}"


def test_prepare_cpu_leaves_fp32_and_unpackable_models_alone(monkeypatch):
    model = ours_from(random_hf_model("maverick", seed=2))
    assert prepare_cpu(model) == 0
    monkeypatch.setattr(cpu_linear, "packing_available", lambda: False)
    bf16 = ours_from(random_hf_model("maverick", seed=2), torch.bfloat16)
    assert prepare_cpu(bf16) == 0
    assert PackedLinear not in {type(m) for m in bf16.modules()}


def test_fast_bf16_flag_reads_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert fast_bf16_flag(cpuinfo) == "avx512_bf16"
    cpuinfo.write_text("flags\t\t: avx512_bf16 amx_bf16 amx_tile\n")
    assert fast_bf16_flag(cpuinfo) == "amx_bf16"
    cpuinfo.write_text("flags\t\t: fpu sse avx2\n")
    assert fast_bf16_flag(cpuinfo) is None
    assert fast_bf16_flag(tmp_path / "missing") is None


def test_cpu_auto_dtype_gives_a_dtype_and_a_reason():
    dtype, reason = cpu_auto_dtype()
    assert dtype in (torch.bfloat16, torch.float32)
    assert reason.startswith(str(dtype).removeprefix("torch."))
    if fast_bf16_flag() is None:
        assert dtype == torch.float32
