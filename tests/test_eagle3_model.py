"""The EAGLE3 draft (pyllama4/model/eagle3.py): numerics against transformers, checkpoint I/O.

The reference is assembled from transformers' own Llama pieces (LlamaRMSNorm, LlamaRotaryEmbedding,
apply_rotary_pos_emb, LlamaMLP) with the draft's weights, SGLang's midlayer wiring and torch SDPA
for the causal attention. Comparing against it is what catches a wrong RoPE layout: the draft must
use HF Llama's rotate-half pairs (i, i + D/2), not Llama 4's interleaved pairs (2i, 2i + 1);
test_interleaved_rope_differs shows the comparison would fail for the latter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracles import dense_causal_attend
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from pyllama4.loading.eagle3 import load_eagle3, save_eagle3
from pyllama4.model.eagle3 import Eagle3Config, Eagle3Draft

TARGET_LAYERS, TARGET_HIDDEN, VOCAB, DRAFT_VOCAB = 8, 48, 300, 50
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CONFIG = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 256,
    "vocab_size": VOCAB,
    "draft_vocab_size": DRAFT_VOCAB,
    "target_hidden_size": TARGET_HIDDEN,
    "torch_dtype": "bfloat16",
    "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 5], "use_aux_hidden_state": True},
}
PUBLISHED = {
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
}
N = 12


def published_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in SGLang's layout for CONFIG, written by hand (not by save_eagle3)."""
    g = torch.Generator().manual_seed(seed)
    H, inter, D = 64, 96, 16
    shapes = {
        "fc.weight": (H, 3 * TARGET_HIDDEN),
        "midlayer.self_attn.q_proj.weight": (4 * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": (2 * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": (2 * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, 4 * D),
        "midlayer.mlp.gate_proj.weight": (inter, H),
        "midlayer.mlp.up_proj.weight": (inter, H),
        "midlayer.mlp.down_proj.weight": (H, inter),
        "lm_head.weight": (DRAFT_VOCAB, H),
    }
    tensors = {k: torch.randn(s, generator=g) / s[1] ** 0.5 for k, s in shapes.items()}
    for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        tensors[f"midlayer.{norm}.weight"] = 1 + 0.2 * torch.randn(H, generator=g)
    tensors["norm.weight"] = 1 + 0.2 * torch.randn(H, generator=g)
    target_ids = torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB].sort().values
    tensors["d2t"] = target_ids - torch.arange(DRAFT_VOCAB)
    tensors["t2d"] = torch.zeros(VOCAB, dtype=torch.bool).index_fill(0, target_ids, True)
    return tensors


