"""What the fused-op kernel tests share (hip/fused_ops.hip; tests/test_kernels_emulated.py on the
CPU, tests/gpu/test_fused_ops.py on a GPU): inputs, the torch references, and the tolerance,
counted in bf16 steps.

The tolerance: at most FUSED_ULPS bf16 steps, on at most FUSED_FLIPS of the elements. The
kernels round wherever the references round, so what may differ is fp32 detail the references
leave open (a norm's summation order, the device's cosf / sinf / expf): a result at a bf16
rounding boundary, rarely. A rounding the kernel misses flips ~25% of the elements.
"""

from __future__ import annotations

import torch

from pyllama4.config import RopeScaling
from pyllama4.layers.norm import l2_norm
from pyllama4.layers.rope import apply_rope, rotation

FUSED_ULPS = 1  # bf16 steps any element may be from the torch reference
FUSED_FLIPS = 1e-3  # the fraction of elements that may differ at all
EPS = 1e-5  # Llama 4's rms_norm_eps
SCOUT_ROPE = RopeScaling(16.0, 1.0, 1.0, 8192)  # Scout's llama3 scaling
SCOUT_THETA = 500000.0


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, how many bf16 steps a and b are apart: 0 when equal (+0 == -0)."""

    def key(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (key(a.cpu()) - key(b.cpu())).abs()


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ulps = bf16_ulps(out, ref)
    flips = (ulps > 0).double().mean().item()
    worst = int(ulps.max())
    assert worst <= FUSED_ULPS and flips <= FUSED_FLIPS, f"{what}: {worst} ulps, on {flips:.3%}"


def bf16_randn(*shape: int, seed: int, scale: float = 1.0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(torch.bfloat16).to(device)


def temperature(positions: torch.Tensor) -> torch.Tensor:
    """pyllama4.model.llama4.StepContext's temperature [T] fp32 at Scout's floor_scale 8192 and
    attn_scale 0.1."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / 8192)) * 0.1 + 1.0


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor | None,
    qk_norm: bool,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What pyllama4.model.llama4.Attention.forward does to q and k, in its order: RoPE (when
    inv_freq is given), QK-norm, the temperature `scale` [T] (when given)."""
    if inv_freq is not None:
        rot = rotation(positions, inv_freq)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
    if qk_norm:
        q, k = l2_norm(q, EPS), l2_norm(k, EPS)
    if scale is not None:
        q = (q * scale[:, None, None]).to(q.dtype)
    return q, k
