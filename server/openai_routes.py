"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models.

Invariant: a request is decoded, checked and mapped to SamplingParams before anything is
queued; a streamed response ends with an error event if generation failed, else with the usage
chunk when stream_options.include_usage asks for it, then `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec

from pyllama4.outputs import RequestOutput
from pyllama4.sampling_params import OPENAI_MAX_STOP_STRINGS
from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError, Receive, Send, decode, error_body, respond, stream_sse
from pyllama4.server.chat_prompt import render_chat
from pyllama4.server.completions import (
    batch_usage,
    build_choices,
    collect_all,
    read_prompts,
    submit_all,
)
from pyllama4.server.completions import chunk_events as completion_events
from pyllama4.server.request_ids import new_id
from pyllama4.server.responses import (
    ChatChunks,
    CompletionChunks,
    chat_logprobs,
    chat_message,
    usage,
)
from pyllama4.server.sampling import openai_params
from pyllama4.server.serving import Serving, collect, prompt_length
from pyllama4.server.tools import grammar_of, grammar_param, plan_tools


class OpenAIRoutes:
    def __init__(self, serving: Serving):
        self.serving = serving

    async def models(self, body: bytes, send: Send, receive: Receive) -> None:
        s = self.serving
        card = p.ModelCard(s.model, s.created, root=s.model, max_model_len=s.context_length)
        await respond(send, 200, msgspec.json.encode(p.ModelList([card])))

    async def chat_completions(self, body: bytes, send: Send, receive: Receive) -> None:
        s = self.serving
        rid = new_id("chatcmpl-")
        req = await decode(body, p.ChatCompletionRequest)
        s.check_model(req.model)
        tools = plan_tools(req, s.tool_call_parser)
        grammar = grammar_of(req)
        if tools.grammar is not None:
            if grammar is not None:
                raise HTTPError(
                    400,
                    "a required or named tool_choice cannot be combined with response_format, "
                    "regex, ebnf or json_schema",
                    param="tool_choice",
                )
            grammar = tools.grammar
        await s.compile_stops(req.stop, OPENAI_MAX_STOP_STRINGS)
        prompt_ids, sources = await render_chat(s, req, tools)
        prompt = await s.with_images(prompt_ids, sources, "messages")
        await s.compile_grammar(grammar, grammar_param(req, tools))
        if req.top_logprobs is not None and not req.logprobs:
            raise HTTPError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        params = openai_params(
            req,
            prompt_len=prompt_length(prompt),
            context_length=s.context_length,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            grammar=grammar,
            defaults=s.sampling_defaults,
        )
        outputs = s.submit(prompt, params, stream=req.stream)
        tokenizer = s.engine.tokenizer if req.logprobs else None
        if req.stream:
            chunks = ChatChunks(rid, int(time.time()), s.model, tools, tokenizer)
            await stream_sse(send, receive, chunk_events(s, outputs, chunks, req))
            return
        final = await collect(s, outputs, receive)
        choices = []
        for c in final.outputs:
            message, reason = chat_message(c, tools)
            lp = chat_logprobs(tokenizer, c.logprobs) if tokenizer is not None else None
            choices.append(p.ChatChoice(c.index, message, reason, lp, c.stop_reason))
        body = p.ChatCompletion(rid, int(time.time()), s.model, choices, usage(final))
        await respond(send, 200, msgspec.json.encode(body))

    async def completions(self, body: bytes, send: Send, receive: Receive) -> None:
        s = self.serving
        rid = new_id("cmpl-")
        req = await decode(body, p.CompletionRequest)
        s.check_model(req.model)
        grammar = grammar_of(req)
        await s.compile_stops(req.stop, OPENAI_MAX_STOP_STRINGS)
        await s.compile_grammar(grammar, grammar_param(req))
        prompts = await read_prompts(s, req)
        params = [
            openai_params(
                req,
                prompt_len=len(prompt.ids),
                context_length=s.context_length,
                logprobs=req.logprobs,
                grammar=grammar,
                defaults=s.sampling_defaults,
            )
            for prompt in prompts
        ]
        streams = submit_all(s, prompts, params, stream=req.stream)
        tokenizer = s.engine.tokenizer if req.logprobs is not None else None
        if req.stream:
            echo = [prompt.text or "" for prompt in prompts] if req.echo else None
            chunks = CompletionChunks(
                rid,
                int(time.time()),
                s.model,
                tokenizer,
                n=req.n,
                echo=echo,
                score_only=req.max_tokens == 0,
            )
            await stream_sse(send, receive, completion_events(s, streams, chunks, req))
            return
        finals = await collect_all(s, streams, receive)
        choices = await anyio.to_thread.run_sync(build_choices, tokenizer, finals, prompts, req)
        usage_ = batch_usage(finals, req.max_tokens == 0)
        body = p.Completion(rid, int(time.time()), s.model, choices, usage_)
        await respond(send, 200, msgspec.json.encode(body))


async def chunk_events(
    serving: Serving, outputs: AsyncIterator[RequestOutput], chunks: ChatChunks, req: Any
) -> AsyncIterator[bytes]:
    """A stream's events: each output's chunks, then the usage chunk if asked for; a request
    the server cut short ends with an error event instead of its last chunks."""
    async for out in outputs:
        error = serving.cut_short(out) if out.finished else None
        if error is not None:
            yield error_body(error.status, error.message, error.kind)
            return
        for c in out.outputs:
            chunk = chunks.chunk(c)
            if chunk is not None:
                yield msgspec.json.encode(chunk)
        if out.finished and req.stream_options and req.stream_options.include_usage:
            yield msgspec.json.encode(chunks.usage_chunk(out))
