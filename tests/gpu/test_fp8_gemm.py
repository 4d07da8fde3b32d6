"""The fp8 linear kernels (hip/fp8_gemm.hip) against the CPU reference, on a GPU.

Skipped without a GPU, without the built kernel library, or with a library that predates the
fp8 launchers (the skip names which). Weights are random fp8 bytes of every finite pattern with
random per-row scales; activations normal bf16, token 0 with an outlier beyond the default
activation_scale_ub (1200) so the clamp matters. Shapes: Scout's dense linears (in 5120 -> out
5120, 1024, 16384; 16384 -> 5120) at 1, 4 and 16 tokens, both formats, quantize_input on (ub 1200
and none) and off.

Reference: pyllama4.quant.fp8.scaled_mm on the same tensors moved to the CPU (exact sums rounded
once to fp32, then scaled). The kernel sums in fp32 and rounds to bf16 once: an element may differ
by the bf16 rounding of the output (2^-9 relative) and the fp32 summation order, so the tolerance
is 2^-8 * |ref| + 1e-3 * max |ref| of the token's row. The quantized activation bytes must equal
torch's float8 cast of the clamped, scaled activations exactly (except on rounding ties, where
only the division's last bit decides), and the scales bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from pyllama4 import fp8_format, kernels
from pyllama4.kernels import fp8 as fp8_gpu
from pyllama4.quant import fp8 as fp8_ref

if not torch.cuda.is_available():
    pytest.skip("no GPU: torch.cuda.is_available() is False", allow_module_level=True)
if kernels.library() is None:
    pytest.skip(f"no GPU kernel library: {kernels.reason()}", allow_module_level=True)
if fp8_gpu._functions() is None:
    pytest.skip("the kernel library predates the fp8 kernels (rebuild it)", allow_module_level=True)

SHAPES = [(5120, 5120), (5120, 1024), (5120, 16384), (16384, 5120)]  # (in, out)
TOKENS = [1, 4, 16]
FORMATS = [fp8_format.E4M3FN, fp8_format.E4M3FNUZ]
MODES = [(True, 1200.0), (True, None), (False, None)]  # (quantize_input, activation_scale_ub)


def random_weight(shape: tuple[int, int], fmt: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(weight [out, in] float8 on the GPU, weight_scale [out] fp32 on the GPU)."""
    features, out = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bits = torch.randint(0, 256, (out, features), dtype=torch.uint8, device="cuda", generator=gen)
    bits[fp8_format.is_nan(bits, fmt)] = 0x3C
    scale = (torch.rand(out, device="cuda", generator=gen) + 0.5) / (100 * features**0.5)
    return bits.view(fp8_format.torch_dtype(fmt)), scale


def random_x(tokens: int, features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, features, device="cuda", generator=gen)
    x[0, 7] = 3000.0  # beyond ub = 1200: saturates when the clamp applies
    return x.to(torch.bfloat16)


@pytest.fixture(scope="module")
def weights() -> dict[tuple[tuple[int, int], int], tuple[torch.Tensor, ...]]:
    return {}


def get_weight(cache: dict, shape: tuple[int, int], fmt: int) -> tuple[torch.Tensor, ...]:
    key = (shape, fmt)
    if key not in cache:
        cache.clear()  # one at a time: the CPU copies of 16384 x 5120 are large enough
        weight, scale = random_weight(shape, fmt, seed=shape[0] + shape[1] + fmt)
        cache[key] = (weight, scale, weight.cpu(), scale.cpu())
    return cache[key]


