"""The ASGI app: OpenAI-compatible endpoints over pyllama4.Engine (raw ASGI, msgspec, anyio).

Invariants:
- Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}} with the
  right status; a bad request never reaches the engine, never disturbs another request and
  never stops the server.
- Every request the engine accepted ends: with its output, with an error event on its stream,
  or aborted the moment its client disconnects (its KV pages are freed at once).
- The engine's step loop runs for the app's lifetime (ASGI lifespan); shutdown lets in-flight
  requests finish within a timeout, then aborts the rest.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pyllama4 import Engine, SamplingParams
from pyllama4.grammar import GrammarError, GrammarSpec
from pyllama4.multimodal.inputs import ImageInput, ImagePrompt
from pyllama4.multimodal.media import MediaError, MediaPolicy, load_image
from pyllama4.outputs import RequestOutput
from pyllama4.server import protocol as p
from pyllama4.server.tool_parser import ToolCall, ToolCallStream, parse_tool_calls
from pyllama4.server.tools import (
    RequestError,
    ToolPlan,
    grammar_of,
    native_grammars,
    one_grammar,
    plan_tools,
    template_message,
)

log = logging.getLogger("pyllama4.server")

MAX_BODY_BYTES = 64 << 20  # room for a few base64 images
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or []


def error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    return msgspec.json.encode(p.ErrorResponse(p.ErrorDetail(message, kind, param, status)))


class _EngineCollector:
    """Prometheus view of the engine's statistics, read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        gauges = {
            "num_running_reqs": ("Requests running", s.num_running),
            "num_queue_reqs": ("Requests waiting", s.num_waiting),
            "global_pages_used": ("Global-pool KV pages held or cached", s.global_pages_used),
            "global_pages_total": ("Global-pool KV pages", s.global_pages_total),
            "local_pages_used": ("Chunk-local KV pages held or cached", s.local_pages_used),
            "local_pages_total": ("Chunk-local KV pages", s.local_pages_total),
            "token_usage": ("Fraction of global KV pages in use", s.kv_usage),
            "cache_hit_rate": ("Prompt tokens served by the prefix cache", s.cache_hit_rate),
            "spec_accept_length": (
                "Mean tokens per EAGLE3 verify step (accepted drafts + 1)",
                s.spec_accept_length,
            ),
        }
        gauges["pages_held_by_requests"] = ("Global KV pages held by requests", s.global_pages_held)
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"pyllama4_{name}", doc, value=value)
        counters = {
            "prompt_tokens": ("Prompt tokens admitted", s.prompt_tokens),
            "cached_prompt_tokens": ("Prompt tokens from the prefix cache", s.cached_prompt_tokens),
            "generation_tokens": ("Tokens generated", s.generation_tokens),
            "retractions": ("Requests retracted for lack of KV pages", s.num_retractions),
            "images_encoded": ("Images run through the vision tower", s.images_encoded),
            "spec_verify_steps": ("EAGLE3 verify steps (per request)", s.spec_verify_steps),
            "spec_accepted_tokens": ("Tokens from EAGLE3 verify steps", s.spec_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"pyllama4_{name}", doc, value=value)


class App:
    def __init__(
        self,
        engine: Engine,
        *,
        served_model_name: str,
        context_length: int,
        api_key: str | None = None,
        max_queued_requests: int | None = None,
        chat_template: str | None = None,
        media: MediaPolicy | None = None,
        max_images_per_request: int = 10,
        tool_call_parser: str | None = None,
    ):
        """media: how image references are fetched and decoded (for an engine with images);
        tool_call_parser: "pythonic" turns tool-call outputs into tool_calls (None: off)."""
        self.engine = engine
        self.tool_call_parser = tool_call_parser
        self.media = media or MediaPolicy()
        self.max_images = max_images_per_request
        self.model = served_model_name
        self.context_length = context_length
        self.api_key = api_key
        self.max_queued = max_queued_requests
        self.chat_template = chat_template
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.in_flight = 0
        self.routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.health,
            ("GET", "/health_generate"): self.health_generate,
            ("GET", "/metrics"): self.metrics,
            ("POST", "/generate"): self.generate,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
            ("GET", "/get_model_info"): self.model_info,
            ("GET", "/get_server_info"): self.server_info,
            ("GET", "/openapi.json"): self.openapi,
        }

    # ---- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.engine.run)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await self.shutdown(30.0)
            tg.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    async def shutdown(self, timeout: float) -> None:
        """Lets in-flight requests finish for up to `timeout` seconds, then aborts the rest."""
        with anyio.move_on_after(timeout):
            while self.in_flight:
                await anyio.sleep(0.05)
        aborted = self.engine.abort_all()
        if aborted:
            log.warning(
                "shutdown: aborted %d requests still running after %.0f s", aborted, timeout
            )

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        handler = self.routes.get((scope["method"], scope["path"]))
        try:
            if handler is None:
                known = {path for _, path in self.routes}
                status = 405 if scope["path"] in known else 404
                kind = "not_found_error" if status == 404 else "invalid_request_error"
                message = f"{scope['method']} {scope['path']} is not an endpoint"
                raise HTTPError(status, message, kind=kind)
            if self.api_key and scope["path"].startswith("/v1/"):
                self.check_key(scope)
            body = await read_body(receive) if scope["method"] == "POST" else b""
            self.in_flight += 1
            try:
                await handler(body, tracked_send, receive)
            finally:
                self.in_flight -= 1
        except HTTPError as e:
            if not started:
                body = error_body(e.status, e.message, e.kind, e.param)
                await respond(send, e.status, body, headers=e.headers)
        except Exception as e:  # noqa: BLE001 - the server never dies on a request
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                body = error_body(500, f"internal error: {type(e).__name__}: {e}", "internal_error")
                await respond(send, 500, body)

    def check_key(self, scope: Scope) -> None:
        headers = dict(scope["headers"])
        if headers.get(b"authorization", b"").decode() != f"Bearer {self.api_key}":
            raise HTTPError(401, "missing or wrong API key", kind="authentication_error")

    # ---- endpoints ----------------------------------------------------------------------------

    async def health(self, body: bytes, send: Send, receive: Receive) -> None:
        if self.engine.failure is not None:
            raise HTTPError(503, self.engine.failure, kind="service_unavailable")
        await respond(send, 200, b"{}")

    async def health_generate(self, body: bytes, send: Send, receive: Receive) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        async for _ in self.engine.submit([self.engine.tokenizer.eos_token_id or 0], params):
            pass
        await respond(send, 200, b"{}")

    async def metrics(self, body: bytes, send: Send, receive: Receive) -> None:
        await respond(
            send, 200, generate_latest(self.registry), content_type=b"text/plain; version=0.0.4"
        )

    async def models(self, body: bytes, send: Send, receive: Receive) -> None:
        card = p.ModelCard(
            self.model, self.created, root=self.model, max_model_len=self.context_length
        )
        await respond(send, 200, msgspec.json.encode(p.ModelList([card])))

    async def chat_completions(self, body: bytes, send: Send, receive: Receive) -> None:
        req = decode(body, p.ChatCompletionRequest)
        self.check_model(req.model)
        try:
            tools = plan_tools(req, self.tool_call_parser)
            grammar = grammar_of(req)
        except RequestError as e:
            raise HTTPError(400, str(e), param=e.param) from None
        if tools.grammar is not None:
            if grammar is not None:
                raise HTTPError(
                    400,
                    "a required or named tool_choice cannot be combined with response_format, "
                    "regex, ebnf or json_schema",
                    param="tool_choice",
                )
            grammar = tools.grammar
        prompt_ids, sources = self.render_chat(req, tools)
        prompt = await self.with_images(prompt_ids, sources, "messages")
        await self.compile_grammar(grammar, "response_format")
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise HTTPError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        params = self.sampling_params(
            req, prompt_length(prompt), max_tokens, (top or 0) if req.logprobs else None, grammar
        )
        outputs = self.submit(prompt, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            await self.stream(send, receive, outputs, rid, req, chat=True, tools=tools.names)
            return
        final = await self.collect(outputs, receive)
        choices = []
        for c in final.outputs:
            message, reason = chat_message(c, tools)
            lp = self.chat_logprobs(c.logprobs) if req.logprobs else None
            choices.append(p.ChatChoice(c.index, message, reason, lp, c.stop_reason))
        body = p.ChatCompletion(rid, int(time.time()), self.model, choices, usage(final))
        await respond(send, 200, msgspec.json.encode(body))

    async def completions(self, body: bytes, send: Send, receive: Receive) -> None:
        req = decode(body, p.CompletionRequest)
        self.check_model(req.model)
        try:
            grammar = grammar_of(req)
        except RequestError as e:
            raise HTTPError(400, str(e), param=e.param) from None
        await self.compile_grammar(grammar, "response_format")
        if isinstance(req.prompt, str):
            prompt_ids = self.engine.tokenize(req.prompt)
        else:
            prompt_ids = list(req.prompt)
        params = self.sampling_params(
            req, len(prompt_ids), req.max_tokens or 16, req.logprobs, grammar
        )
        outputs = self.submit(prompt_ids, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            await self.stream(send, receive, outputs, rid, req, chat=False)
            return
        final = await self.collect(outputs, receive)
        choices = [
            p.CompletionChoice(
                c.index,
                c.text,
                finish_reason(c),
                self.completion_logprobs(c.logprobs) if req.logprobs is not None else None,
                c.stop_reason,
            )
            for c in final.outputs
        ]
        body = p.Completion(rid, int(time.time()), self.model, choices, usage(final))
        await respond(send, 200, msgspec.json.encode(body))

    async def generate(self, body: bytes, send: Send, receive: Receive) -> None:
        """SGLang's native endpoint: cumulative text when streaming, meta_info per output."""
        req = decode(body, p.GenerateRequest)
        if (req.text is None) == (req.input_ids is None):
            raise HTTPError(400, "give exactly one of text and input_ids", param="text")
        prompt_ids = self.engine.tokenize(req.text) if req.text is not None else req.input_ids
        sources = [req.image_data] if isinstance(req.image_data, str) else req.image_data or []
        prompt = await self.with_images(list(prompt_ids), sources, "image_data")
        length = prompt_length(prompt)
        sp = req.sampling_params or p.NativeSamplingParams()
        try:
            grammar = one_grammar(native_grammars(sp))
        except RequestError as e:
            raise HTTPError(400, str(e), param=e.param) from None
        await self.compile_grammar(grammar, "sampling_params")
        stop = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        if sp.max_new_tokens + length > self.context_length:
            raise HTTPError(
                400,
                f"prompt ({length} tokens) + max_new_tokens "
                f"({sp.max_new_tokens}) exceeds the context length "
                f"{self.context_length}",
                param="max_new_tokens",
            )
        try:
            params = SamplingParams(
                n=sp.n,
                temperature=sp.temperature,
                top_p=sp.top_p,
                top_k=sp.top_k,
                min_p=sp.min_p,
                frequency_penalty=sp.frequency_penalty,
                presence_penalty=sp.presence_penalty,
                repetition_penalty=sp.repetition_penalty,
                max_tokens=sp.max_new_tokens,
                min_tokens=sp.min_new_tokens,
                stop=stop,
                stop_token_ids=list(sp.stop_token_ids or []),
                ignore_eos=sp.ignore_eos,
                skip_special_tokens=sp.skip_special_tokens,
                seed=sp.seed,
                grammar=grammar,
            )
        except ValueError as e:
            raise HTTPError(400, str(e), param=str(e).split(":")[0]) from None
        outputs = self.submit(prompt, params)
        rid = uuid.uuid4().hex

        def spec_info(c: Any) -> dict[str, Any]:
            """SGLang's speculative fields: verify steps and tokens per step (EAGLE3 only)."""
            if self.engine.speculative is None:
                return {}
            steps = c.verify_steps
            length = len(c.token_ids) / steps if steps else 0.0
            return {"spec_verify_ct": steps, "spec_accept_length": length}

        def native(out: RequestOutput) -> list[dict[str, Any]]:
            return [
                {
                    "text": c.text,
                    "output_ids": c.token_ids,
                    "meta_info": {
                        "id": rid,
                        "finish_reason": None
                        if not c.finished
                        else {"type": finish_reason(c), "matched": c.stop_reason},
                        "prompt_tokens": len(out.prompt_token_ids),
                        "completion_tokens": len(c.token_ids),
                        "cached_tokens": out.cached_tokens,
                        **spec_info(c),
                    },
                }
                for c in out.outputs
            ]

        if not req.stream:
            final = await self.collect(outputs, receive)
            result = native(final)
            await respond(send, 200, msgspec.json.encode(result[0] if sp.n == 1 else result))
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                async for out in outputs:
                    for item in native(out):
                        data = b"data: " + msgspec.json.encode(item) + b"\n\n"
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                await send(
                    {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
                )
            except OSError:
                pass
            tg.cancel_scope.cancel()

    async def tokenize(self, body: bytes, send: Send, receive: Receive) -> None:
        req = decode(body, p.TokenizeRequest)
        ids = self.engine.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)
        ids = list(ids["input_ids"])
        await respond(send, 200, msgspec.json.encode({"tokens": ids, "count": len(ids)}))

    async def detokenize(self, body: bytes, send: Send, receive: Receive) -> None:
        req = decode(body, p.DetokenizeRequest)
        if any(not 0 <= t < self.engine.vocab_size for t in req.tokens):
            raise HTTPError(400, "token ids must be in the vocabulary", param="tokens")
        text = self.engine.tokenizer.decode(req.tokens)
        await respond(send, 200, msgspec.json.encode({"text": text}))

    async def model_info(self, body: bytes, send: Send, receive: Receive) -> None:
        info = {
            "model_path": self.model,
            "is_generation": True,
            "context_length": self.context_length,
        }
        await respond(send, 200, msgspec.json.encode(info))

    async def server_info(self, body: bytes, send: Send, receive: Receive) -> None:
        s = self.engine.stats()
        mem = self.engine.memory
        info = {
            "served_model_name": self.model,
            "context_length": self.context_length,
            "max_total_num_tokens": mem.max_tokens,
            "page_size": mem.page_size,
            "kv_cache": mem.describe(),
            "num_running_reqs": s.num_running,
            "num_queue_reqs": s.num_waiting,
        }
        if self.engine.speculative is not None:  # SGLang's key (bench/serving.py reads it)
            info["avg_spec_accept_length"] = s.spec_accept_length
        await respond(send, 200, msgspec.json.encode(info))

    async def openapi(self, body: bytes, send: Send, receive: Receive) -> None:
        await respond(send, 200, msgspec.json.encode(openapi_document()))

    # ---- helpers ------------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise HTTPError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model!r}",
                kind="not_found_error",
                param="model",
            )

    def render_chat(
        self, req: p.ChatCompletionRequest, tools: ToolPlan
    ) -> tuple[list[int], list[str]]:
        """The prompt's token ids (one <|image|> per image) and the images' sources, in order."""
        if not req.messages:
            raise HTTPError(400, "messages must not be empty", param="messages")
        messages = []
        sources: list[str] = []
        for i, m in enumerate(req.messages):
            if m.role not in ("system", "user", "assistant", "tool", "ipython", "developer"):
                raise HTTPError(
                    400, f"messages[{i}].role {m.role!r} is not a chat role", param="messages"
                )
            content: str | list[dict[str, str]] = m.content or ""
            if isinstance(m.content, list):
                parts: list[dict[str, str]] = []
                for part in m.content:
                    if part.type == "text" and part.text is not None:
                        parts.append({"type": "text", "text": part.text})
                    elif part.type == "image_url" and part.image_url is not None:
                        self.check_takes_images("messages")
                        parts.append({"type": "image"})
                        sources.append(part.image_url.url)
                    else:
                        raise HTTPError(
                            400,
                            f"messages[{i}]: content part of type {part.type!r} needs its field",
                            param="messages",
                        )
                # Text-only content stays a string: templates without image support take it.
                has_image = any(part["type"] == "image" for part in parts)
                content = parts if has_image else "".join(part["text"] for part in parts)
            try:
                messages.append(template_message(i, m, content))
            except RequestError as e:
                raise HTTPError(400, str(e), param=e.param) from None
        try:
            text = self.engine.tokenizer.apply_chat_template(
                messages,
                tools=tools.template_tools,
                chat_template=self.chat_template,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                tokenize=False,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # noqa: BLE001 - a template error is the request's problem
            raise HTTPError(
                400, f"the chat template failed on these messages: {e}", param="messages"
            ) from None
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"], sources

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

    def check_takes_images(self, param: str) -> None:
        if self.engine.images is None:
            raise HTTPError(
                400,
                "this server takes text only: image input needs a multimodal checkpoint served "
                "with --enable-multimodal",
                param=param,
            )

    def sampling_params(
        self,
        req: Any,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        grammar: GrammarSpec | None = None,
    ) -> SamplingParams:
        room = self.context_length - prompt_len
        if room < 1:
            raise HTTPError(
                400,
                f"the prompt has {prompt_len} tokens; the context length is {self.context_length}",
                param="messages",
            )
        if max_tokens is None:
            max_tokens = room
        elif max_tokens + prompt_len > self.context_length:
            raise HTTPError(
                400,
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_len + max_tokens} exceeds the context length "
                f"{self.context_length}",
                param="max_tokens",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        except ValueError:
            raise HTTPError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        try:
            return SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                frequency_penalty=req.frequency_penalty,
                presence_penalty=req.presence_penalty,
                repetition_penalty=req.repetition_penalty,
                logit_bias=bias,
                seed=req.seed,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
                stop=stop,
                stop_token_ids=list(req.stop_token_ids or []),
                skip_special_tokens=req.skip_special_tokens,
                logprobs=logprobs,
                grammar=grammar,
            )
        except ValueError as e:
            raise HTTPError(400, str(e), param=str(e).split(":")[0]) from None

    def submit(
        self, prompt: list[int] | ImagePrompt, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.max_queued is not None and self.engine.stats().num_waiting >= self.max_queued:
            raise HTTPError(
                503,
                "the server is at its queue limit; retry later",
                kind="server_overloaded",
                headers=[(b"retry-after", b"1")],
            )
        try:
            return self.engine.submit(prompt, params)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    async def collect(
        self, outputs: AsyncIterator[RequestOutput], receive: Receive
    ) -> RequestOutput:
        final: RequestOutput | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            async for out in outputs:
                final = out
            tg.cancel_scope.cancel()
        if final is None or not final.finished:
            raise HTTPError(499, "client disconnected")
        if final.error:
            raise HTTPError(500, f"generation failed: {final.error}", kind="internal_error")
        return final

    async def stream(
        self,
        send: Send,
        receive: Receive,
        outputs: AsyncIterator[RequestOutput],
        rid: str,
        req: Any,
        *,
        chat: bool,
        tools: frozenset[str] = frozenset(),
    ) -> None:
        """SSE chunks; with tools, content until a call list starts, then each call as a
        tool_calls delta as soon as it is complete."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sent_role: set[int] = set()
        parsers: dict[int, ToolCallStream] = {}
        calls_sent: dict[int, int] = {}

        async def event(payload: bytes) -> None:
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + payload + b"\n\n",
                    "more_body": True,
                }
            )

        final: RequestOutput | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                async for out in outputs:
                    final = out
                    for c in out.outputs:
                        if not (c.delta_text or c.finished or (chat and c.index not in sent_role)):
                            continue
                        if chat:
                            text, calls = c.delta_text, []
                            if tools:
                                parser = parsers.setdefault(c.index, ToolCallStream(tools))
                                text, calls = parser.push(text)
                                if c.finished:
                                    tail, more = parser.finish()
                                    text, calls = text + tail, calls + more
                            delta = p.ChatDelta(content=text or None)
                            if calls:
                                first = calls_sent.get(c.index, 0)
                                delta.tool_calls = [
                                    p.ToolCallDelta(k, *tool_call_delta(call))
                                    for k, call in enumerate(calls, first)
                                ]
                                calls_sent[c.index] = first + len(calls)
                            if c.index not in sent_role:
                                delta.role = "assistant"
                                sent_role.add(c.index)
                            lp = self.chat_logprobs(c.delta_logprobs) if req.logprobs else None
                            reason = finish_reason(c)
                            if reason == "stop" and calls_sent.get(c.index):
                                reason = "tool_calls"
                            choice = p.ChatChunkChoice(c.index, delta, reason, lp)
                            chunk = p.ChatCompletionChunk(rid, created, self.model, [choice])
                        else:
                            lp = (
                                self.completion_logprobs(c.delta_logprobs)
                                if req.logprobs is not None
                                else None
                            )
                            choice = p.CompletionChoice(c.index, c.delta_text, finish_reason(c), lp)
                            chunk = p.Completion(rid, created, self.model, [choice], None)
                        await event(msgspec.json.encode(chunk))
                if final is not None and final.error:
                    await event(
                        error_body(500, f"generation failed: {final.error}", "internal_error")
                    )
                elif final is not None and include_usage:
                    if chat:
                        tail = p.ChatCompletionChunk(rid, created, self.model, [], usage(final))
                    else:
                        tail = p.Completion(rid, created, self.model, [], usage(final))
                    await event(msgspec.json.encode(tail))
                await send(
                    {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
                )
            except OSError:
                pass  # the client went away; leaving the stream aborted the request
            tg.cancel_scope.cancel()

    def chat_logprobs(self, entries: Any) -> p.ChoiceLogprobs:
        tok = self.engine.tokenizer
        content = []
        for e in entries or []:
            tops = [p.TopLogprob(token_text(tok, t), lp, token_bytes(tok, t)) for t, lp in e.top]
            content.append(
                p.TokenLogprobEntry(
                    token_text(tok, e.token_id), e.logprob, token_bytes(tok, e.token_id), tops
                )
            )
        return p.ChoiceLogprobs(content)

    def completion_logprobs(self, entries: Any) -> p.CompletionLogprobs:
        tok = self.engine.tokenizer
        tokens, lps, tops, offsets, at = [], [], [], [], 0
        for e in entries or []:
            text = token_text(tok, e.token_id)
            tokens.append(text)
            lps.append(e.logprob)
            tops.append({token_text(tok, t): lp for t, lp in e.top})
            offsets.append(at)
            at += len(text)
        return p.CompletionLogprobs(tokens, lps, tops, offsets)


def create_app(engine: Engine, **options: Any) -> App:
    """The ASGI app over an engine; options as App's."""
    return App(engine, **options)


# ---- small helpers -------------------------------------------------------------------------------

_BODIES = {
    "/v1/chat/completions": (p.ChatCompletionRequest, p.ChatCompletion),
    "/v1/completions": (p.CompletionRequest, p.Completion),
    "/generate": (p.GenerateRequest, None),
    "/tokenize": (p.TokenizeRequest, None),
    "/detokenize": (p.DetokenizeRequest, None),
}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the endpoints, with request and response schemas from the structs."""
    kinds = [k for pair in _BODIES.values() for k in pair if k is not None]
    kinds += [p.ModelList, p.ErrorResponse]
    (schemas, components) = msgspec.json.schema_components(
        kinds, ref_template="#/components/schemas/{name}"
    )
    by_kind = dict(zip(kinds, schemas, strict=True))
    error = {
        "description": "error",
        "content": {"application/json": {"schema": by_kind[p.ErrorResponse]}},
    }
    paths: dict[str, Any] = {}
    for path, (request, response) in _BODIES.items():
        ok = {"description": "ok"}
        if response is not None:
            ok["content"] = {"application/json": {"schema": by_kind[response]}}
        paths[path] = {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": by_kind[request]}},
                },
                "responses": {"200": ok, "400": error, "404": error, "413": error, "503": error},
            }
        }
    for path in (
        "/v1/models",
        "/health",
        "/health_generate",
        "/metrics",
        "/get_model_info",
        "/get_server_info",
    ):
        ok = {"description": "ok"}
        if path == "/v1/models":
            ok["content"] = {"application/json": {"schema": by_kind[p.ModelList]}}
        paths[path] = {"get": {"responses": {"200": ok}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyllama4", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }


async def read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def decode(body: bytes, kind: type) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise HTTPError(400, f"invalid request: {e}", param=_field(str(e))) from None
    except msgspec.DecodeError as e:
        raise HTTPError(400, f"the body is not valid JSON: {e}") from None


def _field(message: str) -> str | None:
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0].split("[", 1)[0]
    return None


async def cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


def chat_message(c: Any, tools: ToolPlan) -> tuple[p.ChatResponseMessage, str | None]:
    """A finished completion as the assistant's message, its tool calls parsed out."""
    reason = finish_reason(c)
    if not tools.names:
        return p.ChatResponseMessage("assistant", c.text), reason
    parsed = parse_tool_calls(c.text, tools.names)
    if not parsed.calls:
        return p.ChatResponseMessage("assistant", c.text), reason
    calls = [p.ToolCallOut(*tool_call_out(call)) for call in parsed.calls]
    return (
        p.ChatResponseMessage("assistant", parsed.content, calls),
        "tool_calls" if reason == "stop" else reason,
    )


def tool_call_out(call: ToolCall) -> tuple[str, p.FunctionCallOut]:
    """(id, function) of a parsed call, as the API returns it."""
    return f"call_{uuid.uuid4().hex[:24]}", p.FunctionCallOut(call.name, call.arguments_json())


def tool_call_delta(call: ToolCall) -> tuple[str, str, p.FunctionCallOut]:
    """(id, type, function) of a streamed call: each call is sent whole, in one delta."""
    call_id, function = tool_call_out(call)
    return call_id, "function", function


def prompt_length(prompt: list[int] | ImagePrompt) -> int:
    return len(prompt.token_ids) if isinstance(prompt, ImagePrompt) else len(prompt)


def finish_reason(c: Any) -> str | None:
    return {"abort": "abort", "error": "error"}.get(c.finish_reason, c.finish_reason)


def usage(out: RequestOutput) -> p.Usage:
    completion = sum(len(c.token_ids) for c in out.outputs)
    prompt = len(out.prompt_token_ids)
    return p.Usage(prompt, completion, prompt + completion, {"cached_tokens": out.cached_tokens})


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    return list(tokenizer.decode([token_id]).encode())
