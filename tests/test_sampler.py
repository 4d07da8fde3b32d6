"""Behaviour of pyllama4.sampler.Sampler against straightforward per-row references."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from helpers import processed_logits
from pyllama4.sampler import Sampler, SampleRequest
from pyllama4.sampling_params import SamplingParams

SMALL = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5], dtype=np.float32)


def req(prompt=(), output=(), stop=(), offset=0, **kw) -> SampleRequest:
    return SampleRequest(SamplingParams(**kw), list(prompt), list(output), tuple(stop), offset)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (rows, vocab))).float()


# -- references: Python loops over one row ------------------------------------------------------


def ref_penalized(row: np.ndarray, r: SampleRequest) -> np.ndarray:
    """logit_bias, repetition, frequency/presence, min_tokens, in float32 like the sampler."""
    p = r.params
    out = row.astype(np.float32).copy()
    for t, b in p.logit_bias.items():
        out[t] = out[t] + np.float32(b)
    if p.repetition_penalty != 1.0:
        rp = np.float32(p.repetition_penalty)
        for t in set(r.prompt_ids) | set(r.output_ids):
            out[t] = out[t] / rp if out[t] > 0 else out[t] * rp
    for t, c in Counter(r.output_ids).items():
        present = 1.0 if c > 0 else 0.0
        delta = np.float32(p.frequency_penalty) * np.float32(c) + np.float32(
            p.presence_penalty * present
        )
        out[t] = out[t] - delta
    if len(r.output_ids) < p.min_tokens:
        for t in r.stop_ids:
            out[t] = -np.inf
    return out


def ref_allowed(row: np.ndarray, p: SamplingParams) -> set[int]:
    """Tokens a sampled row may draw: top_k, then top_p on the renormalized rest, then min_p."""
    z = (row / np.float32(p.temperature)).astype(np.float64)
    vocab = len(z)
    order = sorted(range(vocab), key=lambda t: -z[t])
    if 0 < p.top_k < vocab:
        order = order[: p.top_k]
    top = z[order[0]]
    weight = {t: math.exp(z[t] - top) for t in order}
    total = sum(weight.values())
    kept = []
    cumulative = 0.0
    for t in order:
        kept.append(t)
        cumulative += weight[t] / total
        if p.top_p < 1.0 and cumulative >= p.top_p:
            break
    return {t for t in kept if weight[t] >= p.min_p * weight[order[0]] and weight[t] > 0}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


# -- greedy, logit_bias --------------------------------------------------------------------------


def test_greedy_is_argmax_and_input_untouched():
    logits = random_logits(9, 300, seed=1)
    before = logits.clone()
    out = Sampler(300)(logits, [req(temperature=0.0) for _ in range(9)])
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert out.tokens.dtype == torch.int64
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    assert torch.equal(logits, before)
    half = logits.to(torch.bfloat16)
    out = Sampler(300)(half, [req(temperature=0.0) for _ in range(9)])
    assert torch.equal(out.tokens, half.float().argmax(-1))


def test_logit_bias_forces_and_forbids():
    logits = random_logits(4, 100, seed=2)
    best = logits.argmax(-1)
    forced = [7, 8, 9, 10]
    requests = [
        req(temperature=0.0, logit_bias={forced[0]: 100.0}),
        req(temperature=1.0, logit_bias={forced[1]: 100.0}),
        req(temperature=0.0, logit_bias={int(best[2]): -100.0}),
        req(temperature=0.0),
    ]
    before = logits.clone()
    out = Sampler(100)(logits, requests)
    assert out.tokens[:2].tolist() == forced[:2]
    second = logits[2].clone()
    second[best[2]] = -math.inf
    assert out.tokens[2] == second.argmax()
    assert out.tokens[3] == best[3]
    assert torch.equal(logits, before)
    # Forbidden for sampled rows too: -100 on the top token of a peaked distribution.
    peaked = torch.zeros(2000, 5)
    peaked[:, 3] = 5.0
    out = Sampler(5)(peaked, [req(logit_bias={3: -100.0}) for _ in range(2000)])
    assert 3 not in out.tokens.tolist()
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler(5)(peaked[:1], [req(logit_bias={5: 1.0})])


# -- temperature: the sampled distribution -------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_distribution(temperature):
    rows = 20000
    logits = torch.from_numpy(SMALL).expand(rows, -1)
    torch.manual_seed(0)
    out = Sampler(len(SMALL))(logits, [req(temperature=temperature) for _ in range(rows)])
    freq = np.bincount(out.tokens.numpy(), minlength=len(SMALL)) / rows
    expected = softmax(SMALL / temperature)
    # Binomial standard error is at most 0.0035 here: 0.012 is over 3 sigma per token.
    assert np.abs(freq - expected).max() < 0.012


def test_seeded_rows_follow_the_distribution():
    rows = 20000
    logits = torch.from_numpy(SMALL).expand(rows, -1)
    out = Sampler(len(SMALL))(logits, [req(temperature=0.8, seed=i) for i in range(rows)])
    freq = np.bincount(out.tokens.numpy(), minlength=len(SMALL)) / rows
    assert np.abs(freq - softmax(SMALL / 0.8)).max() < 0.012


# -- top_k / top_p / min_p -----------------------------------------------------------------------

WARPS = [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_k=1),
    dict(temperature=1.3, top_p=0.5),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.5, top_p=0.01),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=2.0, min_p=0.5),
    dict(temperature=1.0, top_k=10, top_p=0.6),
    dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05),
    dict(temperature=1.0, top_k=64),  # k >= vocab: no limit
    dict(temperature=1.0, top_k=0),
    dict(temperature=1.0),
]


def test_allowed_sets_match_reference():
    vocab = 64
    requests = [req(**w) for w in WARPS] + [req(temperature=0.0)]
    logits = random_logits(len(requests), vocab, seed=3)
    processed = processed_logits(Sampler(vocab), logits, requests)
    for i, r in enumerate(requests[:-1]):
        finite = torch.isfinite(processed[i])
        assert set(torch.nonzero(finite).flatten().tolist()) == ref_allowed(
            logits[i].numpy(), r.params
        ), WARPS[i]
        expected = logits[i] / torch.tensor(np.float32(r.params.temperature))
        assert torch.equal(processed[i][finite], expected[finite])
    assert torch.equal(processed[-1], logits[-1])


def test_samples_stay_in_allowed_set_and_cover_it():
    vocab, copies = 40, 3000
    base = random_logits(len(WARPS), vocab, seed=4, scale=1.0)
    logits = base.repeat_interleave(copies, dim=0)
    requests = [req(**w) for w in WARPS for _ in range(copies)]
    torch.manual_seed(1)
    tokens = Sampler(vocab)(logits, requests).tokens.view(len(WARPS), copies)
    for i, w in enumerate(WARPS):
        allowed = ref_allowed(base[i].numpy(), SamplingParams(**w))
        drawn = set(tokens[i].tolist())
        assert drawn <= allowed, w
        if len(allowed) <= 12:  # every allowed token has a fair chance in 3000 draws
            assert drawn == allowed, w


def test_top_p_distribution_is_renormalized():
    rows = 20000
    logits = torch.from_numpy(SMALL).expand(rows, -1)
    params = dict(temperature=1.0, top_p=0.8)
    torch.manual_seed(2)
    out = Sampler(len(SMALL))(logits, [req(**params) for _ in range(rows)])
    allowed = sorted(ref_allowed(SMALL, SamplingParams(**params)))
    expected = np.zeros(len(SMALL))
    expected[allowed] = softmax(SMALL[allowed])
    freq = np.bincount(out.tokens.numpy(), minlength=len(SMALL)) / rows
    assert np.abs(freq - expected).max() < 0.012


# -- penalties, min_tokens -----------------------------------------------------------------------


def test_penalties_match_reference_exactly():
    vocab = 50
    rng = np.random.default_rng(5)

    def ids(n):
        return rng.integers(0, vocab, n).tolist()

    requests = [
        req(temperature=0.0, prompt=ids(30), output=ids(12), repetition_penalty=1.3),
        req(temperature=0.0, prompt=ids(30), output=ids(12), repetition_penalty=0.7),
        req(temperature=0.0, prompt=ids(10), output=ids(20), frequency_penalty=0.4),
        req(temperature=0.0, prompt=ids(10), output=ids(20), presence_penalty=-1.1),
        req(
            temperature=0.0,
            prompt=ids(25),
            output=[3, 3, 3, 4, 4, 9],
            repetition_penalty=1.2,
            frequency_penalty=0.75,
            presence_penalty=0.5,
            logit_bias={3: 2.5, 11: -7.0},
        ),
        req(temperature=0.0, prompt=ids(5), output=ids(5)),
        req(temperature=0.0, prompt=ids(5), output=[], frequency_penalty=1.0),
        req(temperature=0.0, output=[1], min_tokens=3, stop=(2, 5), repetition_penalty=1.5),
        req(temperature=0.0, output=[1, 2, 3], min_tokens=3, stop=(2, 5)),
    ]
    logits = random_logits(len(requests), vocab, seed=6)
    sampler = Sampler(vocab)
    processed = processed_logits(sampler, logits, requests)
    expected = np.stack([ref_penalized(logits[i].numpy(), r) for i, r in enumerate(requests)])
    assert torch.equal(processed, torch.from_numpy(expected))
    out = sampler(logits, requests)
    assert out.tokens.tolist() == expected.argmax(-1).tolist()
    # The same rows sampled with temperature see the same penalized logits (divided by T).
    hot = [SampleRequest(SamplingParams(**{**vars(r.params), "temperature": 0.5}),
                         r.prompt_ids, r.output_ids, r.stop_ids) for r in requests]  # fmt: skip
    processed = processed_logits(sampler, logits, hot)
    assert torch.equal(processed, torch.from_numpy(expected / np.float32(0.5)))


def test_min_tokens_masks_stop_ids_until_reached():
    vocab, eos = 20, 7
    logits = torch.zeros(3, vocab)
    logits[:, eos] = 10.0
    logits[:, 4] = 9.0
    requests = [
        req(temperature=0.0, output=[1, 1], min_tokens=3, stop=(eos,)),
        req(temperature=0.0, output=[1, 1, 1], min_tokens=3, stop=(eos,)),
        req(temperature=0.0, output=[], min_tokens=3, stop=()),  # ignore_eos: nothing to mask
    ]
    assert Sampler(vocab)(logits, requests).tokens.tolist() == [4, eos, eos]
    rows = 3000
    hot = torch.zeros(rows, vocab)
    hot[:, eos] = 5.0
    stops = frozenset({eos, 3})
    out = Sampler(vocab)(hot, [req(output=[0], min_tokens=2, stop=stops) for _ in range(rows)])
    assert not set(out.tokens.tolist()) & stops


# -- seeds ---------------------------------------------------------------------------------------


TARGETS = [
    dict(temperature=0.9, top_p=0.95, seed=1234),
    dict(temperature=1.0, min_p=0.01, repetition_penalty=1.2, seed=77),  # no copy when alone
]


@pytest.mark.parametrize("target", TARGETS)
def test_seeded_row_is_independent_of_batch(target):
    vocab = 500
    row = random_logits(1, vocab, seed=7, scale=0.5)
    history = dict(prompt=[1, 2, 3], output=[4, 5])
    alone = [Sampler(vocab)(row, [req(**history, **target)]).tokens.item() for _ in range(3)]
    assert len(set(alone)) == 1
    others = [
        req(temperature=0.0),
        req(temperature=1.0),
        req(temperature=0.7, top_k=20, seed=99),
        req(temperature=1.2, min_p=0.05, repetition_penalty=1.3, prompt=[1, 2], output=[3]),
        req(temperature=1.0, top_p=0.5, frequency_penalty=0.5, output=[9, 9], logprobs=3),
        req(temperature=0.0, presence_penalty=1.0, output=[1], logit_bias={2: 3.0}),
    ]
    rng = np.random.default_rng(8)
    for trial in range(6):
        torch.manual_seed(trial)  # the unseeded rows' draw must not matter
        batch = [others[i] for i in rng.permutation(len(others))[: 2 + trial % 4]]
        position = int(rng.integers(0, len(batch) + 1))
        batch.insert(position, req(**history, **target))
        logits = random_logits(len(batch), vocab, seed=100 + trial, scale=0.5)
        logits[position] = row[0]
        out = Sampler(vocab)(logits, batch)
        assert out.tokens[position].item() == alone[0], (trial, position)


def test_different_seeds_steps_and_offsets_differ():
    vocab = 1000
    flat = torch.zeros(1, vocab)  # uniform: any two draws collide with probability 1/1000
    sampler = Sampler(vocab)

    def draw(seed, output=(), offset=0):
        return sampler(flat, [req(output=output, offset=offset, seed=seed)]).tokens.item()

    assert len({draw(seed) for seed in range(8)}) >= 7
    assert len({draw(5, output=[0] * step) for step in range(8)}) >= 7
    assert len({draw(5, offset=k) for k in range(8)}) >= 7
    # n completions in one batch: same seed, different offsets.
    out = sampler(flat.expand(8, -1), [req(offset=k, seed=5) for k in range(8)])
    assert out.tokens.tolist() == [draw(5, offset=k) for k in range(8)]
    assert draw(5, output=[1, 2], offset=3) == draw(5, output=[7, 8], offset=3)


# -- logprobs ------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_sorted_top():
    vocab = 80
    requests = [
        req(temperature=0.5, top_k=3, logprobs=3, logit_bias={1: 5.0}),
        req(temperature=0.0, logprobs=0, repetition_penalty=1.5, prompt=[0, 1, 2]),
        req(temperature=1.0),
        req(temperature=1.0, logprobs=5, seed=3, frequency_penalty=1.0, output=[4, 4]),
    ]
    logits = random_logits(len(requests), vocab, seed=9)
    out = Sampler(vocab)(logits, requests)
    raw = torch.log_softmax(logits, -1)
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    assert out.top_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    for i in (0, 1, 3):
        assert torch.allclose(out.logprobs[i], raw[i, out.tokens[i]])
        values, ids = torch.sort(raw[i], descending=True)
        assert torch.equal(out.top_ids[i], ids[:5])
        assert torch.allclose(out.top_logprobs[i], values[:5])
        assert torch.all(out.top_logprobs[i][:-1] >= out.top_logprobs[i][1:])
    assert math.isnan(out.logprobs[2]) and (out.top_ids[2] == -1).all()
    out = Sampler(vocab)(logits[:2], [req(logprobs=0), req(logprobs=0, temperature=0.0)])
    assert out.top_ids.shape == (2, 0) and out.logprobs.shape == (2,)
    assert torch.allclose(out.logprobs, raw[:2].gather(1, out.tokens[:, None]).squeeze(1))


def test_empty_batch_and_shape_checks():
    out = Sampler(10)(torch.zeros(0, 10), [])
    assert out.tokens.shape == (0,)
    with pytest.raises(ValueError):
        Sampler(10)(torch.zeros(2, 10), [req()])
    with pytest.raises(ValueError):
        Sampler(10)(torch.zeros(1, 11), [req()])
