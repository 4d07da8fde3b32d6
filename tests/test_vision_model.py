"""VisionTower: a saved transformers Llama4ForConditionalGeneration's vision tower + projector,
loaded by load_vision_tower, encodes tiles as transformers does (fp32: max abs diff <= 1e-5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig

from pyllama4.config import ConfigError, VisionConfig
from pyllama4.loading.checkpoint import CheckpointError, text_name, vision_name
from pyllama4.loading.load import load_vision_tower
from pyllama4.model.vision import VisionTower, rotation_2d
from tiny_models import TINY_TEXT, TINY_VISION

TEXT = {
    **TINY_TEXT,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
    "max_position_embeddings": 1024,
}
# Other shapes, to catch anything hard-wired: a 6x6 grid with 4 heads of 8 and 3 layers; an 8x8
# grid shuffled 4x4 (ratio 1/4) with 4 heads, another RoPE base and a wider text model.
OTHER_VISION = {
    "grid6": dict(
        TINY_VISION,
        image_size=84,
        num_attention_heads=4,
        num_hidden_layers=3,
        projector_input_dim=48,
    ),
    "ratio4": dict(
        TINY_VISION,
        image_size=112,
        num_attention_heads=4,
        pixel_shuffle_ratio=0.25,
        intermediate_size=512,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}
for _v in OTHER_VISION.values():
    _v["projector_output_dim"] = _v["vision_output_dim"] = _v["projector_input_dim"]

FP32_TOL = 1e-5
BATCH_TOL = 1e-6
BF16_TOL = 0.05  # relative to the largest fp32 output (bf16 has an 8-bit mantissa)


def randomize(model: torch.nn.Module) -> None:
    """O(1) activations everywhere (transformers' init leaves biases at 0 and outputs ~1e-2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif p.dim() == 2 and "positional" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 1.0)


def save_tiny(path: Path, vision: dict, *, vocab_size: int = 256, seed: int = 0, **text) -> Path:
    torch.manual_seed(seed)
    config = Llama4Config(
        text_config={**TEXT, "vocab_size": vocab_size, **text}, vision_config=vision
    )
    hf = Llama4ForConditionalGeneration(config).eval()
    randomize(hf.vision_model)
    randomize(hf.multi_modal_projector)
    hf.save_pretrained(path)
    return path


def reference(hf: Llama4ForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """What Llama4ForConditionalGeneration.forward scatters into the <|patch|> slots, per tile."""
    with torch.no_grad():
        features = hf.get_image_features(pixels).last_hidden_state  # [N, tokens, proj_out]
        return hf.multi_modal_projector(features)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny multimodal model (TINY_VISION, real vocabulary), saved once."""
    return save_tiny(tmp_path_factory.mktemp("vlm"), TINY_VISION, vocab_size=202048)


@pytest.fixture(scope="module")
def hf_tiny(tiny) -> Llama4ForConditionalGeneration:
    return Llama4ForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tower(tiny) -> VisionTower:
    return load_vision_tower(tiny, dtype=torch.float32, progress=False)


def pixels(n: int, config: VisionConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, config.num_channels, config.image_size, config.image_size, generator=g)


def test_matches_transformers(tower, hf_tiny):
    assert tower.config == VisionConfig.from_dict(hf_tiny.config.to_dict())
    assert tower.config.tokens_per_tile == 4
    x = pixels(3, tower.config)
    ref = reference(hf_tiny, x)
    out = tower.encode(x)
    assert out.shape == (3, 4, 64) and out.dtype == torch.float32
    assert ref.abs().max() > 0.5  # the comparison is not of near-zero numbers
    assert (out - ref).abs().max() <= FP32_TOL


def test_parameters_are_the_checkpoint_tensors(tower, hf_tiny):
    ours = tower.state_dict()
    theirs = {k: v for k, v in hf_tiny.state_dict().items() if not k.startswith("language_model.")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_rotation_table_is_transformers(tower, hf_tiny):
    freqs = hf_tiny.vision_model.rotary_embedding.freqs_ci  # [patches + 1, 1, head_dim / 2]
    assert torch.equal(rotation_2d(tower.config), freqs[:, 0])


def test_tiles_are_independent(tower):
    x = pixels(3, tower.config, seed=2)
    batched = tower.encode(x)
    alone = torch.cat([tower.encode(x[i : i + 1]) for i in range(3)])
    assert (batched - alone).abs().max() <= BATCH_TOL
    assert (tower.encode(x[1:]) - batched[1:]).abs().max() <= BATCH_TOL


def test_input_is_cast_to_the_module_dtype(tower):
    x = pixels(2, tower.config, seed=3).to(torch.bfloat16)  # as the image processor returns
    assert torch.equal(tower.encode(x), tower.encode(x.float()))


def test_wrong_tile_shape(tower):
    with pytest.raises(ValueError, match=r"expected \[N, 3, 56, 56\]"):
        tower.encode(torch.zeros(1, 3, 84, 84))


@pytest.mark.parametrize("kind", sorted(OTHER_VISION))
def test_other_shapes_match_transformers(tmp_path, kind):
    path = save_tiny(tmp_path, OTHER_VISION[kind], seed=5, hidden_size=96, head_dim=24)
    hf = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tower = load_vision_tower(path, dtype=torch.float32, progress=False)
    config = tower.config
    assert config.text_hidden_size == 96
    assert config.tokens_per_tile == {"grid6": 9, "ratio4": 4}[kind]
    x = pixels(2, config)
    ref = reference(hf, x)
    out = tower.encode(x)
    assert out.shape == (2, config.tokens_per_tile, 96)
    assert (out - ref).abs().max() <= FP32_TOL


def test_bf16_is_close_to_fp32(tiny, tower):
    bf16 = load_vision_tower(tiny, dtype=torch.bfloat16, progress=False)
    x = pixels(3, tower.config, seed=4)
    ref = tower.encode(x)
    out = bf16.encode(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() <= BF16_TOL * ref.abs().max()


# ---- configuration -----------------------------------------------------------------------------


def vision_dict(**overrides) -> dict:
    return {"text_config": {"hidden_size": 64}, "vision_config": {**TINY_VISION, **overrides}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(intermediate_size=96), r"intermediate_size 96 != hidden_size / .* = 128"),
        (dict(vision_output_dim=48), r"vision_output_dim 48 != projector_output_dim 64"),
        (dict(projector_input_dim=48), r"projector_input_dim 48 != projector_output_dim 64"),
        (dict(image_size=42), r"image_size/patch_size = 3 not divisible by .* = 2"),
        (dict(image_size=50), r"image_size 50 not a multiple of 14"),
        (dict(num_attention_heads=4, hidden_size=24, intermediate_size=96), r"head_dim 6 "),
        (dict(num_attention_heads=3), r"hidden_size 32 not divisible by 3 heads"),
        (dict(pixel_shuffle_ratio=0.4), r"pixel_shuffle_ratio 0.4 "),
        (dict(pixel_shuffle_ratio=0.0), r"pixel_shuffle_ratio 0.0 "),
        (dict(norm_eps=1e-6), r"norm_eps 1e-06 "),
        (dict(image_size=[56, 56]), r"vision_config.image_size \[56, 56\] \(a positive int\)"),
    ],
)
def test_config_rejects_shapes_the_model_cannot_compute(overrides, message):
    with pytest.raises(ConfigError, match=message):
        VisionConfig.from_dict(vision_dict(**overrides))


def test_config_keys_and_defaults():
    legacy = vision_dict(rope_theta=500)  # transformers 4.x spelling
    legacy.update(image_token_id=7, boi_token_index=8)
    config = VisionConfig.from_dict(legacy)
    assert config.rope_theta == 500.0
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (
        7,
        8,
        200081,
    )
    scout = {
        "vision_config": {
            "hidden_size": 1408,
            "image_size": 336,
            "intermediate_size": 5632,
            "vision_output_dim": 4096,
        }
    }
    config = VisionConfig.from_dict(scout)
    assert config.text_hidden_size == 5120 and config.num_hidden_layers == 34
    assert (config.grid_size, config.head_dim, config.tokens_per_tile) == (24, 88, 144)
    assert VisionConfig.from_dict(Llama4TextConfig().to_dict()) is None


def test_text_only_checkpoint_has_no_vision_tower(tmp_path):
    Llama4TextConfig(**TEXT, vocab_size=256).save_pretrained(tmp_path)
    assert VisionConfig.from_checkpoint(tmp_path) is None
    assert load_vision_tower(tmp_path, progress=False) is None


# ---- weights -----------------------------------------------------------------------------------


def test_vision_name():
    for name in ("vision_model.class_embedding", "multi_modal_projector.linear_1.weight"):
        assert vision_name(name) == vision_name("model." + name) == name
        assert text_name(name) is None and text_name("model." + name) is None
    for name in ("language_model.model.norm.weight", "model.norm.weight", "lm_head.weight"):
        assert vision_name(name) is None


def rewrite(src: Path, dst: Path, edit) -> Path:
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")
    return dst


def test_model_prefixed_names_load(tiny, tower, tmp_path):
    def prefix(tensors):
        return {
            (k if k.startswith("language_model.") else "model." + k): v for k, v in tensors.items()
        }

    loaded = load_vision_tower(rewrite(tiny, tmp_path, prefix), dtype=torch.float32, progress=False)
    x = pixels(1, tower.config)
    assert torch.equal(loaded.encode(x), tower.encode(x))


def test_missing_vision_tensor(tiny, tmp_path):
    gone = "vision_model.model.layers.1.mlp.fc2.bias"

    def drop(tensors):
        del tensors[gone]
        return tensors

    with pytest.raises(
        CheckpointError, match=r"1 missing tensor\(s\): " + gone.replace(".", r"\.")
    ):
        load_vision_tower(rewrite(tiny, tmp_path, drop), progress=False)
