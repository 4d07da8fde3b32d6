"""Offline generation throughput of the demo model: pyllama4.Engine.generate beside
transformers' generate on the same checkpoint, the same prompts, in one run.

Prompts: distinct chat prompts (the demo tokenizer's template; they share only its system
prompt, so prefix caching barely helps); greedy, exactly
--max-tokens new tokens per prompt (EOS ignored on both sides), so both produce the same number
of tokens. Throughput = generated tokens / wall time of the whole batch (prefill included), the
best of --repeat interleaved runs per engine (the prefix cache is flushed before each of ours).

Run: python bench/offline.py  (docs/benchmarks.md records the figures with the machine).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import AutoTokenizer
from transformers import Llama4ForCausalLM as HFLlama4

from pyllama4 import Engine, SamplingParams
from pyllama4.demo import demo_checkpoint

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Suggest a name for a bakery.",
]


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def run_ours(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine.scheduler.flush_cache()  # a repeated run must not reuse the previous run's prompts
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return len(prompts) * max_tokens / elapsed


@torch.inference_mode()
def run_hf(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> float:
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == width + max_tokens
    return len(prompts) * max_tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=2, help="runs per engine, interleaved; best kept")
    args = ap.parse_args()
    path = demo_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = Engine.from_checkpoint(path, dtype=args.dtype, context_len=2048, progress=False)
    hf = HFLlama4.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    print(
        f"demo model (SmolLM2-135M-Instruct as Llama 4), {args.dtype}, on {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; {args.max_tokens} new tokens per prompt, greedy"
    )
    print(f"{'batch':>5} {'pyllama4 tok/s':>15} {'transformers tok/s':>19} {'ratio':>6}")
    run_ours(engine, chat_prompts(tokenizer, 1), 4)  # warm-up
    for b in args.batches:
        prompts = chat_prompts(tokenizer, b)
        ours = ref = 0.0
        for _ in range(args.repeat):  # this VM's speed drifts: interleave and keep the best
            ours = max(ours, run_ours(engine, prompts, args.max_tokens))
            ref = max(ref, run_hf(hf, tokenizer, prompts, args.max_tokens))
        print(f"{b:>5} {ours:>15.1f} {ref:>19.1f} {ours / ref:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
