"""POST /generate: SGLang's native endpoint, one prompt or a batch, whole or streamed.

Invariants:
- Every prompt of a batch is checked (tokenized, fitted to the context, its grammar and stops
  compiled) before any is queued; if queueing one fails, those already queued are aborted.
- Every queued request ends: with its output, or aborted when the client goes away or the
  answer ends early (an error in another prompt of the batch).
- The answer is one object for one prompt with n == 1, else a list in SGLang's order (prompt by
  prompt, n completions each); streamed, each event is one completion's cumulative state, sent
  when it has grown or ended, with "index" (its place in that list) when the answer is a list.
- Logprob rendering (which decodes token texts and grows with the request) runs in a worker
  thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from pyllama4 import SamplingParams
from pyllama4.multimodal.inputs import ImagePrompt
from pyllama4.outputs import CompletionOutput, RequestOutput
from pyllama4.server import protocol as p
from pyllama4.server.asgi import (
    HTTPError,
    Receive,
    Send,
    cancel_on_disconnect,
    decode,
    error_body,
    respond,
    stream_sse,
)
from pyllama4.server.generate_batch import GenerateBatch, GenerateItem, split
from pyllama4.server.generate_meta import logprob_fields, native_output
from pyllama4.server.request_ids import new_id
from pyllama4.server.sampling import native_params
from pyllama4.server.serving import Serving, prompt_length
from pyllama4.server.tools import grammar_param, native_grammars, one_grammar

GENERATE_STREAM_HEADERS = [(b"content-type", b"text/event-stream")]
PARAMS = "sampling_params."  # how errors name a field of sampling_params


@dataclass
class Prepared:
    """One prompt, checked and ready to queue."""

    item: GenerateItem
    prompt: list[int] | ImagePrompt
    params: SamplingParams
    prompt_ids: list[int]
    scores_prompt: bool  # the engine returns prompt logprobs (positions after the first)
    ids: list[str]  # meta_info.id of each completion
    engine_id: str = ""


class GenerateRoute:
    def __init__(self, serving: Serving):
        self.serving = serving

    async def __call__(self, body: bytes, send: Send, receive: Receive) -> None:
        rid = new_id()  # the request's id in the log; a lone output's meta_info.id
        req = await decode(body, p.GenerateRequest)
        batch = split(req)
        lone_id = None if batch.listed else rid
        prepared = [await self.prepare(item, batch.prompt_field, lone_id) for item in batch.items]
        streams = self.submit_all(prepared, req.stream)
        if req.stream:
            events = self.events(batch, prepared, streams)
            await stream_sse(send, receive, events, headers=GENERATE_STREAM_HEADERS)
            return
        finals = await self.collect_all(prepared, streams, receive)
        results: list[dict[str, Any]] = []
        for prep, final in zip(prepared, finals, strict=True):
            results += await self.render(prep, final, final.outputs)
        await respond(send, 200, msgspec.json.encode(results if batch.listed else results[0]))

    async def prepare(self, item: GenerateItem, prompt_field: str, lone_id: str | None) -> Prepared:
        """The prompt's ids (with images) and SamplingParams; a 400 for anything invalid.
        lone_id: the output's id when it is the answer's only one (and has no rid)."""
        sp = item.params
        await self.serving.compile_stops(sp.stop)
        if item.text is not None:
            ids = await self.serving.text.encode(item.text, "text")
        else:
            ids = item.input_ids or []
        prompt = await self.serving.with_images(list(ids), item.images, "image_data")
        prompt_ids = prompt.token_ids if isinstance(prompt, ImagePrompt) else prompt
        grammar = one_grammar(native_grammars(sp, PARAMS))
        await self.serving.compile_grammar(grammar, grammar_param(sp, prefix=PARAMS))
        options = item.logprobs
        params = native_params(
            sp,
            prompt_len=prompt_length(prompt),
            prompt_field=prompt_field,
            context_length=self.serving.context_length,
            grammar=grammar,
            logprobs=None if options is None else options.top,
            defaults=self.serving.sampling_defaults,
        )
        scores_prompt = False
        if options is not None:
            start = options.start if options.start >= 0 else len(prompt_ids) - 1
            if start >= len(prompt_ids):
                raise HTTPError(
                    400,
                    f"logprob_start_len ({start}) must be below the prompt's {len(prompt_ids)} "
                    "tokens",
                    param="logprob_start_len",
                )
            scores_prompt = start + 1 < len(prompt_ids)
            if scores_prompt:  # the engine scores the positions after `start`
                params = dataclasses.replace(
                    params, prompt_logprobs=options.top, prompt_logprobs_start=start + 1
                )
        # SGLang gives each of n > 1 completions, and each prompt of a batch, a fresh id.
        ids_out = [item.rid or lone_id or uuid.uuid4().hex] if sp.n == 1 else []
        ids_out = ids_out or [uuid.uuid4().hex for _ in range(sp.n)]
        return Prepared(item, prompt, params, list(prompt_ids), scores_prompt, ids_out)

    def submit_all(
        self, prepared: list[Prepared], stream: bool
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queues every prompt; if one cannot be queued, aborts those that were."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for prep in prepared:
                prep.engine_id = f"generate-{uuid.uuid4().hex}"
                outputs = self.serving.submit(
                    prep.prompt, prep.params, request_id=prep.engine_id, stream=stream
                )
                streams.append(outputs)
        except HTTPError:
            self.abort(prepared[: len(streams)])
            raise
        return streams

    def abort(self, prepared: Sequence[Prepared]) -> None:
        """Ends the prompts' requests that still run (a no-op for those that ended)."""
        for prep in prepared:
            self.serving.engine.abort(prep.engine_id)

    async def collect_all(
        self,
        prepared: list[Prepared],
        streams: list[AsyncIterator[RequestOutput]],
        receive: Receive,
    ) -> list[RequestOutput]:
        """Each prompt's final output; a client disconnect aborts them all (499); a request the
        server cut short is its Serving.cut_short error."""
        finals: list[RequestOutput | None] = [None] * len(streams)

        async def drain(j: int) -> None:
            async for out in streams[j]:
                finals[j] = out

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
                async with anyio.create_task_group() as each:
                    for j in range(len(streams)):
                        each.start_soon(drain, j)
                tg.cancel_scope.cancel()
        finally:
            self.abort(prepared)
        done = [f for f in finals if f is not None and f.finished]
        if len(done) != len(finals):
            raise HTTPError(499, "client disconnected")
        for final in done:
            error = self.serving.cut_short(final)
            if error is not None:
                raise error
        return done

    async def events(
        self,
        batch: GenerateBatch,
        prepared: list[Prepared],
        streams: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[bytes]:
        """Each completion's state whenever it grew or ended; an error event ends the stream
        (and aborts the rest)."""
        offsets = batch.offsets()
        sent: dict[tuple[int, int], tuple[int, bool]] = {}
        try:
            async for j, out in merge(streams):
                error = self.serving.cut_short(out) if out.finished else None
                if error is not None:
                    yield error_body(error.status, error.message, error.kind)
                    return
                grown = [c for c in out.outputs if sent.get((j, c.index)) != _state(c)]
                for c in grown:
                    sent[(j, c.index)] = _state(c)
                for c, item in zip(grown, await self.render(prepared[j], out, grown), strict=True):
                    if batch.listed:
                        item["index"] = offsets[j] + c.index
                    yield msgspec.json.encode(item)
        finally:
            self.abort(prepared)

    async def render(
        self, prep: Prepared, out: RequestOutput, outputs: Sequence[CompletionOutput]
    ) -> list[dict[str, Any]]:
        """The completions' output objects (in a worker thread when they carry logprobs)."""
        if prep.item.logprobs is None:
            return [self.output(prep, out, c, {}) for c in outputs]
        return await anyio.to_thread.run_sync(self.render_logprobs, prep, out, outputs)

    def render_logprobs(
        self, prep: Prepared, out: RequestOutput, outputs: Sequence[CompletionOutput]
    ) -> list[dict[str, Any]]:
        options = prep.item.logprobs
        assert options is not None
        tokenizer = self.serving.engine.tokenizer
        texts: dict[int, str] = {}

        def text_of(token_id: int) -> str | None:
            if not options.text:
                return None
            if token_id not in texts:
                texts[token_id] = tokenizer.decode([token_id])
            return texts[token_id]

        scored = (out.prompt_logprobs or []) if prep.scores_prompt else []
        return [
            self.output(prep, out, c, logprob_fields(c, options, prep.prompt_ids, scored, text_of))
            for c in outputs
        ]

    def output(
        self, prep: Prepared, out: RequestOutput, c: CompletionOutput, extra: dict[str, Any]
    ) -> dict[str, Any]:
        return native_output(out, c, prep.ids[c.index], extra | self.spec_info(c))

    def spec_info(self, c: CompletionOutput) -> dict[str, Any]:
        """SGLang's speculative fields: verify steps and tokens per step (EAGLE3 only)."""
        if self.serving.engine.speculative is None:
            return {}
        steps = c.verify_steps
        length = len(c.token_ids) / steps if steps else 0.0
        return {"spec_verify_ct": steps, "spec_accept_length": length}


def _state(c: CompletionOutput) -> tuple[int, bool]:
    """What a streamed event of the completion reports: its length and whether it ended."""
    return len(c.token_ids), c.finished


async def merge(
    streams: Sequence[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The streams' outputs as they come, each with its stream's index; leaving early cancels
    the reads still pending."""
    pending = {asyncio.ensure_future(anext(s)): j for j, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                j = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[j]))] = j
                yield j, out
    finally:
        for task in pending:
            task.cancel()
