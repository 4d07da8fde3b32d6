"""Pre-quantized FP8 checkpoints: fbgemm_fp8 and compressed-tensors checkpoints,
written here from tiny random Scout- and Maverick-like models (weights quantized per output
channel with quantize_weight), loaded by load_model.

Tolerances:
- Loaded model vs a reference built from the same bf16 model, whose modules the config quantizes
  are Fp8Linear.from_linear / Fp8Experts.from_experts (e4m3fn, the config's activation bound):
  every parameter bit-identical (float8 bytes, fp32 scales, bf16 rest) and logits bit-identical,
  as the checkpoint holds exactly the bytes and scales quantize_weight gave.
- e4m3fnuz loading: every FP8 weight's values q * scale equal the e4m3fn load's exactly, its
  bytes are fn_to_fnuz's, and logits are bit-identical to the e4m3fn load's model with each FP8
  module converted by fn_to_fnuz here. They are not identical to the e4m3fn logits themselves:
  activations are quantized to the weights' format (fnuz tops out at 240, fn at 448), which moves
  their rounding grid; top-1 agreement with the e4m3fn logits printed (0.84 and 0.97 here,
  where random tiny models have small logit margins), asserted >= 0.5 only.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pyllama4.config import TextConfig, VisionConfig
from pyllama4.fp8_format import dequantize
from pyllama4.layers.ffn import Experts, MoE, Router
from pyllama4.layers.fp8 import Fp8Experts, Fp8Linear
from pyllama4.loading.checkpoint import CheckpointError, UnsupportedCheckpointError
from pyllama4.loading.fp8_checkpoint import parse_fp8_scheme
from pyllama4.loading.load import load_model, load_vision_tower
from pyllama4.loading.quantize import fp8_targets
from pyllama4.loading.weights import load_weights
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.model.vision import VisionTower
from pyllama4.quant.fp8 import fn_to_fnuz, quantize_weight
from tiny_models import LLAMA3_ROPE, TINY_TEXT, TINY_VISION, last_token_logits

VOCAB = 256
UB = 1000.0  # not fbgemm's default 1200: the config's value must be the one used
INTER = TINY_TEXT["intermediate_size"]

FBGEMM = "fbgemm_fp8"
CT = "compressed-tensors"
FBGEMM_CONFIG = {"quant_method": FBGEMM, "activation_scale_ub": UB, "modules_to_not_convert": []}
CT_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
CT_CONFIG = {
    "quant_method": CT,
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {**CT_ARGS, "strategy": "channel", "dynamic": False, "observer": "minmax"},
            "input_activations": {**CT_ARGS, "strategy": "token", "dynamic": True},
            "output_activations": None,
        }
    },
    "ignore": ["re:.*self_attn.*", "re:.*router.*", "lm_head"],
    "kv_cache_scheme": None,
}


def text_config(kind: str) -> dict:
    common = dict(
        TINY_TEXT,
        model_type="llama4_text",
        vocab_size=VOCAB,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        max_position_embeddings=1024,
    )
    if kind == "scout":  # all layers MoE, QK-norm, llama3 RoPE
        return dict(
            common, interleave_moe_layer_step=1, use_qk_norm=True, rope_parameters=LLAMA3_ROPE
        )
    rope = {"rope_type": "default", "rope_theta": 500000.0}  # maverick: dense and MoE layers
    return dict(common, interleave_moe_layer_step=2, use_qk_norm=False, rope_parameters=rope)


def tiny_model(kind: str, seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(TextConfig.from_dict(text_config(kind)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model.bfloat16().eval()


def module_names(model: nn.Module) -> dict[tuple[int, str], str]:
    """(id(parent), attribute) of every fp8 target -> its module name."""
    parents = {id(m): name for name, m in model.named_modules()}
    return {(id(p), a): f"{parents[id(p)]}.{a}" for p, a in fp8_targets(model)}


# ---- writing checkpoints --------------------------------------------------------------------


def quantized_tensors(
    model: Llama4ForCausalLM, method: str, quantized: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (text-only names): bf16 for everything `quantized` rejects,
    fbgemm_fp8's or compressed-tensors' FP8 layout for the rest."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    names = module_names(model)
    for parent, attr in fp8_targets(model):
        name = names[id(parent), attr]
        module = getattr(parent, attr)
        if not quantized(name):
            continue
        if isinstance(module, Experts):
            gate_up, down = tensors.pop(f"{name}.gate_up_proj"), tensors.pop(f"{name}.down_proj")
            if method == FBGEMM:  # fused, input-major, scales [E, 1, 2I] and [E, H, 1]
                q, scale = quantize_weight(gate_up.transpose(1, 2))
                tensors[f"{name}.gate_up_proj"] = q.transpose(1, 2).contiguous()
                tensors[f"{name}.gate_up_proj_scale"] = scale[:, None, :]
                q, scale = quantize_weight(down.transpose(1, 2))
                tensors[f"{name}.down_proj"] = q.transpose(1, 2).contiguous()
                tensors[f"{name}.down_proj_scale"] = scale[:, :, None]
            else:  # per expert, nn.Linear [out, in], scales [out, 1]
                for e in range(gate_up.shape[0]):
                    parts = {
                        "gate": gate_up[e, :, :INTER].T,
                        "up": gate_up[e, :, INTER:].T,
                        "down": down[e].T,
                    }
                    for part, weight in parts.items():
                        q, scale = quantize_weight(weight)
                        tensors[f"{name}.{e}.{part}_proj.weight"] = q.contiguous()
                        tensors[f"{name}.{e}.{part}_proj.weight_scale"] = scale[:, None]
        else:
            q, scale = quantize_weight(tensors[f"{name}.weight"])
            tensors[f"{name}.weight"] = q
            # fbgemm_fp8 writes [out, 1]; compressed-tensors either, here [out].
            tensors[f"{name}.weight_scale"] = scale[:, None] if method == FBGEMM else scale
    return tensors


def rename(name: str, naming: str) -> str:
    """Text-only names -> transformers 4.x multimodal (`mm4`) or 5.x style (`mm5`) ones."""
    if naming == "mm4":
        return "language_model." + name
    if naming == "mm5" and name.startswith("model."):
        return "model.language_model." + name.removeprefix("model.")
    return name


def vision_tower() -> tuple[VisionTower, dict]:
    config = {"text_config": {"hidden_size": TINY_TEXT["hidden_size"]}, "vision_config": {}}
    config["vision_config"] = {**TINY_VISION, "rope_theta": 10000}
    torch.manual_seed(1)
    tower = VisionTower(VisionConfig.from_dict(config))
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0.0, 0.1)
    return tower.bfloat16(), config["vision_config"]


def save_checkpoint(
    path: Path, kind: str, tensors: dict[str, torch.Tensor], quant: dict, naming: str = "text"
) -> Path:
    """A checkpoint directory: model.safetensors and a config.json carrying `quant`; multimodal
    namings also get a (bf16) vision tower and projector."""
    path.mkdir(parents=True, exist_ok=True)
    out = {rename(k, naming): v.contiguous() for k, v in tensors.items()}
    config: dict = {**text_config(kind), "quantization_config": quant}
    if naming != "text":
        tower, vision = vision_tower()
        prefix = "model." if naming == "mm5" else ""
        out.update({prefix + k: v.contiguous() for k, v in tower.state_dict().items()})
        config = {
            "model_type": "llama4",
            "text_config": text_config(kind),
            "vision_config": vision,
            "quantization_config": quant,
        }
    save_file(out, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def reference(
    model: Llama4ForCausalLM, quantized: Callable[[str], bool], ub: float | None
) -> Llama4ForCausalLM:
    """`model` with the modules the config quantizes replaced by their e4m3fn quantization."""
    ref = copy.deepcopy(model)
    names = module_names(ref)
    for parent, attr in fp8_targets(ref):
        if quantized(names[id(parent), attr]):
            module = getattr(parent, attr)
            if isinstance(module, Experts):
                new = Fp8Experts.from_experts(module, "e4m3fn", activation_scale_ub=ub)
            else:
                new = Fp8Linear.from_linear(module, "e4m3fn", activation_scale_ub=ub)
            setattr(parent, attr, new)
    return ref


# ---- running -------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes (torch.equal compares fp8 only through them)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_same_state(model: nn.Module, expected: nn.Module) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(bits(got[name]), bits(tensor)), name


def random_prompts(seed: int = 7, count: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 33, (count,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---- the published layouts load as the reference ----------------------------------------------

# (method, kind, naming, quantization_config, which of fp8_targets the config quantizes)
CASES = {
    "fbgemm-scout": (
        FBGEMM,
        "scout",
        "text",
        FBGEMM_CONFIG | {"modules_to_not_convert": ["lm_head"]},
    ),
    "fbgemm-maverick": (FBGEMM, "maverick", "text", FBGEMM_CONFIG),
    "fbgemm-maverick-multimodal": (
        FBGEMM,
        "maverick",
        "mm4",
        FBGEMM_CONFIG
        | {
            "modules_to_not_convert": [
                "language_model.lm_head",
                "language_model.model.layers.0.self_attn",
                "language_model.model.layers.1.feed_forward.experts",
                "vision_model",
                "multi_modal_projector",
            ]
        },
    ),
    "ct-scout": (CT, "scout", "text", CT_CONFIG),
    "ct-maverick": (CT, "maverick", "text", CT_CONFIG),
    "ct-scout-multimodal": (
        CT,
        "scout",
        "mm5",
        CT_CONFIG
        | {
            "ignore": [
                "re:.*self_attn.*",
                "re:.*router.*",
                "lm_head",
                "re:.*vision_model.*",
                "re:.*multi_modal_projector.*",
            ]
        },
    ),
}


def quantizes(case: str) -> Callable[[str], bool]:
    """Which fp8 target modules the case's config quantizes, written out independently."""
    if case == "fbgemm-maverick-multimodal":
        kept = ("model.layers.0.self_attn.", "model.layers.1.feed_forward.experts")
        return lambda name: not name.startswith(kept)
    if case.startswith("ct"):
        return lambda name: ".self_attn." not in name
    return lambda name: True


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Llama4ForCausalLM, Path]]:
    """Every case's bf16 model and checkpoint, written once."""
    out = {}
    for case, (method, kind, naming, quant) in CASES.items():
        model = tiny_model(kind)
        tensors = quantized_tensors(model, method, quantizes(case))
        path = save_checkpoint(tmp_path_factory.mktemp(case), kind, tensors, quant, naming)
        out[case] = model, path
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_checkpoint_loads_as_the_reference(checkpoints, case):
    method, _, naming, _ = CASES[case]
    model, path = checkpoints[case]
    quantized = quantizes(case)
    ub = UB if method == FBGEMM else None
    loaded = load_model(path, dtype=torch.bfloat16, progress=False)
    ref = reference(model, quantized, ub)
    assert_same_state(loaded, ref)  # bit for bit, dtypes included

    names, original = module_names(loaded), dict(model.named_modules())
    fp8_modules = 0
    for parent, attr in fp8_targets(loaded):
        name, module = names[id(parent), attr], getattr(parent, attr)
        if quantized(name):
            assert isinstance(module, Fp8Experts | Fp8Linear), name
            assert module.activation_scale_ub == ub and module.quantize_input, name
            fp8_modules += 1
        else:  # left as the config says: the plain module, the original bf16 weights
            assert type(module) is type(original[name]), name
            assert all(
                p.dtype == torch.bfloat16 and torch.equal(p, q)
                for p, q in zip(module.parameters(), original[name].parameters(), strict=True)
            ), name
    assert fp8_modules > 0
    for layer, original_layer in zip(loaded.model.layers, model.model.layers, strict=True):
        if isinstance(layer.feed_forward, MoE):
            router = layer.feed_forward.router
            assert type(router) is Router and router.weight.dtype == torch.bfloat16
            assert torch.equal(router.weight, original_layer.feed_forward.router.weight)
    assert type(loaded.lm_head) is nn.Linear
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    scales = [p for n, p in loaded.named_parameters() if n.endswith("scale")]
    assert scales and all(p.dtype == torch.float32 for p in scales)

    prompts = random_prompts()
    assert torch.equal(last_token_logits(loaded, prompts), last_token_logits(ref, prompts))

    if naming != "text":  # the vision tower of an FP8 checkpoint: unquantized, loaded as is
        tower = load_vision_tower(path, dtype=torch.bfloat16, progress=False)
        assert_same_state(tower, vision_tower()[0])


