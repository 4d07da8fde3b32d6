"""Online FP8 quantization of a loaded model (`--quantization fp8`): which modules become FP8,
and their replacement by Fp8Linear / Fp8Experts.

Invariant: `quantize_model` runs after the model is loaded and cast (Module.to(dtype) would also
cast fp8 tensors, which torch counts as floating point) and replaces exactly the modules
`fp8_targets` lists, each by the FP8 quantization of its own weights; nothing else changes.
"""

from __future__ import annotations

from torch import nn

from pyllama4.fp8_format import check_format
from pyllama4.layers.ffn import Experts, MoE
from pyllama4.layers.fp8 import Fp8Experts, Fp8Linear
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.quant.fp8 import DEFAULT_ACTIVATION_SCALE_UB


def fp8_targets(model: Llama4ForCausalLM) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every module quantize_model replaces: per decoder layer the
    attention q/k/v/o projections, the dense SwiGLU's gate/up/down or, on MoE layers, the routed
    experts and the shared expert's gate/up/down. Kept in the model dtype: embeddings, norms,
    routers and lm_head, as in the published FP8 checkpoints (a vision tower is a separate module,
    never passed here). Attention is quantized too, as fbgemm_fp8's recipe does, while the
    llm-compressor recipe keeps it in bf16."""
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
