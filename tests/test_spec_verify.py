"""pyllama4.speculative.verify: the output equals what the target alone would produce.

Greedy: hand-built trees, and random trees against greedy decoding of a table target. Sampling:
a Markov target over V = 6 tokens; 20000 identical rows verified in one call; the joint
distribution of the first one, two and three generated tokens (later ones drawn from the target
when a row outputs fewer) is compared with the exact target probabilities by a chi-square
goodness-of-fit test (cells expected < 5 pooled). Generators are seeded, so the tests are
deterministic; the significance level is 1e-3 (the test passes when p > 1e-3). The same test
rejects (p < 1e-6) two wrong acceptance rules: always accepting the first child, and not
renormalizing after a rejection.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import chain_tree
from pyllama4.speculative.tree import DraftTree, draft_tree
from pyllama4.speculative.verify import Acceptance, accept_greedy, accept_sampling


def make_tree(tokens: list[int], parents: list[int], rows: int = 1) -> DraftTree:
    """A DraftTree of `rows` identical rows from one row's node tokens and parents."""
    n = len(tokens)
    depths = [0] * n
    ancestors = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        assert 0 <= parents[i] < i
        depths[i] = depths[parents[i]] + 1
        ancestors[i] |= ancestors[parents[i]]
    return DraftTree(
        tokens=torch.tensor([tokens] * rows),
        parents=torch.tensor([parents] * rows),
        depths=torch.tensor([depths] * rows),
        ancestors=ancestors.expand(rows, n, n).clone(),
    )


def check_consistent(tree: DraftTree, acc: Acceptance) -> None:
    """Paths follow parents; tokens are the path's drafts then the bonus; -1 padding after; the
    bonus is no child's token at the last node (every child there was rejected)."""
    bsz, width = acc.nodes.shape
    assert width == int(tree.depths.max()) + 1 and acc.tokens.shape == (bsz, width)
    for b in range(bsz):
        count = int(acc.counts[b])
        nodes, tokens = acc.nodes[b].tolist(), acc.tokens[b].tolist()
        assert 1 <= count <= width and nodes[0] == 0
        assert nodes[count:] == [-1] * (width - count) == tokens[count:]
        for d in range(1, count):
            assert tree.parents[b, nodes[d]] == nodes[d - 1]
            assert tokens[d - 1] == tree.tokens[b, nodes[d]]
        last = nodes[count - 1]
        kids = tree.tokens[b][tree.parents[b] == last].tolist()
        assert tokens[count - 1] not in kids


# -- greedy -------------------------------------------------------------------------------------

#                 0   1  2  3  4  5  6  7
HAND_TOKENS = [10, 5, 7, 7, 8, 9, 4, 6]
HAND_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "target,nodes,tokens",
    [
        ({0: 3}, [0, -1, -1, -1], [3, -1, -1, -1]),  # no child matches: the target's token
        ({0: 5, 1: 8, 4: 6, 7: 2}, [0, 1, 4, 7], [5, 8, 6, 2]),  # the full path
        ({0: 7, 2: 9, 5: 1}, [0, 2, 5, -1], [7, 9, 1, -1]),  # a later sibling; the 1st duplicate
        ({0: 7, 2: 4}, [0, 2, -1, -1], [7, 4, -1, -1]),  # the 2nd duplicate's child doesn't count
        ({0: 5, 1: 9}, [0, 1, -1, -1], [5, 9, -1, -1]),  # a token matching elsewhere in the tree
    ],
)
def test_greedy_hand_built(target, nodes, tokens):
    tree = make_tree(HAND_TOKENS, HAND_PARENTS)
    target_tokens = torch.tensor([[target.get(i, 0) for i in range(len(HAND_TOKENS))]])
    acc = accept_greedy(tree, target_tokens)
    check_consistent(tree, acc)
    assert acc.nodes.tolist() == [nodes] and acc.tokens.tolist() == [tokens]
    assert acc.counts.tolist() == [sum(n >= 0 for n in nodes)]


