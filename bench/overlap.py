"""What the overlap schedule hides: the host time between two steps, and the text made meanwhile.

For batch sizes 16 and 64 on the demo model (greedy, 64 new tokens per prompt, ignore_eos), with
overlap on and off: the model thread's time per step (forward + sampling), the event loop's time
per step making text (detokenizer, stop strings, emitting: the step loop's `deliver`), the gap
between one step's end on the model thread and the next step's start (on a GPU: the time it
idles between steps; it holds the commit of one step and the planning of the next) and the
output tokens/s. The model thread runs the loop itself and hands each step's outputs to the
event loop, which makes their text while the next step computes; without overlap the model
thread waits for that text before it plans the next step.

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


def timed(owner: object, name: str, spans: list[tuple[float, float]]) -> None:
    """Wraps owner.<name> to append the (start, end) of each call to spans."""
    inner = getattr(owner, name)

    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args)
        finally:
            spans.append((start, time.perf_counter()))

    setattr(owner, name, wrapper)


def run(engine: Engine, batch: int, max_tokens: int) -> tuple[float, float, float, float]:
    """(forward ms per step, delivery ms per step, gap ms between steps, output tok/s)."""
    forwards: list[tuple[float, float]] = []
    deliveries: list[tuple[float, float]] = []
    deliver = engine.steps.deliver
    timed(engine.executor, "execute", forwards)
    timed(engine.steps, "deliver", deliveries)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts(engine, batch), params)
    seconds = time.perf_counter() - start
    del engine.executor.execute  # the instance wrapper
    engine.steps.deliver = deliver
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = len(forwards)
    gaps = [b[0] - a[1] for a, b in zip(forwards, forwards[1:], strict=False)]
    return (
        sum(e - s for s, e in forwards) / steps * 1e3,
        sum(e - s for s, e in deliveries) / steps * 1e3,
        sum(gaps) / max(len(gaps), 1) * 1e3,
        tokens / seconds,
    )


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
    print(
        f"{'batch':>5} {'overlap':>7} {'forward ms/step':>15} {'text ms/step':>12} "
        f"{'gap ms':>7} {'tok/s':>7}"
    )
    for engine in engines.values():
        run(engine, 1, 4)  # warm-up
    for batch in args.batches:
        for overlap, engine in engines.items():
            forward, deliver, gap, rate = run(engine, batch, args.max_tokens)
            mode = "on" if overlap else "off"
            print(
                f"{batch:>5} {mode:>7} {forward:>15.1f} {deliver:>12.2f} {gap:>7.2f} {rate:>7.1f}"
            )


if __name__ == "__main__":
    main()
