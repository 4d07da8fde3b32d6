"""Draft training data: chat prompts from ShareGPT, the target's greedy answers to them, and the
seeded split of the captured sequences into validation, dev and training."""

from __future__ import annotations

import random
import time
from pathlib import Path

import anyio

from pyllama4.bench_data import iter_json_list
from pyllama4.engine import Engine
from pyllama4.sampling_params import SamplingParams
from pyllama4.speculative.train.log import log


def load_prompts(path: Path, tokenizer, n: int, max_tokens: int, seed: int) -> list[list[int]]:
    """n distinct first human turns, shuffled by seed, as chat prompts of 2..max_tokens ids."""
    turns = []
    for item in iter_json_list(path.read_text(encoding="utf-8", errors="replace")):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if conv and conv[0].get("from") == "human" and isinstance(conv[0].get("value"), str):
            turns.append(conv[0]["value"].strip())
    turns = [t for t in dict.fromkeys(turns) if t and len(t) <= 8 * max_tokens]
    random.Random(seed).shuffle(turns)
    prompts = []
    for text in turns[: 4 * n]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if 2 <= len(ids) <= max_tokens:
            prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts


def generate_answers(
    engine: Engine, prompts: list[list[int]], max_new_tokens: int, seconds: float
) -> list[list[int]]:
    """Greedy answers (EOS included when reached); those running at the deadline are cut."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    answers: list[list[int]] = [[] for _ in prompts]
    start, done = time.monotonic(), 0

    async def collect(i: int) -> None:
        nonlocal done
        async for out in engine.submit(prompts[i], params):
            answers[i] = list(out.outputs[0].token_ids)
        done += 1
        if done % max(1, len(prompts) // 10) == 0:
            tokens = sum(map(len, answers))
            rate = tokens / (time.monotonic() - start)
            log(f"generation: {done}/{len(prompts)} answers, {tokens} tokens, {rate:.0f} tok/s")

    async def run() -> None:
        async with engine:
            with anyio.move_on_after(seconds):
                async with anyio.create_task_group() as tg:
                    for i in range(len(prompts)):
                        tg.start_soon(collect, i)

    anyio.run(run)
    return answers


def split(items: list, fraction: float, seed: int) -> tuple[list, list, list]:
    """(validation, dev, training) after a seeded shuffle; validation and dev get `fraction`
    each (at least one item)."""
    order = items[:]
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(order)))
    return order[:n], order[n : 2 * n], order[2 * n :]
