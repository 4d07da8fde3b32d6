"""Pre-quantized FP8 checkpoints: what a checkpoint's quantization_config quantizes,
the model built with FP8 modules in those places, and the e4m3fnuz conversion for MI300.

Supported schemes (config.json `quantization_config`, top level or in text_config):
- `quant_method: "fbgemm_fp8"` (transformers): per-output-channel weight scales, activations
  quantized dynamically per token with the upper bound `activation_scale_ub` (default 1200).
  `modules_to_not_convert` names the modules left unquantized; a module is left so when
  transformers 5.x's rule (the entry from the start of the name up to a module boundary, as a
  regex, or as a suffix) or 4.x's (the entry anywhere in the name; here only between module
  boundaries, so "layers.1" does not also take layers.1x) would leave it.
- `quant_method: "compressed-tensors"`, float-quantized: every config group quantizes its weights
  to 8-bit floats (e4m3fn) with one static scale per output channel (strategy "channel") and its
  input activations dynamically per token (strategy "token", no upper bound). A module is
  quantized when a group's `targets` names it ("Linear": any of our candidates, `re:` regexes
  matched from the start of the name, exact names) and `ignore` does not.
Anything else (another quant_method, group- or block-wise or per-tensor weight scales, static or
per-tensor input scales, num_bits != 8, integer types, asymmetric scales, weight-only groups,
output activations, a KV-cache scheme, sparsity or transforms) is an UnsupportedCheckpointError
naming the setting.

Invariants:
- Only the modules `pyllama4.loading.quantize.fp8_targets` lists can be FP8 (attention q/k/v/o,
  dense and shared-expert SwiGLU, routed experts); embeddings, norms, routers and lm_head always
  stay in the model dtype, so a checkpoint quantizing them fails at load (its float8 tensors have no
  float8 parameter to go to).
- Config names may be spelled as a text-only model's (`model.layers.0.self_attn.q_proj`) or as
  either multimodal one's (`language_model.model.layers...`, `model.language_model.layers...`);
  an entry matching any spelling applies.
- Routed experts are one module: under compressed-tensors they are matched as the per-expert
  Linears `experts.{e}.{gate,up,down}_proj`, which must all agree; under fbgemm_fp8 as the fused
  `experts`.
- `install_fp8_modules` puts empty e4m3fn Fp8Linear / Fp8Experts on the replaced modules' device
  (meta, in load_model), so the loader writes every byte and scale from the checkpoint;
  `convert_to_fnuz` then converts them exactly with fn_to_fnuz, one weight matrix at a time, in
  the weights' own memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pyllama4.layers.ffn import Experts
from pyllama4.layers.fp8 import Fp8Experts, Fp8Linear
from pyllama4.loading.checkpoint import (
    CheckpointError,
    UnsupportedCheckpointError,
    read_quantization_config,
)
from pyllama4.loading.quantize import fp8_targets
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.quant.fp8 import DEFAULT_ACTIVATION_SCALE_UB, fn_to_fnuz

__all__ = [
    "COMPRESSED_TENSORS",
    "FBGEMM_FP8",
    "Fp8Scheme",
    "convert_to_fnuz",
    "install_fp8_modules",
    "parse_fp8_scheme",
    "read_fp8_scheme",
]

FBGEMM_FP8 = "fbgemm_fp8"
COMPRESSED_TENSORS = "compressed-tensors"
_FLOAT_QUANTIZED = "float-quantized"
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"  # transformers 5.x: a match ends at a module boundary

# compressed-tensors QuantizationArgs: the keys checked, their defaults when absent, and the only
# values the FP8 modules run, for weights and for input activations.
_ARG_DEFAULTS = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "strategy": None,
    "dynamic": False,
    "group_size": None,
    "block_structure": None,
    "actorder": None,
}
_WEIGHTS = dict(_ARG_DEFAULTS, type="float", strategy="channel")
_INPUTS = dict(_ARG_DEFAULTS, type="float", strategy="token", dynamic=True)


@dataclass(frozen=True)
class Fp8Scheme:
    """A supported FP8 checkpoint scheme: which modules it quantizes, and how activations are
    quantized (per token, amax clamped to `activation_scale_ub`, None: unbounded)."""

    method: str  # FBGEMM_FP8 or COMPRESSED_TENSORS
    activation_scale_ub: float | None
    skip: tuple[str, ...]  # modules_to_not_convert / ignore entries
    targets: tuple[str, ...] | None  # compressed-tensors config-group targets; None: all

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint holds `module` (a Llama4ForCausalLM module name under
        `model.`, e.g. model.layers.0.self_attn.q_proj) in FP8."""
        names = _spellings(module)
        if self.method == FBGEMM_FP8:
            return not any(_fbgemm_skips(entry, n) for entry in self.skip for n in names)
        if any(_ct_matches(entry, n) for entry in self.skip for n in names):
            return False
        return self.targets is None or any(
            _ct_matches(entry, n) for entry in self.targets for n in names
        )

    def quantizes_experts(self, experts: str, num_experts: int) -> bool:
        """Whether the routed experts module `experts` is FP8; all or none of its Linears."""
        if self.method == FBGEMM_FP8:
            return self.quantizes(experts)
        decisions = {
            (e, part): self.quantizes(f"{experts}.{e}.{part}_proj")
            for e in range(num_experts)
            for part in ("gate", "up", "down")
        }
        if len(set(decisions.values())) > 1:
            kept = [f"{experts}.{e}.{p}_proj" for (e, p), q in decisions.items() if not q]
            raise UnsupportedCheckpointError(
                f"{self.method}: the quantization config leaves some of the routed experts "
                f"{experts} unquantized ({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''}), "
                f"but they run as one FP8 module: all or none"
            )
        return decisions[0, "gate"]


