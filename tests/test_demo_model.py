"""The built-in demo model on our engine equals transformers reading the original GGUF."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from helpers import greedy_generate
from pyllama4.loading.load import load_model
from pyllama4.runner import ModelRunner

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish and German.",
]


@pytest.fixture(scope="module")
def ours(demo_dir):
    model = load_model(demo_dir, dtype=torch.float32, progress=False)
    return ModelRunner(model, kv_tokens=8192, context_len=2048, max_step_tokens=256)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_greedy_chat_answers_equal_transformers_on_the_gguf(ours, tokenizer, hf_gguf_model):
    """32 greedy tokens per chat, batched through our scheduler (prefill split into 256-token
    steps), token-identical to transformers' LlamaForCausalLM on the GGUF, fp32."""
    prompts = [chat_ids(tokenizer, c) for c in CHATS]
    got = greedy_generate(ours, prompts, max_new_tokens=32)
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = hf_gguf_model.generate(
                torch.tensor([prompt]),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )[0, len(prompt) :].tolist()
        assert tokens == ref, (tokenizer.decode(tokens), tokenizer.decode(ref))


def test_the_demo_model_knows_the_capital_of_france(ours, tokenizer):
    (answer,) = greedy_generate(
        ours,
        [chat_ids(tokenizer, "What is the capital of France?")],
        max_new_tokens=32,
        stop_token_ids=(tokenizer.eos_token_id,),
    )
    assert "Paris" in tokenizer.decode(answer)
    assert answer[-1] == tokenizer.eos_token_id  # a short answer that ends by itself
