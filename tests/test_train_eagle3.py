"""EAGLE3 draft training (pyllama4.speculative.train, `python -m pyllama4.train_eagle3`).

- The training-time-test unrolling computes exactly what sequential top-1 drafting computes: for
  every trained row and step, the unrolled logits equal those of the draft run step by step with
  dense causal attention over the step-0 rows up to that position plus the chain so far.
- End to end on a tiny random Llama 4 target (demo tokenizer, ShareGPT-format prompts): the draft
  saved loads with load_eagle3, its vocabulary holds the most frequent answer tokens, and the loss
  falls on a memorizable data set (a few repeated prompts).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from oracles import dense_causal_attend
from torch import nn
from transformers import Llama4ForCausalLM as HFLlama4
from transformers import Llama4TextConfig

from pyllama4.engine import Engine
from pyllama4.loading.eagle3 import load_eagle3
from pyllama4.model.eagle3 import Eagle3Config, Eagle3Draft
from pyllama4.speculative.train.capture import Sample
from pyllama4.speculative.train.cli import main
from pyllama4.speculative.train.data import generate_answers, load_prompts, split
from pyllama4.speculative.train.unroll import pack, unroll
from tiny_models import TINY_TEXT

VOCAB, LAYERS, DRAFT_VOCAB, NEW_TOKENS = 49152, 8, 64, 24
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three prime numbers.",
    "How do I sort a list in Python?",
    "Why is the sky blue?",
]


def test_unrolled_steps_are_sequential_drafting():
    torch.manual_seed(0)
    config = Eagle3Config(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=256,
        vocab_size=50,
        draft_vocab_size=50,
        target_hidden_size=16,
        aux_layers=(2, 3, 4),
    )
    draft = Eagle3Draft(config)
    draft.set_embedding(nn.Embedding(50, 32))
    to_draft = torch.arange(50)
    samples = [
        Sample(torch.randint(0, 50, (length,)), torch.randn(length - 1, 48), prompt_len)
        for length, prompt_len in ((12, 4), (9, 2))
    ]
    steps = 3
    p = pack(samples, steps, to_draft)
    with torch.no_grad():
        logits = unroll(draft, p, steps)
        attend = dense_causal_attend(draft.scale)
        row = 0
        for s in samples:
            t, last = s.tokens, len(s.tokens) - 1
            for i in range(s.prompt_len - 1, last - 1):
                # Step-0 rows 0..i: (t[j + 1], fused aux of j) at position j; then the chain.
                tokens, hidden = t[1 : i + 2], draft.fuse(s.aux[: i + 1])
                positions = torch.arange(i + 1)
                for k in range(steps):
                    prenorm, normed = draft(tokens, hidden, positions, attend)
                    expected = draft.logits(normed[-1:])
                    torch.testing.assert_close(logits[k][row : row + 1], expected)
                    label = int(t[i + 2 + k]) if i + 2 + k <= last else -1
                    assert int(p.labels[k][row]) == label
                    tokens = torch.cat([tokens, t[min(i + 2 + k, last)].view(1)])
                    hidden = torch.cat([hidden, prenorm[-1:]])
                    positions = torch.cat([positions, torch.tensor([i + 1 + k])])
                row += 1
        assert row == len(p.rows)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, demo_dir) -> Path:
    """A random 8-layer Llama 4 text model with the demo tokenizer (vocab 49152, EOS 2)."""
    path = tmp_path_factory.mktemp("tiny-target")
    torch.manual_seed(0)
    config = Llama4TextConfig(
        **{**TINY_TEXT, "num_hidden_layers": LAYERS},
        vocab_size=VOCAB,
        interleave_moe_layer_step=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    hf = HFLlama4(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0, 0.1)
        hf.lm_head.weight.normal_(0, 0.5)  # peaked: answers that are not all distinct noise
    hf.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(demo_dir / name, path / name)
    return path


def test_trains_a_loadable_draft_on_a_tiny_target(tiny_target, tmp_path):
    dataset = tmp_path / "sharegpt.json"
    convs = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": ""}],
        }
        for i, p in enumerate([*PROMPTS, "a conversation cut off by the truncated file"])
    ]
    dataset.write_text(json.dumps(convs)[:-20])  # truncated like the packaged file
    out = tmp_path / "draft"
    args = [
        *("--output", str(out), "--model", str(tiny_target), "--dataset-path", str(dataset)),
        *f"--num-prompts 10 --max-new-tokens {NEW_TOKENS} --steps 60 --log-every 10".split(),
        *f"--draft-vocab-size {DRAFT_VOCAB} --lr 3e-3 --warmup-steps 5".split(),
        *"--batch-tokens 4096 --val-fraction 0.08".split(),
    ]
    assert main(args) == 0

    draft = load_eagle3(out, 64, VOCAB, LAYERS, dtype=torch.float32)
    assert draft.config.draft_vocab_size == DRAFT_VOCAB
    assert draft.config.aux_layers == (2, LAYERS // 2, LAYERS - 3)
    targets = draft.to_target(torch.arange(DRAFT_VOCAB))
    assert targets.unique().numel() == DRAFT_VOCAB and 0 <= targets.min() <= targets.max() < VOCAB
    assert torch.equal(draft.t2d.nonzero().flatten(), targets.sort().values)

    # The answers again (greedy, so the same); the vocabulary comes from those of the training
    # split: EOS and every token more frequent there than the (K-1)-th most frequent one.
    engine = Engine.from_checkpoint(
        tiny_target, dtype=torch.float32, kv_tokens=4096, progress=False
    )
    prompts = load_prompts(dataset, engine.tokenizer, len(PROMPTS), 256, 0)
    answers = generate_answers(engine, prompts, NEW_TOKENS, 600)
    _, _, trained = split(answers, 0.08, 0)
    counts = Counter(t for a in trained for t in a)
    ranked = sorted(counts.values(), reverse=True)
    cut = ranked[DRAFT_VOCAB - 2] if len(ranked) >= DRAFT_VOCAB - 1 else 0
    sure = {t for t, c in counts.items() if c > cut}
    assert sure and sure | {2} <= set(targets.tolist())

    stats = json.loads((out / "train_stats.json").read_text())
    losses = [entry["loss"] for entry in stats["training"]["intervals"]]
    assert stats["training"]["steps"] == 60 and len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    assert stats["data"]["sequences"] == len(PROMPTS)
    assert len(stats["validation"]["accuracy"]) == 3
