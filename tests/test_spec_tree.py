"""pyllama4.speculative.tree against plain-Python references of EAGLE drafting.

The draft model is a table: the log-probabilities of the token after a branch depend on the
branch's last two target tokens (its parent's and its own), so step_fn must follow the `parents`
argument to know each branch's ancestry; the reference enumerates every expansion of every step
exactly as specified (scores summed in float32, ties to the lower token id / earlier creation).
Tables with logprobs in multiples of 1/2 make many exact ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import chain_tree
from pyllama4.speculative.tree import DraftTree, _topk, draft_tree

B = 3
V_DRAFT = 7
V_TARGET = 24
# A d2t-like map (EAGLE3's: target = draft + d2t[draft]), deliberately not the identity.
D2T = torch.tensor([3, 0, 5, 9, 2, 11, 16])
TARGET_OF = torch.arange(V_DRAFT) + D2T


def to_target(ids: torch.Tensor) -> torch.Tensor:
    return ids + D2T.to(ids.device)[ids]


def make_table(seed: int, ties: bool) -> torch.Tensor:
    """[B, V_TARGET, V_TARGET, V_DRAFT] logprobs of the next draft token given (prev, token)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        return -torch.randint(0, 5, (B, V_TARGET, V_TARGET, V_DRAFT), generator=g) / 2.0
    logits = torch.randn(B, V_TARGET, V_TARGET, V_DRAFT, generator=g) * 2
    return torch.log_softmax(logits, dim=-1)


class TableDraft:
    """step_fn over a table; tracks each branch's token path through `parents` and logs calls."""

    def __init__(self, table: torch.Tensor, root_tokens: torch.Tensor):
        self.table = table
        self.paths = root_tokens[:, None, None]  # [B, W, length] target ids from the root
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, step: int, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        self.calls.append((step, tokens.clone(), parents.clone()))
        prev = self.paths.gather(1, parents[:, :, None].expand(-1, -1, self.paths.shape[2]))
        self.paths = torch.cat([prev, tokens[:, :, None]], dim=2)
        rows = torch.arange(tokens.shape[0])[:, None]
        return self.table[rows, self.paths[:, :, -2], tokens]