@pytest.mark.parametrize("case", ["fbgemm-maverick", "ct-scout"])
def test_e4m3fnuz_loading_is_the_exact_conversion(checkpoints, case):
    _, path = checkpoints[case]
    fn = load_model(path, dtype=torch.bfloat16, progress=False)
    fnuz = load_model(path, dtype=torch.bfloat16, progress=False, fp8_format="e4m3fnuz")
    expected = copy.deepcopy(fn)  # fn's FP8 modules converted here, module by module
    for module in expected.modules():
        if isinstance(module, Fp8Linear | Fp8Experts):
            pairs = (
                [("weight", "weight_scale")]
                if isinstance(module, Fp8Linear)
                else [("gate_up_proj", "gate_up_scale"), ("down_proj", "down_scale")]
            )
            for weight, scale in pairs:
                q, s = fn_to_fnuz(getattr(module, weight).detach(), getattr(module, scale).detach())
                setattr(module, weight, nn.Parameter(q, requires_grad=False))
                setattr(module, scale, nn.Parameter(s, requires_grad=False))
    assert_same_state(fnuz, expected)
    fn_state, fnuz_state = fn.state_dict(), fnuz.state_dict()
    converted = 0
    for name, tensor in fnuz_state.items():
        if tensor.dtype == torch.float8_e4m3fnuz:
            scale_name = name + "_scale" if name.endswith("weight") else None
            if scale_name is None:  # fused experts: gate_up_proj -> gate_up_scale
                scale_name = name.removesuffix("_proj") + "_scale"
                values = dequantize(tensor.transpose(1, 2), fnuz_state[scale_name][..., None])
                fn_values = dequantize(
                    fn_state[name].transpose(1, 2), fn_state[scale_name][..., None]
                )
            else:
                values = dequantize(tensor, fnuz_state[scale_name][..., None])
                fn_values = dequantize(fn_state[name], fn_state[scale_name][..., None])
            assert torch.equal(values, fn_values), name
            converted += 1
    assert converted > 0
    assert not any(t.dtype == torch.float8_e4m3fn for t in fnuz_state.values())

    prompts = random_prompts()
    logits = last_token_logits(fnuz, prompts)
    assert torch.equal(logits, last_token_logits(expected, prompts))
    fn_logits = last_token_logits(fn, prompts)
    agreement = (logits.argmax(-1) == fn_logits.argmax(-1)).float().mean().item()
    error = (logits.float() - fn_logits.float()).abs().max().item()
    print(f"{case}: e4m3fnuz vs e4m3fn top-1 agreement {agreement:.3f}, max |diff| {error:.4f}")
    assert agreement >= 0.5