def test_greedy_equals_target_greedy_decoding():
    """The target: the next token is nxt[b, previous token, token]; the draft agrees often."""
    vocab, bsz = 8, 40
    g = torch.Generator().manual_seed(3)
    nxt = torch.randint(0, vocab, (bsz, vocab, vocab), generator=g)
    before_root = torch.randint(0, vocab, (bsz,), generator=g)
    roots = torch.randint(0, vocab, (bsz,), generator=g)
    agree = torch.nn.functional.one_hot(nxt, vocab) * 2.5
    draft_table = torch.log_softmax(agree + torch.randn(bsz, vocab, vocab, vocab, generator=g), -1)
    rows = torch.arange(bsz)[:, None]

    def decode(b: int, path: list[int], steps: int) -> list[int]:
        path = list(path)
        for _ in range(steps):
            path.append(int(nxt[b, path[-2], path[-1]]))
        return path

    for num_steps, topk, num_nodes in [(4, 1, 5), (3, 2, 6), (4, 3, 12), (5, 2, 14)]:
        history = [roots[:, None]]  # each call's branch tokens; step 1's parent is the root

        def step_fn(step, tokens, parents, history=history):
            before = history[-1].gather(1, parents)
            history.append(tokens)
            return draft_table[rows, before, tokens]

        first = draft_table[torch.arange(bsz), before_root, roots]
        tree = draft_tree(
            first,
            roots,
            step_fn,
            num_steps=num_steps,
            topk=topk,
            num_draft_tokens=num_nodes,
            to_target=lambda ids: ids,
        )
        target_tokens = torch.empty_like(tree.tokens)
        for b in range(bsz):
            for i in range(num_nodes):
                path = [int(before_root[b])]
                path += tree.tokens[b][tree.ancestors[b, i]].tolist()  # ancestors precede i
                target_tokens[b, i] = int(nxt[b, path[-2], path[-1]])
        acc = accept_greedy(tree, target_tokens)
        check_consistent(tree, acc)
        assert int(acc.counts.max()) > 2  # some rows accept several drafts
        for b in range(bsz):
            count = int(acc.counts[b])
            want = decode(b, [int(before_root[b]), int(roots[b])], count)[2:]
            assert acc.tokens[b, :count].tolist() == want


def test_greedy_chain_tree():
    tree = chain_tree(torch.tensor([1, 1]), torch.tensor([[2, 3, 4], [2, 5, 4]]))
    target = torch.tensor([[2, 3, 4, 9], [2, 3, 4, 9]])
    acc = accept_greedy(tree, target)
    assert acc.tokens.tolist() == [[2, 3, 4, 9], [2, 3, -1, -1]]
    assert acc.counts.tolist() == [4, 2]


# -- sampling -----------------------------------------------------------------------------------

V = 6
ROWS = 20_000
ROOT = 0
ALPHA = 1e-3  # the significance level


def markov_table() -> np.ndarray:
    """P[prev, next] in float64, from float32 values (what the target rows hold); some zeros."""
    p = np.random.default_rng(7).dirichlet(np.full(V, 0.8), size=V)
    p[p < 0.06] = 0.0
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    return p / p.sum(axis=1, keepdims=True)


P = markov_table()
P32 = torch.from_numpy(P).float()


def expand(tree: DraftTree, rows: int) -> DraftTree:
    return DraftTree(
        tokens=tree.tokens[:1].expand(rows, -1),
        parents=tree.parents[:1].expand(rows, -1),
        depths=tree.depths[:1].expand(rows, -1),
        ancestors=tree.ancestors[:1].expand(rows, -1, -1),
    )


def head(tree: DraftTree, acc: Acceptance, rows: int) -> tuple[DraftTree, Acceptance]:
    """The first `rows` rows of a tree and its acceptance."""
    return expand(tree, rows), Acceptance(acc.nodes[:rows], acc.tokens[:rows], acc.counts[:rows])


def first_tokens(acc: Acceptance, length: int, seed: int) -> torch.Tensor:
    """[rows, length]: the first `length` generated tokens, continued from the target (P)."""
    g = torch.Generator().manual_seed(seed)
    out = acc.tokens[:, :length].clone()
    for j in range(length):
        missing = acc.counts <= j
        if j == 0:
            assert not missing.any()
            continue
        drawn = torch.multinomial(P32[out[:, j - 1]], 1, generator=g).squeeze(1)
        out[:, j] = torch.where(missing, drawn, out[:, j])
    return out


