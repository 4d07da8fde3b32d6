"""load_weights: tiny random Llama 4 checkpoints written by transformers, loaded into a fresh
Llama4ForCausalLM (same parameter names as our model), plus hand-edited checkpoints for the
per-expert layout, the multimodal name styles and every error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
)

from pyllama4.loading import weight_copy  # noqa: E402
from pyllama4.loading.checkpoint import (  # noqa: E402
    CheckpointError,
    UnsupportedCheckpointError,
    checkpoint_files,
    text_name,
)
from pyllama4.loading.weights import load_weights  # noqa: E402
from tiny_models import TINY_TEXT, TINY_VISION  # noqa: E402

# The tiny text model (tiny_models.TINY_TEXT's shape), with a small vocabulary.
TEXT = {
    **TINY_TEXT,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8,
    "use_qk_norm": True,
    "attn_temperature_tuning": True,
    "floor_scale": 8,
    "attn_scale": 0.1,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
}
MOE_LAYERS = (1, 3)
EXPERTS = "model.layers.{l}.feed_forward.experts"


def text_config(**overrides) -> Llama4TextConfig:
    return Llama4TextConfig(**{**TEXT, **overrides})


def fresh_model(seed: int, **overrides) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    return Llama4ForCausalLM(text_config(**overrides)).eval()


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def assert_differs(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert not torch.equal(
        got["model.layers.1.feed_forward.experts.gate_up_proj"],
        expected["model.layers.1.feed_forward.experts.gate_up_proj"],
    )


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file checkpoint, passing its tensors through `edit(dict) -> dict`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = edit(load_file(src / "model.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        dst / "model.safetensors",
        metadata={"format": "pt"},
    )
    return dst


def to_per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused [E, H, 2I] / [E, I, H] experts -> per-expert nn.Linear [out, in] tensors."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            half = tensor.shape[2] // 2
            for e in range(tensor.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = tensor[e, :, :half].T
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = tensor[e, :, half:].T
        elif name.endswith("experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = tensor[e].T
        else:
            out[name] = tensor
    return out


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A text-only fp32 Llama4ForCausalLM saved by save_pretrained, and its state dict."""
    src = fresh_model(0)
    path = tmp_path_factory.mktemp("text") / "ckpt"
    src.save_pretrained(path)
    return path, {k: v.clone() for k, v in src.state_dict().items()}


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    src = fresh_model(2)
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    src.save_pretrained(path, max_shard_size="20KB")
    return path, {k: v.clone() for k, v in src.state_dict().items()}


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# Loading


