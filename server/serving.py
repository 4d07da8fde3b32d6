"""What every route shares: the engine, the server's options, and the checked steps from a
request to the engine's output stream (model name, images, grammar, queue limit, collecting).

Invariant: routes reach the engine only through this class and the engine's public API; a
request the engine cannot take is an HTTPError before anything is queued. Work that grows with a
request (tokenizing, compiling its grammar or stop strings) runs in worker threads.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from pyllama4 import Engine, SamplingParams
from pyllama4.detokenizer import compile_stops
from pyllama4.grammar import GrammarError, GrammarSpec
from pyllama4.multimodal.inputs import ImageInput, ImagePrompt
from pyllama4.multimodal.media import MediaError, MediaPolicy, load_image
from pyllama4.outputs import RequestOutput
from pyllama4.sampling_params import MAX_STOP_STRINGS, check_stop
from pyllama4.server import request_log
from pyllama4.server.asgi import HTTPError, Receive, cancel_on_disconnect
from pyllama4.server.sampling_defaults import SamplingDefaults
from pyllama4.server.tokenizing import TextCodec


@dataclass
class Serving:
    """The engine and the options it is served with (see App for their meaning)."""

    engine: Engine
    model: str
    context_length: int
    max_queued: int | None = None
    chat_template: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_images: int = 10
    tool_call_parser: str | None = None
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    created: int = field(default_factory=lambda: int(time.time()))
    stopping: bool = False  # set when the server starts shutting down

    @functools.cached_property
    def text(self) -> TextCodec:
        """The tokenizer's encode and decode for the routes, off the event loop."""
        return TextCodec(self.engine.tokenizer, self.context_length)

    def cut_short(self, final: RequestOutput) -> HTTPError | None:
        """The error for a request the server ended without its output, None for one that
        finished: 503 when the server is shutting down or cannot go on (a worker died), 500 for
        a failed step. The message never carries the cause's text (it may hold internal paths;
        the server log has it)."""
        reasons = {c.finish_reason for c in final.outputs}
        if not (final.error or reasons & {"abort", "error"}):
            return None
        if self.engine.failure is not None:
            message = f"the server cannot go on ({self.engine.failure}); retry on another server"
            return HTTPError(503, message, kind="service_unavailable")
        if final.error:
            cause = final.error.split(":", 1)[0]
            message = f"generation failed ({cause}); the server's log has the details"
            return HTTPError(500, message, kind="internal_error")
        message = "the server is shutting down; the request was cut before it finished"
        return HTTPError(503, message, kind="service_unavailable")

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise HTTPError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model!r}",
                kind="not_found_error",
                param="model",
            )

    def check_takes_images(self, param: str) -> None:
        if self.engine.images is None:
            raise HTTPError(
                400,
                "this server takes text only: image input needs a multimodal checkpoint served "
                "with --enable-multimodal",
                param=param,
            )

    async def with_images(
        self, prompt_ids: list[int], sources: list[str], param: str
    ) -> list[int] | ImagePrompt:
        """The prompt with its images fetched, decoded, tiled and expanded (if it has any)."""
        if not sources:
            return prompt_ids
        self.check_takes_images(param)
        if len(sources) > self.max_images:
            raise HTTPError(
                400,
                f"{len(sources)} images in one request; this server takes at most "
                f"{self.max_images} (--max-images-per-request)",
                param=param,
            )
        images: list[Any] = [None] * len(sources)
        errors: list[str] = []

        async def fetch(i: int) -> None:
            try:
                images[i] = await load_image(sources[i], self.media)
            except MediaError as e:
                errors.append(f"image {i + 1}: {e}")

        async with anyio.create_task_group() as tg:
            for i in range(len(sources)):
                tg.start_soon(fetch, i)
        if errors:
            raise HTTPError(400, sorted(errors)[0], param=param)
        config = self.engine.images.processor
        try:
            tiled = await anyio.to_thread.run_sync(
                lambda: [ImageInput.from_image(image, config) for image in images]
            )
            return self.engine.image_prompt(prompt_ids, tiled)
        except ValueError as e:
            raise HTTPError(400, str(e), param=param) from None

    async def compile_grammar(self, grammar: GrammarSpec | None, param: str) -> None:
        """Compiles a request's grammar off the event loop (cached); a bad one is a 400."""
        if grammar is None:
            return
        try:
            await self.engine.compile_grammar(grammar)
        except GrammarError as e:
            raise HTTPError(400, str(e), param=param) from None

    async def compile_stops(
        self, stop: str | list[str] | None, max_count: int = MAX_STOP_STRINGS
    ) -> None:
        """Checks a request's stop strings against the limits (a 400 naming "stop") and compiles
        them off the event loop (cached), so that submit() finds them ready."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        try:
            check_stop(stops, max_count)
        except ValueError as e:
            raise HTTPError(400, str(e), param="stop") from None
        if stops:
            await anyio.to_thread.run_sync(compile_stops, tuple(stops))

    def submit(
        self,
        prompt: list[int] | ImagePrompt,
        params: SamplingParams,
        stream: bool = False,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queues the request (a 503 at the queue limit or once the server is shutting down, a
        400 if the engine refuses it); with --log-requests its outputs come through the request
        log (stream: whether the client asked for a stream, for that log). request_id: the engine's
        id for it (None: the engine makes one)."""
        if self.stopping:
            raise HTTPError(503, "the server is shutting down", kind="service_unavailable")
        if self.max_queued is not None and self.engine.stats().num_waiting >= self.max_queued:
            raise HTTPError(
                503,
                "the server is at its queue limit; retry later",
                kind="server_overloaded",
                headers=[(b"retry-after", b"1")],
            )
        logged = request_log.CONFIG.level is not None
        ids = prompt.token_ids if isinstance(prompt, ImagePrompt) else prompt
        if logged:
            request_log.received(ids, params, stream)
        try:
            outputs = self.engine.submit(prompt, params, request_id)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        if not logged:
            return outputs
        return request_log.watched(outputs, ids, self.engine.tokenizer.decode)


def prompt_length(prompt: list[int] | ImagePrompt) -> int:
    return len(prompt.token_ids) if isinstance(prompt, ImagePrompt) else len(prompt)


async def collect(
    serving: Serving, outputs: AsyncIterator[RequestOutput], receive: Receive
) -> RequestOutput:
    """The request's final output; a client disconnect aborts it (499); a request the server
    cut short is its Serving.cut_short error."""
    final: RequestOutput | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
        async for out in outputs:
            final = out
        tg.cancel_scope.cancel()
    if final is None or not final.finished:
        raise HTTPError(499, "client disconnected")
    error = serving.cut_short(final)
    if error is not None:
        raise error
    return final
