"""SGLang's native routes but /generate (pyllama4.server.generate_route): /health,
/health_generate, /tokenize, /detokenize, /model_info, /server_info (and their older names
/get_model_info, /get_server_info), /get_load, /flush_cache and /openapi.json.

Invariants: each answers with SGLang's keys where the server has the data; /flush_cache empties
the prefix cache only while no request is queued or running (else SGLang's 400), and
/health_generate is a 503 if one token does not come within HEALTH_CHECK_TIMEOUT seconds.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec

from pyllama4 import SamplingParams
from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError, Receive, Send, decode, respond
from pyllama4.server.openapi import openapi_document
from pyllama4.server.serving import Serving

HEALTH_CHECK_TIMEOUT = 20.0  # seconds: SGLang's SGLANG_HEALTH_CHECK_TIMEOUT default
FLUSH_TEXT = (
    b"Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    b"waiting requests, the operation will not be performed.)\n"
)
TEXT_PLAIN = b"text/plain; charset=utf-8"
VERSION = "0.1.0"


class NativeRoutes:
    def __init__(self, serving: Serving):
        self.serving = serving

    async def health(self, body: bytes, send: Send, receive: Receive) -> None:
        if self.serving.engine.failure is not None:
            raise HTTPError(503, self.serving.engine.failure, kind="service_unavailable")
        await respond(send, 200, b"{}")

    async def health_generate(self, body: bytes, send: Send, receive: Receive) -> None:
        engine = self.serving.engine
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        with anyio.move_on_after(HEALTH_CHECK_TIMEOUT) as waited:
            async for _ in engine.submit([engine.tokenizer.eos_token_id or 0], params):
                pass
        if waited.cancelled_caught:
            message = f"no token generated within {HEALTH_CHECK_TIMEOUT:g} s"
            raise HTTPError(503, message, kind="service_unavailable")
        await respond(send, 200, b"{}")

    async def tokenize(self, body: bytes, send: Send, receive: Receive) -> None:
        req = await decode(body, p.TokenizeRequest)
        text = self.serving.text
        ids = await text.encode(req.prompt, "prompt", add_special_tokens=req.add_special_tokens)
        await respond(send, 200, msgspec.json.encode({"tokens": ids, "count": len(ids)}))

    async def detokenize(self, body: bytes, send: Send, receive: Receive) -> None:
        req = await decode(body, p.DetokenizeRequest)
        text = await self.serving.text.decode(req.tokens, self.serving.engine.vocab_size, "tokens")
        await respond(send, 200, msgspec.json.encode({"text": text}))

    async def model_info(self, body: bytes, send: Send, receive: Receive) -> None:
        s = self.serving
        config = s.engine.runner.model.config
        info = {
            "model_path": s.model,
            # where the tokenizer was loaded from: sglang-router loads it from there
            "tokenizer_path": getattr(s.engine.tokenizer, "name_or_path", None) or s.model,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": s.engine.images is not None,
            "has_audio_understanding": False,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
            "context_length": s.context_length,
        }
        await respond(send, 200, msgspec.json.encode(info))

    async def server_info(self, body: bytes, send: Send, receive: Receive) -> None:
        s = self.serving
        stats = s.engine.stats()
        mem = s.engine.memory
        state: dict[str, Any] = {
            "num_running_reqs": stats.num_running,
            "num_queue_reqs": stats.num_waiting,
            "memory_usage": {"token_capacity": mem.max_tokens},
        }
        info: dict[str, Any] = {
            "model_path": s.model,
            "served_model_name": s.model,
            "context_length": s.context_length,
            "max_total_num_tokens": mem.max_tokens,
            "page_size": mem.page_size,
            "kv_cache": mem.describe(),
            "num_running_reqs": stats.num_running,
            "num_queue_reqs": stats.num_waiting,
            "internal_states": [state],
            "version": VERSION,
        }
        if s.engine.speculative is not None:  # SGLang's key (bench/serving.py reads it)
            info["avg_spec_accept_length"] = state["avg_spec_accept_length"] = (
                stats.spec_accept_length
            )
        await respond(send, 200, msgspec.json.encode(info))

    async def get_load(self, body: bytes, send: Send, receive: Receive) -> None:
        """SGLang's /get_load: one entry per data-parallel rank (this server has one)."""
        stats = self.serving.engine.stats()
        mem = self.serving.engine.memory
        page = mem.page_size
        used = stats.global_pages_held * page
        total = stats.global_pages_total * page
        load = {
            "dp_rank": 0,
            "num_reqs": stats.num_running + stats.num_waiting,
            "num_waiting_reqs": stats.num_waiting,
            "num_tokens": total,
            "num_pending_tokens": total - used,
            "ts_tic": time.perf_counter(),
        }
        await respond(send, 200, msgspec.json.encode([load]))

    async def flush_cache(self, body: bytes, send: Send, receive: Receive) -> None:
        """Empties the prefix cache: SGLang's text, a 200 or (requests running) a 400."""
        engine = self.serving.engine
        if engine.flush_cache():
            await respond(send, 200, FLUSH_TEXT, content_type=TEXT_PLAIN)
            return
        stats = engine.stats()
        message = (
            "Cache not flushed because there are pending requests. "
            f"#queue-req: {stats.num_waiting}, #running-req: {stats.num_running}"
        )
        raise HTTPError(400, message)

    async def openapi(self, body: bytes, send: Send, receive: Receive) -> None:
        await respond(send, 200, msgspec.json.encode(openapi_document()))
