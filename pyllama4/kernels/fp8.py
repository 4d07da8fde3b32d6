"""GPU fp8 linear for decode (hip/fp8_gemm.hip) behind pyllama4.layers.fp8's Fp8Linear.

Invariant: `fp8_linear_gpu(x, weight, weight_scale, fmt, ub, quantize_input)` gives what
Fp8Linear.forward gives for x [T, in] bf16 (T <= MAX_TOKENS): y = bf16(fp32(x_q . W_q^T) *
x_scale[t] * w_scale[o]), x_q the per-token quantized activations in the weight's format (or x
itself with quantize_input=False), with fp32 sums in place of the reference's exact ones
(tests/gpu/test_fp8_gemm.py). It enqueues on the current stream and never synchronises.

Scope: decode, 1 <= T <= MAX_TOKENS = 16 (the GEMV reads the weights once for all T tokens).
Larger T (prefill) takes pyllama4.quant.fp8.scaled_mm_device: torch._scaled_mm, the vendor's
fp8 GEMM with row-wise scales, where the device takes it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from pyllama4 import fp8_format
from pyllama4.kernels import check, declare, library
from pyllama4.kernels import workspace as scratch

MAX_TOKENS = 16  # hip/fp8_gemm.hip kMaxTokens
ALIGN = 16  # in_features multiple, pointer alignment of x and weight

_c = ctypes
_LINEAR = [_c.c_void_p] * 4 + [_c.c_int32] * 4 + [_c.c_float, _c.c_int32, _c.c_void_p]
_LINEAR += [_c.c_int64, _c.c_void_p]
_QUANTIZE = [_c.c_void_p] * 3 + [_c.c_int32] * 3 + [_c.c_float, _c.c_void_p]


def _fn(lib: ctypes.CDLL, name: str, argtypes: list[Any], restype: Any = _c.c_int) -> Any:
    fn = getattr(lib, name)
    return fn if fn.argtypes is not None else declare(lib, name, argtypes, restype)


def launchers(lib: ctypes.CDLL) -> tuple[Any, Any, Any]:
    """(workspace_bytes, quantize_per_token, linear): lib's fp8 functions, their C signatures
    declared."""
    return (
        _fn(lib, "pyllama4_fp8_linear_workspace_bytes", [_c.c_int32] * 2, _c.c_int64),
        _fn(lib, "pyllama4_fp8_quantize_per_token", _QUANTIZE),
        _fn(lib, "pyllama4_fp8_linear", _LINEAR),
    )


def _functions() -> tuple[Any, Any, Any] | None:
    """launchers() of the loaded library, or None (no library, or one built before the fp8
    kernels)."""
    lib = library()
    if lib is None or not hasattr(lib, "pyllama4_fp8_linear"):
        return None
    return launchers(lib)


def usable(weight: torch.Tensor) -> bool:
    """The kernels take this Fp8Linear weight [out, in]: on the GPU, float8 (e4m3fn or
    e4m3fnuz), contiguous, 16-byte aligned, in a multiple of 16, and a library with the fp8
    launchers."""
    return (
        weight.is_cuda
        and weight.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.shape[1] % ALIGN == 0
        and weight.data_ptr() % ALIGN == 0
        and _functions() is not None
    )


def dispatches(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Fp8Linear sends x [T, in] to the kernel: bf16 on the weight's device, 1 <= T <= 16."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and x.dim() == 2
        and 1 <= x.shape[0] <= MAX_TOKENS
        and x.shape[1] == weight.shape[-1]
        and x.device == weight.device
        and usable(weight)
    )


def _workspace_for(device: torch.device, nbytes: int) -> torch.Tensor:
    return scratch("fp8_linear", device, nbytes, torch.uint8)


def _ub(ub: float | None) -> float:
    return 0.0 if ub is None else float(ub)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % ALIGN == 0 else x.clone()


def quantize_per_token_gpu(
    x: torch.Tensor, fmt: int, ub: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, in] bf16 -> (x_q [T, in] uint8 bits, x_scale [T] fp32), as
    pyllama4.quant.fp8.quantize_activation (the first launch of fp8_linear_gpu)."""
    fns = _functions()
    assert fns is not None, "quantize_per_token_gpu called without the kernel library"
    x = _aligned(x)
    tokens, features = x.shape
    x_q = torch.empty(tokens, features, dtype=torch.uint8, device=x.device)
    scale = torch.empty(tokens, dtype=torch.float32, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    check(fns[1](*quantize_arguments(x_q, scale, x, fmt, ub), stream))
    return x_q, scale


def quantize_arguments(
    x_q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, fmt: int, ub: float | None
) -> tuple[Any, ...]:
    """pyllama4_fp8_quantize_per_token's arguments but the stream."""
    tokens, features = x.shape
    return (x_q.data_ptr(), scale.data_ptr(), x.data_ptr(), fmt, tokens, features, _ub(ub))


def linear_arguments(
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    fmt: int,
    ub: float | None,
    quantize_input: bool,
    workspace: torch.Tensor,
) -> tuple[Any, ...]:
    """pyllama4_fp8_linear's arguments but the stream (x, weight, weight_scale contiguous)."""
    tokens, features = x.shape
    return (
        y.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        weight_scale.data_ptr(),
        fmt,
        tokens,
        features,
        weight.shape[0],
        _ub(ub),
        int(quantize_input),
        workspace.data_ptr(),
        workspace.numel(),
    )


def fp8_linear_gpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    fmt: int | None = None,
    ub: float | None = None,
    quantize_input: bool = True,
) -> torch.Tensor:
    """x [T, in] bf16 (T <= 16), weight [out, in] float8 (or uint8 bits with fmt), weight_scale
    [out] fp32 -> y [T, out] bf16 (see the module's invariant). fmt defaults to the weight's
    dtype's format code (fp8_format.E4M3FN or E4M3FNUZ); ub None or <= 0: no upper clamp."""
    fns = _functions()
    assert fns is not None, "fp8_linear_gpu called without the kernel library"
    if fmt is None:
        fmt = fp8_format.format_of_dtype(weight.dtype)
    tokens, features = x.shape
    out_features = weight.shape[0]
    if weight.shape[1] != features or weight_scale.shape != (out_features,):
        raise ValueError(
            f"fp8_linear_gpu: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"weight_scale {tuple(weight_scale.shape)}"
        )
    x = _aligned(x)
    scale = weight_scale.contiguous().float()
    nbytes = fns[0](tokens, features)
    workspace = _workspace_for(x.device, nbytes)
    y = torch.empty(tokens, out_features, dtype=torch.bfloat16, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    args = linear_arguments(y, x, weight, scale, fmt, ub, quantize_input, workspace)
    check(fns[2](*args, stream))
    return y
