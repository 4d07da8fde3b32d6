"""Llama 4 feed-forward blocks: dense SwiGLU and the top-k MoE with a shared expert.

Invariants (as in transformers): the router score is sigmoid(top-k logit), computed in float32,
cast to the activation dtype, and multiplies the expert INPUT; the shared expert sees the
unscaled input; expert weights are input-major (`gate_up_proj` [E, H, 2I]: gate then up;
`down_proj` [E, I, H]). Dispatch is sparse: each expert computes only the tokens routed to it.
Small bf16 batches on a GPU use the fused MoE kernels instead (pyllama4.kernels.moe), which
compute the same in fp32 with one bf16 rounding at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyllama4.kernels import moe as moe_gpu


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Routed experts in transformers' fused, input-major layout."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, 2 * intermediate_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on the rows routed to it (already scaled by their router scores)."""
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * F.silu(gate)) @ self.down_proj[e]

    def kernel_weights(self) -> Experts:
        """What the fused MoE kernels read (pyllama4.kernels.moe): these bf16 weights."""
        return self


class Router(nn.Linear):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = Router(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = SwiGLU(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H]. On a GPU, bf16 batches of up to moe_gpu.MAX_TOKENS rows (decode)
        take the fused MoE kernels (pyllama4.kernels.moe; bf16 or FP8 experts, W8A16 or W8A8 as
        the experts module computes; the shared expert stays torch's);
        everything else, the CPU always, takes the torch path below."""
        if x.is_cuda and moe_gpu.dispatches(
            x, weights := self.experts.kernel_weights(), self.top_k
        ):
            shared = self.shared_expert(x)
            return moe_gpu.fused_moe_gpu(x, self.router(x), weights, self.top_k, shared)
        logits = self.router(x)
        top_logits, top_experts = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)  # [N, k]
        # Group the N*k (token, expert) pairs by expert: one contiguous run per expert.
        flat_experts = top_experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        tokens = order // self.top_k
        routed_in = x[tokens] * scores.reshape(-1, 1)[order]
        counts = torch.bincount(flat_experts, minlength=self.experts.gate_up_proj.shape[0])
        routed_out = torch.empty_like(routed_in)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                routed_out[start : start + n] = self.experts.expert(e, routed_in[start : start + n])
                start += n
        out = self.shared_expert(x)
        return out.index_add_(0, tokens, routed_out)