def test_text_checkpoint_loads_exactly(text_ckpt, capsys):
    path, expected = text_ckpt
    model = fresh_model(1)
    assert_differs(model, expected)
    load_weights(model, path)
    assert_state_equal(model, expected)
    assert "loading weights: 1/1 shards" in capsys.readouterr().err
    load_weights(fresh_model(1), path, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("module_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_parameter_dtype_wins(text_ckpt, tmp_path, module_dtype):
    path, expected = text_ckpt
    model = fresh_model(1).to(module_dtype)
    load_weights(model, path, progress=False)  # fp32 checkpoint
    assert_state_equal(model, {k: v.to(module_dtype) for k, v in expected.items()})

    bf16 = rewrite(path, tmp_path / "bf16", lambda t: {k: v.bfloat16() for k, v in t.items()})
    model = fresh_model(1).to(module_dtype)
    load_weights(model, bf16, progress=False)  # bf16 checkpoint
    assert_state_equal(model, {k: v.bfloat16().to(module_dtype) for k, v in expected.items()})


def test_sharded_checkpoint(sharded_ckpt, capsys):
    path, expected = sharded_ckpt
    files = checkpoint_files(path)
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(files) >= 3
    assert [f.name for f in files] == sorted(set(index["weight_map"].values()))
    model = fresh_model(1)
    load_weights(model, path)
    assert_state_equal(model, expected)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"loading weights: 1/{len(files)} shards, ")
    assert lines[-1].startswith(f"loading weights: {len(files)}/{len(files)} shards, ")


def test_large_tensors_are_copied_in_row_blocks(text_ckpt, tmp_path, monkeypatch):
    path, expected = text_ckpt
    monkeypatch.setattr(weight_copy, "_CHUNK_BYTES", 1000)
    model = fresh_model(1).bfloat16()
    load_weights(model, path, progress=False)
    assert_state_equal(model, {k: v.bfloat16() for k, v in expected.items()})


def test_per_expert_layout(text_ckpt, tmp_path):
    path, expected = text_ckpt
    per_expert = rewrite(path, tmp_path / "per_expert", to_per_expert)
    with safe_open(per_expert / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.feed_forward.experts.3.up_proj.weight" in names
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    model = fresh_model(1)
    load_weights(model, per_expert, progress=False)
    assert_state_equal(model, expected)


def test_per_expert_layout_mixed_with_fused_per_layer(text_ckpt, tmp_path):
    """Layer 1 per expert, layer 3 fused: each parameter is still covered exactly once."""
    path, expected = text_ckpt

    def edit(t):
        layer1 = to_per_expert({k: v for k, v in t.items() if k.startswith("model.layers.1.")})
        return {**{k: v for k, v in t.items() if not k.startswith("model.layers.1.")}, **layer1}

    model = fresh_model(1)
    load_weights(model, rewrite(path, tmp_path / "mixed", edit), progress=False)
    assert_state_equal(model, expected)


def test_multimodal_checkpoint_loads_text_weights(tmp_path):
    torch.manual_seed(3)
    config = Llama4Config(text_config={**TEXT, "vocab_size": 202048}, vision_config=TINY_VISION)
    src = Llama4ForConditionalGeneration(config)
    src.save_pretrained(tmp_path / "mm")
    with safe_open(tmp_path / "mm" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    # transformers 5.24 writes the same names as 4.x: the text model under `language_model.`
    # (`language_model.model.layers.{i}...`, `language_model.model.embed_tokens.weight`,
    # `language_model.model.norm.weight`, `language_model.lm_head.weight`), the vision tower
    # under `vision_model.` and the projector as `multi_modal_projector.linear_1.weight`.
    assert "language_model.lm_head.weight" in names
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in names
    assert "multi_modal_projector.linear_1.weight" in names
    assert {n.split(".")[0] for n in names} == {
        "language_model",
        "vision_model",
        "multi_modal_projector",
    }
    expected = {k: v.clone() for k, v in src.language_model.state_dict().items()}
    del src
    torch.manual_seed(4)
    model = Llama4ForCausalLM(config.text_config)
    load_weights(model, tmp_path / "mm", progress=False)
    assert_state_equal(model, expected)


def _prefixed(style: str):
    def edit(t):
        out = {}
        for name, tensor in t.items():
            if style == "language_model.":  # transformers 4.x / 5.24 Llama4ForConditionalGeneration
                out["language_model." + name] = tensor
            else:  # transformers 5.x style of other multimodal models
                out[name.replace("model.", "model.language_model.", 1)] = tensor
        prefix = "" if style == "language_model." else "model."
        out[prefix + "vision_model.class_embedding"] = torch.zeros(8)
        out[prefix + "multi_modal_projector.linear_1.weight"] = torch.zeros(64, 64)
        return out

    return edit


@pytest.mark.parametrize("style", ["language_model.", "model.language_model."])
def test_multimodal_name_styles(text_ckpt, tmp_path, style):
    path, expected = text_ckpt
    model = fresh_model(1)
    load_weights(model, rewrite(path, tmp_path / "mm", _prefixed(style)), progress=False)
    assert_state_equal(model, expected)


def test_text_name():
    assert text_name("model.norm.weight") == "model.norm.weight"
    assert text_name("language_model.model.norm.weight") == "model.norm.weight"
    assert text_name("language_model.lm_head.weight") == "lm_head.weight"
    assert text_name("model.language_model.layers.0.x") == "model.layers.0.x"
    assert text_name("vision_model.class_embedding") is None
    assert text_name("model.multi_modal_projector.linear_1.weight") is None
    assert text_name("vision_tower.x") == "vision_tower.x"  # not skipped: unexpected later


# ------------------------------------------------------------------------------------------------
# Tied embeddings


def test_tied_checkpoint_without_lm_head(tmp_path):
    src = fresh_model(5, tie_word_embeddings=True)
    src.save_pretrained(tmp_path / "tied")
    with safe_open(tmp_path / "tied" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    embed = src.model.embed_tokens.weight.detach().clone()

    untied = fresh_model(1)  # our model: lm_head is its own parameter
    load_weights(untied, tmp_path / "tied", progress=False)
    assert torch.equal(untied.lm_head.weight, embed)
    assert torch.equal(untied.model.embed_tokens.weight, embed)

    tied = fresh_model(1, tie_word_embeddings=True)  # one parameter under two names
    load_weights(tied, tmp_path / "tied", progress=False)
    assert_state_equal(tied, src.state_dict())


def test_untied_checkpoint_without_lm_head_is_an_error(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = rewrite(
        path, tmp_path / "no_head", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"}
    )
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): lm_head\.weight"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_tied_module_with_different_lm_head_is_an_error(text_ckpt):
    path, _ = text_ckpt
    model = fresh_model(1, tie_word_embeddings=True)
    with pytest.raises(
        CheckpointError,
        match=r"lm_head\.weight and model\.embed_tokens\.weight differ, but the module ties them",
    ):
        load_weights(model, path, progress=False)


# ------------------------------------------------------------------------------------------------
# Errors


def drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def test_missing_tensor(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = rewrite(path, tmp_path / "c", drop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing.*model\.layers\.2\.self_attn\.k_proj\.weight"
    ):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_missing_tensors_are_listed_up_to_ten(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = rewrite(
        path, tmp_path / "c", lambda t: {k: v for k, v in t.items() if "self_attn" not in k}
    )
    with pytest.raises(CheckpointError, match=r"16 missing tensor\(s\): .*\.\.\. and 6 more"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_missing_expert_slice(text_ckpt, tmp_path):
    path, _ = text_ckpt

    def edit(t):
        return drop(f"{EXPERTS.format(l=3)}.2.up_proj.weight")(to_per_expert(t))

    with pytest.raises(
        CheckpointError, match=r"missing.*layers\.3\.feed_forward\.experts\.2\.up_proj"
    ):
        load_weights(fresh_model(1), rewrite(path, tmp_path / "c", edit), progress=False)


def test_unexpected_tensor(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = rewrite(
        path,
        tmp_path / "c",
        lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)},
    )
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_norm"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_only_vision_and_projector_are_skipped(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = rewrite(path, tmp_path / "c", lambda t: {**t, "vision_tower.x": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"unexpected.*vision_tower\.x"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_expert_index_out_of_range(text_ckpt, tmp_path):
    path, _ = text_ckpt
    name = f"{EXPERTS.format(l=1)}.4.gate_proj.weight"
    ckpt = rewrite(path, tmp_path / "c", lambda t: {**to_per_expert(t), name: torch.ones(32, 64)})
    with pytest.raises(
        CheckpointError, match=r"unexpected.*experts\.4\.gate_proj\.weight \(expert 4"
    ):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_wrong_shape_leaves_the_module_untouched(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = rewrite(path, tmp_path / "c", lambda t: {**t, "model.norm.weight": torch.ones(65)})
    model = fresh_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"model\.norm\.weight: expected shape \[64\], got \[65\]"
    ):
        load_weights(model, ckpt, progress=False)
    assert_state_equal(model, before)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, ckpt, progress=False)
    assert "missing" not in str(info.value)  # reported once, as a wrong shape


def test_wrong_per_expert_shape(text_ckpt, tmp_path):
    path, _ = text_ckpt
    name = f"{EXPERTS.format(l=1)}.0.down_proj.weight"
    ckpt = rewrite(path, tmp_path / "c", lambda t: {**to_per_expert(t), name: torch.ones(32, 64)})
    with pytest.raises(
        CheckpointError, match=r"0\.down_proj\.weight: expected shape \[64, 32\], got \[32, 64\]"
    ):  # noqa: E501
        load_weights(fresh_model(1), ckpt, progress=False)


def test_fused_and_per_expert_for_the_same_layer(text_ckpt, tmp_path):
    path, _ = text_ckpt
    name = f"{EXPERTS.format(l=1)}.2.up_proj.weight"
    ckpt = rewrite(path, tmp_path / "c", lambda t: {**t, name: torch.ones(32, 64)})
    with pytest.raises(CheckpointError, match=r"more than once.*experts\.2\.up_proj\.weight"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_same_parameter_under_two_prefixes(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = rewrite(
        path,
        tmp_path / "c",
        lambda t: {**t, "language_model.model.norm.weight": t["model.norm.weight"].clone()},
    )
    with pytest.raises(CheckpointError, match=r"more than once.*model\.norm\.weight"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_duplicate_across_shards(sharded_ckpt, tmp_path):
    path, _ = sharded_ckpt
    ckpt = copy_dir(path, tmp_path / "c")
    first, *_, last = checkpoint_files(ckpt)
    with safe_open(first, "pt") as f:
        name = next(iter(f.keys()))
        tensor = f.get_tensor(name)
    tensors = load_file(last)
    tensors[name] = tensor
    save_file(tensors, last, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} is in both {first.name} and {last.name}"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_index_entry_not_in_its_shard(sharded_ckpt, tmp_path):
    path, _ = sharded_ckpt
    ckpt = copy_dir(path, tmp_path / "c")
    last = checkpoint_files(ckpt)[-1]
    tensors = load_file(last)
    name = sorted(tensors)[0]
    del tensors[name]
    save_file(tensors, last, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} is listed in {last.name} but not stored"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_missing_shard_file(sharded_ckpt, tmp_path):
    path, _ = sharded_ckpt
    ckpt = copy_dir(path, tmp_path / "c")
    gone = checkpoint_files(ckpt)[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"absent.*{gone.name}"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(fresh_model(1), tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_weights(fresh_model(1), tmp_path)


def test_unreadable_shard(text_ckpt, tmp_path):
    path, _ = text_ckpt
    ckpt = copy_dir(path, tmp_path / "c")
    (ckpt / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_float8_tensor_is_not_supported(text_ckpt, tmp_path):
    path, _ = text_ckpt
    name = "model.layers.0.self_attn.q_proj.weight"
    ckpt = rewrite(path, tmp_path / "c", lambda t: {**t, name: t[name].to(torch.float8_e4m3fn)})
    with pytest.raises(UnsupportedCheckpointError, match=rf"not supported yet.*{name} has float8"):
        load_weights(fresh_model(1), ckpt, progress=False)


@pytest.mark.parametrize("where", ["top", "text_config"])
def test_quantization_config_is_not_supported(text_ckpt, tmp_path, where):
    path, _ = text_ckpt
    ckpt = copy_dir(path, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    if where == "top":
        config["quantization_config"] = quant
    else:
        config["text_config"] = {"quantization_config": quant}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointError, match="not supported yet.*compressed-tensors"):
        load_weights(fresh_model(1), ckpt, progress=False)


def test_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(UnsupportedCheckpointError, CheckpointError)