def write_checkpoint(directory: Path, config: dict, tensors: dict, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return directory
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def make_draft(config: dict, seed: int = 0) -> tuple[Eagle3Draft, nn.Embedding]:
    draft = Eagle3Draft(Eagle3Config.from_dict(config, TARGET_LAYERS))
    draft.load_state_dict(published_tensors(seed))
    embedding = nn.Embedding(VOCAB, 64)
    nn.init.normal_(embedding.weight, generator=torch.Generator().manual_seed(seed + 1))
    draft.set_embedding(embedding)
    return draft, embedding


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, VOCAB, (N,), generator=g)
    return token_ids, torch.randn(N, 64, generator=g), 3 + 5 * torch.arange(N)


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """Llama 4's layout: pairs (2i, 2i + 1) rotated as complex numbers; x [1, heads, N, D]."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def reference(draft: Eagle3Draft, token_ids, hidden, positions, rope: str = "rotate_half"):
    """(prenorm, normed, logits) from transformers' Llama pieces, SGLang's midlayer wiring."""
    c, m = draft.config, draft.midlayer
    params = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    hf = LlamaConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters=params,
        hidden_act="silu",
    )

    def norm(module: nn.Module) -> LlamaRMSNorm:
        ref = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        ref.weight.data.copy_(module.weight)
        return ref

    mlp = LlamaMLP(hf)
    mlp.load_state_dict(m.mlp.state_dict())
    attn = {name: proj.weight for name, proj in m.self_attn.items()}
    x = torch.cat(
        [norm(m.input_layernorm)(draft.embed_tokens(token_ids)), norm(m.hidden_norm)(hidden)], -1
    )

    def heads(name: str, count: int) -> torch.Tensor:
        return F.linear(x, attn[name]).view(1, N, count, c.head_dim).transpose(1, 2)

    q, k, v = heads("q_proj", 4), heads("k_proj", 2), heads("v_proj", 2)
    rotary = LlamaRotaryEmbedding(hf)
    if rope == "rotate_half":
        cos, sin = rotary(x, positions[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    else:
        q, k = (interleaved_rope(t, positions, rotary.inv_freq) for t in (q, k))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.head_dim**-0.5)
    h = F.linear(out.transpose(1, 2).reshape(N, -1), attn["o_proj"]) + hidden
    prenorm = mlp(norm(m.post_attention_layernorm)(h)) + h
    normed = norm(draft.norm)(prenorm)
    return prenorm, normed, F.linear(normed, draft.lm_head.weight)


def run_draft(draft: Eagle3Draft, token_ids, hidden, positions):
    prenorm, normed = draft(token_ids, hidden, positions, dense_causal_attend(draft.scale))
    return prenorm, normed, draft.logits(normed)


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["unscaled", "llama3"])
@torch.no_grad()
def test_matches_transformers_reference(scaling):
    draft, _ = make_draft({**CONFIG, "rope_scaling": scaling})
    token_ids, hidden, positions = inputs()
    got = run_draft(draft, token_ids, hidden, positions)
    want = reference(draft, token_ids, hidden, positions)
    assert got[2].dtype == torch.float32 and got[2].shape == (N, DRAFT_VOCAB)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 1e-5


@torch.no_grad()
def test_interleaved_rope_differs():
    draft, _ = make_draft({**CONFIG, "rope_scaling": LLAMA3})
    token_ids, hidden, positions = inputs()
    got = run_draft(draft, token_ids, hidden, positions)
    wrong = reference(draft, token_ids, hidden, positions, rope="interleaved")
    assert (got[0] - wrong[0]).abs().max().item() > 1e-3


@torch.no_grad()
def test_llama3_scaling_changes_the_draft():
    """The scaled comparison above has teeth: ignoring rope_scaling would change the output."""
    unscaled, _ = make_draft(CONFIG)
    scaled, _ = make_draft({**CONFIG, "rope_scaling": LLAMA3})
    diff = run_draft(unscaled, *inputs())[0] - run_draft(scaled, *inputs())[0]
    assert diff.abs().max().item() > 1e-3


def test_embedding_is_shared_not_owned():
    draft, embedding = make_draft(CONFIG)
    assert draft.embed_tokens is embedding
    assert set(draft.state_dict()) == PUBLISHED
    assert all(p is not embedding.weight for p in draft.parameters())
    assert draft.d2t.dtype == torch.int64 and draft.t2d.dtype == torch.bool
    assert draft.scale == 16**-0.5


def test_fuse_width():
    draft, _ = make_draft(CONFIG)
    assert draft.fuse(torch.randn(5, 3 * TARGET_HIDDEN)).shape == (5, 64)


def test_d2t_mapping():
    draft, _ = make_draft(CONFIG)
    ids = torch.arange(DRAFT_VOCAB)
    mapped = draft.to_target(ids)
    assert torch.equal(mapped, ids + draft.d2t)
    assert torch.equal(draft.t2d.nonzero().flatten(), mapped)


def test_save_load_round_trip(tmp_path):
    draft, embedding = make_draft({**CONFIG, "rope_scaling": LLAMA3})
    save_eagle3(draft, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == PUBLISHED
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == DRAFT_VOCAB
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
    loaded = load_eagle3(tmp_path, TARGET_HIDDEN, VOCAB, TARGET_LAYERS, dtype=torch.float32)
    assert loaded.config == draft.config and loaded.config.aux_layers == (2, 4, 6)
    want = draft.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name
    loaded.set_embedding(embedding)
    with torch.no_grad():
        for a, b in zip(run_draft(draft, *inputs()), run_draft(loaded, *inputs()), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("prefix", "shards", "rope"),
    [("", 1, "rope_scaling"), ("model.", 1, "rope_scaling"), ("model.", 2, "rope_parameters")],
)
def test_loads_sglang_layout(tmp_path, prefix, shards, rope):
    tensors = published_tensors()
    written = {
        (k if k in ("lm_head.weight", "d2t", "t2d") else prefix + k): v for k, v in tensors.items()
    }
    written[prefix + "embed_tokens.weight"] = torch.randn(VOCAB, 64)  # ignored: the target's
    config = {**CONFIG, "rope_scaling": LLAMA3}
    if rope == "rope_parameters":  # what transformers 5 writes
        del config["rope_theta"], config["rope_scaling"]
        config["rope_parameters"] = {**LLAMA3, "rope_theta": 10000.0}
    write_checkpoint(tmp_path, config, written, shards)
    draft = load_eagle3(tmp_path, TARGET_HIDDEN, VOCAB, TARGET_LAYERS)
    assert draft.config.rope_scaling == LLAMA3 and draft.config.rope_theta == 10000.0
    state = draft.state_dict()
    assert set(state) == PUBLISHED
    for name, tensor in tensors.items():
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert state[name].dtype == want.dtype and torch.equal(state[name], want), name
    draft.set_embedding(nn.Embedding(VOCAB, 64, dtype=torch.bfloat16))
    token_ids, hidden, positions = inputs()
    with torch.no_grad():
        prenorm, normed = draft(token_ids, hidden.bfloat16(), positions, dense_causal_attend(0.25))
    assert prenorm.dtype == torch.bfloat16 and draft.logits(normed).shape == (N, DRAFT_VOCAB)


def _load(directory: Path, **target: int) -> Eagle3Draft:
    args = {"target_hidden_size": TARGET_HIDDEN, "target_vocab_size": VOCAB, **target}
    return load_eagle3(directory, target_num_layers=TARGET_LAYERS, **args)


@pytest.mark.parametrize(
    ("name", "tensor", "match"),
    [
        (
            "fc.weight",
            torch.zeros(64, 150),
            r"fc\.weight: expected shape \[64, 144\], found \[64, 150\]",
        ),
        ("lm_head.weight", torch.zeros(40, 64), r"lm_head\.weight: expected shape \[50, 64\]"),
        ("midlayer.mlp.up_proj.weight", None, r"missing tensor midlayer\.mlp\.up_proj\.weight"),
        ("midlayer.extra", torch.zeros(1), r"unexpected tensor midlayer\.extra"),
        ("d2t", torch.full((DRAFT_VOCAB,), VOCAB), r"d2t maps draft ids outside .*\[0, 300\)"),
    ],
)
def test_bad_tensors_fail_clearly(tmp_path, name, tensor, match):
    tensors = published_tensors()
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    write_checkpoint(tmp_path, CONFIG, tensors)
    with pytest.raises(ValueError, match=match):
        _load(tmp_path)


@pytest.mark.parametrize(
    ("changes", "target", "match"),
    [
        ({}, {"target_vocab_size": VOCAB + 1}, "vocab_size 300 != the target's 301"),
        ({}, {"target_hidden_size": 64}, "target_hidden_size 48 != the target's 64"),
        ({"num_hidden_layers": 2}, {}, "num_hidden_layers 2"),
        ({"architectures": ["LlamaForCausalLM"]}, {}, "architectures"),
        ({"hidden_size": None}, {}, "lacks hidden_size"),
        ({"head_dim": "16"}, {}, "head_dim"),
        ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 7]}}, {}, "layer_ids"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, {}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, {}, "low_freq_factor"),
    ],
)
def test_bad_configs_fail_clearly(tmp_path, changes, target, match):
    write_checkpoint(tmp_path, {**CONFIG, **changes}, published_tensors())
    with pytest.raises(ValueError, match=match) as error:
        _load(tmp_path, **target)
    assert str(error.value).startswith(f"the EAGLE3 draft {tmp_path}: ")  # the draft, named


def test_a_config_without_rope_theta_reads_as_transformers_reads_it(tmp_path):
    """SpecForge's published draft configs have no rope_theta: transformers' LlamaConfig (which
    SGLang reads them with) gives its default."""
    from transformers import LlamaConfig

    config = {k: v for k, v in CONFIG.items() if k not in ("rope_theta", "rope_scaling")}
    write_checkpoint(tmp_path, config, published_tensors())
    draft = _load(tmp_path)
    reference = LlamaConfig(**config).rope_parameters
    assert draft.config.rope_theta == reference["rope_theta"] and draft.config.rope_scaling is None


def test_aux_layers():
    no_eagle_config = {k: v for k, v in CONFIG.items() if k != "eagle_config"}
    assert Eagle3Config.from_dict(no_eagle_config, 30).aux_layers == (2, 15, 27)
    maverick = {**CONFIG, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 23, 44]}}
    config = Eagle3Config.from_dict(maverick, 48)
    assert config.aux_layers == (2, 24, 45)
    assert config.to_dict()["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 23, 44]
    assert Eagle3Config.from_dict(config.to_dict(), 48) == config


def test_config_defaults_and_llama4_mlp_width():
    sparse = {
        k: v
        for k, v in CONFIG.items()
        if k not in ("head_dim", "draft_vocab_size", "target_hidden_size")
    }
    config = Eagle3Config.from_dict(sparse, TARGET_LAYERS)
    assert (config.head_dim, config.draft_vocab_size, config.target_hidden_size) == (16, VOCAB, 64)
    llama4 = {**CONFIG, "model_type": "llama4_text", "intermediate_size_mlp": 128}
    assert Eagle3Config.from_dict(llama4, TARGET_LAYERS).intermediate_size == 128
