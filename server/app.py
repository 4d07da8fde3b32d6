"""The ASGI app: OpenAI-compatible (and SGLang-native) endpoints over pyllama4.Engine (raw ASGI,
msgspec, anyio).

Invariants:
- Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}} with the
  right status; a bad request never reaches the engine, never disturbs another request and
  never stops the server.
- Every request the engine accepted ends: with its output, with an error event on its stream,
  or aborted the moment its client disconnects (its KV pages are freed at once).
- The engine's step loop runs for the app's lifetime (ASGI lifespan); shutdown lets in-flight
  requests finish within a timeout, then cuts the rest, each with an error its client can tell
  from success (503, or an error event on a stream).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import anyio
import msgspec

from pyllama4 import Engine
from pyllama4.multimodal.media import MediaPolicy
from pyllama4.server import protocol as p
from pyllama4.server.asgi import Handler, Receive, Scope, Send, respond, serve_lifespan
from pyllama4.server.generate_route import GenerateRoute
from pyllama4.server.http_limits import HTTPLimits
from pyllama4.server.metrics import MetricsRoute
from pyllama4.server.native_routes import NativeRoutes
from pyllama4.server.openai_routes import OpenAIRoutes
from pyllama4.server.response_store import ResponseStore
from pyllama4.server.responses_api import ResponsesRoutes
from pyllama4.server.router import PrefixHandler, Router
from pyllama4.server.sampling_defaults import SamplingDefaults
from pyllama4.server.serving import Serving

log = logging.getLogger("pyllama4.server")


@dataclass(frozen=True)
class AppConfig:
    """What the HTTP layer serves with, from the command line (pyllama4.server.launch)."""

    served_model_name: str
    context_length: int
    api_key: str | None = None  # every route but /health needs it
    public_metrics: bool = False  # /metrics answers without the API key
    limits: HTTPLimits = field(default_factory=HTTPLimits)  # body size and time, concurrency
    max_queued_requests: int | None = None  # None: no limit (503 + Retry-After beyond it)
    chat_template: str | None = None  # None: the tokenizer's
    media: MediaPolicy = field(default_factory=MediaPolicy)  # fetching and decoding images
    max_images_per_request: int = 10
    tool_call_parser: str | None = None  # "pythonic": tool-call outputs become tool_calls
    shutdown_timeout: float = 20.0  # in-flight requests' grace at shutdown, then they are cut
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)  # unset fields


class App:
    def __init__(self, engine: Engine, config: AppConfig):
        self.engine = engine
        self.serving = Serving(
            engine,
            config.served_model_name,
            config.context_length,
            max_queued=config.max_queued_requests,
            chat_template=config.chat_template,
            media=config.media,
            max_images=config.max_images_per_request,
            tool_call_parser=config.tool_call_parser,
            sampling_defaults=config.sampling_defaults,
        )
        responses = ResponsesRoutes(self.serving, ResponseStore())
        self.router = Router(
            routes(self.serving, responses),
            config.api_key,
            prefix_routes=prefix_routes(self.serving, responses),
            limits=config.limits,
            public_metrics=config.public_metrics,
        )
        self.shutdown_timeout = config.shutdown_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            stop = partial(self.shutdown, self.shutdown_timeout)
            await serve_lifespan(receive, send, self.engine.run, stop)
        elif scope["type"] == "http":
            await self.router(scope, receive, send)

    async def shutdown(self, timeout: float) -> None:
        """Lets in-flight requests finish for up to `timeout` seconds, then cuts the rest: each
        ends with a 503 or, streaming, an error event. New requests get a 503 meanwhile."""
        self.serving.stopping = True
        with anyio.move_on_after(timeout):
            while self.router.in_flight:
                await anyio.sleep(0.05)
        aborted = self.engine.abort_all()
        if aborted:
            log.warning(
                "shutdown: aborted %d requests still running after %.0f s", aborted, timeout
            )


def routes(serving: Serving, responses: ResponsesRoutes) -> dict[tuple[str, str], Handler]:
    """Every endpoint, by (method, path)."""
    openai, native, generate = OpenAIRoutes(serving), NativeRoutes(serving), GenerateRoute(serving)
    return {
        ("POST", "/v1/chat/completions"): openai.chat_completions,
        ("POST", "/v1/completions"): openai.completions,
        ("POST", "/v1/responses"): responses.create,
        ("GET", "/v1/models"): openai.models,
        ("GET", "/health"): native.health,
        ("GET", "/health_generate"): native.health_generate,
        ("GET", "/metrics"): MetricsRoute(serving.engine),
        ("POST", "/generate"): generate,
        ("POST", "/tokenize"): native.tokenize,
        ("POST", "/detokenize"): native.detokenize,
        ("GET", "/model_info"): native.model_info,
        ("GET", "/get_model_info"): native.model_info,
        ("GET", "/server_info"): native.server_info,
        ("GET", "/get_server_info"): native.server_info,
        ("GET", "/get_load"): native.get_load,
        ("GET", "/flush_cache"): native.flush_cache,
        ("POST", "/flush_cache"): native.flush_cache,
        ("GET", "/openapi.json"): native.openapi,
    }


def prefix_routes(
    serving: Serving, responses: ResponsesRoutes
) -> dict[tuple[str, str], PrefixHandler]:
    """The endpoints with a parameter at the end of their path, by (method, path prefix)."""
    return {
        ("GET", "/v1/models/"): partial(retrieve_model, serving),
        ("GET", "/v1/responses/"): responses.retrieve,
        ("DELETE", "/v1/responses/"): responses.delete,
    }


async def retrieve_model(
    serving: Serving, model: str, body: bytes, send: Send, receive: Receive
) -> None:
    """GET /v1/models/{model}: the served model's card (a 404 for any other name)."""
    serving.check_model(model)
    card = p.ModelCard(
        serving.model, serving.created, root=serving.model, max_model_len=serving.context_length
    )
    await respond(send, 200, msgspec.json.encode(card))


def create_app(engine: Engine, config: AppConfig) -> App:
    """The ASGI app over an engine."""
    return App(engine, config)
