"""Llama 4 text (and vision, `VisionConfig`) configuration, parsed from a checkpoint's config.json.

Invariant: a `TextConfig` is fully resolved — every per-layer choice (RoPE or NoPE, chunked or
full attention, MoE or dense) is explicit, derived exactly as transformers derives it, so the
model never consults defaults. Accepts the multimodal layout (`text_config` nested in a
`Llama4ForConditionalGeneration` config) and the text-only one, transformers 4.x keys
(`rope_theta`, `rope_scaling`) and 5.x keys (`rope_parameters`), and `attn_temperature_tuning`
given as a bool or an int. Anything the model cannot compute exactly is rejected with a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Defaults of transformers' Llama4TextConfig, for keys a config.json may omit.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 202048,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "num_experts_per_tok": 1,
    "num_local_experts": 16,
    "moe_layers": None,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "no_rope_layers": None,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "layer_types": None,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "attention_bias": False,
}


class ConfigError(ValueError):
    """config.json describes a model pyllama4 cannot run exactly."""


@dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling (Scout): long wavelengths shrink by `factor`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per routed expert and the shared expert
    intermediate_size_mlp: int  # dense SwiGLU layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    use_rope: tuple[bool, ...]  # per layer: RoPE (+ QK-norm) layer, else NoPE layer
    chunked: tuple[bool, ...]  # per layer: chunk-local attention, else full causal attention
    moe: tuple[bool, ...]  # per layer: MoE feed-forward, else dense SwiGLU
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: int
    attn_scale: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TextConfig:
        """Parses a config.json dict (multimodal or text-only)."""
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise ConfigError("config.json: text_config must be an object")
        # null means "default" except where transformers gives it a meaning of its own.
        keep_null = ("attention_chunk_size", "pad_token_id", "bos_token_id")
        get = {**_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k in keep_null}}
        # Top-level ids/tie flags of a multimodal config apply when the text config omits them.
        for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key not in text and key in config:
                get[key] = config[key]

        if get["hidden_act"] != "silu":
            raise ConfigError(f"config.json: hidden_act {get['hidden_act']!r} (only silu)")
        if get["attention_bias"]:
            raise ConfigError("config.json: attention_bias is not supported (Llama 4 has none)")
        layers = int(get["num_hidden_layers"])
        heads = int(get["num_attention_heads"])
        kv_heads = int(get["num_key_value_heads"] or heads)
        if heads % kv_heads:
            raise ConfigError(f"config.json: {heads} attention heads over {kv_heads} KV heads")
        head_dim = int(get["head_dim"] or get["hidden_size"] // heads)

        use_rope, chunked, chunk = _attention_layers(get, layers)
        moe, experts, top_k = _moe_layers(get, layers)

        rope_theta, rope_scaling = _rope(text, int(get["max_position_embeddings"]))
        eos = get["eos_token_id"]
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        return cls(
            vocab_size=int(get["vocab_size"]),
            hidden_size=int(get["hidden_size"]),
            intermediate_size=int(get["intermediate_size"]),
            intermediate_size_mlp=int(get["intermediate_size_mlp"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            max_position_embeddings=int(get["max_position_embeddings"]),
            rms_norm_eps=float(get["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            use_rope=use_rope,
            chunked=chunked,
            moe=moe,
            attention_chunk_size=chunk,
            use_qk_norm=bool(get["use_qk_norm"]),
            # Older configs give 4 instead of true: any truthy value enables it.
            attn_temperature_tuning=bool(get["attn_temperature_tuning"]),
            floor_scale=int(get["floor_scale"]),
            attn_scale=float(get["attn_scale"]),
            tie_word_embeddings=bool(get["tie_word_embeddings"]),
            bos_token_id=None if get["bos_token_id"] is None else int(get["bos_token_id"]),
            eos_token_ids=eos_ids,
            pad_token_id=None if get["pad_token_id"] is None else int(get["pad_token_id"]),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> TextConfig:
        path = Path(checkpoint_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{path} not found: not a Hugging Face checkpoint directory"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(config)


def _attention_layers(
    get: dict[str, Any], layers: int
) -> tuple[tuple[bool, ...], tuple[bool, ...], int | None]:
    """(use_rope per layer, chunked per layer, attention_chunk_size)."""
    no_rope = get["no_rope_layers"]
    if not no_rope:  # empty or absent: transformers' default (every interval-th layer is NoPE)
        interval = int(get["no_rope_layer_interval"])
        no_rope = [int((i + 1) % interval != 0) for i in range(layers)]
    use_rope = _per_layer(no_rope, layers, "no_rope_layers")
    chunk = get["attention_chunk_size"]
    chunk = None if chunk is None else int(chunk)
    layer_types = get["layer_types"]
    if layer_types is None:
        return use_rope, tuple(r and chunk is not None for r in use_rope), chunk
    if len(layer_types) != layers or set(layer_types) - {"chunked_attention", "full_attention"}:
        raise ConfigError(f"config.json: layer_types {layer_types!r}")
    chunked = tuple(t == "chunked_attention" for t in layer_types)
    if any(chunked) and chunk is None:
        raise ConfigError("config.json: chunked_attention layers need attention_chunk_size")
    return use_rope, chunked, chunk


def _moe_layers(get: dict[str, Any], layers: int) -> tuple[tuple[bool, ...], int, int]:
    """(MoE per layer, num_local_experts, num_experts_per_tok)."""
    moe_layers = get["moe_layers"]
    if moe_layers is None:
        step = int(get["interleave_moe_layer_step"])
        moe_layers = range(step - 1, layers, step)
    moe_set = {int(i) for i in moe_layers}
    if moe_set - set(range(layers)):
        raise ConfigError(f"config.json: moe_layers {sorted(moe_set)} outside 0..{layers - 1}")
    moe = tuple(i in moe_set for i in range(layers))
    experts = int(get["num_local_experts"])
    top_k = int(get["num_experts_per_tok"])
    if any(moe) and not 1 <= top_k <= experts:
        raise ConfigError(f"config.json: num_experts_per_tok {top_k} with {experts} experts")
    return moe, experts, top_k


def _per_layer(values: list[Any], layers: int, name: str) -> tuple[bool, ...]:
    if len(values) != layers:
        raise ConfigError(f"config.json: {name} has {len(values)} entries for {layers} layers")
    return tuple(bool(v) for v in values)


def _rope(text: dict[str, Any], max_positions: int) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = text.get("rope_parameters")
    legacy_theta = text.get("rope_theta")
    legacy = text.get("rope_scaling")
    if params:
        theta = float(params.get("rope_theta", legacy_theta or 500000.0))
        if legacy_theta is not None and float(legacy_theta) != theta:
            raise ConfigError(
                f"config.json: rope_theta {legacy_theta} disagrees with rope_parameters "
                f"rope_theta {theta}"
            )
        scaling = params
    else:
        theta = float(legacy_theta if legacy_theta is not None else 500000.0)
        scaling = legacy or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"config.json: rope_type {rope_type!r} (supported: default, llama3)")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", max_positions)
            ),
        )
    except KeyError as e:
        raise ConfigError(f"config.json: llama3 rope scaling lacks {e.args[0]}") from None


# Defaults of transformers' Llama4VisionConfig, for keys a vision_config may omit.
_VISION_DEFAULTS: dict[str, Any] = {
    "image_size": 448,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_size": 768,
    "num_hidden_layers": 34,
    "num_attention_heads": 16,
    "intermediate_size": 5632,
    "norm_eps": 1e-5,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "vision_output_dim": 7680,
}
_IMAGE_TOKEN_DEFAULTS = {
    "image_token_index": 200092,
    "boi_token_index": 200080,
    "eoi_token_index": 200081,
}
# transformers' vision LayerNorms always use nn.LayerNorm's default eps, whatever norm_eps says.
_VISION_NORM_EPS = 1e-5


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower, the projector into the text width, and the image token ids.

    Invariant: the shapes are mutually consistent (checked by `from_dict`), so every tile of
    image_size x image_size pixels becomes exactly `tokens_per_tile` text-width embeddings.
    """

    image_size: int  # tile side, pixels
    patch_size: int
    num_channels: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # encoder MLP width, and the pixel-shuffled width
    norm_eps: float
    pixel_shuffle_ratio: float
    projector_input_dim: int  # vision-adapter MLP hidden width
    projector_output_dim: int  # vision-adapter output width
    vision_output_dim: int  # multi_modal_projector input width
    rope_theta: float
    text_hidden_size: int  # multi_modal_projector output width
    image_token_index: int = 200092  # <|patch|>: the slots the projected features fill
    boi_token_index: int = 200080  # <|image_start|>
    eoi_token_index: int = 200081  # <|image_end|>

    @property
    def grid_size(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """Patches per output-token side: 1 / pixel_shuffle_ratio."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_tile(self) -> int:
        """(image_size / patch_size)^2 * pixel_shuffle_ratio^2."""
        return (self.grid_size // self.shuffle_factor) ** 2

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VisionConfig | None:
        """Parses a config.json dict; None when it has no vision_config (a text-only model)."""
        vision = config.get("vision_config")
        if vision is None:
            return None
        if not isinstance(vision, dict):
            raise ConfigError("config.json: vision_config must be an object")
        text = config.get("text_config")
        text_hidden = text.get("hidden_size") if isinstance(text, dict) else None
        get = {**_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
        ints = {key: get[key] for key, default in _VISION_DEFAULTS.items() if type(default) is int}
        for key, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: vision_config.{key} {value!r} (a positive int)")
        params = vision.get("rope_parameters") or {}
        # transformers also reads the *_id spellings (Llama4Config.attribute_map).
        ids = {}
        for key, default in _IMAGE_TOKEN_DEFAULTS.items():
            value = config.get(key)
            if value is None:
                value = config.get(key.replace("_index", "_id"))
            ids[key] = default if value is None else int(value)
        parsed = cls(
            **ints,
            norm_eps=float(get["norm_eps"]),
            pixel_shuffle_ratio=float(get["pixel_shuffle_ratio"]),
            rope_theta=float(params.get("rope_theta", vision.get("rope_theta") or 10000.0)),
            text_hidden_size=int(text_hidden or 5120),
            **ids,
        )
        parsed._check()
        return parsed

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> VisionConfig | None:
        return cls.from_dict(_read_config_json(checkpoint_dir))

    def _check(self) -> None:
        """The shapes transformers hard-wires must agree."""
        problems = []
        if self.norm_eps != _VISION_NORM_EPS:
            problems.append(f"norm_eps {self.norm_eps} (transformers ignores it and uses 1e-5)")
        ratio = self.pixel_shuffle_ratio
        if not 0 < ratio <= 1 or round(1 / ratio) * ratio != 1:
            problems.append(f"pixel_shuffle_ratio {ratio} (must be 1/n for an integer n)")
        elif self.intermediate_size != self.hidden_size * self.shuffle_factor**2:
            problems.append(
                f"intermediate_size {self.intermediate_size} != hidden_size / "
                f"pixel_shuffle_ratio^2 = {self.hidden_size * self.shuffle_factor**2}"
            )
        elif self.grid_size % self.shuffle_factor:
            problems.append(
                f"image_size/patch_size = {self.grid_size} not divisible by "
                f"1/pixel_shuffle_ratio = {self.shuffle_factor}"
            )
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} not a multiple of {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
            )
        elif self.head_dim % 4:
            problems.append(f"head_dim {self.head_dim} not divisible by 4 (2D RoPE)")
        if self.projector_input_dim != self.projector_output_dim:
            problems.append(
                f"projector_input_dim {self.projector_input_dim} != projector_output_dim "
                f"{self.projector_output_dim}"
            )
        if self.vision_output_dim != self.projector_output_dim:
            problems.append(
                f"vision_output_dim {self.vision_output_dim} != projector_output_dim "
                f"{self.projector_output_dim}"
            )
        if problems:
            raise ConfigError("config.json: vision_config " + "; ".join(problems))


def _read_config_json(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: not a Hugging Face checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return config
