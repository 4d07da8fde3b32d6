"""RMSNorm and the weightless L2 norm of Llama 4, with transformers' rounding.

Invariant: statistics are computed in float32 and the normalised value is cast back to the
input dtype BEFORE the weight multiplies it (the order transformers and Meta use).
"""

from __future__ import annotations

import torch
from torch import nn


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """QK-norm: x / rms(x) over the last dim, in float32, cast back; no learnable weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm(x, self.eps) * self.weight
