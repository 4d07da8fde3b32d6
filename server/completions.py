"""/v1/completions over a batch of prompts, with echo: one engine request per prompt, their
outputs merged into one response (or one stream) whose choices are ordered prompt-major.

Invariants: choice j of prompt i has index i * n + j, whole and streamed; usage sums every
prompt's; with echo each choice's text (and, with logprobs, its logprobs: the prompt's tokens
first, the first one without a logprob) starts with its prompt's, and a stream's first chunk of
each choice carries it. A batch is refused (400) before anything is queued when it is malformed
or too big; if the engine refuses one prompt, those queued before it are aborted. Tokenizing,
decoding and logprob text are made in worker threads.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from pyllama4 import SamplingParams
from pyllama4.outputs import RequestOutput
from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError, Receive, cancel_on_disconnect, error_body
from pyllama4.server.responses import CompletionChunks, completion_logprobs, finish_reason
from pyllama4.server.serving import Serving

MAX_BATCH_COMPLETIONS = 2048  # prompts * n in one request


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str | None  # the echoed text (None without echo)


async def read_prompts(serving: Serving, req: p.CompletionRequest) -> list[Prompt]:
    """The request's prompts, tokenized (a string) or checked (token ids), with their text when
    echoed; a 400 for a list that mixes kinds or a batch above MAX_BATCH_COMPLETIONS."""
    raw = req.prompt
    if isinstance(raw, str) or all(isinstance(x, int) for x in raw):
        batch: list[Any] = [raw]
    elif all(isinstance(x, str) for x in raw) or all(isinstance(x, list) for x in raw):
        batch = list(raw)
    else:
        raise HTTPError(
            400,
            "prompt: a string, a list of token ids, or a list of either (not mixed)",
            param="prompt",
        )
    if len(batch) * req.n > MAX_BATCH_COMPLETIONS:
        raise HTTPError(
            400,
            f"prompt: {len(batch)} prompts x n = {req.n} completions; at most "
            f"{MAX_BATCH_COMPLETIONS} in one request",
            param="prompt",
        )
    prompts = []
    vocab = serving.engine.vocab_size
    for item in batch:
        if isinstance(item, str):
            ids = await serving.text.encode(item, "prompt")
            text = item if req.echo else None
        else:
            ids = list(item)
            text = await serving.text.decode(ids, vocab, "prompt") if req.echo else None
        prompts.append(Prompt(ids, text))
    return prompts


def submit_all(
    serving: Serving, prompts: Sequence[Prompt], params: Sequence[SamplingParams], stream: bool
) -> list[AsyncIterator[RequestOutput]]:
    """Queues every prompt; if one is refused, the ones queued before it are aborted."""
    tag = uuid.uuid4().hex
    streams = []
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        try:
            streams.append(serving.submit(prompt.ids, sp, stream, f"cmpl-{tag}-{i}"))
        except HTTPError as e:
            for k in range(i):
                serving.engine.abort(f"cmpl-{tag}-{k}")
            param = "prompt" if e.status == 400 else e.param
            raise HTTPError(
                e.status, e.message, kind=e.kind, param=param, headers=e.headers
            ) from None
    return streams


async def merged(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[Any]:
    """(prompt index, output) of every stream as they come; leaving early aborts them all."""
    send, receive = anyio.create_memory_object_stream[tuple[int, RequestOutput]](math.inf)

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        async for out in stream:
            send.send_nowait((i, out))

    async with anyio.create_task_group() as tg:

        async def run_all() -> None:
            async with send:
                async with anyio.create_task_group() as pumps:
                    for i, stream in enumerate(streams):
                        pumps.start_soon(pump, i, stream)

        tg.start_soon(run_all)
        async with receive:
            async for item in receive:
                yield item


async def collect_all(
    serving: Serving, streams: Sequence[AsyncIterator[RequestOutput]], receive: Receive
) -> list[RequestOutput]:
    """Every prompt's final output; a client disconnect aborts them all (499); a request the
    server cut short is its Serving.cut_short error."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
        async for i, out in merged(streams):
            finals[i] = out
        tg.cancel_scope.cancel()
    done = [f for f in finals if f is not None and f.finished]
    if len(done) != len(finals):
        raise HTTPError(499, "client disconnected")
    for final in done:
        error = serving.cut_short(final)
        if error is not None:
            raise error
    return done


def choice_logprobs(
    tokenizer: Any, out: RequestOutput, c: Any, echo: bool, score_only: bool
) -> p.CompletionLogprobs:
    """A choice's logprobs: the prompt's tokens first with echo, then the generated ones."""
    generated = [] if score_only else list(c.logprobs or [])
    prompt = list(out.prompt_logprobs or []) if echo else []
    return completion_logprobs(tokenizer, prompt + generated, out.prompt_token_ids)


def build_choices(
    tokenizer: Any | None,
    finals: Sequence[RequestOutput],
    prompts: Sequence[Prompt],
    req: p.CompletionRequest,
) -> list[p.CompletionChoice]:
    """Every choice of the batch, prompt-major (run in a worker thread: it decodes tokens)."""
    score_only = req.max_tokens == 0
    choices = []
    for i, (out, prompt) in enumerate(zip(finals, prompts, strict=True)):
        for c in out.outputs:
            text = "" if score_only else c.text
            lp = None
            if tokenizer is not None:
                lp = choice_logprobs(tokenizer, out, c, req.echo, score_only)
            choices.append(
                p.CompletionChoice(
                    i * req.n + c.index,
                    (prompt.text or "") + text,
                    "length" if score_only else finish_reason(c),
                    lp,
                    None if score_only else c.stop_reason,
                )
            )
    return choices


def batch_usage(finals: Sequence[RequestOutput], score_only: bool) -> p.Usage:
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    generated = 0 if score_only else sum(len(c.token_ids) for f in finals for c in f.outputs)
    cached = sum(f.cached_tokens for f in finals)
    return p.Usage(prompt, generated, prompt + generated, {"cached_tokens": cached})


async def chunk_events(
    serving: Serving,
    streams: Sequence[AsyncIterator[RequestOutput]],
    chunks: CompletionChunks,
    req: p.CompletionRequest,
) -> AsyncIterator[bytes]:
    """A stream's events: every prompt's chunks as they come, then the usage chunk (summed) if
    asked for; a request the server cut short ends the stream with an error event."""
    finals: list[RequestOutput] = []
    async for i, out in merged(streams):
        error = serving.cut_short(out) if out.finished else None
        if error is not None:
            yield error_body(error.status, error.message, error.kind)
            return
        for c in out.outputs:
            if chunks.needs_echo(i, c):  # the prompt's text and logprobs: O(prompt)
                chunk = await anyio.to_thread.run_sync(chunks.chunk, i, out, c)
            else:
                chunk = chunks.chunk(i, out, c)
            if chunk is not None:
                yield msgspec.json.encode(chunk)
        if out.finished:
            finals.append(out)
    if req.stream_options and req.stream_options.include_usage:
        yield msgspec.json.encode(chunks.usage_chunk(batch_usage(finals, req.max_tokens == 0)))
