"""From a protocol request to SamplingParams: the one mapping and the one context-length check
that chat, completions and /generate all go through.

Invariant: a request whose prompt plus output budget does not fit the context length, whose
sampling fields SamplingParams rejects, or that asks for a completions option the server does
not support, is a 400 naming the field; nothing invalid reaches the engine. An unset output
budget (max_tokens, max_completion_tokens, max_new_tokens) is all the room the context leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from pyllama4 import SamplingParams
from pyllama4.grammar import GrammarSpec
from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError
from pyllama4.server.sampling_defaults import SamplingDefaults

OPENAI_DEFAULTS = SamplingDefaults()
_T = TypeVar("_T")


class SamplingFields(Protocol):
    """The sampling fields OpenAI's requests and SGLang's sampling_params share."""

    n: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float | None
    seed: int | None
    stop: str | list[str] | None
    stop_token_ids: list[int] | None
    ignore_eos: bool
    skip_special_tokens: bool


@dataclass(frozen=True)
class TokenLimit:
    """How a request spells its prompt and its output budget in context-length errors."""

    prompt: str  # the request field the prompt comes from
    field: str  # the request field the budget comes from
    shows_total: bool  # the error states prompt + budget
    logprobs: str = "logprobs"  # the request field the number of top logprobs comes from


def fit_context(
    prompt_len: int, max_tokens: int | None, context_length: int, limit: TokenLimit
) -> int:
    """The output budget: `max_tokens` if prompt + max_tokens fits the context, all the room the
    prompt leaves if max_tokens is None; otherwise a 400."""
    room = context_length - prompt_len
    if room < 1:
        raise HTTPError(
            400,
            f"the prompt has {prompt_len} tokens; the context length is {context_length}",
            param=limit.prompt,
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
    names: dict[str, str] | None = None,
    defaults: SamplingDefaults = OPENAI_DEFAULTS,
) -> SamplingParams:
    """SamplingParams from a request's fields, `defaults` for those it leaves unset; an invalid
    one is a 400 naming the field (names: the request's name for a SamplingParams field, where
    they differ)."""
    stop = [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])
    bias = {int(k): v for k, v in (logit_bias or {}).items()}  # keys: digits (protocol.TokenIdKey)
    try:
        return SamplingParams(
            n=fields.n,
            temperature=_or(fields.temperature, defaults.temperature),
            top_p=_or(fields.top_p, defaults.top_p),
            top_k=_or(fields.top_k, defaults.top_k),
            min_p=_or(fields.min_p, defaults.min_p),
            frequency_penalty=fields.frequency_penalty,
            presence_penalty=fields.presence_penalty,
            repetition_penalty=_or(fields.repetition_penalty, defaults.repetition_penalty),
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
        field = str(e).split(":")[0]
        raise HTTPError(400, str(e), param=(names or {}).get(field, field)) from None


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def check_supported(req: p.CompletionRequest) -> None:
    """A 400 naming the first completions option that asks for what the server does not do."""
    if req.max_tokens == 0 and not req.echo:
        raise HTTPError(
            400, "max_tokens: must be >= 1 (0 only with echo: true)", param="max_tokens"
        )
    if req.suffix:
        raise HTTPError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of not in (1, req.n):
        raise HTTPError(400, "best_of other than n is not supported", param="best_of")


def openai_limit(
    req: p.ChatCompletionRequest | p.CompletionRequest,
) -> tuple[int | None, TokenLimit]:
    """The output budget the request asks for (None: the rest of the context) and how its errors
    name it: max_completion_tokens wins over max_tokens when both are set."""
    if isinstance(req, p.CompletionRequest):  # max_tokens 0 (echo) still samples one token
        budget = None if req.max_tokens is None else max(req.max_tokens, 1)
        return budget, TokenLimit("prompt", "max_tokens", shows_total=True)
    if req.max_completion_tokens is not None:
        field, max_tokens = "max_completion_tokens", req.max_completion_tokens
    else:
        field, max_tokens = "max_tokens", req.max_tokens
    return max_tokens, TokenLimit("messages", field, shows_total=True, logprobs="top_logprobs")


def openai_params(
    req: p.ChatCompletionRequest | p.CompletionRequest,
    *,
    prompt_len: int,
    context_length: int,
    logprobs: int | None,
    grammar: GrammarSpec | None,
    defaults: SamplingDefaults = OPENAI_DEFAULTS,
) -> SamplingParams:
    """A chat or completions request's SamplingParams; a completions request with echo and
    logprobs asks for the prompt's logprobs too."""
    if isinstance(req, p.CompletionRequest):
        check_supported(req)
    max_tokens, limit = openai_limit(req)
    params = to_sampling_params(
        req,
        max_tokens=fit_context(prompt_len, max_tokens, context_length, limit),
        min_tokens=req.min_tokens,
        logit_bias=req.logit_bias,
        logprobs=logprobs,
        grammar=grammar,
        names={"max_tokens": limit.field, "logprobs": limit.logprobs},
        defaults=defaults,
    )
    if isinstance(req, p.CompletionRequest) and req.echo and logprobs is not None:
        params.prompt_logprobs = logprobs
    return params


def native_params(
    sp: p.NativeSamplingParams,
    *,
    prompt_len: int,
    prompt_field: str,
    context_length: int,
    grammar: GrammarSpec | None,
    logprobs: int | None = None,
    defaults: SamplingDefaults = OPENAI_DEFAULTS,
) -> SamplingParams:
    """A /generate request's SamplingParams; prompt_field: "text" or "input_ids"; logprobs: the
    top logprobs per output token (None: no logprobs)."""
    limit = TokenLimit(prompt_field, "max_new_tokens", shows_total=False)
    return to_sampling_params(
        sp,
        max_tokens=fit_context(prompt_len, sp.max_new_tokens, context_length, limit),
        min_tokens=sp.min_new_tokens,
        logprobs=logprobs,
        grammar=grammar,
        names={
            "max_tokens": "max_new_tokens",
            "min_tokens": "min_new_tokens",
            "logprobs": "top_logprobs_num",
        },
        defaults=defaults,
    )
