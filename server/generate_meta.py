"""SGLang's /generate output: cumulative text and output_ids with meta_info, field for field as
SGLang's tokenizer manager builds it.

Invariants:
- finish_reason is null until the completion ends, then {"type": "length", "length": N},
  {"type": "stop", "matched": <stop token id or stop string>} (an EOS token: its id) or
  {"type": "abort", "message": ...}.
- Logprobs are [logprob, token_id, text] triples (text null unless asked for). The input side
  starts at the prompt position the request asked for and its first triple's logprob is null
  (SGLang's rule: that position is never scored); a position without top logprobs is null.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pyllama4.outputs import CompletionOutput, RequestOutput, TokenLogprob
from pyllama4.server.generate_batch import LogprobOptions

WEIGHT_VERSION = "default"  # SGLang's meta_info.weight_version before any weight update
Triple = list[Any]  # [logprob | None, token_id, text | None]
TextOf = Callable[[int], str | None]


def finish_reason(c: CompletionOutput) -> dict[str, Any] | None:
    """SGLang's finish_reason object for a completion (None while it runs)."""
    if c.finish_reason is None:
        return None
    if c.finish_reason == "length":
        return {"type": "length", "length": len(c.token_ids)}
    if c.finish_reason == "stop":
        return {"type": "stop", "matched": c.stop_reason}
    return {"type": "abort", "message": f"the request ended early ({c.finish_reason})"}


def native_output(
    out: RequestOutput, c: CompletionOutput, rid: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """One completion's text, output_ids and meta_info; extra: logprob and speculative keys."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish_reason(c),
        "prompt_tokens": len(out.prompt_token_ids),
        "weight_version": WEIGHT_VERSION,
        **extra,
        "completion_tokens": len(c.token_ids),
        "cached_tokens": out.cached_tokens,
    }
    if c.finished:
        end = out.metrics.finish_time or time.monotonic()
        meta["e2e_latency"] = end - out.metrics.arrival_time
    return {"text": c.text, "output_ids": c.token_ids, "meta_info": meta}


def logprob_fields(
    c: CompletionOutput,
    options: LogprobOptions,
    prompt_ids: Sequence[int],
    prompt_logprobs: Sequence[TokenLogprob | None],
    text_of: TextOf,
) -> dict[str, Any]:
    """SGLang's input_/output_ token and top logprobs. prompt_logprobs: the engine's entries for
    the prompt positions after the first one returned (start + 1 on)."""
    start = options.start if options.start >= 0 else len(prompt_ids) - 1
    first: Triple = [None, prompt_ids[start], text_of(prompt_ids[start])]
    scored = [_scored(e, prompt_ids[start + 1 + i], text_of) for i, e in enumerate(prompt_logprobs)]
    output = c.logprobs or []
    fields: dict[str, Any] = {
        "input_token_logprobs": [first] + scored,
        "output_token_logprobs": [[lp.logprob, lp.token_id, text_of(lp.token_id)] for lp in output],
    }
    if options.top > 0:
        fields["input_top_logprobs"] = [None] + [
            None if e is None else _tops(e.top, text_of) for e in prompt_logprobs
        ]
        fields["output_top_logprobs"] = [_tops(lp.top, text_of) for lp in output]
    return fields


def _scored(entry: TokenLogprob | None, token_id: int, text_of: TextOf) -> Triple:
    if entry is None:
        return [None, token_id, text_of(token_id)]
    return [entry.logprob, entry.token_id, text_of(entry.token_id)]


def _tops(top: list[tuple[int, float]], text_of: TextOf) -> list[Triple] | None:
    """A position's top logprobs as triples; None where there are none (SGLang's null)."""
    return [[logprob, tid, text_of(tid)] for tid, logprob in top] or None
