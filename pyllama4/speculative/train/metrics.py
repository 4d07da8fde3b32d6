"""Draft quality figures: per-step accuracy and the accept length a top-1 chain would reach.

Invariant: a label outside the draft vocabulary (-1) is a miss; step k counts only the rows whose
label exists (room >= k); the accept length counts only rows where every step's label exists.
"""

from __future__ import annotations

import torch

from pyllama4.speculative.train.unroll import Packed


def counts(logits: list[torch.Tensor], p: Packed) -> torch.Tensor:
    """Per step: [hits, rows in range], then [chains all hit to step k, full-range chains]."""
    out, chain = [], None
    full = p.room >= len(logits) - 1
    for k, lg in enumerate(logits):
        hit = (lg.argmax(-1) == p.labels[k]) & (p.labels[k] >= 0)
        chain = hit if chain is None else chain & hit
        out.append([int((hit & (p.room >= k)).sum()), int((p.room >= k).sum())])
        out.append([int((chain & full).sum()), int(full.sum())])
    return torch.tensor(out, dtype=torch.float64)


def summarize(c: torch.Tensor) -> dict:
    acc = (c[0::2, 0] / c[0::2, 1].clamp(min=1)).tolist()
    chain = (c[1::2, 0] / c[1::2, 1].clamp(min=1)).tolist()
    return {"accuracy": acc, "accept_length": 1 + sum(chain)}


def describe(entry: dict) -> str:
    accs = " ".join(f"{a:.3f}" for a in entry["accuracy"])
    loss = f"loss {entry['loss']:.3f}, " if "loss" in entry else ""
    return f"{loss}accuracy per step {accs}, accept length ~{entry['accept_length']:.2f}"
