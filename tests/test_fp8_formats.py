"""The fp8 decoding rule (fp8_format.decode) against torch's float8 dtypes for every bit pattern,
the bit tricks of the device function that implements it (hip/fused_moe.hip decode_fp8x4,
modelled here in numpy on packed 32-bit words), and the fp8 experts' torch reference
(tests/oracles.py moe_reference on Fp8ExpertWeights) against the MoE module. CPU only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from oracles import moe_reference

from pyllama4 import fp8_format
from pyllama4.kernels.moe import Fp8ExpertWeights
from pyllama4.layers.ffn import MoE
from pyllama4.layers.fp8 import Fp8Experts

FORMATS = [fp8_format.E4M3FN, fp8_format.E4M3FNUZ]
ALL_BITS = torch.arange(256, dtype=torch.int32).to(torch.uint8)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns where not NaN (so +0 != -0), NaN where the other is NaN."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.parametrize("fmt", FORMATS, ids=fp8_format.NAMES.get)
def test_decode_matches_torch_for_all_256_bit_patterns(fmt):
    ours = fp8_format.decode(ALL_BITS, fmt)
    theirs = ALL_BITS.view(fp8_format.torch_dtype(fmt)).to(torch.float32)
    assert same_values(ours, theirs)


def test_the_formats_special_values():
    fn = fp8_format.decode(torch.tensor([0x00, 0x80, 0x7F, 0xFF, 0x7E, 0x01], dtype=torch.uint8), 1)
    assert fn[:1].item() == 0 and torch.signbit(fn[1]).item() and fn[1].item() == 0
    assert torch.isnan(fn[2:4]).all()
    assert fn[4].item() == 448 and fn[5].item() == 2.0**-9  # max, smallest subnormal
    fnuz = fp8_format.decode(torch.tensor([0x00, 0x80, 0x7F, 0xFF, 0x01], dtype=torch.uint8), 2)
    assert fnuz[0].item() == 0 and not torch.signbit(fnuz[0]).item()
    assert torch.isnan(fnuz[1]).item() and fnuz[2].item() == 240 and fnuz[3].item() == -240
    assert fnuz[4].item() == 2.0**-10
    assert (
        fp8_format.is_nan(ALL_BITS, 1).sum().item() == 2
        and fp8_format.is_nan(ALL_BITS, 2).sum().item() == 1
    )


def device_rule(words: np.ndarray, fmt: int) -> tuple[np.ndarray, np.ndarray]:
    """decode_fp8x4 on uint32 words, as the device computes it: ([n, 4] float32 values times
    2^(bias - 15), [n, 4] NaN flags), bytes lowest first."""
    w = words.astype(np.uint32)
    even = ((w & 0x007F007F) << 7) | ((w & 0x00800080) << 8)
    odd = ((w >> 1) & 0x3F803F80) | (w & 0x80008000)
    halves = np.stack([even & 0xFFFF, odd & 0xFFFF, even >> 16, odd >> 16], axis=1)
    values = halves.astype(np.uint16).view(np.float16).astype(np.float32)
    low7 = w & 0x7F7F7F7F
    if fmt == fp8_format.E4M3FN:
        flags = (low7 + 0x01010101) & 0x80808080
    else:
        flags = w & ~(low7 + 0x7F7F7F7F) & 0x80808080
    nan = np.stack([(flags >> (8 * i + 7)) & 1 for i in range(4)], axis=1).astype(bool)
    return values, nan


@pytest.mark.parametrize("fmt", FORMATS, ids=fp8_format.NAMES.get)
def test_the_device_bit_tricks_implement_the_rule(fmt):
    """Words holding every pair of byte values in every two adjacent positions (other bytes
    random, so a carry or borrow between bytes would show), and random words: the fp16 reading
    times 2^(15 - bias) is the rule's value, and the NaN flags mark exactly the NaN bytes."""
    rng = np.random.default_rng(fmt)
    unscale = np.float32(256.0 if fmt == fp8_format.E4M3FN else 128.0)
    table = fp8_format.decode(ALL_BITS, fmt).numpy()
    nan_table = fp8_format.is_nan(ALL_BITS, fmt).numpy()
    pairs = np.stack(np.meshgrid(np.arange(256), np.arange(256)), -1).reshape(-1, 2)
    blocks = [rng.integers(0, 256, size=(1 << 20, 4))]
    for position in range(3):
        data = rng.integers(0, 256, size=(len(pairs), 4))
        data[:, position : position + 2] = pairs
        blocks.append(data)
    data = np.concatenate(blocks).astype(np.uint8)
    values, nan = device_rule(data.view("<u4").reshape(-1), fmt)
    assert np.isfinite(values).all()  # NaN bytes decode finite: nothing overflows on the way
    assert np.array_equal(nan, nan_table[data])
    got = np.where(nan, np.float32(np.nan), values * unscale).astype(np.float32)
    assert same_values(torch.from_numpy(got), torch.from_numpy(table[data]))


