"""What the overlap schedule hides: the CPU time each step spends making its outputs' text.

For batch sizes 16 and 64 on the demo model (greedy, 64 new tokens per prompt, ignore_eos), with
overlap on and off: the model thread's time per step (forward + sampling), the event loop's time
per step making text (detokenizer, stop strings, emitting: Engine._deliver) and the output
tokens/s. With overlap the text of step N is made while step N+1 computes, so on a GPU (where
the CPU otherwise waits for the step) a step saves up to the delivery time; on a CPU both compete
for the same cores and the difference is within noise.

Run: python bench/overlap.py [--batches 16 64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch

from pyllama4 import Engine, SamplingParams
from pyllama4.demo import demo_checkpoint

TOPICS = ["the sea", "a mountain", "bread", "a library", "the moon", "rain", "a bicycle", "tea"]


def prompts(engine: Engine, batch: int) -> list[list[int]]:
    return [
        engine.tokenize(f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i}).")
        for i in range(batch)
    ]


def timed(engine: Engine, name: str, totals: dict[str, float]) -> None:
    """Wraps engine.<name> to add its wall time to totals[name] and count its calls."""
    inner = getattr(engine, name)

    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args)
        finally:
            totals[name] += time.perf_counter() - start
            totals[name + "_calls"] += 1

    setattr(engine, name, wrapper)


def run(engine: Engine, batch: int, max_tokens: int) -> tuple[float, float, float]:
    """(forward ms per step, delivery ms per step, output tok/s)."""
    totals = {"_forward": 0.0, "_forward_calls": 0, "_deliver": 0.0, "_deliver_calls": 0}
    timed(engine, "_forward", totals)
    timed(engine, "_deliver", totals)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts(engine, batch), params)
    seconds = time.perf_counter() - start
    del engine._forward, engine._deliver  # the instance wrappers
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = max(totals["_forward_calls"], 1)
    return totals["_forward"] / steps * 1e3, totals["_deliver"] / steps * 1e3, tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    path = demo_checkpoint()
    engines = {
        overlap: Engine.from_checkpoint(
            path, dtype="float32", context_len=2048, progress=False, overlap=overlap
        )
        for overlap in (True, False)
    }
    print(
        f"demo model, float32, {platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"{args.max_tokens} new tokens per prompt, greedy"
    )
    print(f"{'batch':>5} {'overlap':>7} {'forward ms/step':>15} {'text ms/step':>12} {'tok/s':>7}")
    for engine in engines.values():
        run(engine, 1, 4)  # warm-up
    for batch in args.batches:
        for overlap, engine in engines.items():
            forward, deliver, rate = run(engine, batch, args.max_tokens)
            mode = "on" if overlap else "off"
            print(f"{batch:>5} {mode:>7} {forward:>15.1f} {deliver:>12.2f} {rate:>7.1f}")


if __name__ == "__main__":
    main()
