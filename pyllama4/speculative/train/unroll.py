"""The training-time test: a batch of samples unrolled as top-1 draft chains.

Invariant: the logits of step k at a chain row equal what sequential top-1 drafting computes
there: the row's query sees the step-0 keys of positions <= i and its own keys of steps 1..k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyllama4.model.eagle3 import Eagle3Draft
from pyllama4.speculative.train.capture import Sample


@dataclass
class Packed:
    """Several samples as one unrolled batch. Step-0 rows: every position of every sample;
    chain rows: the positions i in [P - 1, L - 3] of each sample (the trained ones)."""

    tokens0: torch.Tensor
    aux0: torch.Tensor
    pos0: torch.Tensor
    spans: list[tuple[int, int, int, int]]  # per sample: step-0 rows lo:hi, chain rows a:b
    rows: torch.Tensor  # step-0 row of each chain row
    local: torch.Tensor  # its position i
    room: torch.Tensor  # L - 3 - i: step k is in range (t[i+2+k] exists) iff k <= room
    tokens: list[torch.Tensor]  # per step: the chain rows' input tokens (step 0: unused)
    labels: list[torch.Tensor]  # per step: draft id of t[i+2+k]; -1 out of vocab or range


def pack(samples: list[Sample], steps: int, to_draft: torch.Tensor) -> Packed:
    tok0, spans, rows, local, room = [], [], [], [], []
    tokens: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    labels: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    lo = a = 0
    for s in samples:
        tok = s.tokens[1:]  # step-0 row i's token t[i+1]
        n = len(tok)
        i = torch.arange(s.prompt_len - 1, n - 1)
        for k in range(steps):
            tokens[k].append(tok[(i + k).clamp(max=n - 1)])
            nxt = i + k + 1
            labels[k].append(torch.where(nxt < n, to_draft[tok[nxt.clamp(max=n - 1)]], -1))
        tok0.append(tok)
        spans.append((lo, lo + n, a, a + len(i)))
        rows.append(lo + i)
        local.append(i)
        room.append(n - 2 - i)
        lo, a = lo + n, a + len(i)
    return Packed(
        torch.cat(tok0),
        torch.cat([s.aux for s in samples]),
        torch.cat([torch.arange(len(s.tokens) - 1) for s in samples]),
        spans,
        torch.cat(rows),
        torch.cat(local),
        torch.cat(room),
        [torch.cat(t) for t in tokens],
        [torch.cat(lb) for lb in labels],
    )


class ChainAttention:
    """attend() for one unrolled batch (see the module invariant), dense, in float32. Rows are
    split per sample (split, not slicing: its backward is one concatenation)."""

    def __init__(self, p: Packed, scale: float):
        self.scale = scale
        self.seq = [hi - lo for lo, hi, _, _ in p.spans]
        self.rows = [b - a for _, _, a, b in p.spans]
        self.local = p.local.split(self.rows)
        self.kv0: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
        self.chain: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        dtype, q = q.dtype, q.float()
        k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
        if self.kv0 is None:
            self.kv0 = (k.split(self.seq), v.split(self.seq))
            queries, where = q.split(self.seq), [torch.arange(n) for n in self.seq]
        else:
            self.chain.append((k, v))
            queries, where = q.split(self.rows), self.local
        if self.chain:  # each chain row's scores against its own keys of steps 1..k
            own = torch.stack([(q * ck).sum(-1) for ck, _ in self.chain], -1) * self.scale
            mine = own.split(self.rows)
        else:
            mine = tuple(q.new_empty(n, q.shape[1], 0) for n in self.seq)
        outs, own_probs = [], []
        for qs, i, k0, v0, m in zip(queries, where, *self.kv0, mine, strict=True):
            scores = torch.einsum("qhd,khd->qhk", qs, k0) * self.scale
            scores = scores.masked_fill(torch.arange(len(k0)) > i[:, None, None], -math.inf)
            probs = torch.cat([scores, m], -1).softmax(-1)
            outs.append(torch.einsum("qhk,khd->qhd", probs[..., : len(k0)], v0))
            own_probs.append(probs[..., len(k0) :])
        out = torch.cat(outs)
        if self.chain:
            values = torch.stack([cv for _, cv in self.chain])
            out = out + torch.einsum("qhm,mqhd->qhd", torch.cat(own_probs), values)
        return out.to(dtype)


def unroll(draft: Eagle3Draft, p: Packed, steps: int) -> list[torch.Tensor]:
    """Draft logits [chain rows, K] of each unrolled step."""
    attend = ChainAttention(p, draft.scale)
    hidden = draft.fuse(p.aux0.float())
    prenorm, normed = draft(p.tokens0, hidden, p.pos0, attend)
    prenorm, normed = prenorm[p.rows], normed[p.rows]
    logits = [draft.logits(normed)]
    for k in range(1, steps):
        prenorm, normed = draft(p.tokens[k], prenorm, p.local + k, attend)
        logits.append(draft.logits(normed))
    return logits
