"""FP8 weights (pyllama4.quant.fp8, pyllama4.layers.fp8, pyllama4.loading.quantize), the CPU
reference, against definitions computed here.

Bounds and tolerances:
- Weight quantization, per element, with v = w / scale: |w - dq| <= scale * h(v) + 2^-22 |w|,
  h(v) = 2^(max(floor(log2 |v|), emin) - 4): half an e4m3 ULP (3 mantissa bits) at v, the
  subnormal spacing 2^(emin - 3) below the smallest normal 2^emin (emin -6 fn, -7 fnuz); the
  second term covers the fp32 roundings of w / scale and q * scale. At the top binade this is
  scale * 2^(emax - 4) = amax * 16 / 448 (fn) or amax * 8 / 240 (fnuz), and 2^-4 |w| for normals.
- fn -> fnuz: exact, value for value (-0 becomes +0).
- Fp8Linear / Fp8Experts against the definition written here (exact fp8 dot products, rounded
  once to fp32, then the scales in fp32): bit-identical. Against dequantized matmuls (float64):
  within 2^-22 |y| (three fp32 roundings of an exact dot product) plus, for weight-only, the
  float64 summation and fp32 rounding of x * W, 2^-22 (|x| @ |W_dq|^T).
- Tiny Scout- and Maverick-like models quantized by quantize_model: logits bit-identical to a
  reference model whose targets are the definition modules written here (everything else is the
  same deterministic computation). A reference with dequantized fp32 weights would differ, since
  fp32 rounding differences flip later activation quantizations by an fp8 ULP now and then.
  Against the unquantized model: top-1 agreement printed, asserted >= 0.5 only.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Llama4ForCausalLM as HFLlama4
from transformers import Llama4TextConfig

from pyllama4.config import TextConfig
from pyllama4.fp8_format import FP8_FORMATS, FP8_MAX, dequantize
from pyllama4.layers.ffn import Experts, MoE, Router
from pyllama4.layers.fp8 import Fp8Experts, Fp8Linear
from pyllama4.loading.load import load_model
from pyllama4.loading.quantize import fp8_targets, quantize_model, weight_bytes
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.quant.fp8 import (
    fn_to_fnuz,
    quantize_activation,
    quantize_weight,
    scaled_mm,
    scaled_mm_device,
)
from tiny_models import LLAMA3_ROPE, TINY_TEXT, last_token_logits

FORMATS = list(FP8_FORMATS)
FP32_ROUNDING = 2.0**-22
UB = 1200.0
VOCAB = 512


def emin(fmt: str) -> int:
    return int(np.log2(torch.finfo(FP8_FORMATS[fmt]).smallest_normal))


def half_ulp(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Half the e4m3 spacing at |v| (float64)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** emin(fmt))))
    return 2.0 ** (e - 4)


def random_weights(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 80, generator=g)
    if kind == "heavy":  # log-normal scale mixture: most of each row far below its max
        w = w * torch.exp(2.5 * torch.randn(96, 80, generator=g))
    w[3] = 0.0  # an all-zero row
    w[5] = 0.0
    w[5, 7] = -3.0  # a single nonzero
    return w


# The definition, written independently of pyllama4.quant.fp8.
def act_quant(x: torch.Tensor, fmt: str, ub: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    fmax = torch.finfo(FP8_FORMATS[fmt]).max
    scale = x.float().abs().amax(-1).clamp(1e-12, ub) / fmax
    q = (x.float() / scale[:, None]).clamp(-fmax, fmax).to(FP8_FORMATS[fmt])
    return q, scale


def exact_dot(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """a [N, K] . b [M, K] of fp8 values, summed exactly (float64), rounded once to fp32."""
    return torch.einsum("nk,mk->nm", a_q.double(), b_q.double()).float()


def definition(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, ub: float | None):
    """y = (x_q . W_q^T) * x_scale[row] * w_scale[out] for W_q [out, in], in fp32."""
    fmt = next(k for k, v in FP8_FORMATS.items() if v == w_q.dtype)
    x_q, x_scale = act_quant(x, fmt, ub)
    return exact_dot(x_q, w_q) * x_scale[:, None] * w_scale


def test_formats():
    assert FP8_MAX == {"e4m3fn": 448.0, "e4m3fnuz": 240.0}
    assert FP8_FORMATS == {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
    with pytest.raises(ValueError, match="e4m3fn, e4m3fnuz"):
        quantize_weight(torch.ones(2, 2), "e5m2")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_weight_quantization_error_is_within_half_an_ulp(fmt, kind):
    w = random_weights(kind, seed=len(kind) + len(fmt))
    q, scale = quantize_weight(w, fmt)
    assert q.dtype == FP8_FORMATS[fmt] and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (96,)
    amax = w.abs().amax(-1)
    assert scale[3] == 1.0 and not q[3].float().any()  # zero row: scale 1
    nonzero = amax > 0
    assert torch.equal(scale[nonzero], amax[nonzero] / FP8_MAX[fmt])
    assert (q.float().abs().amax(-1)[nonzero] == FP8_MAX[fmt]).all()  # row max -> +-fmax

    dq = dequantize(q, scale[..., None])
    assert dq.dtype == torch.float32 and torch.equal(dq, q.float() * scale[:, None])
    w64, s64 = w.double(), scale.double()[:, None]
    v = w64 / s64
    bound = s64 * half_ulp(v, fmt) + FP32_ROUNDING * w64.abs()
    err = (w64 - dq.double()).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert (err / bound).max() > 0.5  # and the bound is the right one, not a loose one
    top = 2.0 ** (np.log2(FP8_MAX[fmt]) // 1 - 4)  # half-ULP at the top binade: 16 fn, 8 fnuz
    assert (err <= s64 * top * (1 + FP32_ROUNDING)).all()
    subnormal = (v.abs() < 2.0 ** emin(fmt)) & (q.float() != 0)
    if kind == "heavy":
        assert subnormal.sum() > 100, "the subnormal range is not exercised"


def test_weight_with_nan_or_inf_is_refused():
    for bad in (float("nan"), float("inf")):
        w = torch.ones(3, 4)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantize_weight(w)


def test_every_fn_byte_converts_exactly_to_fnuz():
    fn_bytes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    q = fn_bytes.view(torch.float8_e4m3fn).reshape(-1, 1)  # 254 rows, one value each
    scale = torch.exp(torch.randn(254, generator=torch.Generator().manual_seed(0)) * 8)
    fnuz, fnuz_scale = fn_to_fnuz(q, scale)
    assert fnuz.dtype == torch.float8_e4m3fnuz and torch.equal(fnuz_scale, scale * 2)
    assert torch.equal(fnuz.float() * fnuz_scale[:, None], q.float() * scale[:, None])
    assert torch.equal(fnuz.float() * 2, q.float())  # every value halves
    expected = fn_bytes.masked_fill(fn_bytes == 0x80, 0)  # -0 (fnuz's NaN byte) becomes +0
    assert torch.equal(fnuz.view(torch.uint8).flatten(), expected)
    assert not fnuz.float().isnan().any()


def test_fn_to_fnuz_keeps_quantized_weights_and_refuses_nan():
    w = random_weights("heavy", seed=3)
    w[7, :5] = -1e-6  # rounds to -0 in e4m3fn
    q, scale = quantize_weight(w, "e4m3fn")
    assert (q.view(torch.uint8) == 0x80).any()
    fnuz, fnuz_scale = fn_to_fnuz(q, scale)
    assert torch.equal(
        dequantize(fnuz, fnuz_scale[..., None]), dequantize(q, scale[..., None])
    )  # -0 == +0
    nan = q.clone()
    nan.view(torch.uint8)[2, 3] = 0xFF
    with pytest.raises(ValueError, match="NaN"):
        fn_to_fnuz(nan, scale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fn_to_fnuz(fnuz, scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_activation_quantization(fmt):
    fmax = FP8_MAX[fmt]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g) * torch.tensor([1, 30, 1e-3, 500, 1, 1])[:, None]
    x[3, 5] = 5000.0  # beyond ub
    x[3, 6] = -2000.0
    x[4] = 0.0  # a zero row
    q, scale = quantize_activation(x, fmt, UB)
    amax = x.abs().amax(-1)
    # scale = min(amax, ub) / fmax; a zero row gets 1e-12 / fmax, positive and finite.
    assert torch.equal(scale, amax.clamp(1e-12, UB) / fmax)
    assert scale[4] > 0 and torch.isfinite(scale).all() and not q[4].float().any()
    dq = dequantize(q, scale[..., None])
    assert not dq.isnan().any()
    # ub clamps: values beyond +-ub saturate to +-ub, the rest keep the weight bound.
    assert scale[3] == UB / fmax
    assert q[3, 5].float() == fmax and q[3, 6].float() == -fmax
    inside = x.abs() <= UB
    v = x.double() / scale.double()[:, None]
    err = (x.double() - dq.double()).abs()
    bound = scale.double()[:, None] * half_ulp(v, fmt) + FP32_ROUNDING * x.double().abs()
    assert (err <= bound)[inside].all()
    # Rows within ub reach +-fmax exactly at their largest element.
    assert (q.float().abs().amax(-1)[[0, 1, 2, 5]] == fmax).all()
    # ub None: no clamp.
    _, unclamped = quantize_activation(x, fmt, None)
    assert unclamped[3] == 5000.0 / fmax
    # The definition, written here.
    q_def, scale_def = act_quant(x, fmt, UB)
    assert torch.equal(bits(q), bits(q_def))
    assert torch.equal(scale, scale_def)


def random_linear(seed: int, in_features: int = 64, out_features: int = 48) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=False)


def random_input(seed: int, n: int = 37, width: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    x[0] = 0.0
    x[1, 3] = 3000.0  # beyond the default ub
    return x


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_linear_equals_its_definition(fmt):
    linear = random_linear(0)
    layer = Fp8Linear.from_linear(linear, fmt)
    assert layer.weight.dtype == FP8_FORMATS[fmt] and layer.weight.shape == (48, 64)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (48,)
    w_q, w_scale = quantize_weight(linear.weight.detach(), fmt)
    assert torch.equal(bits(layer.weight), bits(w_q))
    assert torch.equal(layer.weight_scale, w_scale)
    x = random_input(1)
    with torch.no_grad():
        y = layer(x)
        # Bit-identical to the definition, also for [B, T, in] inputs and bf16 activations.
        assert torch.equal(y, definition(x, w_q, w_scale, UB))
        assert torch.equal(layer(x.reshape(1, 37, 64)), y.reshape(1, 37, 48))
        x16 = x.bfloat16()
        y16 = layer(x16)
        assert y16.dtype == torch.bfloat16
        assert torch.equal(y16, definition(x16, w_q, w_scale, UB).bfloat16())
    # Dequantized matmul in float64 (x_q * x_scale and W_q * w_scale exact, 2^-53 per product
    # and sum): within three fp32 roundings of the exact value.
    x_q, x_scale = quantize_activation(x, fmt, UB)
    x_dq = x_q.double() * x_scale.double()[:, None]
    w_dq = w_q.double() * w_scale.double()[:, None]
    ref = x_dq @ w_dq.T
    bound = FP32_ROUNDING * ref.abs() + 2.0**-50 * (x_dq.abs() @ w_dq.abs().T)
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_linear_weight_only(fmt):
    linear = random_linear(2)
    layer = Fp8Linear.from_linear(linear, fmt, quantize_input=False)
    x = random_input(3)
    with torch.no_grad():
        y = layer(x)
    w_dq = layer.weight.double() * layer.weight_scale.double()[:, None]
    ref = x.double() @ w_dq.T
    assert ((y.double() - ref).abs() <= FP32_ROUNDING * (x.double().abs() @ w_dq.abs().T)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
def test_the_device_path_equals_the_reference(fmt, dtype):
    """scaled_mm_device (FP8 prefill on a GPU) run here on the CPU: torch._scaled_mm with
    row-wise scales for Fp8Linear's column-major weight, the fp32 matmul for the experts'
    input-major one and for weight-only; each equals the exact reference up to fp32 sums (1e-5
    relative) and, in bf16, one rounding (a bf16 step: 2^-7 relative at most)."""
    torch.manual_seed(1)
    w = torch.randn(80, 96)
    q, scale = quantize_weight(w, fmt)
    x = (torch.randn(40, 96) * 3).to(dtype)
    tol = {"rtol": 2**-7, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for quant in (True, False):
        ref = scaled_mm(x, q.T, scale, 1.0, quant).to(dtype)  # ub 1.0: saturation included
        for weight in (q.T, q.T.contiguous()):  # column-major (Fp8Linear), row-major (experts)
            got = scaled_mm_device(x, weight, scale, 1.0, quant)
            torch.testing.assert_close(got.to(dtype), ref, **tol)


def test_fp8_linear_refuses_a_bias():
    with pytest.raises(ValueError, match="bias"):
        Fp8Linear.from_linear(nn.Linear(4, 4))


def random_experts(seed: int, num: int = 4, hidden: int = 64, inter: int = 32) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(num, hidden, inter)
    nn.init.normal_(experts.gate_up_proj, 0, 0.1)
    nn.init.normal_(experts.down_proj, 0, 0.1)
    return experts


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_experts_equal_their_definition(fmt, dtype):
    experts = random_experts(4)
    fp8 = Fp8Experts.from_experts(experts, fmt)
    assert fp8.gate_up_proj.shape == (4, 64, 64) and fp8.gate_up_scale.shape == (4, 64)
    assert fp8.down_proj.shape == (4, 32, 64) and fp8.down_scale.shape == (4, 64)
    assert fp8.gate_up_proj.dtype == fp8.down_proj.dtype == FP8_FORMATS[fmt]
    x = random_input(5).to(dtype)
    for e in range(4):
        # Per output column: quantize the [out, in] transpose of the input-major weights.
        gu_q, gu_scale = quantize_weight(experts.gate_up_proj[e].detach().T, fmt)
        down_q, down_scale = quantize_weight(experts.down_proj[e].detach().T, fmt)
        assert torch.equal(bits(fp8.gate_up_proj[e].T), bits(gu_q))
        assert torch.equal(fp8.gate_up_scale[e], gu_scale)
        assert torch.equal(bits(fp8.down_proj[e].T), bits(down_q))
        assert torch.equal(fp8.down_scale[e], down_scale)
        gate, up = definition(x, gu_q, gu_scale, UB).to(dtype).chunk(2, dim=-1)
        expected = definition(up * F.silu(gate), down_q, down_scale, UB).to(dtype)
        with torch.no_grad():
            got = fp8.expert(e, x)
        assert got.dtype == dtype and torch.equal(got, expected)


# Tiny models: our Llama4ForCausalLM from a TextConfig, random weights, fp32 activations.
def tiny_model(kind: str, seed: int = 0) -> Llama4ForCausalLM:
    common = dict(
        TINY_TEXT,
        vocab_size=VOCAB,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        max_position_embeddings=1024,
    )
    if kind == "scout":  # all layers MoE, QK-norm, llama3 RoPE
        cfg = dict(
            common, interleave_moe_layer_step=1, use_qk_norm=True, rope_parameters=LLAMA3_ROPE
        )
    else:  # maverick: dense and MoE interleaved
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        cfg = dict(common, interleave_moe_layer_step=2, use_qk_norm=False, rope_parameters=rope)
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(TextConfig.from_dict(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


class DefinitionLinear(nn.Module):
    def __init__(self, layer: Fp8Linear):
        super().__init__()
        self.w_q, self.w_scale = layer.weight, layer.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return definition(x, self.w_q, self.w_scale, UB).to(x.dtype)


class DefinitionExperts(nn.Module):
    def __init__(self, experts: Fp8Experts):
        super().__init__()
        self.gate_up_proj = experts.gate_up_proj  # MoE reads its shape[0]
        self.gu_q, self.gu_scale = experts.gate_up_proj.transpose(1, 2), experts.gate_up_scale
        self.down_q, self.down_scale = experts.down_proj.transpose(1, 2), experts.down_scale

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = definition(x, self.gu_q[e], self.gu_scale[e], UB).to(x.dtype)
        gate, up = h.chunk(2, dim=-1)
        return definition(up * F.silu(gate), self.down_q[e], self.down_scale[e], UB).to(x.dtype)


def random_prompts(seed: int, count: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 33, (count,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["scout", "maverick"])
def test_quantized_tiny_model_equals_its_definition(kind, fmt):
    model = tiny_model(kind)
    prompts = random_prompts(7)
    unquantized = last_token_logits(model, prompts)
    quantized = quantize_model(copy.deepcopy(model), fmt, activation_scale_ub=UB)

    reference = copy.deepcopy(quantized)
    for parent, name in fp8_targets(reference):
        module = getattr(parent, name)
        definition_module = (
            DefinitionExperts(module)
            if isinstance(module, Fp8Experts)
            else DefinitionLinear(module)
        )
        setattr(parent, name, definition_module)
    logits = last_token_logits(quantized, prompts)
    assert torch.equal(logits, last_token_logits(reference, prompts))

    agreement = (logits.argmax(-1) == unquantized.argmax(-1)).float().mean().item()
    error = (logits - unquantized).abs().amax(-1)
    print(
        f"{kind} {fmt}: top-1 agreement with the unquantized model {agreement:.3f} over "
        f"{len(prompts)} prompts; max |logit error| median {error.median():.3f}, "
        f"max {error.max():.3f} (logits up to {unquantized.abs().max():.2f})"
    )
    assert agreement >= 0.5


@pytest.mark.parametrize("kind", ["scout", "maverick"])
def test_quantize_model_replaces_exactly_the_targets(kind):
    model = tiny_model(kind, seed=1).bfloat16()
    before = {n: p.clone() for n, p in model.named_parameters()}
    bf16_bytes = weight_bytes(model)
    quantize_model(model, "e4m3fn")
    layers = model.model.layers
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        assert all(
            isinstance(getattr(attn, n), Fp8Linear)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        ffn = layer.feed_forward
        assert isinstance(ffn, MoE) == model.config.moe[i]
        if isinstance(ffn, MoE):
            assert isinstance(ffn.experts, Fp8Experts) and isinstance(ffn.router, Router)
            ffn = ffn.shared_expert
        assert all(
            isinstance(getattr(ffn, n), Fp8Linear) for n in ("gate_proj", "up_proj", "down_proj")
        )
    after = dict(model.named_parameters())
    kept = {n for n, p in after.items() if p.dtype == torch.bfloat16}
    assert kept == {n for n in before if "router" in n or "norm" in n or "_proj" not in n}
    assert "lm_head.weight" in kept and "model.embed_tokens.weight" in kept
    assert all(torch.equal(after[n], before[n]) for n in kept)
    fp8 = [p for p in after.values() if p.dtype == torch.float8_e4m3fn]
    assert fp8 and all(p.element_size() == 1 for p in fp8)
    scales = [p for n, p in after.items() if n.endswith("scale")]
    assert all(p.dtype == torch.float32 for p in scales)
    expected = sum(p.numel() * p.element_size() for p in after.values())
    assert weight_bytes(model) == expected < bf16_bytes
    print(f"{kind}: weight bytes bf16 {bf16_bytes}, fp8 {weight_bytes(model)}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes (torch.equal compares fp8 only through them)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        **TINY_TEXT,
        vocab_size=256,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
        max_position_embeddings=1024,
    )
    hf = HFLlama4(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("fp8ckpt")
    hf.save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_model_quantizes_online(checkpoint, fmt):
    plain = load_model(checkpoint, dtype=torch.bfloat16, progress=False)
    model = load_model(
        checkpoint, dtype=torch.bfloat16, progress=False, quantization="fp8", fp8_format=fmt
    )
    expected = quantize_model(plain, fmt).state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(bits(got[k]), bits(expected[k])) for k in got)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == FP8_FORMATS[fmt]


def test_load_model_refuses_unknown_quantization(checkpoint):
    with pytest.raises(ValueError, match="'int4'.*fp8"):
        load_model(checkpoint, progress=False, quantization="int4")
    with pytest.raises(ValueError, match="e4m3fn, e4m3fnuz"):
        load_model(checkpoint, progress=False, quantization="fp8", fp8_format="e5m2")