# ---- what is refused ----------------------------------------------------------------------------


def edited(src: Path, dst: Path, tensors=None, quant=None) -> Path:
    """A copy of checkpoint `src` with `tensors(dict) -> dict` applied to its tensors and
    `quant(dict) -> dict` to its quantization_config."""
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    if quant is not None:
        config["quantization_config"] = quant(copy.deepcopy(config["quantization_config"]))
    (dst / "config.json").write_text(json.dumps(config))
    if tensors is None:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    else:
        save_file(tensors(load_file(src / "model.safetensors")), str(dst / "model.safetensors"))
    return dst


def without(name: str):
    return lambda t: {k: v for k, v in t.items() if k != name}


def replaced(name: str, fn):
    return lambda t: {**t, name: fn(t)}


def weights_group(**changes):
    def edit(quant):
        quant["config_groups"]["group_0"]["weights"].update(changes)
        return quant

    return edit


def inputs_group(**changes):
    def edit(quant):
        quant["config_groups"]["group_0"]["input_activations"].update(changes)
        return quant

    return edit


ATTN = "model.layers.0.self_attn.q_proj"
SHARED = "model.layers.1.feed_forward.shared_expert.down_proj"
FUSED = "model.layers.1.feed_forward.experts"
PER_EXPERT = "model.layers.1.feed_forward.experts.2"

