"""The workload of bench/serving.py: prompts sampled as SGLang's bench_serving samples them.

A row is a prompt (text, or token ids) with its length in tokens and the number of output tokens
to ask for; a dataset, a seed and the sizes give the same rows every time.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from pyllama4.bench_data import iter_json_list


@dataclass
class DatasetRow:
    prompt: str | list[int]  # text, or token ids for --dataset-name random-ids
    prompt_len: int
    output_len: int


def random_lengths(
    length: int, ratio: float, n: int, rng: np.random.Generator, floor: int = 1
) -> list[int]:
    """SGLang's --random-range-ratio: lengths uniform in [max(floor(L*r), floor), L]."""
    low = max(int(length * ratio), floor)
    high = max(length, low)
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def sample_random(
    tokenizer: Any,
    n: int,
    input_len: int,
    output_len: int,
    ratio: float,
    rng: np.random.Generator,
    as_ids: bool,
) -> list[DatasetRow]:
    """Prompts of token ids drawn from the vocabulary without special tokens (decoded to text
    unless `as_ids`); the prompt length is the number of ids drawn, as in SGLang."""
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    ins = random_lengths(input_len, ratio, n, rng)
    outs = random_lengths(output_len, ratio, n, rng)
    rows = []
    for il, ol in zip(ins, outs, strict=True):
        ids = [int(t) for t in rng.choice(vocab, size=il)]
        prompt: str | list[int] = ids if as_ids else tokenizer.decode(ids)
        rows.append(DatasetRow(prompt, il, ol))
    return rows


def sample_sharegpt(
    path: Path, tokenizer: Any, n: int, fixed_output_len: int | None, seed: int
) -> list[DatasetRow]:
    """SGLang's ShareGPT sampling: first human turn as prompt, the reply's length as output."""
    convs = [
        c["conversations"]
        for c in iter_json_list(path.read_text(encoding="utf-8", errors="replace"))
        if isinstance(c, dict) and len(c.get("conversations") or []) >= 2
    ]
    random.Random(seed).shuffle(convs)
    rows: list[DatasetRow] = []
    for conv in convs:
        if len(rows) == n:
            break
        prompt, completion = conv[0].get("value", ""), conv[1].get("value", "")
        prompt_len = len(tokenizer.encode(prompt))
        out_len = fixed_output_len or len(tokenizer.encode(completion))
        if prompt_len < 2 or out_len < 2:
            continue
        if fixed_output_len is None and (prompt_len > 1024 or prompt_len + out_len > 2048):
            continue
        rows.append(DatasetRow(prompt, prompt_len, out_len))
    if len(rows) < n:
        print(f"warning: only {len(rows)} ShareGPT prompts qualified", file=sys.stderr)
    return rows


def part_of_serving(doc: str | None, argv: list[str] | None) -> NoReturn:
    """The command line of a part of bench/serving.py, not a script of its own: --help says what
    it holds (doc), anything else says to run bench/serving.py."""
    ap = argparse.ArgumentParser(
        description=doc,
        epilog="Not a script: bench/serving.py imports it (python bench/serving.py --help).",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.parse_args(argv)
    ap.error("this module is a part of bench/serving.py; run that instead")


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
