"""Reference implementations the tests compare production code with, and nothing else uses.

- `moe_reference`: what pyllama4.kernels.moe.fused_moe_gpu computes, in torch and float32.
- `dense_causal_attend`: causal softmax attention over one sequence, the plain `Attend` of
  pyllama4.model.eagle3.Eagle3Draft.

Test modules import it as `oracles` (pyproject.toml puts tests/ on pytest's pythonpath).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyllama4 import fp8_format
from pyllama4.kernels.moe import Experts, Fp8ExpertWeights
from pyllama4.model.eagle3 import Attend
from pyllama4.quant.fp8 import quantize_activation


def expert_weights_fp32(
    experts: Experts | Fp8ExpertWeights, e: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's float32 (gate_up [H, 2I], down [I, H])."""
    if isinstance(experts, Fp8ExpertWeights):
        return experts.dequantized(e)
    return experts.gate_up_proj[e].float(), experts.down_proj[e].float()


def moe_reference(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    experts: Experts | Fp8ExpertWeights,
    top_k: int,
    shared_out: torch.Tensor,
) -> torch.Tensor:
    """What fused_moe_gpu computes, in torch and float32 (the tests' reference): MoE.forward's
    routing (torch.topk, sigmoid in fp32 cast to x's dtype, x * score in x's dtype), then each
    touched expert in fp32 on its weights (fp8 dequantized), summed onto shared_out in fp32.
    W8A8 experts (quantize_input) follow Fp8Experts.expert instead: input rows quantized, the
    gate_up output rounded to x's dtype and the SwiGLU computed in it, then quantized again.
    Returns [T, H] float32."""
    top_logits, top_ids = torch.topk(router_logits, top_k, dim=-1)
    scores = torch.sigmoid(top_logits.float()).to(x.dtype).reshape(-1, 1)
    flat = top_ids.reshape(-1)
    tokens = torch.arange(flat.numel(), device=x.device) // top_k
    out = shared_out.float().clone()
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        rows = tokens[pairs]
        scaled = x[rows] * scores[pairs]
        gate_up, down = expert_weights_fp32(experts, e)
        if isinstance(experts, Fp8ExpertWeights) and experts.quantize_input:
            ub, fmt = experts.activation_scale_ub, experts.format
            gate, up = (_fake_quantized(scaled, fmt, ub) @ gate_up).to(x.dtype).chunk(2, dim=-1)
            out.index_add_(0, rows, _fake_quantized(up * F.silu(gate), fmt, ub) @ down)
        else:
            gate, up = (scaled.float() @ gate_up).chunk(2, dim=-1)
            out.index_add_(0, rows, (F.silu(gate) * up) @ down)
    return out


def _fake_quantized(rows: torch.Tensor, fmt: int, ub: float | None) -> torch.Tensor:
    """rows quantized per row into fp8 format `fmt` (quantize_activation), as float32 q * scale."""
    q, scale = quantize_activation(rows, fp8_format.NAMES[fmt], ub)
    return q.float() * scale.unsqueeze(-1)


def dense_causal_attend(scale: float) -> Attend:
    """Causal softmax attention over the N given rows of one sequence (GQA), in float32."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
        n = q.shape[0]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, v).type_as(q)

    return attend