def chi_square_p(samples: torch.Tensor) -> float:
    """p-value of the goodness of fit of samples [rows, length] to the Markov chain from ROOT
    (cells expected < 5 pooled into one); 0 when a sample lies in a cell of probability 0."""
    rows, length = samples.shape
    joint = P[ROOT]
    for _ in range(1, length):
        joint = joint[..., None] * P  # [..., a, c] = [..., a] * P[a, c]
    expected = joint.reshape(-1) * rows
    cells = (samples * V ** torch.arange(length - 1, -1, -1)).sum(dim=1)
    observed = np.bincount(cells.numpy(), minlength=V**length).astype(np.float64)
    if observed[expected == 0].any():
        return 0.0
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = torch.tensor((keep.sum() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


def target_probs(tree: DraftTree) -> torch.Tensor:
    return P32[tree.tokens]  # the Markov target: the distribution after a node's token


def argmax_path(length: int, worst: bool = False) -> list[int]:
    path, token = [], ROOT
    for _ in range(length):
        token = int(np.argmin(P[token]) if worst else np.argmax(P[token]))
        path.append(token)
    return path


def ranked_tokens(token: int) -> list[int]:
    return [int(t) for t in np.argsort(-P[token], kind="stable")]


def hand_tree() -> DraftTree:
    """Root children: the best, the 2nd, the best again, a zero-probability token; below them
    their top 2 or a bad token; one level deeper under the first grandchild."""
    best, second, *_, zero = ranked_tokens(ROOT)
    assert P[ROOT, zero] == 0
    tokens = [ROOT, best, second, best, zero]
    parents = [-1, 0, 0, 0, 0]
    for node in (1, 2, 4):
        for t in ranked_tokens(tokens[node])[:2]:
            tokens.append(t)
            parents.append(node)
    tokens.append(ranked_tokens(tokens[5])[-1])
    parents.append(5)
    return make_tree(tokens, parents)


def drafted_tree() -> DraftTree:
    """draft_tree over a draft Markov model close to P (topk 2, 3 steps, 9 nodes)."""
    noise = np.random.default_rng(11).normal(0, 0.5, (V, V))
    q = torch.log_softmax(torch.from_numpy(np.log(P + 0.05) + noise).float(), dim=-1)
    return draft_tree(
        q[ROOT][None],
        torch.tensor([ROOT]),
        lambda step, tokens, parents: q[tokens],
        num_steps=3,
        topk=2,
        num_draft_tokens=9,
        to_target=lambda ids: ids,
    )


TREES = {
    "good chain": lambda: chain_tree(torch.tensor([ROOT]), torch.tensor([argmax_path(3)])),
    "bad chain": lambda: chain_tree(torch.tensor([ROOT]), torch.tensor([argmax_path(3, True)])),
    "hand tree": hand_tree,
    "drafted tree": drafted_tree,
}


@pytest.mark.parametrize("name", list(TREES))
def test_sampling_matches_the_target_distribution(name):
    tree = expand(TREES[name](), ROWS)
    acc = accept_sampling(tree, target_probs(tree), torch.Generator().manual_seed(1))
    check_consistent(*head(tree, acc, 200))
    for length in (1, 2, 3):
        p = chi_square_p(first_tokens(acc, length, seed=2))
        assert p > ALPHA, (name, length, p)
    if name != "bad chain":
        assert (acc.counts >= 2).float().mean() > 0.3  # drafts do get accepted


def accept_first_child(tree: DraftTree, probs: torch.Tensor, generator) -> Acceptance:
    """A wrong rule: always accept the first child; the bonus from the target at the leaf."""
    nodes = [0]
    while (kids := torch.nonzero(tree.parents[0] == nodes[-1]).flatten()).numel():
        nodes.append(int(kids[0]))
    rows = tree.tokens.shape[0]
    bonus = torch.multinomial(probs[:, nodes[-1]], 1, generator=generator).squeeze(1)
    drafts = tree.tokens[:, nodes[1:]]
    return Acceptance(
        nodes=torch.tensor(nodes).expand(rows, -1),
        tokens=torch.cat([drafts, bonus[:, None]], dim=1),
        counts=torch.full((rows,), len(nodes)),
    )


def accept_without_renormalizing(tree: DraftTree, probs: torch.Tensor, generator) -> Acceptance:
    """A wrong rule, per row in Python: a rejected child's token is removed from p, but the next
    sibling is accepted with its original probability."""
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
    parents, tokens = tree.parents[0].tolist(), tree.tokens[0].tolist()
    children = [[j for j in range(len(parents)) if parents[j] == i] for i in range(len(parents))]
    width = int(tree.depths.max()) + 1
    out_nodes, out_tokens = [], []
    for _ in range(tree.tokens.shape[0]):
        node, path = 0, [0]
        while True:
            p = probs[0, node].tolist()
            for child in children[node]:
                if rng.random() < p[tokens[child]]:
                    node = child
                    break
                p[tokens[child]] = 0.0
            else:
                break
            path.append(node)
        bonus = rng.choices(range(V), weights=p)[0]
        drafts = [tokens[n] for n in path[1:]]
        out_nodes.append(path + [-1] * (width - len(path)))
        out_tokens.append(drafts + [bonus] + [-1] * (width - len(path)))
    return Acceptance(
        nodes=torch.tensor(out_nodes),
        tokens=torch.tensor(out_tokens),
        counts=(torch.tensor(out_nodes) >= 0).sum(dim=1),
    )


@pytest.mark.parametrize("wrong", [accept_first_child, accept_without_renormalizing])
def test_chi_square_rejects_wrong_rules(wrong):
    tree = expand(hand_tree(), ROWS)
    acc = wrong(tree, target_probs(tree), torch.Generator().manual_seed(1))
    assert chi_square_p(first_tokens(acc, 2, seed=2)) < 1e-6


def test_sampling_is_reproducible_and_uses_the_generator():
    tree = expand(hand_tree(), 500)
    probs = target_probs(tree)
    a = accept_sampling(tree, probs, torch.Generator().manual_seed(9))
    b = accept_sampling(tree, probs, torch.Generator().manual_seed(9))
    c = accept_sampling(tree, probs, torch.Generator().manual_seed(10))
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values(), strict=True))
    assert not torch.equal(a.tokens, c.tokens)
    check_consistent(tree, accept_sampling(tree, probs))  # the default generator