def read_fp8_scheme(checkpoint_dir: str | Path) -> Fp8Scheme | None:
    """The FP8 scheme of a checkpoint; None if config.json has no quantization_config."""
    quant = read_quantization_config(checkpoint_dir)
    return None if quant is None else parse_fp8_scheme(quant)


def parse_fp8_scheme(quant: dict) -> Fp8Scheme:
    """A quantization_config -> its Fp8Scheme; UnsupportedCheckpointError naming the method or
    setting pyllama4 cannot run, CheckpointError for a malformed one."""
    method = quant.get("quant_method")
    if method == FBGEMM_FP8:
        ub = quant.get("activation_scale_ub", DEFAULT_ACTIVATION_SCALE_UB)
        if isinstance(ub, bool) or not isinstance(ub, int | float) or not ub > 0:
            raise CheckpointError(f"{FBGEMM_FP8}: activation_scale_ub {ub!r} is not positive")
        skip = _names(quant.get("modules_to_not_convert"), "modules_to_not_convert")
        for entry in skip:
            _compile(rf"(?:{entry}){_BOUNDARY}", "modules_to_not_convert", entry)
        return Fp8Scheme(FBGEMM_FP8, float(ub), skip, None)
    if method == COMPRESSED_TENSORS:
        return _compressed_tensors(quant)
    raise UnsupportedCheckpointError(
        f"quantization_config.quant_method {method!r} is not supported (supported: {FBGEMM_FP8}, "
        f"{COMPRESSED_TENSORS} {_FLOAT_QUANTIZED})"
    )


def _compressed_tensors(quant: dict) -> Fp8Scheme:
    problems: list[str] = []
    fmt = quant.get("format")
    if fmt is not None and fmt != _FLOAT_QUANTIZED:
        problems.append(f"format {fmt!r} (supported: {_FLOAT_QUANTIZED})")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quant.get(key):
            problems.append(f"{key} (not supported: only FP8 weights and activations)")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        problems.append("config_groups is missing or empty")
        groups = {}
    targets: list[str] = []
    for name, group in groups.items():
        where = f"config_groups.{name}"
        if not isinstance(group, dict):
            problems.append(f"{where} is not an object")
            continue
        if group.get("format") not in (None, _FLOAT_QUANTIZED):
            problems.append(f"{where}.format {group['format']!r} (supported: {_FLOAT_QUANTIZED})")
        problems += _check_args(group.get("weights"), f"{where}.weights", _WEIGHTS)
        problems += _check_args(
            group.get("input_activations"), f"{where}.input_activations", _INPUTS
        )
        if group.get("output_activations") is not None:
            problems.append(f"{where}.output_activations (not supported)")
        targets += _names(group.get("targets"), f"{where}.targets")
    if problems:
        raise UnsupportedCheckpointError(
            f"{COMPRESSED_TENSORS}: not supported (pyllama4 runs 8-bit float weights with one "
            f"static scale per output channel and activations quantized dynamically per token): "
            + "; ".join(problems)
        )
    skip = _names(quant.get("ignore"), "ignore")
    for entry in (*skip, *targets):
        if entry.startswith("re:"):
            _compile(entry[3:], "ignore/targets", entry)
    return Fp8Scheme(COMPRESSED_TENSORS, None, skip, tuple(targets))


