"""Per-request log lines (--log-requests): `Receive:` as a request is queued, `Finish:` when
it ends (or `Abort:` when its client left first), `Error:` for every error answer.

Invariants: each line carries the request's id (request_ids: its response's id); a request's
Receive line comes before any batch line that computes it. What a line holds follows SGLang's
--log-requests-level: 0 metadata only; 1 adds the sampling parameters; 2 adds the stop strings
and (on the Finish line) the prompt and output text, each cut to its first and last 1024
characters; 3 the whole text. With it off only server errors (status 500 and above) are
logged, and a request's outputs reach its route untouched; with it on, the only work on the
event loop is formatting two lines per request (the prompt's text, at levels 2 and 3, is
decoded in a worker thread).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from pyllama4 import SamplingParams
from pyllama4.outputs import RequestOutput
from pyllama4.server import request_ids
from pyllama4.server.asgi import Receive, Scope, Send

if TYPE_CHECKING:
    from pyllama4.server.request_ids import ASGIApp

log = logging.getLogger("pyllama4.requests")
LEVELS = (0, 1, 2, 3)
DEFAULT_LEVEL = 1  # metadata and sampling parameters: no prompt or output text
TRUNCATE = 2048  # level 2 keeps the first and last half of this many characters
ERROR_BODY_BYTES = 8192  # larger error bodies are logged without their message
ALWAYS = ("temperature", "top_p", "top_k", "max_tokens")  # the sampling parameters always shown
TEXT = {"stop"}  # lists of the user's text (levels 2 and 3)
SKIPPED = {"n", "grammar", "logit_bias"}  # n has its own field; the others are summarized
_DEFAULTS = SamplingParams()


@dataclass
class RequestLogConfig:
    level: int | None = None  # None: no per-request lines


CONFIG = RequestLogConfig()


def configure(enabled: bool, level: int = DEFAULT_LEVEL) -> None:
    """Turns the per-request lines on (at `level`) or off."""
    CONFIG.level = level if enabled else None


def clip(text: str, level: int) -> str:
    """The text as logged at `level` (repr-quoted; at level 2 its two ends around ` ... `)."""
    if level >= 3 or len(text) <= TRUNCATE:
        return repr(text)
    half = TRUNCATE // 2
    return f"{text[:half]!r} ... {text[-half:]!r}"


def sampling_text(params: SamplingParams, level: int) -> str:
    """The parameters that matter: the usual four, and every other one not at its default."""
    shown = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.name in SKIPPED or (f.name in TEXT and level < 2):
            continue
        if f.name in TEXT and value:
            shown.append(f"{f.name}: [{', '.join(clip(text, level) for text in value)}]")
        elif f.name in ALWAYS or value != getattr(_DEFAULTS, f.name):
            shown.append(f"{f.name}: {value!r}")
    if params.grammar is not None:
        shown.append(f"grammar: {params.grammar.kind}")
    if params.logit_bias:
        shown.append(f"logit_bias: {len(params.logit_bias)} tokens")
    return "{" + ", ".join(shown) + "}"


def received_line(
    rid: str,
    route: str,
    prompt_tokens: int,
    params: SamplingParams,
    stream: bool,
    level: int,
) -> str:
    line = (
        f"Receive: id={rid}, route={route}, prompt_tokens={prompt_tokens}, n={params.n}, "
        f"stream={stream}"
    )
    if level >= 1:
        line += f", sampling_params={sampling_text(params, level)}"
    return line


def finished_line(rid: str, final: RequestOutput, level: int, prompt: str | None = None) -> str:
    reasons = ",".join(str(c.finish_reason) for c in final.outputs)
    tokens = sum(len(c.token_ids) for c in final.outputs)
    m = final.metrics
    line = (
        f"Finish: id={rid}, finish_reason={reasons}, prompt_tokens={len(final.prompt_token_ids)}, "
        f"completion_tokens={tokens}, cached_tokens={final.cached_tokens}, "
        f"e2e_latency={_seconds(m.e2e)}, ttft={_seconds(m.ttft)}"
    )
    if final.error:
        line += f", error={final.error!r}"
    if level >= 2 and prompt is not None:
        line += f", prompt={clip(prompt, level)}"
    if level >= 2:
        texts = [clip(c.text, level) for c in final.outputs]
        line += f", output={texts[0] if len(texts) == 1 else '[' + ', '.join(texts) + ']'}"
    return line


def aborted_line(rid: str, last: RequestOutput | None) -> str:
    tokens = 0 if last is None else sum(len(c.token_ids) for c in last.outputs)
    return f"Abort: id={rid}, the client left before the end, completion_tokens={tokens}"


def error_line(rid: str, route: str, status: int, body: bytes) -> str:
    kind, message = _error_of(body)
    return f"Error: id={rid}, route={route}, status={status}, type={kind}, message={message!r}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _error_of(body: bytes) -> tuple[str, str]:
    """An OpenAI error body's type and message ("-" for what it does not hold)."""
    try:
        error = json.loads(body)["error"] if len(body) <= ERROR_BODY_BYTES else {}
    except (ValueError, KeyError, TypeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    return str(error.get("type", "-")), str(error.get("message", "-"))


def received(prompt_ids: Sequence[int], params: SamplingParams, stream: bool) -> None:
    """The Receive line of the request being served, before it is queued."""
    level = CONFIG.level if CONFIG.level is not None else DEFAULT_LEVEL
    rid, route = _request()
    line = received_line(rid, route, len(prompt_ids), params, stream, level)
    log.info(line, extra={"request_id": rid})


async def watched(
    outputs: AsyncIterator[RequestOutput],
    prompt_ids: Sequence[int],
    decode: Callable[[list[int]], str],
) -> AsyncIterator[RequestOutput]:
    """The request's outputs, its Finish (or Abort) line last; at levels 2 and 3 the Finish
    line holds the prompt's text, decoded in a worker thread before the first output."""
    level = CONFIG.level if CONFIG.level is not None else DEFAULT_LEVEL
    rid, _ = _request()
    prompt = None
    if level >= 2:
        prompt = await anyio.to_thread.run_sync(decode, list(prompt_ids))
    last: RequestOutput | None = None
    try:
        async for out in outputs:
            last = out
            yield out
    finally:
        extra = {"request_id": rid}
        if last is not None and last.finished:
            log.info(finished_line(rid, last, level, prompt), extra=extra)
        else:
            log.info(aborted_line(rid, last), extra=extra)
            with anyio.CancelScope(shield=True):
                await outputs.aclose()  # type: ignore[attr-defined]


def _request() -> tuple[str, str]:
    """The id and route of the request being served ("-" outside one)."""
    tag = request_ids.current()
    return request_ids.current_id() or "-", tag.route if tag is not None else "-"


def logged(app: ASGIApp) -> ASGIApp:
    """`app` with request ids (request_ids.tagged) and an Error line for each error answer
    (status 400 and above): with --log-requests at INFO, else only server errors (500 and above)
    at WARNING."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        status = 0

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                _log_error(status, message.get("body", b""))
                status = 0  # one line per answer
            await send(message)

        await app(scope, receive, watch)

    return request_ids.tagged(serve)


def _log_error(status: int, body: bytes) -> None:
    if CONFIG.level is None and status < 500:
        return
    rid, route = _request()
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(level, error_line(rid, route, status, body), extra={"request_id": rid})
