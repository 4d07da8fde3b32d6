"""A dense llama GGUF's metadata and tensors as a Hugging Face Llama 4 text model's.

Invariant: `hyperparameters` accepts only a GGUF that a dense, all-RoPE Llama 4 text model
computes exactly, and `convert_tensors` returns exactly the tensors of that model, at the shapes
the hyperparameters imply, or raises a ValueError.

Facts the conversion relies on (checked against transformers' own GGUF loader in
tests/test_demo_checkpoint.py):
- GGUF lists shapes innermost first, so a dequantized array is reshaped to the reversed shape,
  which is nn.Linear's [out, in].
- llama.cpp's converter already permuted the Q and K rows from Hugging Face's rotate-half layout
  into interleaved pairs, which is Llama 4's complex-pair RoPE layout, so they are copied as they
  are.
- The GGUF has no `output` tensor (tied embeddings); `lm_head.weight` is written as a copy of the
  embeddings with `tie_word_embeddings: false`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pyllama4.demo.cache import say


def read_metadata(reader: Any) -> dict[str, Any]:
    """The GGUF's key/value metadata (without the file format's own `GGUF.*` fields)."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    return meta


def hyperparameters(meta: dict[str, Any]) -> dict[str, Any]:
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


def convert_tensors(reader: Any, hp: dict[str, Any], progress: bool) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its Hugging Face name, lm_head included."""
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
            say(progress, f"converting {total} tensors: {percent}%")
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


def llama4_config(hp: dict[str, Any]) -> dict[str, Any]:
    """config.json of the dense, all-RoPE Llama 4 text model with these hyperparameters."""
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
