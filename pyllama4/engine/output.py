"""Output processing: a committed step's tokens become text, stop decisions and outputs.

Invariant: this module runs on the event loop and never touches the scheduler. It returns what
ended (and whether the core still holds it); the loop tells the core. A completion ends once: by
the core (a stop token: its text is not part of the output; the length limit, a completed
grammar) or by a stop string. Tokens reach `token_ids` here, one by one with their text: those
after the token that ended a completion never do.
"""

from __future__ import annotations

from typing import NamedTuple

from pyllama4._core import Finished
from pyllama4.engine.records import Completion, LogprobRow, StepOutputs
from pyllama4.outputs import TokenLogprob


class Ended(NamedTuple):
    """A completion that output processing ended while the core still runs it: the loop ends it
    in the core with this reason."""

    completion: Completion
    reason: str


def process(step: StepOutputs) -> tuple[int, list[Completion], list[Ended]]:
    """Makes the text of a step's tokens. Returns (tokens processed, completions the core ended,
    completions ended here that the core still runs). A completion that ends before its last
    fresh token (a stop string inside a multi-token speculative step) drops the rest."""
    processed = 0
    by_core: list[Completion] = []
    ended: list[Ended] = []
    for c, fresh, logprob, done, grammar_ended in step.rows:
        if c.finished:  # ended since the step committed (aborted, or a stop string)
            continue
        for j, token in enumerate(fresh):
            processed += 1
            last = j == len(fresh) - 1
            c.token_ids.append(token)
            core_finish = done if last else None
            reason = _on_token(c, token, logprob, core_finish, last and grammar_ended, step.time)
            if reason is None:
                continue
            c.finish_reason = reason
            if core_finish is not None or (last and grammar_ended):
                by_core.append(c)
            else:
                ended.append(Ended(c, reason))
            break
    return processed, by_core, ended


def _on_token(
    c: Completion,
    token: int,
    logprob: LogprobRow | None,
    done: Finished | None,
    grammar_ended: bool,
    now: float,
) -> str | None:
    """Takes one token into c's text; returns the finish reason if it ends c."""
    metrics = c.request.metrics
    if metrics.first_token_time is None:
        metrics.first_token_time = now
    if c.last_token_time is not None:
        metrics.sum_inter_token += now - c.last_token_time
        metrics.num_token_times += 1
    c.last_token_time = now
    if logprob is not None:
        assert c.logprobs is not None  # rows carry logprobs only for requests that asked
        c.logprobs.append(TokenLogprob(token, logprob.logprob, logprob.top))
    by_stop_token = done is not None and done.reason == "stop"
    # A stop token ends the text: its own text is not part of the output.
    text = "" if by_stop_token else c.detokenizer.push([token])
    if done is not None:
        text += c.detokenizer.finish()
    emit, stopped = c.stops.push(text)
    c.pieces.append(emit)
    if done is None and grammar_ended:
        # The grammar ended on a stop token the request does not stop at (ignore_eos).
        c.pieces.append(c.stops.finish())
        c.stop_reason = token
        return "stop"
    if stopped:
        c.stop_reason = c.stops.matched
        return "stop"
    if done is not None:
        c.pieces.append(c.stops.finish())
        c.stop_reason = token if by_stop_token else None
        return "stop" if by_stop_token else "length"
    return None
