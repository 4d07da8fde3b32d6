"""Verification of EAGLE draft trees against the target model: which drafts a request accepts.

Invariant: the output tokens of a row are distributed exactly as the tokens the target alone
would produce from the root: accept_greedy returns exactly the target's greedy continuation;
accept_sampling returns tokens distributed as sampling target_probs token by token. Each row
walks down its tree from the root; the output is the accepted drafts followed by one bonus token
from the target's distribution at the last accepted node, so every row outputs >= 1 token.

accept_sampling uses SGLang's "target only" rule, exact multi-draft rejection sampling for
point-mass drafts: at a node with distribution p its children are tried in node order, child c
accepted with probability p(c) / sum(p); a rejected child's token gets p = 0 (so a later sibling
with the same token is never accepted); the bonus is drawn from what is left of p. Weights stay
unnormalized (each test compares u * sum(p) with p(c)); a child whose token holds all that is left
of p is accepted outright, so rounding never empties p.

Everything is batched over the B rows; Python loops only over the depth and the sibling rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyllama4.speculative.tree import DraftTree


@dataclass(frozen=True)
class Acceptance:
    """B rows' accepted paths; D = the trees' max depth."""

    nodes: torch.Tensor  # [B, D+1] int64 accepted path's node indices from the root (0); -1 pad
    tokens: torch.Tensor  # [B, D+1] int64 the accepted drafts (nodes[1:count]), the bonus; -1 pad
    counts: torch.Tensor  # [B] int64 number of output tokens = accepted drafts + 1 (>= 1)


def _acceptance(tree: DraftTree, nodes: torch.Tensor, bonus: torch.Tensor) -> Acceptance:
    """The Acceptance of accepted paths nodes [B, D+1] (-1 padded) ending in bonus tokens [B]."""
    path = nodes[:, 1:]
    drafts = torch.where(path >= 0, tree.tokens.gather(1, path.clamp(min=0)), -1)
    tokens = torch.cat([drafts, torch.full_like(bonus, -1).unsqueeze(1)], dim=1)
    counts = (nodes >= 0).sum(dim=1)
    tokens.scatter_(1, (counts - 1).unsqueeze(1), bonus.unsqueeze(1))
    return Acceptance(nodes=nodes, tokens=tokens, counts=counts)


def accept_greedy(tree: DraftTree, target_tokens: torch.Tensor) -> Acceptance:
    """Greedy verification; target_tokens [B, N]: the target's greedy token after each node.

    From the root, the first child (in node order) whose token equals the target's token at the
    current node is accepted, until none does; the bonus is the target's token at the last
    accepted node. One host sync (the max depth).
    """
    bsz = tree.tokens.shape[0]
    max_depth = int(tree.depths.max())
    nodes = torch.full((bsz, max_depth + 1), -1, dtype=torch.int64, device=tree.tokens.device)
    nodes[:, 0] = 0
    current = torch.zeros_like(nodes[:, 0])
    active = torch.ones_like(current, dtype=torch.bool)
    for depth in range(max_depth):
        wanted = target_tokens.gather(1, current.unsqueeze(1))
        match = (tree.parents == current.unsqueeze(1)) & (tree.tokens == wanted)
        active &= match.any(dim=1)
        current = torch.where(active, match.to(torch.uint8).argmax(dim=1), current)
        nodes[:, depth + 1] = torch.where(active, current, -1)
    return _acceptance(tree, nodes, target_tokens.gather(1, current.unsqueeze(1)).squeeze(1))


def _children(tree: DraftTree) -> tuple[torch.Tensor, int]:
    """([B, N, R] each node's children in node order, -1 padded; D the max depth); R = the most
    children of a node. One host sync."""
    n = tree.num_nodes
    index = torch.arange(n, device=tree.parents.device)
    is_child = tree.parents.unsqueeze(1) == index.unsqueeze(1)  # [b, i, j]: j is a child of i
    num_children, max_depth = torch.stack([is_child.sum(dim=2).max(), tree.depths.max()]).tolist()
    order = torch.argsort((~is_child).to(torch.uint8), dim=2, stable=True)[..., :num_children]
    children = torch.where(is_child.gather(2, order), order, -1)
    return children, max_depth


def accept_sampling(
    tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None = None
) -> Acceptance:
    """Sampling verification (module docstring); target_probs [B, N, V] float32: the target's
    processed, normalized distribution of the token after each node. Uniforms and the bonus's
    exponential race draw from generator (torch's default generator when None)."""
    bsz = tree.tokens.shape[0]
    device = tree.tokens.device
    children, max_depth = _children(tree)
    rows = torch.arange(bsz, device=device)
    nodes = torch.full((bsz, max_depth + 1), -1, dtype=torch.int64, device=device)
    nodes[:, 0] = 0
    current = torch.zeros_like(rows)
    active = torch.ones_like(rows, dtype=torch.bool)
    final = torch.empty_like(target_probs[:, 0])  # the bonus's weights of each finished row
    for depth in range(max_depth):
        p = target_probs[rows, current]
        kids = children[rows, current]
        accepted = torch.zeros_like(active)
        for rank in range(children.shape[2]):
            child = kids[:, rank]
            token = tree.tokens.gather(1, child.clamp(min=0).unsqueeze(1))
            p_child = p.gather(1, token).squeeze(1)
            rest = p.scatter(1, token, 0.0)
            rest_mass = rest.sum(dim=1)
            u = torch.rand(bsz, device=device, generator=generator)
            trying = active & ~accepted & (child >= 0)
            accept = (u * (p_child + rest_mass) < p_child) | (rest_mass <= 0)
            accept &= trying & (p_child > 0)
            p = torch.where((trying & ~accept).unsqueeze(1), rest, p)
            current = torch.where(accept, child, current)
            accepted |= accept
        final = torch.where((active & ~accepted).unsqueeze(1), p, final)
        active &= accepted
        nodes[:, depth + 1] = torch.where(active, current, -1)
    final = torch.where(active.unsqueeze(1), target_probs[rows, current], final)
    noise = torch.empty_like(final).uniform_(generator=generator).log_().neg_()  # E ~ Exp(1), > 0
    bonus = torch.where(final > 0, final / noise, -1.0).argmax(dim=1)  # zero weight never wins
    return _acceptance(tree, nodes, bonus)
