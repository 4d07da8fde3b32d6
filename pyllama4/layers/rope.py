"""Llama 4 rotary embedding: interleaved (complex-pair) RoPE with optional llama3 scaling.

Invariant: head-dim pairs (2i, 2i+1) are rotated as the complex number x[2i] + j*x[2i+1] by
angle position * inv_freq[i], computed in float32 and cast back, exactly as transformers does;
checkpoint q/k rows are used as stored (no rotate-half permutation).
"""

from __future__ import annotations

import math

import torch

from pyllama4.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies (transformers' default / llama3 formulas)."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu")  # even under meta
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    # Between the two wavelengths: interpolate. With low == high the band is empty (the division
    # by zero yields inf/nan only where torch.where discards it), as in transformers.
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[T, head_dim // 2] complex64 factors exp(j * position * inv_freq)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, heads, head_dim] by rot [T, head_dim // 2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[:, None, :]).flatten(-2).type_as(x)