@pytest.mark.parametrize("quantize_input,ub", MODES, ids=["quant-ub", "quant-noub", "w8a16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[fp8_format.NAMES[f] for f in FORMATS])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}x{o}" for i, o in SHAPES])
def test_fp8_linear_matches_cpu_reference(
    weights: dict, shape: tuple[int, int], tokens: int, fmt: int, quantize_input: bool, ub
) -> None:
    weight, scale, weight_cpu, scale_cpu = get_weight(weights, shape, fmt)
    x = random_x(tokens, shape[0], seed=tokens)
    y = fp8_gpu.fp8_linear_gpu(x, weight, scale, fmt, ub, quantize_input)
    ref = fp8_ref.scaled_mm(x.cpu(), weight_cpu.T, scale_cpu, ub, quantize_input)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float().cpu() - ref).abs()
    tol = 2**-8 * ref.abs() + 1e-3 * ref.abs().amax(dim=-1, keepdim=True)
    assert torch.isfinite(ref).all()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements off; worst {float((err - tol).max()):.3g} "
        f"beyond tolerance"
    )


def _ties(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Which fp32 values v lie exactly halfway between two fp8 values (q: v cast to fp8)."""
    r = q.float()
    other = 2 * v - r
    return (v != r) & (other.to(q.dtype).float() == other)


@pytest.mark.parametrize("ub", [1200.0, None], ids=["ub", "noub"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[fp8_format.NAMES[f] for f in FORMATS])
@pytest.mark.parametrize("tokens", [1, 16, 37])
def test_quantize_per_token_is_torchs_cast(tokens: int, fmt: int, ub) -> None:
    x = random_x(tokens, 5120, seed=100 + tokens)
    x[-1, :] = 0  # a zero row: the 1e-12 floor
    x[0, 100:356] = (torch.arange(256, device="cuda") - 128).to(torch.bfloat16) * 2**-12  # tiny
    q, scale = fp8_gpu.quantize_per_token_gpu(x, fmt, ub)
    name = fp8_format.NAMES[fmt]
    ref_q, ref_scale = fp8_ref.quantize_activation(x.cpu(), name, ub)
    assert torch.equal(scale.cpu(), ref_scale), "scales differ from the CPU reference"
    fmax = fp8_format.FP8_MAX[name]
    v = (x.float().cpu() / ref_scale.unsqueeze(-1)).clamp(-fmax, fmax)
    cast = v.to(fp8_format.torch_dtype(fmt))
    assert torch.equal(cast.view(torch.uint8), ref_q.view(torch.uint8))
    tie = _ties(v, cast)
    got, want = q.cpu(), cast.view(torch.uint8)
    differs = (got != want) & ~tie
    assert not differs.any(), (
        f"{int(differs.sum())} bytes differ, e.g. value {float(v[differs][0])}: "
        f"kernel {int(got[differs][0]):#04x}, torch {int(want[differs][0]):#04x}"
    )


def test_fp8_linear_module_dispatches() -> None:
    """Fp8Linear on the GPU: decode (<= 16 tokens) through the kernel, prefill through torch;
    both close to the CPU module."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 384, bias=False)
    fmt = "e4m3fnuz" if torch.version.hip else "e4m3fn"
    module = fp8_ref.Fp8Linear.from_linear(linear, fmt)
    gpu_module = fp8_ref.Fp8Linear.from_linear(linear, fmt).cuda()
    assert fp8_gpu.usable(gpu_module.weight)
    for tokens in (3, 16, 40):
        x = torch.randn(tokens, 512).to(torch.bfloat16)
        ref = module(x).float()
        y = gpu_module(x.cuda()).float().cpu()
        tol = 2**-7 * ref.abs() + 2e-3 * ref.abs().amax(dim=-1, keepdim=True)
        assert ((y - ref).abs() <= tol).all(), f"{tokens} tokens"


def test_bad_arguments_are_refused() -> None:
    weight, scale = random_weight((32, 16), fp8_format.E4M3FN, seed=1)
    x = torch.randn(17, 32, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="num_tokens"):
        fp8_gpu.fp8_linear_gpu(x, weight, scale)
    weight, scale = random_weight((24, 16), fp8_format.E4M3FN, seed=1)
    assert not fp8_gpu.usable(weight)  # in_features not a multiple of 16
    with pytest.raises(RuntimeError, match="in_features"):
        fp8_gpu.fp8_linear_gpu(x[:2, :24], weight, scale)
