"""config.json parsing: both transformers key styles, both checkpoint layouts, clear errors."""

from __future__ import annotations

import json

import pytest
from transformers import Llama4Config, Llama4TextConfig

from pyllama4.config import ConfigError, RopeScaling, TextConfig
from tiny_models import TINY_TEXT

SCOUT_ROPE_4X = {
    "rope_type": "llama3",
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}


def scout_like(**overrides) -> dict:
    d = {
        "model_type": "llama4_text",
        **TINY_TEXT,
        "num_hidden_layers": 8,
        "vocab_size": 512,
        "attention_chunk_size": 8,
        "floor_scale": 8,
    }
    d.update(overrides)
    return d


def test_4x_and_5x_rope_keys_parse_identically():
    v4 = TextConfig.from_dict(scout_like(rope_theta=500000.0, rope_scaling=SCOUT_ROPE_4X))
    v5 = TextConfig.from_dict(scout_like(rope_parameters={**SCOUT_ROPE_4X, "rope_theta": 500000.0}))
    assert v4 == v5
    assert v4.rope_scaling == RopeScaling(16.0, 1.0, 1.0, 8192)
    # A config transformers 5.x saves itself parses the same way.
    saved = Llama4TextConfig(
        **{k: v for k, v in scout_like().items() if k != "model_type"},
        rope_parameters={**SCOUT_ROPE_4X, "rope_theta": 500000.0},
    ).to_dict()
    assert TextConfig.from_dict(saved) == v5


def test_layer_layout_follows_transformers_defaults():
    c = TextConfig.from_dict(scout_like())
    assert c.use_rope == (True, True, True, False) * 2  # every 4th layer is NoPE
    assert c.chunked == c.use_rope
    assert c.moe == (True,) * 8  # interleave step 1: all MoE (Scout)
    m = TextConfig.from_dict(scout_like(interleave_moe_layer_step=2, no_rope_layers=[]))
    assert m.moe == (False, True) * 4  # Maverick: odd layers
    assert m.use_rope == c.use_rope  # an EMPTY list means the default, not "all RoPE"
    hf = Llama4TextConfig(
        **{k: v for k, v in scout_like(interleave_moe_layer_step=2).items() if k != "model_type"}
    )
    assert m.moe == tuple(i in hf.moe_layers for i in range(8))
    assert m.use_rope == tuple(bool(x) for x in hf.no_rope_layers)
    assert m.chunked == tuple(t == "chunked_attention" for t in hf.layer_types)


def test_multimodal_layout_reads_the_nested_text_config():
    text = scout_like(rope_theta=500000.0, rope_scaling=SCOUT_ROPE_4X)
    mm = {"architectures": ["Llama4ForConditionalGeneration"], "text_config": text}
    mm["vision_config"] = {"hidden_size": 32}
    assert TextConfig.from_dict(mm) == TextConfig.from_dict(text)
    # Real multimodal configs as transformers writes them.
    saved = Llama4Config(text_config={k: v for k, v in text.items() if k != "model_type"}).to_dict()
    assert TextConfig.from_dict(json.loads(json.dumps(saved))) == TextConfig.from_dict(text)


@pytest.mark.parametrize("value", [True, 4, 1])
def test_temperature_tuning_accepts_bool_or_int(value):
    assert TextConfig.from_dict(scout_like(attn_temperature_tuning=value)).attn_temperature_tuning
    assert not TextConfig.from_dict(
        scout_like(attn_temperature_tuning=False)
    ).attn_temperature_tuning


def test_null_chunk_size_means_full_attention_everywhere():
    c = TextConfig.from_dict(scout_like(attention_chunk_size=None))
    assert c.attention_chunk_size is None and not any(c.chunked)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        (
            {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
            "disagrees",
        ),
        ({"no_rope_layers": [1, 0]}, "no_rope_layers has 2 entries for 8 layers"),
        ({"moe_layers": [9]}, "moe_layers"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "KV heads"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ],
)
def test_unsupported_or_inconsistent_configs_fail_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TextConfig.from_dict(scout_like(**overrides))


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        TextConfig.from_checkpoint(tmp_path)
