"""FP8 (e4m3) quantization of weights and activations: the CPU reference every FP8 kernel must
equal. The formats themselves (names, codes, ranges, encoding) are pyllama4.fp8_format's.

Invariants:
- Weights [out, in] are quantized per output channel: scale = amax(|row|) / fmax (1 for an
  all-zero row), q = round-to-nearest-even(w / scale), so |w / scale - q| is at most half an e4m3
  ULP of w / scale (3 mantissa bits; the subnormal spacing below the smallest normal).
- Activations [N, in] are quantized dynamically per row (token), as fbgemm's quantize_fp8_per_row:
  scale = clamp(amax(|row|), 1e-12, ub) / fmax, so values beyond +-ub saturate to +-fmax and a
  zero row gets a tiny positive scale (never 0 or NaN).
- A quantized matmul (`scaled_mm`) computes y = (x_q . W_q^T) * x_scale[row] * w_scale[out],
  cast to the activation dtype, with the dot products summed exactly (in float64: a product of
  two e4m3 values is a multiple of the format's smallest one, 2^-18 fn or 2^-20 fnuz, and below
  2^35.8 times it, so float64 adds up to 2^17 of them exactly, Llama 4's K being at most 2^14),
  rounded once to fp32, then scaled in fp32: a value independent of summation order, which GPU
  kernels must equal up to their fp32 accumulation error. Weight-only (quantize_input=False)
  uses x_q = x, x_scale = 1. Activations are quantized to the format of the weights they
  multiply.
"""

from __future__ import annotations

import logging

import torch

from pyllama4.fp8_format import FP8_MAX, check_format, encode, format_of

log = logging.getLogger("pyllama4.fp8")

ACTIVATION_EPS = 1e-12  # fbgemm's floor on a row's amax
DEFAULT_ACTIVATION_SCALE_UB = 1200.0  # fbgemm_fp8's activation_scale_ub default


def quantize_weight(w: torch.Tensor, fmt: str = "e4m3fn") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q fp8 [..., out, in], scale fp32 [..., out]), per output channel."""
    check_format(fmt)
    w = w.float()
    amax = w.abs().amax(dim=-1)
    if not torch.isfinite(amax).all():
        raise ValueError("cannot quantize a weight holding NaN or infinite values")
    scale = torch.where(amax > 0, amax / FP8_MAX[fmt], 1.0)
    return encode(w / scale.unsqueeze(-1), fmt), scale


def quantize_activation(
    x: torch.Tensor, fmt: str = "e4m3fn", ub: float | None = DEFAULT_ACTIVATION_SCALE_UB
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] -> (q fp8 [N, in], scale fp32 [N]), per row, amax clamped to [1e-12, ub]."""
    check_format(fmt)
    x = x.float()
    amax = x.abs().amax(dim=-1).clamp(min=ACTIVATION_EPS, max=ub)
    scale = amax / FP8_MAX[fmt]
    return encode(x / scale.unsqueeze(-1), fmt), scale


def fn_to_fnuz(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn weights -> the same values as e4m3fnuz, for MI300 (vLLM's
    normalize_e4m3fn_to_e4m3fnuz). Exact: both formats have 3 mantissa bits and the same
    encoding of normals and subnormals, with exponent bias 7 (fn) and 8 (fnuz), so every byte
    reinterpreted as fnuz is exactly half its fn value; doubling the scale (exact in fp32)
    restores q * scale bit for bit. The byte 0x80, -0 in fn, is fnuz's only NaN: it becomes
    0x00 (+0). fn's NaNs (0x7f, 0xff) would read as fnuz's +-240: a ValueError instead, as a
    quantized weight is never NaN. The fnuz range is then used up to 224 (fn's 448 / 2)."""
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fn_to_fnuz converts float8_e4m3fn, not {q.dtype}")
    bits = q.view(torch.uint8)
    if ((bits & 0x7F) == 0x7F).any():
        raise ValueError("float8_e4m3fn NaN (bytes 0x7f, 0xff) in a quantized weight")
    return bits.masked_fill(bits == 0x80, 0).view(torch.float8_e4m3fnuz), scale * 2


def scaled_mm(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    ub: float | None,
    quantize_input: bool,
) -> torch.Tensor:
    """x [N, K] times input-major fp8 w_q [K, M] with per-column w_scale [M] -> [N, M] (fp32, or
    x's dtype rounded once from it).

    On the GPU, Fp8Linear's decode case (w_q the transpose of a contiguous [M, K] weight, bf16 x,
    N <= 16) runs hip/fp8_gemm.hip (pyllama4.kernels.fp8); everything else on the GPU runs
    scaled_mm_device (vendor GEMMs); the CPU runs the exact reference below."""
    if x.is_cuda:
        from pyllama4.kernels import fp8 as fp8_gpu

        weight = w_q.T
        if fp8_gpu.dispatches(x, weight):
            return fp8_gpu.fp8_linear_gpu(x, weight, w_scale, None, ub, quantize_input)
        return scaled_mm_device(x, w_q, w_scale, ub, quantize_input)
    if not quantize_input:
        return (x.double() @ w_q.double()).float() * w_scale
    a, a_scale = quantize_activation(x, format_of(w_q), ub)
    return (a.double() @ w_q.double()).float() * a_scale.unsqueeze(-1) * w_scale


_NO_SCALED_MM: set[torch.device] = set()  # devices where torch._scaled_mm refused row-wise fp8


def scaled_mm_device(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    ub: float | None,
    quantize_input: bool,
) -> torch.Tensor:
    """_scaled_mm with the device's GEMMs (prefill on a GPU; runs on any device): activations
    quantized as the reference, then torch._scaled_mm (the vendor's fp8 GEMM, row-wise scales,
    output x's dtype when bf16) where w_q is column-major (Fp8Linear's transposed weight) and the
    device takes it, else a float32 matmul of the dequantized operands (the experts' input-major
    weights, weight-only, or a device without row-wise fp8). Equal to the reference up to the
    fp32 summation order and one rounding to x's dtype."""
    a, a_scale = quantize_activation(x, format_of(w_q), ub) if quantize_input else (x, None)
    if a_scale is not None and w_q.stride(0) == 1 and x.device not in _NO_SCALED_MM:
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        try:
            return torch._scaled_mm(
                a,
                w_q,
                scale_a=a_scale.unsqueeze(-1),
                scale_b=w_scale.unsqueeze(0).contiguous(),
                out_dtype=out_dtype,
            )
        except RuntimeError as e:  # no row-wise fp8 GEMM for this device, format or shape
            log.warning("torch._scaled_mm failed on %s (%s): FP8 prefill uses fp32", x.device, e)
            _NO_SCALED_MM.add(x.device)
    lhs = a.float() if a_scale is None else a.float() * a_scale.unsqueeze(-1)
    return (lhs @ w_q.float()) * w_scale
