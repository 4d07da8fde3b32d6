"""The cost of structured outputs: decode throughput of the demo model with and without a JSON
schema grammar at the same batch, in one run, and the masking step alone.

Both runs sample (temperature 1, seeded) exactly --max-tokens new tokens per prompt from the same
chat prompts; the schema (a list of at least 200 person objects) cannot be completed within
that many tokens, so constrained rows never end early. Throughput = generated tokens / wall
time of the whole batch, the best of --repeat interleaved runs. The grammar is compiled before
the timed runs (a server compiles it off the event loop, once per schema).

Run: python bench/grammar.py  (docs/benchmarks.md records the figures with the machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from pyllama4 import Engine, SamplingParams
from pyllama4.demo import demo_checkpoint
from pyllama4.grammar import GrammarSpec, mask_logits

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "minItems": 200,
}


def prompts(engine: Engine, batch: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    out = []
    for i in range(batch):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"List people as JSON (list number {i + 1})."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def tokens_per_second(engine: Engine, batch: list[list[int]], params: SamplingParams) -> float:
    engine.scheduler.flush_cache()
    t0 = time.perf_counter()
    outs = engine.generate(batch, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs)
    return len(batch) * params.max_tokens / elapsed


def mask_ms(engine: Engine, spec: GrammarSpec, rows: int, steps: int) -> float:
    """Median time of mask_logits over `rows` constrained rows, advancing each by a sample."""
    compiled = engine.grammars.compile(spec)
    constraints = [engine.grammars.constraint(compiled) for _ in range(rows)]
    logits = torch.randn(rows, engine.vocab_size)
    times = []
    for _ in range(steps):
        x = logits.clone()
        t0 = time.perf_counter()
        mask_logits(x, list(range(rows)), constraints)
        times.append(time.perf_counter() - t0)
        for row, token in enumerate(x.argmax(-1).tolist()):
            constraints[row].accept(token)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}; demo model, float32, batch {args.batch}, "
        f"{args.max_tokens} new tokens per prompt"
    )
    engine = Engine.from_checkpoint(
        demo_checkpoint(), dtype="float32", kv_tokens=65536, progress=False
    )
    batch = prompts(engine, args.batch)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    engine.grammars.compile(spec)
    print(f"grammar compiler + schema compile: {time.perf_counter() - t0:.2f} s (once)")
    plain = SamplingParams(temperature=1.0, seed=1, max_tokens=args.max_tokens, ignore_eos=True)
    schema = SamplingParams(temperature=1.0, seed=1, max_tokens=args.max_tokens, grammar=spec)
    best = {"no grammar": 0.0, "JSON schema": 0.0}
    for _ in range(args.repeat):
        best["no grammar"] = max(best["no grammar"], tokens_per_second(engine, batch, plain))
        best["JSON schema"] = max(best["JSON schema"], tokens_per_second(engine, batch, schema))
    for name, rate in best.items():
        print(f"  {name:12s}: {rate:7.1f} tok/s (best of {args.repeat})")
    print(f"  ratio: {best['JSON schema'] / best['no grammar']:.3f}")
    ms = mask_ms(engine, spec, args.batch, 64)
    print(f"mask_logits, {args.batch} rows x {engine.vocab_size} vocab: {ms:.2f} ms per step")


if __name__ == "__main__":
    main()
