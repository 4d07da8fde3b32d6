"""What the engine returns: per-request outputs, streamed as they grow, and engine statistics.

Invariant: a completion's `text` and `token_ids` only ever grow; each streamed RequestOutput
carries the full state so far plus the delta since the previous one, and the last one for a
request has `finished` True with a finish_reason on every completion.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, most likely first


class CompletionOutput:
    """One completion as of one streamed output. The cumulative `text`, `token_ids` and
    `logprobs` are views of the completion's growing state cut at this output's length, built
    only when read, so streaming costs O(delta) per step, not O(length)."""

    def __init__(
        self,
        index: int,
        pieces: list[str],
        tokens: list[int],
        logprobs: list[TokenLogprob] | None,
        finish_reason: str | None,
        stop_reason: str | int | None,
        delta_from: tuple[int, int],
        verify_steps: int = 0,
    ):
        self.index = index
        self.verify_steps = verify_steps  # speculative steps that verified drafts (EAGLE3)
        self.finish_reason = finish_reason  # "stop", "length", "abort" or "error"
        self.stop_reason = stop_reason  # the stop string or stop token id that ended it
        self._pieces, self._tokens, self._logprobs = pieces, tokens, logprobs
        self._ends = (len(pieces), len(tokens))
        self._starts = delta_from  # (pieces, tokens) already in earlier outputs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self._pieces[: self._ends[0]])

    @property
    def token_ids(self) -> list[int]:
        return self._tokens[: self._ends[1]]

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return None if self._logprobs is None else self._logprobs[: self._ends[1]]

    @property
    def delta_text(self) -> str:
        return "".join(self._pieces[self._starts[0] : self._ends[0]])

    @property
    def delta_logprobs(self) -> list[TokenLogprob]:
        return [] if self._logprobs is None else self._logprobs[self._starts[1] : self._ends[1]]

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})"
        )


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_token_times: int = 0  # completion tokens behind the inter-token latency mean
    sum_inter_token: float = 0.0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def mean_itl(self) -> float | None:
        return self.sum_inter_token / self.num_token_times if self.num_token_times else None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    cached_tokens: int  # prompt tokens served from the prefix cache (first completion)
    metrics: RequestMetrics
    error: str | None = None  # set when the engine failed the request (finish_reason "error")
    # With SamplingParams.prompt_logprobs: entry i is about prompt token prompt_logprobs_start + i
    # (None for position 0, which nothing predicts); complete on every output. None otherwise.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    global_pages_used: int  # held by requests or cached
    global_pages_held: int  # held by requests (not counting pages only the prefix cache keeps)
    global_pages_total: int
    local_pages_used: int
    local_pages_total: int
    prompt_tokens: int  # admitted prompt tokens (re-admissions count again)
    cached_prompt_tokens: int  # of which served by the prefix cache
    generation_tokens: int
    num_retractions: int
    num_steps: int
    images_encoded: int = 0  # images run through the vision tower (a cache hit needs none)
    spec_verify_steps: int = 0  # (request, step) pairs that verified EAGLE3 drafts
    spec_accepted_tokens: int = 0  # tokens those committed (accepted drafts + one each)

    @property
    def spec_accept_length(self) -> float:
        """Mean tokens committed per verify step (1.0 = no draft accepted; 0 without any)."""
        return self.spec_accepted_tokens / self.spec_verify_steps if self.spec_verify_steps else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        return self.global_pages_used / self.global_pages_total if self.global_pages_total else 0.0
