"""Prompt logprobs: which positions of a step score which prompt tokens, and their results.

Invariants: the logits at position p score prompt token p + 1 (the prompt is known in full, so a
chunk's last position scores the next chunk's first token); each scored position of a request is
scored once, in order, also across retractions (recomputed positions are not scored again); a
request's entries are written on the model thread before the step that completes them is handed
over, so its first output already carries them all. A step without requests that ask builds
nothing here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pyllama4.outputs import TokenLogprob

if TYPE_CHECKING:
    from pyllama4.engine.records import Completion


class PromptScores:
    """One request's prompt logprobs: entry i is about prompt token start + i."""

    def __init__(self, prompt_ids: list[int], start: int, top: int):
        self.prompt_ids = prompt_ids
        self.start = start
        self.top = top
        self.entries: list[TokenLogprob | None] = [None] * (len(prompt_ids) - start)
        self.next = max(start, 1)  # the first prompt position not scored yet

    @property
    def max_cached(self) -> int:
        """The most prompt tokens the prefix cache may supply: the logits of position
        next - 1 are still needed."""
        return self.next - 1


class StepScores:
    """The scored rows of one step: flat token index, target token, owner and entry of each."""

    def __init__(self) -> None:
        self.index: list[int] = []
        self.targets: list[int] = []
        self.owners: list[tuple[PromptScores, int]] = []
        self.top = 0
        self._logprobs: list[torch.Tensor] = []
        self._top_ids: list[torch.Tensor] = []
        self._top_logprobs: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.index)

    def add(self, scores: PromptScores, flat_start: int, first: int, end: int) -> None:
        """Positions [first, end) of a chunk whose position `first` is flat token flat_start."""
        for p in range(first, end):
            self.index.append(flat_start + p - first)
            self.targets.append(scores.prompt_ids[p + 1])
            self.owners.append((scores, p + 1 - scores.start))
        self.top = max(self.top, scores.top)

    def reduce(self, offset: int, logits: torch.Tensor) -> None:
        """Takes the logits [B, vocab] of scored rows offset..offset + B - 1 (the raw logits,
        as the sampler reports them): log_softmax in float32, the target's and the top ones."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(self.targets[offset : offset + logits.shape[0]])
        self._logprobs.append(logprobs.gather(1, targets.to(logits.device)[:, None])[:, 0])
        if self.top:
            values, ids = logprobs.topk(self.top, dim=-1)
            self._top_logprobs.append(values)
            self._top_ids.append(ids)

    def write(self) -> None:
        """Writes the reduced rows into their requests' entries (one host copy)."""
        logprobs = torch.cat(self._logprobs).cpu().tolist()
        top_ids = torch.cat(self._top_ids).cpu().tolist() if self.top else None
        top_lp = torch.cat(self._top_logprobs).cpu().tolist() if self.top else None
        for row, ((scores, entry), target) in enumerate(
            zip(self.owners, self.targets, strict=True)
        ):
            k = scores.top
            top = list(zip(top_ids[row][:k], top_lp[row][:k], strict=True)) if top_ids else []
            scores.entries[entry] = TokenLogprob(target, logprobs[row], top)


def plan_scores(plan: Any, completion_of: Callable[[int], Completion | None]) -> StepScores | None:
    """The prompt positions the plan's prefill chunks compute that score prompt tokens not scored
    yet; None when no request in it asks. Marks them as scored."""
    step = StepScores()
    starts, request_ids, context_lens = plan.query_start, plan.request_ids, plan.context_lens
    for r in range(plan.num_decodes, plan.num_requests):
        c = completion_of(int(request_ids[r]))
        scores = None if c is None or c.index else c.request.prompt_scores
        if scores is None:
            continue
        computed = int(context_lens[r])
        first = max(computed, scores.next - 1)
        end = min(computed + int(starts[r + 1] - starts[r]), len(scores.prompt_ids) - 1)
        if first < end:
            step.add(scores, int(starts[r]) + first - computed, first, end)
            scores.next = end + 1
    return step or None