def ranked(values: list[float], k: int) -> list[int]:
    """Indices of the k largest, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def reference(first, table, root, num_steps, topk, num_nodes):
    """One row in plain Python: (tokens, parents, depths, calls); calls[s - 1] = (the branch
    tokens, their parents among the previous call's branches, their token paths) of step s."""
    # A candidate: (float32 score, target token, parent's creation index, depth, token path).
    cands = [(np.float32(np.inf), root, -1, 0, (root,))]
    step_cands = []
    for i in ranked(first, topk):
        tok = int(TARGET_OF[i])
        step_cands.append((np.float32(first[i]), tok, 0, 1, (root, tok)))
    calls = []
    for _ in range(1, num_steps):
        base = len(cands)
        cands += step_cands
        pick = ranked([float(c[0]) for c in step_cands], topk)
        branches = [step_cands[i] for i in pick]
        calls.append(
            ([c[1] for c in branches], [i // topk for i in pick], [c[4] for c in branches])
        )
        step_cands = []
        for i, (score, tok, _, depth, path) in zip(pick, branches, strict=True):
            lps = [float(x) for x in table[path[-2], tok]]
            for j in ranked(lps, topk):
                child = int(TARGET_OF[j])
                step_cands.append(
                    (score + np.float32(lps[j]), child, base + i, depth + 1, path + (child,))
                )
    cands += step_cands
    keep = sorted(ranked([float(c[0]) for c in cands], num_nodes))
    position = {c: n for n, c in enumerate(keep)}
    tokens = [cands[c][1] for c in keep]
    parents = [position[cands[c][2]] if cands[c][2] >= 0 else -1 for c in keep]
    depths = [cands[c][3] for c in keep]
    return tokens, parents, depths, calls


def check_structure(tree: DraftTree) -> None:
    bsz, n = tree.tokens.shape
    assert tree.num_nodes == n
    for t in (tree.tokens, tree.parents, tree.depths):
        assert t.shape == (bsz, n) and t.dtype == torch.int64
    assert tree.ancestors.shape == (bsz, n, n) and tree.ancestors.dtype == torch.bool
    for b in range(bsz):
        parents = tree.parents[b].tolist()
        assert parents[0] == -1 and tree.depths[b, 0] == 0
        for i in range(1, n):
            assert 0 <= parents[i] < i  # parents precede children (closure under ancestors)
            assert tree.depths[b, i] == tree.depths[b, parents[i]] + 1
            assert tree.depths[b, i] >= tree.depths[b, i - 1]  # ordered by depth
        for i in range(n):
            chain, j = {i}, i
            while parents[j] >= 0:
                j = parents[j]
                chain.add(j)
            assert set(torch.nonzero(tree.ancestors[b, i]).flatten().tolist()) == chain


def run(first, table, roots, num_steps, topk, num_nodes):
    draft = TableDraft(table, roots)
    tree = draft_tree(
        first,
        roots,
        draft,
        num_steps=num_steps,
        topk=topk,
        num_draft_tokens=num_nodes,
        to_target=to_target,
    )
    return tree, draft


def inputs(seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed + 1)
    if ties:
        first = -torch.randint(0, 4, (B, V_DRAFT), generator=g) / 2.0
    else:
        first = torch.log_softmax(torch.randn(B, V_DRAFT, generator=g) * 2, dim=-1)
    roots = torch.randint(0, V_TARGET, (B,), generator=g)
    return first, make_table(seed, ties), roots


def test_chain_is_the_argmax_walk():
    first, table, roots = inputs(0, ties=False)
    num_steps = 5
    tree, draft = run(first, table, roots, num_steps, 1, num_steps + 1)
    check_structure(tree)
    assert len(draft.calls) == num_steps - 1
    for b in range(B):
        prev, tok = int(roots[b]), int(TARGET_OF[int(first[b].argmax())])
        want = [int(roots[b]), tok]
        for _ in range(num_steps - 1):
            prev, tok = tok, int(TARGET_OF[int(table[b, prev, tok].argmax())])
            want.append(tok)
        assert tree.tokens[b].tolist() == want
        assert tree.parents[b].tolist() == list(range(-1, num_steps))
    for step, (s, tokens, parents) in enumerate(draft.calls, start=1):
        assert s == step and tokens.shape == (B, 1)
        assert parents.tolist() == [[0]] * B
        assert tokens[:, 0].tolist() == tree.tokens[:, step].tolist()
    assert torch.equal(tree.ancestors, chain_tree(roots, tree.tokens[:, 1:]).ancestors)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "num_steps,topk,num_nodes",
    [
        (1, 2, 2),
        (1, 3, 4),
        (2, 2, 4),
        (3, 2, 8),
        (3, 3, 10),
        (4, 4, 16),
        (4, 2, 11),
        (5, 3, 1 + 3 + 36),
    ],
)
def test_tree_equals_reference(num_steps, topk, num_nodes, ties):
    for seed in range(3):
        first, table, roots = inputs(100 * seed + num_steps * 10 + topk, ties)
        tree, draft = run(first, table, roots, num_steps, topk, num_nodes)
        check_structure(tree)
        assert len(draft.calls) == num_steps - 1
        for b in range(B):
            tokens, parents, depths, calls = reference(
                first[b].tolist(), table[b], int(roots[b]), num_steps, topk, num_nodes
            )
            assert tree.tokens[b].tolist() == tokens
            assert tree.parents[b].tolist() == parents
            assert tree.depths[b].tolist() == depths
            # step_fn saw the reference's branches and their parents (step 1: zeros) ...
            for (step, got_tokens, got_parents), (want_tokens, want_parents, _) in zip(
                draft.calls, calls, strict=True
            ):
                assert got_tokens.shape == got_parents.shape == (B, topk)
                assert got_tokens[b].tolist() == want_tokens
                assert got_parents[b].tolist() == want_parents
                assert step > 1 or want_parents == [0] * topk
            # ... and the ancestry it gathered through `parents` is the branches' true paths.
            if calls:
                assert [tuple(p) for p in draft.paths[b].tolist()] == calls[-1][2]


def test_closure_assertion_catches_positive_logprobs():
    first = torch.full((1, V_DRAFT), -5.0)
    roots = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="closed under ancestors"):
        draft_tree(
            first,
            roots,
            lambda step, tokens, parents: torch.full((1, 2, V_DRAFT), 10.0),
            num_steps=2,
            topk=2,
            num_draft_tokens=3,
            to_target=to_target,
        )


def test_chain_tree():
    tree = chain_tree(torch.tensor([5, 6]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    check_structure(tree)
    assert tree.tokens.tolist() == [[5, 1, 2, 3], [6, 4, 5, 6]]
    assert tree.depths.tolist() == [[0, 1, 2, 3]] * 2
    assert chain_tree(torch.tensor([7]), torch.zeros((1, 0), dtype=torch.int64)).num_nodes == 1


@pytest.mark.parametrize(
    "num_steps,topk,num_nodes",
    [(0, 2, 2), (2, 0, 2), (3, 1, 3), (3, 1, 5), (2, 2, 1), (2, 2, 8), (1, 3, 5), (2, 8, 4)],
)
def test_value_errors(num_steps, topk, num_nodes):
    first, table, roots = inputs(0, ties=False)
    with pytest.raises(ValueError):
        run(first, table, roots, num_steps, topk, num_nodes)


def test_topk_ties_go_to_the_lower_index():
    g = torch.Generator().manual_seed(5)
    for n, k in [(50_000, 8), (1000, 5), (7, 7), (3, 1)]:
        x = torch.randint(0, 20, (16, n), generator=g) / 2.0
        x[0] = -torch.inf
        values, indices = _topk(x, k)
        want = torch.sort(x, dim=-1, descending=True, stable=True)
        assert torch.equal(values, want.values[:, :k])
        assert torch.equal(indices, want.indices[:, :k])
