"""FP8 drop-ins for the bf16 linears and routed experts: `Fp8Linear` (for a bias-free nn.Linear)
and `Fp8Experts` (for layers.ffn.Experts), holding fp8 weights with fp32 per-output-channel scales.

Invariant: each computes with pyllama4.quant.fp8.scaled_mm, the CPU reference of FP8 matmuls (GPU
kernels where they dispatch), from weights quantized by quantize_weight; Fp8Experts.kernel_weights
hands the fused MoE kernels views of the same bytes, so both paths compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyllama4.fp8_format import check_format, format_of
from pyllama4.kernels.moe import Fp8ExpertWeights
from pyllama4.layers.ffn import Experts
from pyllama4.quant.fp8 import DEFAULT_ACTIVATION_SCALE_UB, quantize_weight, scaled_mm


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Fp8Linear(nn.Module):
    """A bias-free nn.Linear with fp8 `weight` [out, in] and fp32 `weight_scale` [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str = "e4m3fn",
        *,
        activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
        quantize_input: bool = True,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation_scale_ub = activation_scale_ub
        self.quantize_input = quantize_input
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=check_format(fmt)))
        self.weight_scale = _frozen(torch.empty(out_features, dtype=torch.float32))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt: str = "e4m3fn",
        *,
        activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
        quantize_input: bool = True,
    ) -> Fp8Linear:
        if linear.bias is not None:
            raise ValueError("Fp8Linear has no bias; Llama 4's text linears have none")
        with torch.device("meta"):
            module = cls(
                linear.in_features,
                linear.out_features,
                fmt,
                activation_scale_ub=activation_scale_ub,
                quantize_input=quantize_input,
            )
        q, scale = quantize_weight(linear.weight.detach(), fmt)
        module.weight, module.weight_scale = _frozen(q), _frozen(scale)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = scaled_mm(
            x.reshape(-1, self.in_features),
            self.weight.T,
            self.weight_scale,
            self.activation_scale_ub,
            self.quantize_input,
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={format_of(self.weight)}, activation_scale_ub={self.activation_scale_ub}, "
            f"quantize_input={self.quantize_input}"
        )


def _quantize_input_major(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, K, M] (input-major) -> (q fp8 [E, K, M], scale fp32 [E, M]), one scale per column;
    one expert at a time, so the fp32 temporaries stay the size of one expert."""
    num, k, m = w.shape
    q = torch.empty(num, k, m, dtype=check_format(fmt), device=w.device)
    scale = torch.empty(num, m, dtype=torch.float32, device=w.device)
    for e in range(num):
        qe, scale[e] = quantize_weight(w[e].detach().T, fmt)
        q[e] = qe.T
    return q, scale


class Fp8Experts(nn.Module):
    """Drop-in for pyllama4.layers.ffn.Experts: fp8 `gate_up_proj` [E, H, 2I] and `down_proj`
    [E, I, H] in the checkpoint's input-major layout, with fp32 `gate_up_scale` [E, 2I] and
    `down_scale` [E, H], one per output column. An expert quantizes its input per token, computes
    gate_up, SiLU(gate) * up in the activation dtype, quantizes that per token, then down."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        fmt: str = "e4m3fn",
        *,
        activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
        quantize_input: bool = True,
    ):
        super().__init__()
        dtype = check_format(fmt)
        self.intermediate_size = intermediate_size
        self.activation_scale_ub = activation_scale_ub
        self.quantize_input = quantize_input
        e, h, i = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = _frozen(torch.empty(e, h, 2 * i, dtype=dtype))
        self.gate_up_scale = _frozen(torch.empty(e, 2 * i, dtype=torch.float32))
        self.down_proj = _frozen(torch.empty(e, i, h, dtype=dtype))
        self.down_scale = _frozen(torch.empty(e, h, dtype=torch.float32))

    @classmethod
    def from_experts(
        cls,
        experts: Experts,
        fmt: str = "e4m3fn",
        *,
        activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
        quantize_input: bool = True,
    ) -> Fp8Experts:
        num, hidden, _ = experts.gate_up_proj.shape
        with torch.device("meta"):
            module = cls(
                num,
                hidden,
                experts.intermediate_size,
                fmt,
                activation_scale_ub=activation_scale_ub,
                quantize_input=quantize_input,
            )
        for name in ("gate_up", "down"):
            q, scale = _quantize_input_major(getattr(experts, f"{name}_proj"), fmt)
            setattr(module, f"{name}_proj", _frozen(q))
            setattr(module, f"{name}_scale", _frozen(scale))
        return module

    def kernel_weights(self) -> Fp8ExpertWeights:
        """What the fused MoE kernels read: views of these weights, with this module's
        activation quantization (W8A8, or weight-only), so the kernels compute what expert()
        does."""
        return Fp8ExpertWeights.from_float8(
            self.gate_up_proj,
            self.gate_up_scale,
            self.down_proj,
            self.down_scale,
            quantize_input=self.quantize_input,
            activation_scale_ub=self.activation_scale_ub,
        )

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on the rows routed to it (already scaled by their router scores)."""
        ub, quant = self.activation_scale_ub, self.quantize_input
        h = scaled_mm(x, self.gate_up_proj[e], self.gate_up_scale[e], ub, quant).to(x.dtype)
        gate, up = h.chunk(2, dim=-1)
        a = up * F.silu(gate)
        return scaled_mm(a, self.down_proj[e], self.down_scale[e], ub, quant).to(x.dtype)
