"""Fused small ops of a decode step (hip/fused_ops.hip) behind their torch references.

Invariant: each function gives what its torch reference gives in bf16, with every intermediate
bf16 rounding at the same point; only fp32 details the reference leaves open (the summation
order of a norm's squares, the device's cosf / sinf / expf) may move a result by 1 bf16 ulp,
rarely (tests/test_kernels_emulated.py, tests/gpu/test_fused_ops.py):
  - add_rms_norm(x, residual, weight, eps) = (RMSNorm(s), s) for s = bf16(residual + x), which
    is written into residual (residual None: s = x);
  - rope_qk_norm_kv_write(...) = q as pyllama4.model.llama4.Attention.forward prepares it (RoPE,
    QK-norm, temperature, in that order), with k (so prepared) and v written into the caches at
    `slots` as pyllama4.layers.attention.paged_attention writes them;
  - silu_mul(gate, up) = F.silu(gate) * up (pyllama4.layers.ffn.SwiGLU.partial).
They enqueue on the current stream and never synchronise. Callers check usable() first.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from pyllama4.kernels import check, declare, library

_c = ctypes
_ADD_RMS_NORM = [_c.c_void_p] * 4 + [_c.c_int32] * 2 + [_c.c_float, _c.c_void_p]
_ROPE = [_c.c_void_p] * 4 + [_c.c_int64] * 3 + [_c.c_void_p] * 6 + [_c.c_int32] * 6
_ROPE += [_c.c_float, _c.c_void_p]
_SILU_MUL = [_c.c_void_p] * 3 + [_c.c_int64] * 2 + [_c.c_int32] * 2 + [_c.c_void_p]


def launchers(lib: ctypes.CDLL) -> tuple[Any, Any, Any]:
    """(add_rms_norm, rope_qk_norm_kv_write, silu_mul): lib's fused-op functions, their C
    signatures declared."""
    if lib.pyllama4_silu_mul.argtypes is None:
        declare(lib, "pyllama4_add_rms_norm", _ADD_RMS_NORM)
        declare(lib, "pyllama4_rope_qk_norm_kv_write", _ROPE)
        declare(lib, "pyllama4_silu_mul", _SILU_MUL)
    return lib.pyllama4_add_rms_norm, lib.pyllama4_rope_qk_norm_kv_write, lib.pyllama4_silu_mul


def _functions() -> tuple[Any, Any, Any] | None:
    """launchers() of the loaded library, or None (no library, or one built before these
    kernels)."""
    lib = library()
    if lib is None or not hasattr(lib, "pyllama4_silu_mul"):
        return None
    return launchers(lib)


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels take these tensors: non-empty bf16 GPU tensors, and a library with them."""
    return all(t.is_cuda and t.dtype == torch.bfloat16 and t.numel() > 0 for t in tensors) and (
        _functions() is not None
    )


def _launchers() -> tuple[Any, Any, Any]:
    fns = _functions()
    assert fns is not None, "pyllama4.kernels.fused called without the kernels (see usable())"
    return fns


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _heads(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t [T, heads, D] with each row's heads and D contiguous (the kernel's layout; else a
    copy), and its row stride."""
    if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        t = t.contiguous()
    return t, _row_stride(t)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t [..., n] as [rows, n] with unit stride along n (a view where possible), and its row
    stride."""
    t = t.reshape(-1, t.shape[-1])
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, _row_stride(t)


def _row_stride(t: torch.Tensor) -> int:
    """Elements between t's rows (dim 0); a single row's stride is whatever torch kept, so its
    own length then."""
    return t.stride(0) if t.shape[0] > 1 else t[0].numel()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s) with `weight`, s) for s = bf16(residual + x), written into residual (which
    must be contiguous), or s = x when residual is None. x, residual [..., H]; weight [H]."""
    assert residual is None or residual.is_contiguous(), "residual is written in place"
    x = x.contiguous()
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    check(
        _launchers()[0](
            out.data_ptr(),
            None if residual is None else residual.data_ptr(),
            x.data_ptr(),
            weight.contiguous().data_ptr(),
            x.numel() // hidden,
            hidden,
            eps,
            _stream(x),
        )
    )
    return out, x if residual is None else residual


def rope_qk_norm_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor | None,
    qk_norm: bool,
    eps: float,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] after RoPE (when inv_freq [D / 2] fp32 is given), QK-norm (when qk_norm) and
    the temperature (q_scale [T] fp32, when given); k likewise (no temperature) and v are
    written into k_cache / v_cache [slots, Hkv, D] (contiguous) at slots [T] int64. q, k, v may
    be row-strided views; positions [T] int64."""
    tokens, heads, dim = q.shape
    (q, q_stride), (k, k_stride), (v, v_stride) = _heads(q), _heads(k), _heads(v)
    out = torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device)
    check(
        _launchers()[1](
            out.data_ptr(),
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            q_stride,
            k_stride,
            v_stride,
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            slots.contiguous().data_ptr(),
            positions.contiguous().data_ptr(),
            None if inv_freq is None else inv_freq.contiguous().data_ptr(),
            None if q_scale is None else q_scale.contiguous().data_ptr(),
            tokens,
            heads,
            k.shape[1],
            dim,
            inv_freq is not None,
            qk_norm,
            eps,
            _stream(q),
        )
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up in bf16 (each rounded as torch rounds it); gate, up [..., I] (rows may
    be strided, e.g. the halves of a fused gate_up output)."""
    (g, g_stride), (u, u_stride) = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    check(
        _launchers()[2](
            out.data_ptr(),
            g.data_ptr(),
            u.data_ptr(),
            g_stride,
            u_stride,
            g.shape[0],
            g.shape[1],
            _stream(gate),
        )
    )
    return out
