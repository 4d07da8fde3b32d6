"""What the engine keeps per request while it runs, and what one committed step hands over.

Invariants: a Request holds its n Completions, each of which is one request in the core
scheduler (by `core_id`) while `in_core`. A completion's tokens are kept twice: `sampled_ids`,
every token the core committed (written and read on the model thread only: the sampler's
penalties read them), and `token_ids`, the tokens delivered to the caller (written on the event
loop only, with their text); both only grow. `finish_reason` is set once, on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from anyio.streams.memory import MemoryObjectSendStream

from pyllama4._core import Finished
from pyllama4.detokenizer import IncrementalDetokenizer, StopStrings
from pyllama4.engine.prompt_scores import PromptScores
from pyllama4.grammar import Constraint
from pyllama4.multimodal.features import PromptFeatures
from pyllama4.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from pyllama4.sampler import SampleRequest
from pyllama4.sampling_params import SamplingParams


class LogprobRow(NamedTuple):
    """One sampled token's logprob and the top (token id, logprob) pairs asked for."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    """One completion of a request: one request in the core scheduler."""

    core_id: int
    index: int
    request: Request
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    stop_ids: frozenset[int]
    pieces: list[str] = field(default_factory=list)  # output text, in the pieces it came in
    token_ids: list[int] = field(default_factory=list)  # delivered (event loop)
    sampled_ids: list[int] = field(default_factory=list)  # committed (model thread)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    emitted: tuple[int, int] = (0, 0)  # (pieces, tokens) in outputs already sent
    in_core: bool = False
    last_token_time: float | None = None
    constraint: Constraint | None = None  # structured output: advanced on the model thread
    verify_steps: int = 0  # speculative steps that verified drafts for this completion

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sample_request(self) -> SampleRequest:
        """What the sampler needs of this completion for its next token."""
        return SampleRequest(
            params=self.params,
            prompt_ids=self.request.prompt_ids,
            output_ids=self.sampled_ids,
            stop_ids=self.stop_ids,
            seed_offset=self.index,
            constraint=self.constraint,
        )

    def snapshot(self) -> CompletionOutput:
        return CompletionOutput(
            self.index,
            self.pieces,
            self.token_ids,
            self.logprobs,
            self.finish_reason,
            self.stop_reason,
            self.emitted,
            self.verify_steps,
        )


@dataclass
class Request:
    """One submitted request (n completions) and the stream its caller reads."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    send: MemoryObjectSendStream[RequestOutput]
    metrics: RequestMetrics
    key_ids: np.ndarray  # the radix-cache key of the prompt (image positions keyed by content)
    images: PromptFeatures | None = None  # image features, until the prompt is prefilled
    completions: list[Completion] = field(default_factory=list)
    deferred: list[Completion] = field(default_factory=list)  # siblings waiting for the prefix
    cached_tokens: int = 0
    error: str | None = None
    prompt_scores: PromptScores | None = None  # prompt logprobs, when asked (model thread)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def output(self) -> RequestOutput:
        """The request as of now; marks what it carries as sent."""
        out = RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            outputs=[c.snapshot() for c in self.completions],
            finished=self.finished,
            cached_tokens=self.cached_tokens,
            metrics=self.metrics,
            error=self.error,
            prompt_logprobs=None if self.prompt_scores is None else self.prompt_scores.entries,
        )
        for c in self.completions:
            c.emitted = (len(c.pieces), len(c.token_ids))
        return out


class StepRow(NamedTuple):
    """One completion's share of a committed step."""

    completion: Completion
    tokens: list[int]  # the tokens the step added (already in completion.sampled_ids)
    logprob: LogprobRow | None
    core_finish: Finished | None  # set when the core ended it (a stop token, the length limit)
    grammar_ended: bool  # its grammar completed on the last token (the core has ended it)


@dataclass
class StepOutputs:
    """A committed step's tokens, recorded in their completions' sampled ids, their text not
    made yet."""

    time: float
    rows: list[StepRow] = field(default_factory=list)
    requests: dict[str, Request] = field(default_factory=dict)  # the requests the step touched