def random_fp8_experts(e: int, h: int, i: int, fmt: int, seed: int = 0) -> Fp8ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randint(0, 256, (e, h, 2 * i), dtype=torch.uint8, generator=gen)
    down = torch.randint(0, 256, (e, i, h), dtype=torch.uint8, generator=gen)
    for bits in (gate_up, down):
        bits[fp8_format.is_nan(bits, fmt)] = 0x01
    return Fp8ExpertWeights(
        gate_up,
        torch.rand(e, 2 * i, generator=gen) / (64 * h**0.5) + 1e-4,
        down,
        torch.rand(e, h, generator=gen) / (64 * i**0.5) + 1e-4,
        fmt,
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=fp8_format.NAMES.get)
def test_the_fp8_reference_is_the_module_on_dequantized_weights(fmt):
    """moe_reference (the GPU tests' reference) on fp8 experts equals MoE.forward (torch path,
    float32) with the dequantized weights loaded into its Experts: same routing, score on the
    input, sum onto the shared expert."""
    torch.manual_seed(0)
    h, i, e, k = 32, 16, 4, 2
    experts = random_fp8_experts(e, h, i, fmt)
    moe = MoE(h, i, e, k)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        for x in range(e):
            moe.experts.gate_up_proj[x], moe.experts.down_proj[x] = experts.dequantized(x)
    x = torch.randn(9, h)
    with torch.no_grad():
        expected = moe(x)
        got = moe_reference(x, moe.router(x), experts, k, moe.shared_expert(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fp8_experts_check_their_tensors():
    good = random_fp8_experts(2, 16, 8, fp8_format.E4M3FN)
    with pytest.raises(ValueError, match="format"):
        Fp8ExpertWeights(
            good.gate_up, good.gate_up_scale, good.down, good.down_scale, fp8_format.BF16
        )
    with pytest.raises(TypeError, match="uint8"):
        Fp8ExpertWeights(good.gate_up.float(), good.gate_up_scale, good.down, good.down_scale, 1)
    with pytest.raises(ValueError, match="down_scale"):
        Fp8ExpertWeights(good.gate_up, good.gate_up_scale, good.down, good.down_scale[:, :8], 1)


@pytest.mark.parametrize("fmt", FORMATS, ids=fp8_format.NAMES.get)
def test_fp8_expert_weights_from_float8_tensors(fmt):
    """torch float8 tensors (e.g. pyllama4.layers.fp8.Fp8Experts' parameters) are viewed as
    their bytes, with the format taken from the dtype."""
    dtype = fp8_format.torch_dtype(fmt)
    w = random_fp8_experts(2, 16, 8, fmt)
    got = Fp8ExpertWeights.from_float8(
        w.gate_up.view(dtype), w.gate_up_scale, w.down.view(dtype), w.down_scale
    )
    assert got.format == fmt and torch.equal(got.gate_up, w.gate_up)
    assert got.down.data_ptr() == w.down.data_ptr()
    with pytest.raises(ValueError, match="not an fp8 format"):
        Fp8ExpertWeights.from_float8(
            w.gate_up.view(torch.int8), w.gate_up_scale, w.down.view(torch.int8), w.down_scale
        )


@pytest.mark.parametrize("ub", [None, 0.3])
@pytest.mark.parametrize("fmt", FORMATS, ids=fp8_format.NAMES.get)
def test_the_w8a8_reference_is_the_fp8_experts_module(fmt, ub):
    """moe_reference on W8A8 experts (Fp8Experts.kernel_weights(): what the fused MoE kernels
    get) equals MoE.forward with the Fp8Experts module (torch path: per-row activation
    quantization, exact sums), in float32 where the only differences are fp32 sums: 1e-5."""
    torch.manual_seed(0)
    h, i, e, k = 32, 16, 4, 2
    moe = MoE(h, i, e, k)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    name = "e4m3fn" if fmt == fp8_format.E4M3FN else "e4m3fnuz"
    moe.experts = Fp8Experts.from_experts(moe.experts, name, activation_scale_ub=ub)
    weights = moe.experts.kernel_weights()
    assert weights.quantize_input and weights.activation_scale_ub == ub
    x = torch.randn(9, h)
    with torch.no_grad():
        expected = moe(x)
        got = moe_reference(x, moe.router(x), weights, k, moe.shared_expert(x))
        weight_only = moe_reference(
            x,
            moe.router(x),
            dataclasses.replace(weights, quantize_input=False),
            k,
            moe.shared_expert(x),
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (weight_only - expected).abs().max() > 1e-3  # activation quantization is modelled
