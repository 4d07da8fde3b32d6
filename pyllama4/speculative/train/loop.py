"""The optimisation loop of draft training, and the evaluation it logs.

Invariant: the draft leaves fit() with the weights of the logged interval whose dev accept length
was best (the first step always runs, so there are weights to keep); training ends at --steps
(or --epochs) or at the deadline, whichever comes first.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from torch.nn import functional as F

from pyllama4.model.eagle3 import Eagle3Draft
from pyllama4.speculative.train.capture import Sample
from pyllama4.speculative.train.log import log
from pyllama4.speculative.train.metrics import counts, describe, summarize
from pyllama4.speculative.train.unroll import pack, unroll

STEP_WEIGHT = 0.8  # loss weight ratio between successive unrolled steps (SpecForge's)


def batches(samples: list[Sample], batch_tokens: int, rng: random.Random) -> list[list[Sample]]:
    order, out, cur, size = samples[:], [], [], 0
    rng.shuffle(order)
    for s in order:
        cur.append(s)
        size += len(s.tokens)
        if size >= batch_tokens:
            out.append(cur)
            cur, size = [], 0
    return out + [cur] if cur else out


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    """Linear warmup over --warmup-steps, then a cosine decay to 5% of --lr at progress 1."""
    warm = min(1.0, (step + 1) / args.warmup_steps)
    return args.lr * warm * (0.05 + 0.475 * (1 + math.cos(math.pi * min(progress, 1))))


def train_step(
    draft: Eagle3Draft,
    optimizer: torch.optim.Optimizer,
    batch: list[Sample],
    to_draft: torch.Tensor,
    steps: int,
) -> tuple[float, torch.Tensor]:
    """One optimizer step on one batch: (its loss, its counts)."""
    p = pack(batch, steps, to_draft)
    logits = unroll(draft, p, steps)
    loss = sum(
        STEP_WEIGHT**k * F.cross_entropy(lg[p.labels[k] >= 0], p.labels[k][p.labels[k] >= 0])
        for k, lg in enumerate(logits)
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
    optimizer.step()
    return loss.item(), counts([lg.detach() for lg in logits], p)


def fit(
    draft: Eagle3Draft,
    samples: list[Sample],
    dev: list[Sample],
    to_draft: torch.Tensor,
    args: argparse.Namespace,
    deadline: float,
) -> dict:
    """AdamW with warmup and a cosine decay over max(step / steps, time / time left). Every log
    interval measures the accept length on `dev`; the draft ends with the weights of the best
    interval (little data overfits fast)."""
    rng = random.Random(args.seed)
    per_epoch = len(batches(samples, args.batch_tokens, rng))
    total = args.steps or args.epochs * per_epoch
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95))
    log(f"training: {len(samples)} sequences, {per_epoch} batches an epoch, {total} steps at most")
    intervals: list[dict] = []
    best, best_step, best_state = -1.0, 0, {}
    step, start, loss_sum, done = 0, time.monotonic(), 0.0, False
    interval = torch.zeros(2 * args.unroll, 2, dtype=torch.float64)
    while not done:  # the first step always runs: there are weights to keep
        for batch in batches(samples, args.batch_tokens, rng):
            progress = max(step / total, (time.monotonic() - start) / max(deadline - start, 1))
            lr = learning_rate(args, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, batch_counts = train_step(draft, optimizer, batch, to_draft, args.unroll)
            step += 1
            loss_sum += loss
            interval += batch_counts
            done = step >= total or time.monotonic() >= deadline
            if step % args.log_every == 0 or done:
                n = step - (intervals[-1]["step"] if intervals else 0)
                entry = {"step": step, "loss": loss_sum / n, "lr": lr, **summarize(interval)}
                entry["dev"] = evaluate(draft, dev, to_draft, args)
                intervals.append(entry)
                log(f"step {step}/{total}: {describe(entry)}; dev: {describe(entry['dev'])}")
                if entry["dev"]["accept_length"] > best:
                    best, best_step = entry["dev"]["accept_length"], step
                    best_state = {k: v.detach().clone() for k, v in draft.state_dict().items()}
                loss_sum, interval = 0.0, torch.zeros_like(interval)
            if done:
                break
    draft.load_state_dict(best_state)
    log(f"kept the weights of step {best_step} (dev accept length ~{best:.2f})")
    return {
        "steps": step,
        "epochs": step / per_epoch,
        "best_step": best_step,
        "intervals": intervals,
    }


def evaluate(
    draft: Eagle3Draft, samples: list[Sample], to_draft: torch.Tensor, args: argparse.Namespace
) -> dict:
    total = torch.zeros(2 * args.unroll, 2, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches(samples, 4 * args.batch_tokens, random.Random(0)):
            p = pack(batch, args.unroll, to_draft)
            total += counts(unroll(draft, p, args.unroll), p)
    return summarize(total)
