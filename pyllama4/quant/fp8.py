"""FP8 (e4m3) weights and activations: the CPU reference every FP8 kernel must equal (issue #11).

Formats (`FP8_FORMATS`, largest finite value `FP8_MAX`): e4m3fn (448; NVIDIA, MI355 and the CPU
reference) and e4m3fnuz (240; MI300, gfx942).

Invariants:
- Weights [out, in] are quantized per output channel: scale = amax(|row|) / fmax (1 for an
  all-zero row), q = round-to-nearest-even(w / scale), so |w / scale - q| is at most half an e4m3
  ULP of w / scale (3 mantissa bits; the subnormal spacing below the smallest normal).
- Activations [N, in] are quantized dynamically per row (token), as fbgemm's quantize_fp8_per_row:
  scale = clamp(amax(|row|), 1e-12, ub) / fmax, so values beyond +-ub saturate to +-fmax and a
  zero row gets a tiny positive scale (never 0 or NaN).
- A quantized matmul computes y = (x_q . W_q^T) * x_scale[row] * w_scale[out], cast to the
  activation dtype, with the dot products summed exactly (in float64: a product of two e4m3
  values is a multiple of the format's smallest one, 2^-18 fn or 2^-20 fnuz, and below 2^35.8
  times it, so float64 adds up to 2^17 of them exactly, Llama 4's K being at most 2^14),
  rounded once to fp32, then scaled in fp32: a value independent of summation order, which GPU
  kernels must equal up to their fp32 accumulation error. Weight-only (quantize_input=False)
  uses x_q = x, x_scale = 1. Activations are quantized to the format of the weights they
  multiply.

`quantize_model` quantizes online, after the model is loaded and cast: Module.to(dtype) would
also cast fp8 tensors, which torch counts as floating point.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pyllama4.kernels.moe import Fp8ExpertWeights
from pyllama4.layers.ffn import Experts, MoE
from pyllama4.model.llama4 import Llama4ForCausalLM

log = logging.getLogger("pyllama4.fp8")

FP8_FORMATS: dict[str, torch.dtype] = {
    "e4m3fn": torch.float8_e4m3fn,
    "e4m3fnuz": torch.float8_e4m3fnuz,
}
FP8_MAX: dict[str, float] = {name: torch.finfo(dt).max for name, dt in FP8_FORMATS.items()}
ACTIVATION_EPS = 1e-12  # fbgemm's floor on a row's amax
DEFAULT_ACTIVATION_SCALE_UB = 1200.0  # fbgemm_fp8's activation_scale_ub default


def check_format(fmt: str) -> torch.dtype:
    """The torch dtype of an FP8 format name; ValueError naming the choices otherwise."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format {fmt!r}: expected one of {', '.join(FP8_FORMATS)}")
    return FP8_FORMATS[fmt]


def format_of(q: torch.Tensor) -> str:
    """The FP8 format name of a quantized tensor."""
    for name, dtype in FP8_FORMATS.items():
        if q.dtype == dtype:
            return name
    raise ValueError(f"{q.dtype} is not an FP8 format ({', '.join(FP8_FORMATS)})")


def _cast(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round fp32 values already in units of the scale; out-of-range values saturate."""
    fmax = FP8_MAX[fmt]
    return v.clamp(-fmax, fmax).to(FP8_FORMATS[fmt])


def quantize_weight(w: torch.Tensor, fmt: str = "e4m3fn") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q fp8 [..., out, in], scale fp32 [..., out]), per output channel."""
    check_format(fmt)
    w = w.float()
    amax = w.abs().amax(dim=-1)
    if not torch.isfinite(amax).all():
        raise ValueError("cannot quantize a weight holding NaN or infinite values")
    scale = torch.where(amax > 0, amax / FP8_MAX[fmt], 1.0)
    return _cast(w / scale.unsqueeze(-1), fmt), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., out, in] with scale [..., out] -> float32 q * scale."""
    return q.float() * scale.unsqueeze(-1)


def quantize_activation(
    x: torch.Tensor, fmt: str = "e4m3fn", ub: float | None = DEFAULT_ACTIVATION_SCALE_UB
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] -> (q fp8 [N, in], scale fp32 [N]), per row, amax clamped to [1e-12, ub]."""
    check_format(fmt)
    x = x.float()
    amax = x.abs().amax(dim=-1).clamp(min=ACTIVATION_EPS, max=ub)
    scale = amax / FP8_MAX[fmt]
    return _cast(x / scale.unsqueeze(-1), fmt), scale


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


def _scaled_mm(
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
        y = _scaled_mm(
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
        h = _scaled_mm(x, self.gate_up_proj[e], self.gate_up_scale[e], ub, quant).to(x.dtype)
        gate, up = h.chunk(2, dim=-1)
        a = up * F.silu(gate)
        return _scaled_mm(a, self.down_proj[e], self.down_scale[e], ub, quant).to(x.dtype)


def fp8_targets(model: Llama4ForCausalLM) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every module quantize_model replaces: per decoder layer the
    attention q/k/v/o projections, the dense SwiGLU's gate/up/down or, on MoE layers, the routed
    experts and the shared expert's gate/up/down. Kept in the model dtype: embeddings, norms,
    routers and lm_head, as in the published FP8 checkpoints (a vision tower is a separate module,
    never passed here). Attention is quantized too, as fbgemm_fp8's recipe does, while the
    llm-compressor recipe keeps it in bf16 (../shared/LLAMA4.md §4.1)."""
    targets: list[tuple[nn.Module, str]] = []
    for layer in model.model.layers:
        targets += [(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        ffn = layer.feed_forward
        if isinstance(ffn, MoE):
            targets.append((ffn, "experts"))
            ffn = ffn.shared_expert
        targets += [(ffn, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return targets


def quantize_model(
    model: Llama4ForCausalLM,
    fmt: str = "e4m3fn",
    activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
    *,
    quantize_input: bool = True,
) -> Llama4ForCausalLM:
    """Online FP8 quantization (`--quantization fp8`): replaces fp8_targets(model) in place by
    Fp8Linear / Fp8Experts, one module at a time, and returns the model."""
    check_format(fmt)
    options = dict(activation_scale_ub=activation_scale_ub, quantize_input=quantize_input)
    for parent, name in fp8_targets(model):
        module = getattr(parent, name)
        if isinstance(module, Experts):
            setattr(parent, name, Fp8Experts.from_experts(module, fmt, **options))
        else:
            setattr(parent, name, Fp8Linear.from_linear(module, fmt, **options))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (fp8 weights count one byte each, scales four)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
