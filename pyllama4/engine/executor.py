"""Step executors: run one planned step on the model thread (images, forward, sampling) and
bring its tokens to the host. The plain executor samples one token per request; the EAGLE3
executor drafts and verifies. The loop does not know which one it drives.

Invariants: execute() runs on the model thread only and sets `launched` once the step's device
work is queued (on a GPU, before the wait for its tokens; always, also when the step fails).
prepare() runs on the event loop, before the step is handed to the model thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np
import torch

from pyllama4.engine.prompt_scores import StepScores, plan_scores
from pyllama4.engine.records import Completion, LogprobRow
from pyllama4.multimodal.features import ImageFeed
from pyllama4.multimodal.support import ImageSupport
from pyllama4.runner import ModelRunner
from pyllama4.sampler import SampleOutput, Sampler, SampleRequest
from pyllama4.sampling_params import SamplingParams
from pyllama4.speculative.eagle import EagleWorker, eligible

log = logging.getLogger("pyllama4.engine")


class StepResult(NamedTuple):
    """A step's tokens on the host. Without speculation one token per sample row and counts /
    verified None; with it counts[s] tokens per row, concatenated, and whether each verified
    drafts."""

    tokens: np.ndarray
    counts: np.ndarray | None
    verified: np.ndarray | None
    logprobs: list[LogprobRow | None]


class StepExecutor:
    """Runs steps of one runner without speculation."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, images: ImageSupport | None):
        self.runner = runner
        self.sampler = sampler
        self.images = images

    def reserve(self, params: SamplingParams, has_grammar: bool) -> int:
        """Speculative slots a request needs each decode step beyond its one token."""
        return 0

    def prepare(self, plan: Any, completion_of: Callable[[int], Completion | None]) -> Any:
        """What execute() needs of the requests' state, read under the core lock: the prompt
        positions to score (None when no request in the plan asks)."""
        return plan_scores(plan, completion_of)

    def execute(
        self,
        plan: Any,
        requests: list[SampleRequest],
        feed: ImageFeed | None,
        prepared: Any,
        launched: Future[None],
    ) -> StepResult:
        try:
            embeds = None
            if feed is not None:
                assert self.images is not None  # only image prompts have features to feed
                embeds = feed.gather(self.images.tower, self.runner.device)
            out, tokens, counts, verified = self._run(plan, requests, embeds, prepared, launched)
        finally:
            if not launched.done():
                launched.set_result(None)
        grammar_rows = [row for row, r in enumerate(requests) if r.constraint is not None]
        if grammar_rows:  # grammar rows never speculate: their token is the sampled one
            sampled = out.tokens.cpu().tolist()
            for row in grammar_rows:
                constraint = requests[row].constraint
                assert constraint is not None
                if not constraint.accept(sampled[row]):
                    log.error("a sampled token broke its grammar (masking failed)")
        return StepResult(tokens, counts, verified, logprob_rows(out, requests))

    def _run(
        self,
        plan: Any,
        requests: list[SampleRequest],
        embeds: tuple[torch.Tensor, torch.Tensor] | None,
        prepared: Any,
        launched: Future[None],
    ) -> tuple[SampleOutput, np.ndarray, np.ndarray | None, np.ndarray | None]:
        scores: StepScores | None = prepared
        extra = None if scores is None else (np.asarray(scores.index), scores.reduce)
        out = self.sampler(self.runner.forward(plan, embeds, extra), requests)
        launched.set_result(None)
        tokens = out.tokens.to(torch.int32).cpu().numpy()
        if scores is not None:
            scores.write()
        return out, tokens, None, None


class EagleExecutor(StepExecutor):
    """Runs steps with EAGLE3 drafting and verification (pyllama4.speculative.eagle)."""

    def __init__(
        self,
        runner: ModelRunner,
        sampler: Sampler,
        images: ImageSupport | None,
        worker: EagleWorker,
    ):
        super().__init__(runner, sampler, images)
        self.worker = worker

    def reserve(self, params: SamplingParams, has_grammar: bool) -> int:
        return self.worker.config.reserve if eligible(params, has_grammar) else 0

    def prepare(self, plan: Any, completion_of: Callable[[int], Completion | None]) -> np.ndarray:
        """[R]: for each prefill chunk that stops short of its prompt's end, the prompt token
        after it (what the EAGLE3 catch-up pairs with its last position); 0 elsewhere."""
        out = np.zeros(plan.num_requests, dtype=np.int64)
        starts, request_ids = plan.query_start, plan.request_ids
        for r in range(plan.num_decodes, plan.num_requests):
            c = completion_of(int(request_ids[r]))
            end = int(plan.context_lens[r]) + int(starts[r + 1] - starts[r])
            if c is not None and end < len(c.request.prompt_ids):
                out[r] = c.request.prompt_ids[end]
        return out

    def _run(
        self,
        plan: Any,
        requests: list[SampleRequest],
        embeds: tuple[torch.Tensor, torch.Tensor] | None,
        prepared: Any,
        launched: Future[None],
    ) -> tuple[SampleOutput, np.ndarray, np.ndarray | None, np.ndarray | None]:
        result = self.worker.step(plan, requests, self.sampler, prepared, embeds)
        return result.sampled, result.tokens, result.counts, result.verified


def image_feed(plan: Any, completion_of: Callable[[int], Completion | None]) -> ImageFeed | None:
    """The image positions the plan's prefill chunks compute (decodes never hold any)."""
    feed = ImageFeed()
    request_ids, starts = plan.request_ids, plan.query_start
    for r in range(plan.num_decodes, plan.num_requests):
        c = completion_of(int(request_ids[r]))
        if c is not None and c.request.images is not None:
            start = int(plan.context_lens[r])
            end = start + int(starts[r + 1] - starts[r])
            feed.add(c.request.images, start, end, int(starts[r]) - start)
    return feed or None


def logprob_rows(out: SampleOutput, requests: list[SampleRequest]) -> list[LogprobRow | None]:
    """Each sample row's logprob and top pairs, for the rows that asked for logprobs."""
    if out.logprobs is None:
        return [None] * len(requests)
    lp = out.logprobs.tolist()
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    rows: list[LogprobRow | None] = []
    for row, r in enumerate(requests):
        k = r.params.logprobs
        if k is None:
            rows.append(None)
            continue
        top = list(zip(top_ids[row][:k], top_lp[row][:k], strict=True)) if top_ids else []
        rows.append(LogprobRow(lp[row], top))
    return rows
