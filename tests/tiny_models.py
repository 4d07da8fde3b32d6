"""The tiny Llama 4 test configurations, defined once.

- `TINY_TEXT`: the `Llama4TextConfig` keyword arguments every tiny text model in the tests shares
  (the layer sizes); each test adds its own vocabulary, chunk size, RoPE, layout and token ids.
- `LLAMA3_ROPE`: Scout's llama3-scaled RoPE as transformers 5.x writes `rope_parameters`.
- `TINY_VISION`: the tiny vision tower (4x4 patches of 14 on a 56x56 tile, 4 tokens per tile
  after pixel shuffle) projecting to the text width.
- `make_tiny_checkpoint`: a tiny random text-only Llama 4 with a byte-level tokenizer.
- `LLAMA4_SPECIAL_TOKENS`, `TINY_TILE` and `make_tiny_multimodal_checkpoint`: the tiny random
  multimodal checkpoint behind conftest.py's `tiny_mm_dir` fixture.
- `last_token_logits`: our model's last-token logits for a batch of prompts, in one step.
- `tiny_engine_model`: the seeded tiny random transformers Llama 4 the engine tests compare with.

Test modules import it as `tiny_models` (pyproject.toml puts tests/ on pytest's pythonpath).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner

TINY_TEXT: dict = dict(
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
)

# Scout's RoPE (llama3 scaling), transformers 5.x style.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}

# Llama 4's special tokens at their real ids.
LLAMA4_SPECIAL_TOKENS = {
    "<|begin_of_text|>": 200000,
    "<|end_of_text|>": 200001,
    "<|header_start|>": 200005,
    "<|header_end|>": 200006,
    "<|eom|>": 200007,
    "<|eot|>": 200008,
    "<|python_start|>": 200016,
    "<|python_end|>": 200017,
    "<|finetune_right_pad|>": 200018,
    "<|image_start|>": 200080,
    "<|image_end|>": 200081,
    "<|tile_x_separator|>": 200084,
    "<|tile_y_separator|>": 200085,
    "<|image|>": 200090,
    "<|patch|>": 200092,
}
TINY_TILE = 56  # vision image_size: 4x4 patches of 14, 4 tokens per tile after pixel shuffle

TINY_VISION: dict = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=TINY_TILE,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=64,
    projector_output_dim=64,
    vision_output_dim=64,
)


def make_tiny_checkpoint(path: Path) -> Path:
    """A tiny text-only Llama 4 (random weights, a 262-token byte-level tokenizer) at `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Llama4ForCausalLM, Llama4TextConfig, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>"]
    specials += ["<|eot|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot|>"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>"
        "{{ m['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>{% endif %}"
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}

    torch.manual_seed(0)
    config = Llama4TextConfig(
        **TINY_TEXT,
        vocab_size=512,
        interleave_moe_layer_step=2,
        attention_chunk_size=64,
        max_position_embeddings=4096,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|eot|>"],
        pad_token_id=ids["<|end_of_text|>"],
    )
    Llama4ForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_multimodal_checkpoint(path: Path, demo_dir: Path) -> Path:
    """A random Llama4ForConditionalGeneration saved by transformers (fp32, text as
    TINY_TEXT with chunk 16), with a real BPE tokenizer (the demo model's) carrying Llama 4's
    special tokens at their real ids, transformers' Llama 4 chat template and an image
    preprocessor config for 56x56 tiles."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration
    from transformers.models.llama4.processing_llama4 import chat_template

    text = {
        **TINY_TEXT,
        "vocab_size": 202048,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "no_rope_layer_interval": 4,
        "attention_chunk_size": 16,
        "use_qk_norm": True,
        "attn_temperature_tuning": True,
        "floor_scale": 8,
        "attn_scale": 0.1,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "pad_token_id": 200018,
        "initializer_range": 0.1,
    }
    vision = {**TINY_VISION, "rope_theta": 10000, "initializer_range": 0.1}
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=200092)
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(config).eval().save_pretrained(path)

    tokenizer = json.loads((demo_dir / "tokenizer.json").read_text())
    for token, token_id in LLAMA4_SPECIAL_TOKENS.items():
        tokenizer["model"]["vocab"][token] = token_id
        tokenizer["added_tokens"].append(
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "chat_template.jinja").write_text(chat_template)
    preprocessor = {
        "image_processor_type": "Llama4ImageProcessorFast",
        "size": {"height": TINY_TILE, "width": TINY_TILE},
        "max_patches": 16,
        "resample": 2,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "resize_to_max_canvas": False,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return path


def tiny_engine_model(vocab: int, *, peaked: bool = True):
    """A seeded tiny random Llama 4 text model (transformers, eval mode): every layer MoE,
    8-token attention chunks, bos 1 / eos 2; peaked: experts and router drawn wider (std 0.1)
    and the lm_head peaked (std 0.5), so that seeded samples are not all distinct noise."""
    from transformers import Llama4ForCausalLM as HFLlama4
    from transformers import Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        **TINY_TEXT,
        vocab_size=vocab,
        interleave_moe_layer_step=1,
        attention_chunk_size=8,
        floor_scale=8,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters=LLAMA3_ROPE,
    )
    hf = HFLlama4(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if peaked and ("experts" in name or "router" in name):
                p.normal_(0, 0.1)
            if peaked and "lm_head" in name:
                p.normal_(0, 0.5)
    return hf.eval()


def last_token_logits(model: Llama4ForCausalLM, prompts: list[list[int]]) -> torch.Tensor:
    """Last-token logits of every prompt (rows in prompt order), all prompts in one step."""
    runner = ModelRunner(
        model, kv_tokens=4096, context_len=64, page_size=4, max_step_tokens=4096, max_running=64
    )
    sched = runner.new_scheduler()
    for rid, prompt in enumerate(prompts):
        sched.add_request(rid, np.asarray(prompt, dtype=np.int32), max_new_tokens=1)
    plan = sched.schedule()
    logits = runner.forward(plan)
    rids = plan.request_ids[plan.sample_requests]
    assert sorted(rids.tolist()) == list(range(len(prompts)))
    return logits[torch.from_numpy(np.argsort(rids))]


def make_tiny_eagle3_draft(path: Path, target_dir: Path, draft_vocab: int = 64) -> Path:
    """A random EAGLE3 draft in SGLang's layout for the (text or multimodal) checkpoint in
    target_dir: the target's width and vocabulary, a draft vocabulary of its first ids."""
    from pyllama4.config import TextConfig
    from pyllama4.loading.eagle3 import save_eagle3
    from pyllama4.model.eagle3 import Eagle3Config, Eagle3Draft

    target = TextConfig.from_checkpoint(target_dir)
    config = Eagle3Config.from_dict(
        {
            "architectures": ["LlamaForCausalLMEagle3"],
            "hidden_size": target.hidden_size,
            "intermediate_size": 2 * target.hidden_size,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": target.hidden_size // 4,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": target.max_position_embeddings,
            "vocab_size": target.vocab_size,
            "draft_vocab_size": min(draft_vocab, target.vocab_size),
        },
        target.num_hidden_layers,
    )
    torch.manual_seed(0)
    draft = Eagle3Draft(config)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.05)
        draft.d2t.zero_()
        draft.t2d.zero_()
        draft.t2d[: config.draft_vocab_size] = True
    save_eagle3(draft, path)
    return path
