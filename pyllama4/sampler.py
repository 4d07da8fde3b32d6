"""The vectorized sampler of the engine's step loop: one token per logits row.

Invariant: row i's token depends only on logits[i] and requests[i] (for seeded rows also not on
the batch it shares or its position in it, so the same seed and history give the same token); a
greedy row (temperature 0) gets exactly the argmax of its processed logits; the input logits are
never modified; reported logprobs are the log-softmax of the raw logits.

Processing, on float32 copies, in this order: logit_bias; repetition penalty (HF/CTRL, over the
prompt and output tokens); frequency and presence penalties (OpenAI, over the output tokens);
stop ids masked to -inf while fewer than min_tokens tokens were generated (not in rows with a
grammar, which alone decides when they may end); tokens a row's grammar constraint does not allow
next masked to -inf (the constraint advances outside the sampler, by
the tokens it returns). Greedy rows then take
the argmax. The other rows are divided by their temperature, restricted by top_k, top_p and min_p
(tokens tied with the last kept one are kept too), and sampled with the exponential race
(argmax of probs / Exponential(1) noise, which draws from probs) in one argmax for the batch.

Everything runs as batched torch ops; Python only walks the request list to build the small
per-row parameter arrays, the flat index lists of the rows that use logit_bias, penalties or
min_tokens, and one torch.Generator per seeded row. A seeded row's generator is seeded from
(seed, seed_offset, len(output_ids)); unseeded rows share one draw from torch's default
generator of the device. Work no row needs (penalties, sorting, noise, log-softmax) is skipped.
Seeded streams are reproducible on one device type: CPU and CUDA generators differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pyllama4.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pyllama4.grammar import Constraint

_MASK64 = (1 << 64) - 1


@dataclass
class SampleRequest:
    """One row of the logits, built by the engine each step."""

    params: SamplingParams
    prompt_ids: Sequence[int] | np.ndarray  # seen tokens for repetition_penalty (with output_ids)
    output_ids: Sequence[int] | np.ndarray  # tokens generated so far (penalties, min_tokens)
    # EOS ids + params.stop_token_ids (the engine passes EOS unless ignore_eos); masked while
    # len(output_ids) < params.min_tokens.
    stop_ids: frozenset[int] | tuple[int, ...] = ()
    seed_offset: int = 0  # index of the completion for n > 1: n seeded samples differ
    constraint: Constraint | None = None  # structured output: the grammar's allowed tokens


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [S] int64
    # [S] float32: log-softmax of the raw logits at the sampled token (NaN in rows that did not
    # ask for logprobs); None when no row asked.
    logprobs: torch.Tensor | None
    # [S, K] int64 / float32, K = the largest top-logprobs count asked (at most the vocab size),
    # sorted by logprob descending; a row asking fewer uses a prefix; rows that did not ask hold
    # -1 / NaN. None when no row asked for logprobs.
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _row_seed(seed: int, offset: int, step: int) -> int:
    """A 64-bit generator seed that depends only on (seed, completion index, step)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (offset & _MASK64))
    return _splitmix64(h ^ (step & _MASK64))


def _ids(seq) -> np.ndarray:
    if isinstance(seq, (set, frozenset)):
        return np.fromiter(seq, dtype=np.int64, count=len(seq))
    return np.asarray(seq, dtype=np.int64).reshape(-1)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax (first index among ties, like torch); numpy's is ~5x faster on CPU."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.detach().numpy().argmax(axis=-1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)


def _sort_descending(x: torch.Tensor) -> torch.Tensor:
    """Row values of x (a float32 tensor of ours) sorted in descending order, in a new tensor.

    On CPU numpy's sort is ~15x faster than torch's; negating x in place around an ascending
    sort (exact, and undone) saves allocating a flipped copy.
    """
    if x.device.type == "cpu":
        a = x.detach().numpy()
        np.negative(a, out=a)
        try:
            ordered = np.sort(a, axis=-1)
        finally:
            np.negative(a, out=a)
        return torch.from_numpy(np.negative(ordered, out=ordered))
    return torch.sort(x, dim=-1, descending=True).values


