"""The workload of bench/serving.py: prompts sampled exactly as SGLang's bench_serving samples them.

Invariant: after `seed_everything(seed)` the rows are the ones SGLang 0.5's `python -m
sglang.bench_serving` builds from the same flags, seed and ShareGPT file (the same draws from
Python's and numpy's global generators, in the same order), except that a row's `prompt_len` is
the real token count of the prompt it sends (SGLang reports the length it asked for, which a
decoded-then-retokenized prompt does not keep).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from pyllama4.bench_data import iter_json_list

ASSISTANT_SUFFIX = "Assistant:"


@dataclass
class DatasetRow:
    prompt: str | list[int]  # text, or token ids (--tokenize-prompt)
    prompt_len: int
    output_len: int


def seed_everything(seed: int) -> None:
    """SGLang seeds both global generators once, before sampling; its samplers draw from them."""
    random.seed(seed)
    np.random.seed(seed)


def random_lens(full_len: int, range_ratio: float, num: int) -> list[int]:
    """SGLang's --random-range-ratio: lengths uniform in [max(floor(L*r), 1), L]."""
    if full_len <= 0:
        return [0] * num
    low = max(int(full_len * range_ratio), 1)
    return np.random.randint(low, full_len + 1, size=num).tolist()


def load_sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """(first turn, second turn) of every conversation with two turns or more, in file order.
    A truncated file (the packaged one is cut off) gives its complete conversations."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = list(iter_json_list(text))
    pairs = []
    for item in items:
        conv = item.get("conversations", item.get("conversation", []))
        if len(conv) >= 2:
            pairs.append((conv[0]["value"], conv[1]["value"]))
    return pairs


def _real_len(tokenizer: Any, prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, list) else len(tokenizer.encode(prompt))


def sample_random(
    args: argparse.Namespace, tokenizer: Any, sharegpt: Path | None
) -> list[DatasetRow]:
    """--dataset-name random (ShareGPT prompts' tokens cut or repeated to the drawn length) or
    random-ids (consecutive ids from a random offset), decoded unless --tokenize-prompt."""
    n = args.num_prompts
    input_lens = random_lens(args.random_input_len, args.random_range_ratio, n)
    output_lens = random_lens(args.random_output_len, args.random_range_ratio, n)
    as_text = not args.tokenize_prompt
    if as_text:
        special = int(tokenizer.num_special_tokens_to_add())
        input_lens = [max(1, x - special) for x in input_lens]
    contents: list[list[int]] = []
    if sharegpt is not None:
        pairs = load_sharegpt_pairs(sharegpt)
        random.shuffle(pairs)
        for prompt, _ in pairs:
            if len(contents) == n:
                break
            ids = tokenizer.encode(prompt)
            if not ids:
                continue
            want = input_lens[len(contents)]
            contents.append((ids * ((want + len(ids) - 1) // len(ids)))[:want])
    else:
        vocab = tokenizer.vocab_size
        offsets = np.random.randint(0, vocab, size=n)
        for i in range(n):
            contents.append([int((offsets[i] + i + j) % vocab) for j in range(input_lens[i])])
    rows = []
    for ids, out_len in zip(contents, output_lens, strict=False):
        prompt: str | list[int] = tokenizer.decode(ids) if as_text else ids
        rows.append(DatasetRow(prompt, _real_len(tokenizer, prompt), out_len))
    return rows


def sample_sharegpt(args: argparse.Namespace, tokenizer: Any, path: Path) -> list[DatasetRow]:
    """SGLang's ShareGPT sampling: the first turn (with --prompt-suffix, through the chat
    template with --apply-chat-template) as prompt, the reply's length (or
    --sharegpt-output-len) as output length; prompts or outputs under 2 tokens, and pairs over
    --sharegpt-context-len, are skipped."""
    fixed = args.sharegpt_output_len
    if fixed is not None and fixed < 4:
        raise SystemExit("error: --sharegpt-output-len must be at least 4")
    pairs = load_sharegpt_pairs(path)
    random.shuffle(pairs)
    rows: list[DatasetRow] = []
    for prompt, completion in pairs:
        if len(rows) == args.num_prompts:
            break
        if args.prompt_suffix:
            prompt = prompt.removesuffix(ASSISTANT_SUFFIX) + args.prompt_suffix + ASSISTANT_SUFFIX
        if args.apply_chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=False,
                return_dict=False,
            )
            if tokenizer.bos_token:
                prompt = prompt.replace(tokenizer.bos_token, "")
        prompt_len = len(tokenizer.encode(prompt))
        out_len = len(tokenizer.encode(completion)) if fixed is None else fixed
        if prompt_len < 2 or out_len < 2:
            continue
        if args.sharegpt_context_len and prompt_len + out_len > args.sharegpt_context_len:
            continue
        rows.append(DatasetRow(prompt, prompt_len, out_len))
    if len(rows) < args.num_prompts:
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