def _check_args(args: object, where: str, supported: dict) -> list[str]:
    """What in one compressed-tensors QuantizationArgs differs from the supported settings."""
    if not isinstance(args, dict):
        return [f"{where} is {args!r} (both weights and input activations must be quantized)"]
    problems = []
    for key, want in supported.items():
        got = args.get(key, _ARG_DEFAULTS[key])
        if got != want or type(got) is not type(want):
            problems.append(f"{where}.{key} = {got!r} (supported: {want!r})")
    return problems


def _names(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"quantization_config {what}: expected a list of names")
    return tuple(value)


def _compile(pattern: str, what: str, entry: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CheckpointError(f"quantization_config {what}: {entry!r} ({exc})") from exc


def _spellings(module: str) -> tuple[str, ...]:
    """A `model.`-prefixed module name as text-only and both multimodal checkpoints spell it."""
    rest = module.removeprefix("model.")
    return module, "language_model." + module, "model.language_model." + rest


def _fbgemm_skips(entry: str, name: str) -> bool:
    if re.match(rf"(?:{entry}){_BOUNDARY}", name) or name.endswith(entry):
        return True  # transformers 5.x
    return re.search(rf"(?:^|\.){re.escape(entry)}(?:\.|$)", name) is not None  # 4.x substring


def _ct_matches(entry: str, name: str) -> bool:
    if entry == "Linear":
        return True  # the class every candidate is in transformers' model
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == name


def install_fp8_modules(model: Llama4ForCausalLM, scheme: Fp8Scheme) -> None:
    """Replace, in place, each of fp8_targets(model) that `scheme` quantizes by an empty
    (uninitialised) e4m3fn Fp8Linear / Fp8Experts of the same shape on the same device, with the
    scheme's activation_scale_ub and per-token input quantization; the rest is untouched."""
    names = {id(module): name for name, module in model.named_modules()}
    options = dict(activation_scale_ub=scheme.activation_scale_ub, quantize_input=True)
    for parent, attr in fp8_targets(model):
        module = getattr(parent, attr)
        name = f"{names[id(parent)]}.{attr}"
        if isinstance(module, Experts):
            num, hidden, _ = module.gate_up_proj.shape
            if not scheme.quantizes_experts(name, num):
                continue
            with torch.device(module.gate_up_proj.device):
                new = Fp8Experts(num, hidden, module.intermediate_size, "e4m3fn", **options)
        else:
            if not scheme.quantizes(name):
                continue
            with torch.device(module.weight.device):
                new = Fp8Linear(module.in_features, module.out_features, "e4m3fn", **options)
        setattr(parent, attr, new)


def convert_to_fnuz(model: nn.Module) -> None:
    """In place: every e4m3fn Fp8Linear / Fp8Experts of `model` gets the same values in
    e4m3fnuz (fn_to_fnuz: the bytes reinterpreted, -0 made +0, scales doubled; exact), one
    Linear or one expert at a time, written back into the weights' own memory. A float8 NaN in
    a checkpoint's weights is a CheckpointError naming the parameter."""
    for module_name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            pairs = [("weight", "weight_scale")]
        elif isinstance(module, Fp8Experts):
            pairs = [("gate_up_proj", "gate_up_scale"), ("down_proj", "down_scale")]
        else:
            continue
        for weight_name, scale_name in pairs:
            weight = getattr(module, weight_name)
            if weight.dtype != torch.float8_e4m3fn:
                continue
            bits, scale = weight.detach().view(torch.uint8), getattr(module, scale_name).detach()
            blocks: Iterable = range(weight.shape[0]) if weight.dim() == 3 else [slice(None)]
            with torch.no_grad():
                for block in blocks:
                    try:
                        q, block_scale = fn_to_fnuz(weight[block], scale[block])
                    except ValueError as exc:
                        raise CheckpointError(f"{module_name}.{weight_name}: {exc}") from exc
                    bits[block].copy_(q.view(torch.uint8))
                    scale[block].copy_(block_scale)
            fnuz = nn.Parameter(bits.view(torch.float8_e4m3fnuz), requires_grad=False)
            setattr(module, weight_name, fnuz)