@dataclass
class _Plan:
    """Per-row parameters of one call, as host arrays (one pass over the request list)."""

    params: list[SamplingParams]
    temperature: np.ndarray  # float32 [S]
    top_k: np.ndarray  # int64 [S]
    top_p: np.ndarray  # float32 [S]
    min_p: np.ndarray  # float32 [S]
    repetition: np.ndarray  # float32 [S]
    frequency: np.ndarray  # float32 [S]
    presence: np.ndarray  # float32 [S]
    logprobs: np.ndarray  # int64 [S], -1: none
    greedy: np.ndarray  # bool [S]
    sampled: np.ndarray  # int64 indices of the non-greedy rows


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str = "cpu"):
        if vocab_size < 1:
            raise ValueError("vocab_size: must be >= 1")
        self.vocab_size = vocab_size
        self.device = torch.device(device)

    # -- host side ------------------------------------------------------------------------------

    def _plan(self, logits: torch.Tensor, requests: list[SampleRequest]) -> _Plan:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits: expected shape [{len(requests)}, {self.vocab_size}], "
                f"got {list(logits.shape)}"
            )
        if logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits: vocab dimension {logits.shape[1]} != {self.vocab_size}")
        params = [r.params for r in requests]
        temperature = np.array([p.temperature for p in params], dtype=np.float32)
        greedy = temperature == 0.0
        return _Plan(
            params=params,
            temperature=temperature,
            top_k=np.array([p.top_k for p in params], dtype=np.int64),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
            min_p=np.array([p.min_p for p in params], dtype=np.float32),
            repetition=np.array([p.repetition_penalty for p in params], dtype=np.float32),
            frequency=np.array([p.frequency_penalty for p in params], dtype=np.float32),
            presence=np.array([p.presence_penalty for p in params], dtype=np.float32),
            logprobs=np.array(
                [-1 if p.logprobs is None else p.logprobs for p in params], dtype=np.int64
            ),
            greedy=greedy,
            sampled=np.flatnonzero(~greedy),
        )

    def _flat(
        self, rows: Sequence[int], seqs: Sequence, what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices row * V + token into the [S, V] logits, and each sequence's length."""
        arrays = [_ids(s) for s in seqs]
        lens = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{what}: token ids must be in [0, {self.vocab_size})")
        offsets = np.asarray(rows, dtype=np.int64) * self.vocab_size
        return tokens + np.repeat(offsets, lens), lens

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    # -- device side ----------------------------------------------------------------------------

    def _penalized(
        self, logits: torch.Tensor, requests: list[SampleRequest], plan: _Plan
    ) -> tuple[torch.Tensor, bool]:
        """float32 logits after logit_bias, penalties and min_tokens; True if a fresh copy."""
        params = plan.params
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        rep_rows = np.flatnonzero(plan.repetition != 1.0)
        fp_rows = np.flatnonzero((plan.frequency != 0.0) | (plan.presence != 0.0))
        stop_rows = [
            i
            for i, r in enumerate(requests)
            if r.stop_ids and len(r.output_ids) < r.params.min_tokens and r.constraint is None
        ]
        grammar_rows = [i for i, r in enumerate(requests) if r.constraint is not None]
        if not (bias_rows or rep_rows.size or fp_rows.size or stop_rows or grammar_rows):
            owned = logits.dtype != torch.float32
            return logits.float(), owned
        x = torch.empty(logits.shape, dtype=torch.float32, device=self.device)
        x.copy_(logits)
        flat_x = x.view(-1)
        if bias_rows:
            flat, _ = self._flat(
                bias_rows, [list(params[i].logit_bias) for i in bias_rows], "logit_bias"
            )
            bias = np.fromiter(
                (b for i in bias_rows for b in params[i].logit_bias.values()),
                dtype=np.float32,
                count=flat.size,
            )
            idx = self._tensor(flat)  # unique: dict keys
            flat_x[idx] += self._tensor(bias)
        if rep_rows.size:
            # Prompt and output ids of each row; duplicates read and write the same value.
            seqs = [s for i in rep_rows for s in (requests[i].prompt_ids, requests[i].output_ids)]
            flat, lens = self._flat(np.repeat(rep_rows, 2), seqs, "prompt_ids/output_ids")
            if flat.size:
                idx = self._tensor(flat)
                penalty = self._tensor(np.repeat(np.repeat(plan.repetition[rep_rows], 2), lens))
                seen = flat_x[idx]
                flat_x[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
        if fp_rows.size:
            # Counts of each output token per row, scattered (torch.unique would wait for the
            # device); tokens not seen subtract exactly 0.
            outputs = [requests[i].output_ids for i in fp_rows]
            flat, _ = self._flat(np.arange(fp_rows.size), outputs, "output_ids")
            if flat.size:
                counts = torch.zeros(fp_rows.size * self.vocab_size, device=self.device)
                counts.index_add_(0, self._tensor(flat), torch.ones(flat.size, device=self.device))
                counts = counts.view(fp_rows.size, self.vocab_size)
                rows = self._tensor(fp_rows)
                freq = self._tensor(plan.frequency[fp_rows])[:, None]
                pres = self._tensor(plan.presence[fp_rows])[:, None]
                x[rows] = x[rows] - (freq * counts + pres * (counts > 0))
        if stop_rows:
            flat, _ = self._flat(stop_rows, [requests[i].stop_ids for i in stop_rows], "stop_ids")
            flat_x[self._tensor(flat)] = -math.inf
        if grammar_rows:
            from pyllama4.grammar import mask_logits

            mask_logits(x, grammar_rows, [requests[i].constraint for i in grammar_rows])
        return x, True

    def _warped(self, x: torch.Tensor, plan: _Plan, owned: bool) -> torch.Tensor:
        """The sampled rows of x divided by temperature, with top_k / top_p / min_p applied
        (dropped tokens at -inf). May reuse x when owned and every row is sampled."""
        s = plan.sampled
        temperature = plan.temperature[s]
        scale = not np.all(temperature == 1.0)
        if s.size == x.shape[0]:
            if scale:
                xs = x / self._tensor(temperature)[:, None]
            else:
                xs = x if owned else x.clone()
        else:
            xs = x[self._tensor(s)]
            if scale:
                xs.div_(self._tensor(temperature)[:, None])
        vocab = self.vocab_size
        top_k = plan.top_k[s]
        limited = (top_k > 0) & (top_k < vocab)
        top_p = plan.top_p[s]
        min_p = plan.min_p[s]
        threshold = None  # [N]: tokens below it are dropped
        if np.any(top_p < 1.0):
            k = self._tensor(np.where(limited, top_k, vocab))
            ordered = _sort_descending(xs)
            if limited.any():  # renormalize over the top k: drop the rest (never a threshold)
                position = torch.arange(vocab, device=self.device)
                ordered.masked_fill_(position >= k[:, None], -math.inf)
            cumulative = torch.softmax(ordered, dim=-1).cumsum_(dim=-1)
            # The smallest prefix whose probability reaches top_p: the positions before the
            # first cumulative >= top_p (cumulative never decreases), and that one.
            p = self._tensor(np.where(top_p < 1.0, top_p, np.inf).astype(np.float32))
            kept = torch.searchsorted(cumulative, p[:, None]).squeeze(1) + 1
            kept = torch.minimum(kept, k)
            threshold = ordered.gather(1, (kept - 1)[:, None]).squeeze(1)
            keep_all = self._tensor(~limited & (top_p >= 1.0))
            threshold = threshold.masked_fill(keep_all, -math.inf)
        elif limited.any():
            k_max = int(top_k[limited].max())
            top = torch.topk(xs, k_max, dim=-1).values
            position = np.minimum(np.where(limited, top_k, k_max), k_max) - 1
            threshold = top.gather(1, self._tensor(position)[:, None]).squeeze(1)
            threshold = threshold.masked_fill(self._tensor(~limited), -math.inf)
        if np.any(min_p > 0.0):
            # prob < min_p * max prob  <=>  logit < max logit + log(min_p); log(0) = -inf.
            floor = xs.amax(dim=-1) + torch.log(self._tensor(min_p))
            threshold = floor if threshold is None else torch.maximum(threshold, floor)
        if threshold is not None:
            xs.masked_fill_(xs < threshold[:, None], -math.inf)
        return xs

    def _race(self, xs: torch.Tensor, requests: list[SampleRequest], plan: _Plan) -> torch.Tensor:
        """One token per row of xs (the sampled rows; consumed): the exponential race
        argmax(probs / E), E ~ Exponential(1), taken in log space as argmax(xs - log E) (no
        softmax needed). E = -log(U), U uniform in [0, 1), is never 0, so a dropped token
        (-inf) never wins; U = 0 gives E = +inf, which only makes that token lose."""
        s = plan.sampled
        seeds = [plan.params[i].seed for i in s]
        seeded = [j for j, seed in enumerate(seeds) if seed is not None]
        noise = torch.empty_like(xs)
        if len(seeded) < len(s):
            if not seeded:
                noise.uniform_()
            else:
                unseeded = np.flatnonzero(np.array([seed is None for seed in seeds]))
                draw = torch.empty((unseeded.size, xs.shape[1]), device=self.device)
                noise.index_copy_(0, self._tensor(unseeded), draw.uniform_())
        for j in seeded:
            r = requests[s[j]]
            g = torch.Generator(device=self.device)
            g.manual_seed(_row_seed(seeds[j], r.seed_offset, len(r.output_ids)))
            noise[j].uniform_(generator=g)
        noise.log_().neg_().log_()  # log E; torch's exponential_ is ~5x slower on CPU
        return _argmax(xs.sub_(noise))

    # -- API ------------------------------------------------------------------------------------

    def __call__(self, logits: torch.Tensor, requests: list[SampleRequest]) -> SampleOutput:
        plan = self._plan(logits, requests)
        rows = len(requests)
        if rows == 0:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return SampleOutput(empty, None, None, None)
        x, owned = self._penalized(logits, requests, plan)
        s = plan.sampled
        if s.size == 0:
            tokens = _argmax(x)
        else:
            # A read-only argmax over every row beats copying out the greedy ones; it must run
            # before _warped, which may reuse x when no row is greedy.
            tokens = _argmax(x) if plan.greedy.any() else None
            sampled = self._race(self._warped(x, plan, owned), requests, plan)
            if tokens is None:
                tokens = sampled
            else:
                tokens[self._tensor(s)] = sampled
        return self._logprobs(logits, tokens, plan)

    def probabilities(
        self, logits: torch.Tensor, requests: list[SampleRequest], repeat: int
    ) -> torch.Tensor:
        """The distribution each row's token would be sampled from, for logits [B * repeat, V]
        whose row i belongs to requests[i // repeat] (speculative verification: one row per draft
        node). Every request must sample (temperature > 0) with no logit_bias, penalties,
        min_tokens or grammar (pyllama4.speculative.eagle.eligible): softmax of the temperature-
        scaled logits after top_k / top_p / min_p. float32 [B * repeat, V]."""
        plan = self._plan(logits[::repeat], requests)
        if plan.greedy.any():
            raise ValueError("probabilities: greedy rows have no distribution to sample")
        expanded = _Plan(
            params=[p for p in plan.params for _ in range(repeat)],
            **{
                name: np.repeat(getattr(plan, name), repeat)
                for name in (
                    "temperature",
                    "top_k",
                    "top_p",
                    "min_p",
                    "repetition",
                    "frequency",
                    "presence",
                    "logprobs",
                    "greedy",
                )
            },
            sampled=np.arange(logits.shape[0]),
        )
        x = logits.float()
        return torch.softmax(self._warped(x, expanded, owned=x is not logits), dim=-1)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, plan: _Plan) -> SampleOutput:
        asked = np.flatnonzero(plan.logprobs >= 0)
        if asked.size == 0:
            return SampleOutput(tokens, None, None, None)
        rows = tokens.shape[0]
        k = min(int(plan.logprobs.max()), self.vocab_size)
        if asked.size == rows:
            lsm = torch.log_softmax(logits.float(), dim=-1)
            chosen = tokens
        else:
            idx = self._tensor(asked)
            lsm = torch.log_softmax(logits[idx].float(), dim=-1)
            chosen = tokens[idx]
        picked = lsm.gather(1, chosen[:, None]).squeeze(1)
        top_logprobs, top_ids = torch.topk(lsm, k, dim=-1)
        if asked.size == rows:
            return SampleOutput(tokens, picked, top_ids, top_logprobs)
        out_lp = torch.full((rows,), math.nan, device=self.device)
        out_ids = torch.full((rows, k), -1, dtype=torch.int64, device=self.device)
        out_top = torch.full((rows, k), math.nan, device=self.device)
        out_lp[idx] = picked
        out_ids[idx] = top_ids
        out_top[idx] = top_logprobs
        return SampleOutput(tokens, out_lp, out_ids, out_top)
