"""One streamed request per backend: SGLang's /generate, or the OpenAI completions and chat
completions APIs (vllm, openai, openai-chat, pyllama4), read as server-sent events.

A request's record holds the arrival time of every content chunk, the generated text and the
server's token count; it is successful only when the stream carried content and no error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from serving_data import DatasetRow, part_of_serving
from serving_metrics import RequestRecord

BACKENDS = ("sglang", "vllm", "openai", "openai-chat", "pyllama4")


async def sse_events(response: Any) -> AsyncIterator[tuple[float, dict]]:
    """(arrival time, payload) for each `data:` event of a server-sent event stream."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            yield time.perf_counter(), json.loads(data)


def build_request(
    backend: str, model: str, row: DatasetRow, ignore_eos: bool, extra: dict | None = None
) -> tuple[str, dict]:
    if backend == "sglang":
        body: dict[str, Any] = {
            "sampling_params": {
                "temperature": 0.0,
                "max_new_tokens": row.output_len,
                "ignore_eos": ignore_eos,
            },
            "stream": True,
        }
        body["input_ids" if isinstance(row.prompt, list) else "text"] = row.prompt
        return "/generate", body
    common = {
        "model": model,
        "temperature": 0.0,
        "max_tokens": row.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
        **(extra or {}),
    }
    if backend == "openai-chat":
        if isinstance(row.prompt, list):
            raise SystemExit("error: openai-chat takes text prompts, not --dataset-name random-ids")
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": row.prompt}],
            **common,
        }
    return "/v1/completions", {"prompt": row.prompt, **common}


async def send_request(
    client: Any, base_url: str, backend: str, model: str, row: DatasetRow, ignore_eos: bool
) -> RequestRecord:
    path, body = build_request(backend, model, row, ignore_eos)
    rec = RequestRecord(prompt_len=row.prompt_len, send_time=time.perf_counter())
    text_parts: list[str] = []
    try:
        async with client.stream("POST", base_url + path, json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}"
                rec.end_time = time.perf_counter()
                return rec
            async for t, ev in sse_events(resp):
                if "error" in ev or ev.get("object") == "error":
                    rec.error = json.dumps(ev)[:300]
                    break
                if backend == "sglang":  # cumulative text; meta_info counts the tokens
                    text = ev.get("text") or ""
                    if len(text) > len(rec.generated_text):
                        rec.chunk_times.append(t)
                        rec.generated_text = text
                    meta = ev.get("meta_info") or {}
                    if "completion_tokens" in meta:
                        rec.output_tokens = meta["completion_tokens"]
                    continue
                usage = ev.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    rec.output_tokens = usage["completion_tokens"]
                for choice in ev.get("choices") or []:
                    if backend == "openai-chat":
                        delta = (choice.get("delta") or {}).get("content") or ""
                    else:
                        delta = choice.get("text") or ""
                    if delta:
                        rec.chunk_times.append(t)
                        text_parts.append(delta)
            rec.end_time = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a failed request is recorded, not fatal
        rec.error = f"{type(e).__name__}: {e}"
        rec.end_time = time.perf_counter()
        return rec
    if backend != "sglang":
        rec.generated_text = "".join(text_parts)
    rec.success = not rec.error and bool(rec.chunk_times)
    if not rec.error and not rec.chunk_times:
        rec.error = "the stream carried no content"
    return rec


def http_client() -> Any:
    """An httpx.AsyncClient without timeouts or connection limits, with $OPENAI_API_KEY."""
    import httpx

    headers = {}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=None, limits=limits, headers=headers)


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
