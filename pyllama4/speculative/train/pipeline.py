"""The whole training pipeline in order: load, generate, capture, train, validate, save.

Invariant: generation ends by GENERATION_SHARE of the time budget and training by its end; what
train() returns is exactly what it writes to train_stats.json beside the saved draft.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Collection
from pathlib import Path

import torch

from pyllama4.bench_data import SHAREGPT
from pyllama4.config import TextConfig
from pyllama4.demo import demo_checkpoint
from pyllama4.engine import Engine
from pyllama4.loading.eagle3 import save_eagle3
from pyllama4.model.eagle3 import Eagle3Draft
from pyllama4.speculative.train.capture import capture
from pyllama4.speculative.train.data import generate_answers, load_prompts, split
from pyllama4.speculative.train.draft import answer_tokens, draft_vocabulary, new_draft
from pyllama4.speculative.train.log import log
from pyllama4.speculative.train.loop import evaluate, fit
from pyllama4.speculative.train.metrics import describe

GENERATION_SHARE = 0.55  # of the time budget


def train(args: argparse.Namespace) -> dict:
    """The whole pipeline; returns (and writes) train_stats.json's content."""
    start = time.monotonic()
    deadline = start + 60 * args.time_budget_min
    dataset = Path(args.dataset_path) if args.dataset_path else SHAREGPT.path("--dataset-path")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else demo_checkpoint()
    target = TextConfig.from_checkpoint(model_dir)
    n_layers = target.num_hidden_layers
    aux_layers = (2, n_layers // 2, n_layers - 3)
    context = args.max_prompt_tokens + args.max_new_tokens + 1
    engine = Engine.from_checkpoint(
        model_dir,
        dtype=torch.float32,  # ~6x faster than bf16 here: no native bf16 matmul on this CPU
        kv_tokens=args.max_running * context,
        max_running=args.max_running,
        context_len=context,
        progress=False,
    )
    prompts = load_prompts(
        dataset, engine.tokenizer, args.num_prompts, args.max_prompt_tokens, args.seed
    )
    log(f"{len(prompts)} prompts ({sum(map(len, prompts))} tokens); generating")
    t0 = time.monotonic()
    gen_seconds = GENERATION_SHARE * (deadline - start) - (t0 - start)
    answers = generate_answers(engine, prompts, args.max_new_tokens, gen_seconds)
    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if len(a) >= 2]
    if len(pairs) < 2:
        raise SystemExit(f"only {len(pairs)} answers within the time budget: raise it")
    t1 = time.monotonic()
    log(f"generated {sum(len(a) for _, a in pairs)} answer tokens in {len(pairs)} answers")
    model = engine.runner.model
    samples = capture(model, pairs, aux_layers, context, args.max_running)
    t2 = time.monotonic()

    val, dev, train_set = split(samples, args.val_fraction, args.seed)
    draft_ids, to_draft = draft_vocabulary(
        train_set, target.vocab_size, engine.eos_token_ids, args.draft_vocab_size
    )
    val_ids = answer_tokens(val)
    coverage = float((to_draft[val_ids] >= 0).float().mean())
    log(f"draft vocabulary {args.draft_vocab_size}: covers {coverage:.1%} of held-out answers")
    draft = new_draft(target, model, draft_ids, aux_layers, args.intermediate_size)
    training = fit(draft, train_set, dev, to_draft, args, deadline)
    t3 = time.monotonic()
    validation = evaluate(draft, val, to_draft, args)
    log(f"validation ({len(val)} sequences): " + describe(validation))
    save_eagle3(draft, args.output)
    t4 = time.monotonic()
    data = {
        "prompts": len(prompts),
        "sequences": len(samples),
        "validation_sequences": len(val),
        "answers_cut_by_time": cut_answers(answers, args.max_new_tokens, engine.eos_token_ids),
        "answer_tokens": len(answer_tokens(train_set)) + len(val_ids),
        "draft_vocab_coverage_held_out": coverage,
    }
    stats = _stats(args, draft, (start, t0, t1, t2, t3, t4), data, training, validation)
    Path(args.output, "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"saved {args.output} in {t4 - start:.0f} s")
    return stats


def cut_answers(answers: list[list[int]], max_new_tokens: int, eos_ids: Collection[int]) -> int:
    """Answers the deadline cut: begun, shorter than max_new_tokens and not ended by EOS."""
    return sum(0 < len(a) < max_new_tokens and a[-1] not in eos_ids for a in answers)


def _stats(
    args: argparse.Namespace,
    draft: Eagle3Draft,
    marks: tuple[float, float, float, float, float, float],
    data: dict,
    training: dict,
    validation: dict,
) -> dict:
    """train_stats.json's content; marks: the clock at start and at the end of each phase."""
    start, t0, t1, t2, t3, t4 = marks
    return {
        "args": vars(args),
        "draft_config": draft.config.to_dict(),
        "seconds": {
            "load": t0 - start,
            "generation": t1 - t0,
            "capture": t2 - t1,
            "training": t3 - t2,
            "validation_and_save": t4 - t3,
            "total": t4 - start,
        },
        "data": data,
        "training": training,
        "validation": validation,
    }