# id: (case, tensor edit, config edit, error, message pattern)
BAD = {
    "unknown-method": (
        "fbgemm-maverick",
        None,
        lambda q: {**q, "quant_method": "awq"},
        UnsupportedCheckpointError,
        r"quant_method 'awq' is not supported",
    ),
    "fbgemm-missing-scale": (
        "fbgemm-maverick",
        without(f"{ATTN}.weight_scale"),
        None,
        CheckpointError,
        rf"missing tensor\(s\): {ATTN}\.weight_scale",
    ),
    "fbgemm-missing-fused-scale": (
        "fbgemm-maverick",
        without(f"{FUSED}.down_proj_scale"),
        None,
        CheckpointError,
        rf"missing tensor\(s\): {FUSED}\.down_proj_scale",
    ),
    "ct-missing-expert-scale": (
        "ct-scout",
        without(f"{PER_EXPERT}.up_proj.weight_scale"),
        None,
        CheckpointError,
        rf"missing tensor\(s\): {PER_EXPERT}\.up_proj\.weight_scale",
    ),
    "fbgemm-scale-shape": (
        "fbgemm-maverick",
        replaced(f"{FUSED}.gate_up_proj_scale", lambda t: t[f"{FUSED}.gate_up_proj_scale"].mT),
        None,
        CheckpointError,
        rf"wrong shape: {FUSED}\.gate_up_proj_scale: expected shape \[4, 64\] or \[4, 1, 64\], "
        r"got \[4, 64, 1\]",
    ),
    "ct-scale-shape": (
        "ct-scout",
        replaced(
            f"{PER_EXPERT}.down_proj.weight_scale",
            lambda t: t[f"{PER_EXPERT}.down_proj.weight_scale"][:-1],
        ),
        None,
        CheckpointError,
        rf"{PER_EXPERT}\.down_proj\.weight_scale: expected shape \[64\] or \[64, 1\], "
        r"got \[63, 1\]",
    ),
    "bf16-weight-for-fp8": (
        "fbgemm-maverick",
        replaced(f"{SHARED}.weight", lambda t: t[f"{SHARED}.weight"].bfloat16()),
        None,
        CheckpointError,
        rf"wrong dtype: {SHARED}\.weight is BF16, but {SHARED}\.weight expects fp8",
    ),
    "bf16-expert-for-fp8": (
        "ct-scout",
        replaced(
            f"{PER_EXPERT}.gate_proj.weight", lambda t: t[f"{PER_EXPERT}.gate_proj.weight"].float()
        ),
        None,
        CheckpointError,
        rf"{PER_EXPERT}\.gate_proj\.weight is F32, but {FUSED}\.gate_up_proj expects fp8",
    ),
    "fp8-for-ignored-module": (
        "ct-scout",
        lambda t: {
            **t,
            f"{ATTN}.weight": quantize_weight(t[f"{ATTN}.weight"])[0],
            f"{ATTN}.weight_scale": quantize_weight(t[f"{ATTN}.weight"])[1],
        },
        None,
        CheckpointError,
        rf"(?s)unexpected tensor\(s\).*{ATTN}\.weight_scale.*"
        rf"{ATTN}\.weight is float8 \(F8_E4M3\), but {ATTN}\.weight is not quantized",
    ),
    "fp8-router": (
        "fbgemm-scout",
        replaced(
            "model.layers.2.feed_forward.router.weight",
            lambda t: t["model.layers.2.feed_forward.router.weight"].to(torch.float8_e4m3fn),
        ),
        None,
        CheckpointError,
        r"router\.weight is float8 \(F8_E4M3\), but .*router\.weight is not quantized",
    ),
    "e5m2-weight": (
        "fbgemm-maverick",
        replaced(f"{SHARED}.weight", lambda t: t[f"{SHARED}.weight"].to(torch.float8_e5m2)),
        None,
        UnsupportedCheckpointError,
        rf"{SHARED}\.weight has float8 dtype F8_E5M2 \(supported: F8_E4M3",
    ),
    "ct-group-strategy": (
        "ct-scout",
        None,
        weights_group(strategy="group", group_size=128),
        UnsupportedCheckpointError,
        r"weights\.strategy = 'group' \(supported: 'channel'\); .*weights\.group_size = 128",
    ),
    "ct-block-scales": (
        "ct-scout",
        None,
        weights_group(strategy="block", block_structure=[128, 128]),
        UnsupportedCheckpointError,
        r"weights\.strategy = 'block'.*weights\.block_structure = \[128, 128\]",
    ),
    "ct-static-input-scales": (
        "ct-scout",
        None,
        inputs_group(dynamic=False, strategy="tensor"),
        UnsupportedCheckpointError,
        r"input_activations\.strategy = 'tensor'.*input_activations\.dynamic = False",
    ),
    "ct-4-bit": (
        "ct-scout",
        None,
        weights_group(num_bits=4),
        UnsupportedCheckpointError,
        r"weights\.num_bits = 4 \(supported: 8\)",
    ),
    "ct-int": (
        "ct-scout",
        None,
        weights_group(type="int"),
        UnsupportedCheckpointError,
        r"weights\.type = 'int' \(supported: 'float'\)",
    ),
    "ct-weight-only": (
        "ct-scout",
        None,
        lambda q: q["config_groups"]["group_0"].update(input_activations=None) or q,
        UnsupportedCheckpointError,
        r"input_activations is None",
    ),
    "ct-format": (
        "ct-scout",
        None,
        lambda q: {**q, "format": "pack-quantized"},
        UnsupportedCheckpointError,
        r"format 'pack-quantized' \(supported: float-quantized\)",
    ),
    "ct-some-experts-ignored": (
        "ct-scout",
        None,
        lambda q: {**q, "ignore": [*q["ignore"], "re:.*experts\\.0\\."]},
        UnsupportedCheckpointError,
        r"leaves some of the routed experts model\.layers\.0\.feed_forward\.experts unquantized",
    ),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_fp8_checkpoint_is_refused_naming_the_problem(checkpoints, tmp_path, bad):
    case, tensors, quant, error, pattern = BAD[bad]
    path = edited(checkpoints[case][1], tmp_path / "c", tensors, quant)
    with pytest.raises(error, match=pattern):
        load_model(path, progress=False)


def test_online_fp8_of_an_fp8_checkpoint_is_refused(checkpoints):
    with pytest.raises(ValueError, match="already quantized to FP8 \\(fbgemm_fp8\\)"):
        load_model(checkpoints["fbgemm-scout"][1], progress=False, quantization="fp8")


def test_load_weights_needs_the_module_built_for_the_checkpoint(checkpoints):
    model, path = checkpoints["ct-maverick"]
    plain = copy.deepcopy(model)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(UnsupportedCheckpointError, match="into a module without FP8 parameters"):
        load_weights(plain, path, progress=False)
    with pytest.raises(CheckpointError, match="built for quant_method 'fbgemm_fp8'.*says "):
        load_weights(plain, path, progress=False, quant_method=FBGEMM)
    # Checked from the headers before anything is copied: the module is untouched.
    with pytest.raises(CheckpointError, match="wrong dtype"):
        load_weights(plain, path, progress=False, quant_method=CT)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def test_module_name_matching():
    """fbgemm_fp8 skips a module as transformers 5.x (prefix to a module boundary, regex, suffix)
    or 4.x (substring, here at module boundaries) would; compressed-tensors matches `re:` from
    the start, other entries exactly; multimodal spellings count."""
    fbgemm = parse_fp8_scheme(
        {
            "quant_method": FBGEMM,
            "modules_to_not_convert": ["model.layers.1", "self_attn", "language_model.*\\.o_proj"],
        }
    )
    assert fbgemm.activation_scale_ub == 1200.0
    assert not fbgemm.quantizes("model.layers.1.feed_forward.gate_proj")
    assert fbgemm.quantizes("model.layers.11.feed_forward.gate_proj")
    assert not fbgemm.quantizes("model.layers.3.self_attn.q_proj")
    assert fbgemm.quantizes("model.layers.3.feed_forward.experts")
    assert not fbgemm.quantizes("model.layers.12.self_attn.o_proj")
    assert fbgemm.quantizes("model.layers.12.feed_forward.down_proj")
    ct = parse_fp8_scheme(
        CT_CONFIG | {"ignore": ["language_model.model.layers.2.feed_forward.shared_expert.up_proj"]}
    )
    assert ct.activation_scale_ub is None
    assert not ct.quantizes("model.layers.2.feed_forward.shared_expert.up_proj")
    assert ct.quantizes("model.layers.2.feed_forward.shared_expert.gate_proj")
    assert ct.quantizes("model.layers.2.self_attn.q_proj")
    narrow = copy.deepcopy(CT_CONFIG)
    narrow["config_groups"]["group_0"]["targets"] = ["re:.*experts.*"]
    narrow = parse_fp8_scheme(narrow)
    assert narrow.quantizes_experts("model.layers.0.feed_forward.experts", 4)
    assert not narrow.quantizes("model.layers.0.feed_forward.shared_expert.up_proj")
