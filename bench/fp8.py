"""FP8 on the demo model: weight memory and greedy agreement with bf16, in one run.

Loads the built-in demo model twice in bfloat16: as is, and with `quantization="fp8"` (online
per-channel FP8 weights, dynamic per-token activation scales, attention and MLPs quantized,
embeddings and lm_head kept). Both decode the same 20 chat prompts greedily for --max-tokens
tokens. Prints the weight bytes of each, the prompts whose outputs are identical, and the mean
fraction of tokens generated before the first difference.

Run: python bench/fp8.py [--fp8-format e4m3fn|e4m3fnuz]  (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from pyllama4 import Engine, SamplingParams
from pyllama4.demo import demo_checkpoint
from pyllama4.loading.quantize import weight_bytes

TOPICS = [
    "the moon",
    "bread",
    "rivers",
    "chess",
    "volcanoes",
    "bees",
    "trains",
    "the ocean",
    "music",
    "winter",
    "coffee",
    "mountains",
    "libraries",
    "rain",
    "bicycles",
    "stars",
    "gardens",
    "cats",
    "bridges",
    "clocks",
]


def outputs(engine: Engine, max_tokens: int) -> list[list[int]]:
    prompts = []
    for topic in TOPICS:
        text = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me three facts about {topic}."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompts.append(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--fp8-format", choices=("e4m3fn", "e4m3fnuz"), default="e4m3fn")
    args = parser.parse_args()
    path = demo_checkpoint()
    runs = {}
    for name, quantization in (("bf16", None), ("fp8", "fp8")):
        t0 = time.perf_counter()
        engine = Engine.from_checkpoint(
            path,
            dtype=torch.bfloat16,
            quantization=quantization,
            fp8_format=args.fp8_format,
            kv_tokens=65536,
            progress=False,
        )
        tokens = outputs(engine, args.max_tokens)
        runs[name] = (weight_bytes(engine.runner.model), tokens, time.perf_counter() - t0)
    bf16_bytes, ref, _ = runs["bf16"]
    fp8_bytes, got, _ = runs["fp8"]
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    prefix = []
    for a, b in zip(ref, got, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        prefix.append(n / len(a))
    print(f"demo model, bf16 activations, {len(TOPICS)} prompts x {args.max_tokens} greedy tokens")
    print(
        f"weights: bf16 {bf16_bytes / 2**20:.1f} MiB, fp8 ({args.fp8_format}) "
        f"{fp8_bytes / 2**20:.1f} MiB = {fp8_bytes / bf16_bytes:.2f} of bf16"
    )
    print(
        f"identical outputs: {same}/{len(TOPICS)}; tokens before the first difference: "
        f"{100 * sum(prefix) / len(prefix):.0f}% on average"
    )
    for name, (_, _, seconds) in runs.items():
        print(f"  {name}: load + generate {seconds:.1f} s")


if __name__ == "__main__":
    main()
