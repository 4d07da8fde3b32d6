"""EAGLE draft trees: the tensor math of drafting (SGLang's select_top_k_tokens + build_tree).

Invariant: in a DraftTree node 0 is the root and every parent precedes its children (nodes are
ordered by depth, then creation), so parents[b, i] < i for i >= 1, depths[b, i] =
depths[b, parents[b, i]] + 1, and ancestors[b, i, j] holds exactly for j == i and the ancestors
of i.

draft_tree grows B trees at once: step 0 turns the topk best tokens of first_logprobs into the
branches; each later step runs the draft model (step_fn) on the topk branches, records each
branch's topk children as candidates scored by cumulative log-probability, and makes the topk best
candidates the next branches. The tree keeps the root and the num_draft_tokens - 1 best candidates.
Every top-k here takes larger values first and, among equal values, the lower index (the token id
within a vocabulary row, the creation index among candidates), so results never depend on
torch.topk's unspecified order of ties. A parent scores at least as high as its children
(log-probabilities are <= 0) and was created earlier, so the kept set is closed under ancestors.

Everything is batched over the B requests; Python loops only over the draft steps and the depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """B requests' draft trees of N nodes each; node 0 = root; parents precede children."""

    tokens: torch.Tensor  # [B, N] int64 target token ids (node 0: the root token)
    parents: torch.Tensor  # [B, N] int64 parent node index, -1 for the root
    depths: torch.Tensor  # [B, N] int64, root 0
    ancestors: torch.Tensor  # [B, N, N] bool: [b, i, j] iff j == i or j is an ancestor of i

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]


StepFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""step_fn(step, tokens, parents) -> logprobs, for step in 1..num_steps-1.

tokens [B, W]: the target token ids of the current branches. parents [B, W] int64: for each
branch, the index (0..W-1) of the branch of the previous call whose child it is (step 1: zeros,
every branch is a child of the root). Returns [B, W, V_draft] float32 draft log-probabilities of
the token following each branch.
"""


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along the last dim, largest first, equal values
    in ascending index order; exact on ties (torch.topk leaves their order unspecified)."""
    kth = torch.topk(x, k, dim=-1).values[..., -1:]
    above = x > kth  # fewer than k entries, all of them kept
    ties = x == kth
    wanted = k - above.sum(-1, keepdim=True)
    keep = above | (ties & (ties.cumsum(-1) <= wanted))  # exactly k per row
    index = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    key = torch.where(keep, index, x.shape[-1])
    indices = torch.topk(key, k, dim=-1, largest=False).values  # the kept, ascending
    values, order = torch.sort(x.gather(-1, indices), dim=-1, descending=True, stable=True)
    return values, indices.gather(-1, order)


def _ancestors(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B, N, N] bool: [b, i, j] iff j == i or j is an ancestor of i (all depths <= max_depth)."""
    bsz, n = parents.shape
    index = torch.arange(n, device=parents.device)
    node = index.expand(bsz, n)
    ancestors = node.unsqueeze(-1) == index
    for _ in range(max_depth):
        node = torch.where(node >= 0, parents.gather(1, node.clamp(min=0)), -1)
        ancestors |= node.unsqueeze(-1) == index
    return ancestors


def check_config(num_steps: int, topk: int, num_draft_tokens: int, vocab: int) -> None:
    """ValueError (naming the problem) for drafting settings draft_tree cannot run."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= topk <= vocab:
        raise ValueError(f"topk must be in 1..{vocab} (the draft vocabulary), got {topk}")
    if num_draft_tokens < 2:
        raise ValueError(f"num_draft_tokens must be >= 2, got {num_draft_tokens}")
    if topk == 1 and num_draft_tokens != num_steps + 1:
        raise ValueError(
            f"a chain (topk 1) of {num_steps} steps has num_draft_tokens = {num_steps + 1}, "
            f"got {num_draft_tokens}"
        )
    most = 1 + topk + (num_steps - 1) * topk * topk
    if num_draft_tokens > most:
        raise ValueError(
            f"num_draft_tokens {num_draft_tokens} exceeds the {most} nodes that {num_steps} steps "
            f"of topk {topk} produce"
        )


def draft_tree(
    first_logprobs: torch.Tensor,
    root_tokens: torch.Tensor,
    step_fn: StepFn,
    *,
    num_steps: int,
    topk: int,
    num_draft_tokens: int,
    to_target: Callable[[torch.Tensor], torch.Tensor],
) -> DraftTree:
    """B draft trees of num_draft_tokens nodes (SGLang's EAGLE drafting; module docstring).

    first_logprobs [B, V_draft] float32: the draft's log-probabilities of the token after the
    root; root_tokens [B] int64. step_fn is called num_steps - 1 times with topk branches (see
    StepFn); to_target maps draft token ids (any shape) to target ids. The closure of the kept set
    under ancestors is asserted (asynchronously on a GPU): it fails only when step_fn returns
    positive log-probabilities.
    """
    check_config(num_steps, topk, num_draft_tokens, first_logprobs.shape[-1])
    bsz = first_logprobs.shape[0]
    device = first_logprobs.device
    # Candidates by creation index: 0 is the root, then step 0's topk, then topk * topk per step.
    scores, ids = _topk(first_logprobs, topk)
    tokens = to_target(ids)
    all_scores = [torch.full((bsz, 1), torch.inf, dtype=scores.dtype, device=device), scores]
    all_tokens = [root_tokens.unsqueeze(1), tokens]
    all_parents = [torch.full((bsz, 1), -1, device=device), torch.zeros_like(ids)]
    all_depths = [torch.zeros(1, dtype=torch.int64, device=device)]
    all_depths.append(torch.ones(topk, dtype=torch.int64, device=device))
    first_index = 1  # creation index of the latest step's first candidate
    for step in range(1, num_steps):
        branch_scores, pick = _topk(scores, topk)
        branch_nodes = first_index + pick
        first_index += scores.shape[1]
        logprobs = step_fn(step, tokens.gather(1, pick), pick // topk)
        child_logprobs, child_ids = _topk(logprobs, topk)  # [B, topk branches, topk]
        scores = (branch_scores.unsqueeze(-1) + child_logprobs).flatten(1)
        tokens = to_target(child_ids).flatten(1)
        all_scores.append(scores)
        all_tokens.append(tokens)
        all_parents.append(branch_nodes.repeat_interleave(topk, dim=1))
        all_depths.append(torch.full((topk * topk,), step + 1, device=device))
    # Ascending creation index = ascending (depth, creation index); the root (+inf) comes first.
    kept = _topk(torch.cat(all_scores, dim=1), num_draft_tokens)[1].sort(dim=1).values
    created_parents = torch.cat(all_parents, dim=1).gather(1, kept)
    position = torch.full((bsz, first_index + scores.shape[1]), -1, device=device)
    position.scatter_(1, kept, torch.arange(num_draft_tokens, device=device).expand(bsz, -1))
    parents = torch.where(
        created_parents >= 0, position.gather(1, created_parents.clamp(min=0)), -1
    )
    torch._assert_async(
        (parents[:, 1:] >= 0).all(), "draft tree not closed under ancestors: log-probs > 0?"
    )
    return DraftTree(
        tokens=torch.cat(all_tokens, dim=1).gather(1, kept),
        parents=parents,
        depths=torch.cat(all_depths).expand(bsz, -1).gather(1, kept),
        ancestors=_ancestors(parents, num_steps),
    )
