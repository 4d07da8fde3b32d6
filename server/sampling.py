"""From a protocol request to SamplingParams: the one mapping and the one context-length check
that chat, completions and /generate all go through.

Invariant: a request whose prompt plus output budget does not fit the context length, or whose
sampling fields SamplingParams rejects, is a 400 naming the field; nothing invalid reaches the
engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pyllama4 import SamplingParams
from pyllama4.grammar import GrammarSpec
from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError


class SamplingFields(Protocol):
    """The sampling fields OpenAI's requests and SGLang's sampling_params share."""

    n: int
    temperature: float | None
    top_p: float | None
    top_k: int
    min_p: float
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float
    seed: int | None
    stop: str | list[str] | None
    stop_token_ids: list[int] | None
    ignore_eos: bool
    skip_special_tokens: bool


@dataclass(frozen=True)
class TokenLimit:
    """How a protocol spells its output budget in context-length errors."""

    field: str  # the request field the budget comes from
    prompt_first: bool  # a prompt that leaves no room is its own error (param "messages")
    shows_total: bool  # the error states prompt + budget


OPENAI_LIMIT = TokenLimit("max_tokens", prompt_first=True, shows_total=True)
NATIVE_LIMIT = TokenLimit("max_new_tokens", prompt_first=False, shows_total=False)


def fit_context(
    prompt_len: int, max_tokens: int | None, context_length: int, limit: TokenLimit
) -> int:
    """The output budget: `max_tokens` if prompt + max_tokens fits the context, all the room the
    prompt leaves if max_tokens is None; otherwise a 400."""
    room = context_length - prompt_len
    if limit.prompt_first and room < 1:
        raise HTTPError(
            400,
            f"the prompt has {prompt_len} tokens; the context length is {context_length}",
            param="messages",
        )
    if max_tokens is None:
        return room
    if max_tokens + prompt_len > context_length:
        total = f" = {prompt_len + max_tokens}" if limit.shows_total else ""
        raise HTTPError(
            400,
            f"prompt ({prompt_len} tokens) + {limit.field} ({max_tokens}){total} exceeds the "
            f"context length {context_length}",
            param=limit.field,
        )
    return max_tokens


def to_sampling_params(
    fields: SamplingFields,
    *,
    max_tokens: int,
    min_tokens: int,
    logit_bias: dict[str, float] | None = None,
    logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """SamplingParams from a request's fields; an invalid one is a 400 naming the field."""
    stop = [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])
    try:
        bias = {int(k): v for k, v in (logit_bias or {}).items()}
    except ValueError:
        raise HTTPError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    try:
        return SamplingParams(
            n=fields.n,
            temperature=1.0 if fields.temperature is None else fields.temperature,
            top_p=1.0 if fields.top_p is None else fields.top_p,
            top_k=fields.top_k,
            min_p=fields.min_p,
            frequency_penalty=fields.frequency_penalty,
            presence_penalty=fields.presence_penalty,
            repetition_penalty=fields.repetition_penalty,
            logit_bias=bias,
            seed=fields.seed,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=fields.ignore_eos,
            stop=stop,
            stop_token_ids=list(fields.stop_token_ids or []),
            skip_special_tokens=fields.skip_special_tokens,
            logprobs=logprobs,
            grammar=grammar,
        )
    except ValueError as e:
        raise HTTPError(400, str(e), param=str(e).split(":")[0]) from None


def openai_params(
    req: p.ChatCompletionRequest | p.CompletionRequest,
    *,
    prompt_len: int,
    context_length: int,
    max_tokens: int | None,
    logprobs: int | None,
    grammar: GrammarSpec | None,
) -> SamplingParams:
    """A chat or completions request's SamplingParams (max_tokens None: the rest of the context)."""
    return to_sampling_params(
        req,
        max_tokens=fit_context(prompt_len, max_tokens, context_length, OPENAI_LIMIT),
        min_tokens=req.min_tokens,
        logit_bias=req.logit_bias,
        logprobs=logprobs,
        grammar=grammar,
    )


def native_params(
    sp: p.NativeSamplingParams,
    *,
    prompt_len: int,
    context_length: int,
    grammar: GrammarSpec | None,
) -> SamplingParams:
    """A /generate request's SamplingParams."""
    return to_sampling_params(
        sp,
        max_tokens=fit_context(prompt_len, sp.max_new_tokens, context_length, NATIVE_LIMIT),
        min_tokens=sp.min_new_tokens,
        grammar=grammar,
    )
