"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

Invariants:
- A request becomes the chat request it stands for (pyllama4.server.responses_input) and goes
  the chat completions way: chat template, tool-call parser, grammar, the same checks. It is
  decoded, checked and mapped to SamplingParams before anything is queued; errors name the
  Responses field (input, text, max_output_tokens...), not chat's. Converting the input items
  (their cost grows with the request) runs in a worker thread, as templating does.
- A response is stored (store: true, the default) only once it finished (completed or
  incomplete); previous_response_id continues its conversation; an unknown id is a 404.
- A stream is server-sent events with `event:` names and no `[DONE]` line (as OpenAI's); a
  response the server cut short ends with response.failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import msgspec

from pyllama4.outputs import RequestOutput
from pyllama4.server import protocol as p
from pyllama4.server.asgi import (
    SSE_HEADERS,
    HTTPError,
    Receive,
    Send,
    cancel_on_disconnect,
    decode,
    respond,
)
from pyllama4.server.chat_prompt import render_chat
from pyllama4.server.request_ids import new_id
from pyllama4.server.response_store import ResponseStore, encoded_size
from pyllama4.server.responses_input import chat_request, input_messages, output_messages
from pyllama4.server.responses_output import draft_response, whole_response
from pyllama4.server.responses_protocol import DeletedResponse, Response, ResponsesRequest
from pyllama4.server.responses_stream import Event, ResponseEvents
from pyllama4.server.sampling import TokenLimit, fit_context, to_sampling_params
from pyllama4.server.serving import Serving, collect, prompt_length
from pyllama4.server.tools import RequestError, ToolPlan, grammar_of, plan_tools

# Chat's field names in errors, as a Responses request names them.
RESPONSES_PARAMS = {
    "messages": "input",
    "response_format": "text",
    "max_tokens": "max_output_tokens",
}
LIMIT = TokenLimit("input", "max_output_tokens", shows_total=True)


@dataclass(frozen=True)
class Prepared:
    """A request on its way: the engine's outputs and what the answer is built from."""

    outputs: AsyncIterator[RequestOutput]
    tools: ToolPlan
    conversation: list[p.ChatMessage]  # previous messages and the new input


@contextmanager
def responses_params() -> Iterator[None]:
    """Errors raised by the chat path, naming the Responses request's fields."""
    try:
        yield
    except HTTPError as e:
        e.param = RESPONSES_PARAMS.get(e.param or "", e.param)
        raise
    except RequestError as e:
        param = RESPONSES_PARAMS.get(e.param, e.param)
        raise HTTPError(400, str(e), param=param) from None


class ResponsesRoutes:
    def __init__(self, serving: Serving, store: ResponseStore):
        self.serving, self.store = serving, store

    async def create(self, body: bytes, send: Send, receive: Receive) -> None:
        """POST /v1/responses."""
        rid = new_id("resp_")
        req = await decode(body, ResponsesRequest)
        with responses_params():
            prepared = await self.prepare(req)
        draft = draft_response(req, rid, self.serving.model)
        if req.stream:
            events = self.stream(req, prepared, draft)
            await stream_events(send, receive, events)
            return
        final = await collect(self.serving, prepared.outputs, receive)
        response = whole_response(draft, final, prepared.tools)
        await self.keep(req, prepared, response)
        await respond(send, 200, msgspec.json.encode(response))

    async def prepare(self, req: ResponsesRequest) -> Prepared:
        """Checks the request, renders its conversation and queues it."""
        s = self.serving
        if req.model is not None:
            s.check_model(req.model)
        if req.background:
            raise HTTPError(400, "background: true is not supported", param="background")
        history = self.history(req.previous_response_id)
        conversation = history + await anyio.to_thread.run_sync(input_messages, req)
        chat = chat_request(req, s.model, conversation)
        tools = plan_tools(chat, s.tool_call_parser)
        grammar = grammar_of(chat)
        if tools.grammar is not None:
            if grammar is not None:
                raise HTTPError(
                    400,
                    "a required or named tool_choice cannot be combined with a JSON text.format",
                    param="tool_choice",
                )
            grammar = tools.grammar
        prompt_ids, sources = await render_chat(s, chat, tools)
        prompt = await s.with_images(prompt_ids, sources, "input")
        await s.compile_grammar(grammar, "tools" if tools.grammar is not None else "text")
        params = to_sampling_params(
            chat,
            max_tokens=fit_context(
                prompt_length(prompt), req.max_output_tokens, s.context_length, LIMIT
            ),
            min_tokens=0,
            grammar=grammar,
            names={"max_tokens": "max_output_tokens"},
            defaults=s.sampling_defaults,
        )
        return Prepared(s.submit(prompt, params, stream=req.stream), tools, conversation)

    def history(self, previous_response_id: str | None) -> list[p.ChatMessage]:
        """The stored conversation a request continues (none without previous_response_id)."""
        if previous_response_id is None:
            return []
        stored = self.store.get(previous_response_id)
        if stored is None:
            raise HTTPError(
                404,
                f"previous response {previous_response_id!r} not found (it was never stored, "
                "was deleted or was dropped from the server's store)",
                param="previous_response_id",
            )
        return list(stored.messages)

    async def keep(self, req: ResponsesRequest, prepared: Prepared, response: Response) -> None:
        """Stores a finished response (store: true), sized in a worker thread (the size grows
        with the conversation)."""
        if not req.store:
            return
        messages = prepared.conversation + output_messages(response.output)
        size = await anyio.to_thread.run_sync(encoded_size, response, messages)
        self.store.put(response, messages, size)

    async def stream(
        self, req: ResponsesRequest, prepared: Prepared, draft: Response
    ) -> AsyncIterator[Event]:
        """The response's events; a response the server cut short ends with response.failed."""
        events = ResponseEvents(draft, prepared.tools)
        for event in events.start():
            yield event
        async for out in prepared.outputs:
            c = out.outputs[0]
            error = self.serving.cut_short(out) if out.finished else None
            if error is not None:
                for event in events.fail(error):
                    yield event
                return
            for event in events.push(c.delta_text, finished=c.finished):
                yield event
            if out.finished:
                response, last = events.finish(out)
                await self.keep(req, prepared, response)
                for event in last:
                    yield event

    async def retrieve(self, response_id: str, body: bytes, send: Send, receive: Receive) -> None:
        """GET /v1/responses/{id}: a stored response."""
        stored = self.store.get(response_id)
        if stored is None:
            raise not_found(response_id)
        await respond(send, 200, msgspec.json.encode(stored.response))

    async def delete(self, response_id: str, body: bytes, send: Send, receive: Receive) -> None:
        """DELETE /v1/responses/{id}: forgets a stored response."""
        if not self.store.delete(response_id):
            raise not_found(response_id)
        await respond(send, 200, msgspec.json.encode(DeletedResponse(response_id)))


def not_found(response_id: str) -> HTTPError:
    return HTTPError(
        404, f"response {response_id!r} not found", kind="not_found_error", param="response_id"
    )


async def stream_events(send: Send, receive: Receive, events: AsyncIterator[Event]) -> None:
    """A 200 text/event-stream of `event: NAME` / `data: JSON` pairs. A client disconnect
    cancels the producer (which aborts the request); a send to a client gone away ends it."""
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
        try:
            async for name, data in events:
                chunk = b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away; leaving the stream aborted the request
        tg.cancel_scope.cancel()