def test_sampling_when_the_children_hold_all_the_mass():
    """p's mass is all on the children's tokens, in awkward float32 amounts: some child is
    always accepted (rounding never leaves an empty p); zero-probability children never are."""
    probs = torch.zeros(ROWS, 4, V)
    probs[:, 0, 1] = 1 / 3
    probs[:, 0, 4] = 1 - torch.tensor(1 / 3, dtype=torch.float32)
    probs[:, 1:, 2] = 1.0
    tree = expand(make_tree([0, 3, 1, 4], [-1, 0, 0, 0]), ROWS)
    acc = accept_sampling(tree, probs, torch.Generator().manual_seed(4))
    check_consistent(*head(tree, acc, 100))
    assert (acc.counts == 2).all()
    assert set(acc.tokens[:, 0].tolist()) == {1, 4}
    assert (acc.tokens[:, 1] == 2).all()
    assert abs((acc.tokens[:, 0] == 1).float().mean() - 1 / 3) < 0.02


def test_a_child_holding_all_that_is_left_is_accepted_even_if_tiny():
    """p = one float32 denormal on the child's token: u * p(c) rounds up to p(c) for u >= 1/2, so
    only the "all that is left" rule keeps the walk from emptying p."""
    probs = torch.zeros(1000, 2, V)
    probs[:, 0, 3] = torch.finfo(torch.float32).smallest_normal / 2**23  # 2**-149
    probs[:, 1, 5] = 1.0
    tree = expand(make_tree([0, 3], [-1, 0]), 1000)
    acc = accept_sampling(tree, probs, torch.Generator().manual_seed(5))
    assert acc.tokens.tolist() == [[3, 5]] * 1000
