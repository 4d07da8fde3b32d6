"""SGLang's native routes: /generate, /health, /health_generate, /tokenize, /detokenize,
/get_model_info, /get_server_info and /openapi.json.

Invariant: /generate answers as SGLang does: cumulative text and output_ids with meta_info per
output (one object for n == 1, a list otherwise); streamed, one event per output per step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from pyllama4 import SamplingParams
from pyllama4.multimodal.inputs import ImagePrompt
from pyllama4.outputs import RequestOutput
from pyllama4.server import protocol as p
from pyllama4.server.asgi import (
    HTTPError,
    Receive,
    Send,
    decode,
    error_body,
    respond,
    stream_sse,
)
from pyllama4.server.openapi import openapi_document
from pyllama4.server.request_ids import new_id
from pyllama4.server.responses import finish_reason
from pyllama4.server.sampling import native_params
from pyllama4.server.serving import Serving, collect, prompt_length
from pyllama4.server.tools import grammar_param, native_grammars, one_grammar

GENERATE_STREAM_HEADERS = [(b"content-type", b"text/event-stream")]
PARAMS = "sampling_params."  # how errors name a field of sampling_params


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
        async for _ in engine.submit([engine.tokenizer.eos_token_id or 0], params):
            pass
        await respond(send, 200, b"{}")

    async def generate(self, body: bytes, send: Send, receive: Receive) -> None:
        """SGLang's native endpoint: cumulative text when streaming, meta_info per output."""
        rid = new_id()
        req = await decode(body, p.GenerateRequest)
        sp = req.sampling_params or p.NativeSamplingParams()
        await self.serving.compile_stops(sp.stop)
        prompt = await self.generate_prompt(req)
        prompt_field = "text" if req.text is not None else "input_ids"
        params = await self.generate_params(sp, prompt_length(prompt), prompt_field)
        outputs = self.serving.submit(prompt, params, stream=req.stream)
        if req.stream:
            events = self.generate_events(rid, outputs)
            await stream_sse(send, receive, events, headers=GENERATE_STREAM_HEADERS)
            return
        result = self.native_outputs(rid, await collect(self.serving, outputs, receive))
        await respond(send, 200, msgspec.json.encode(result[0] if sp.n == 1 else result))

    async def generate_prompt(self, req: p.GenerateRequest) -> list[int] | ImagePrompt:
        """The prompt from text or input_ids, with image_data's images."""
        if (req.text is None) == (req.input_ids is None):
            raise HTTPError(400, "give exactly one of text and input_ids", param="text")
        if req.text is not None:
            prompt_ids = await self.serving.text.encode(req.text, "text")
        else:
            prompt_ids = req.input_ids
        sources = [req.image_data] if isinstance(req.image_data, str) else req.image_data or []
        return await self.serving.with_images(list(prompt_ids), sources, "image_data")

    async def generate_params(
        self, sp: p.NativeSamplingParams, prompt_len: int, prompt_field: str
    ) -> SamplingParams:
        """SamplingParams from sampling_params, its grammar compiled."""
        grammar = one_grammar(native_grammars(sp, PARAMS))
        await self.serving.compile_grammar(grammar, grammar_param(sp, prefix=PARAMS))
        return native_params(
            sp,
            prompt_len=prompt_len,
            prompt_field=prompt_field,
            context_length=self.serving.context_length,
            grammar=grammar,
            defaults=self.serving.sampling_defaults,
        )

    async def generate_events(
        self, rid: str, outputs: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[bytes]:
        """Each output's items; a request the server cut short ends with an error event."""
        async for out in outputs:
            error = self.serving.cut_short(out) if out.finished else None
            if error is not None:
                yield error_body(error.status, error.message, error.kind)
                return
            for item in self.native_outputs(rid, out):
                yield msgspec.json.encode(item)

    def native_outputs(self, rid: str, out: RequestOutput) -> list[dict[str, Any]]:
        """Each completion's cumulative text and ids with SGLang's meta_info."""
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
                    **self.spec_info(c),
                },
            }
            for c in out.outputs
        ]

    def spec_info(self, c: Any) -> dict[str, Any]:
        """SGLang's speculative fields: verify steps and tokens per step (EAGLE3 only)."""
        if self.serving.engine.speculative is None:
            return {}
        steps = c.verify_steps
        length = len(c.token_ids) / steps if steps else 0.0
        return {"spec_verify_ct": steps, "spec_accept_length": length}

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
        info = {"model_path": s.model, "is_generation": True, "context_length": s.context_length}
        await respond(send, 200, msgspec.json.encode(info))

    async def server_info(self, body: bytes, send: Send, receive: Receive) -> None:
        s = self.serving
        stats = s.engine.stats()
        mem = s.engine.memory
        info = {
            "served_model_name": s.model,
            "context_length": s.context_length,
            "max_total_num_tokens": mem.max_tokens,
            "page_size": mem.page_size,
            "kv_cache": mem.describe(),
            "num_running_reqs": stats.num_running,
            "num_queue_reqs": stats.num_waiting,
        }
        if s.engine.speculative is not None:  # SGLang's key (bench/serving.py reads it)
            info["avg_spec_accept_length"] = stats.spec_accept_length
        await respond(send, 200, msgspec.json.encode(info))

    async def openapi(self, body: bytes, send: Send, receive: Receive) -> None:
        await respond(send, 200, msgspec.json.encode(openapi_document()))
