"""One request per backend, as SGLang's bench_serving sends and times it: SGLang's /generate
(sglang, sglang-native) or the OpenAI completions and chat completions APIs (the others).

Invariant: a record's ITL list has one entry per output token after the first content chunk. On
/generate a chunk's token count is meta_info's completion_tokens minus the previous chunk's (a
chunk that adds none is skipped); on the OpenAI APIs it is the increase of the chunk's own usage
when the server reports usage per chunk, else 1 (metrics may split by retokenizing instead).
A request succeeds when the server answers 200 and the response reads to its end without error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from serving_data import DatasetRow, part_of_serving
from serving_metrics import RequestRecord

GENERATE, COMPLETIONS, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
# SGLang's backend names (and their API paths), then pyllama4's earlier names.
BACKEND_PATHS = {
    "sglang": GENERATE,
    "sglang-native": GENERATE,
    "sglang-oai": COMPLETIONS,
    "sglang-oai-chat": CHAT,
    "vllm": COMPLETIONS,
    "vllm-chat": CHAT,
    "lmdeploy": COMPLETIONS,
    "lmdeploy-chat": CHAT,
    "openai": COMPLETIONS,
    "openai-chat": CHAT,
    "pyllama4": COMPLETIONS,
}
BACKENDS = tuple(BACKEND_PATHS)


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run shares (SGLang's defaults: greedy, EOS ignored, streamed)."""

    model: str
    ignore_eos: bool = True
    stream: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # --extra-request-body, merged last


def build_request(backend: str, opts: RequestOptions, row: DatasetRow) -> tuple[str, dict]:
    """The API path and JSON body SGLang's client sends for `row` on `backend`."""
    path = BACKEND_PATHS[backend]
    if path == GENERATE:
        sampling: dict[str, Any] = {
            "temperature": opts.temperature,
            "max_new_tokens": row.output_len,
            "ignore_eos": opts.ignore_eos,
        }
        if opts.top_p < 1.0:
            sampling["top_p"] = opts.top_p
        key = "input_ids" if isinstance(row.prompt, list) else "text"
        body = {key: row.prompt, "sampling_params": sampling, "stream": opts.stream}
        return path, {**body, **opts.extra}
    body: dict[str, Any] = {"model": opts.model, "stream": opts.stream}
    if path == CHAT:
        if isinstance(row.prompt, list):
            raise SystemExit(f"error: {backend} takes text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": row.prompt}]
        body["max_completion_tokens"] = row.output_len
    else:
        body.update(prompt=row.prompt, best_of=1, max_tokens=row.output_len)
    if opts.stream:
        body["stream_options"] = {"include_usage": True}
    body.update(temperature=0.0, ignore_eos=opts.ignore_eos)
    return path, {**body, **opts.extra}


def _content(path: str, data: dict) -> str:
    """A chunk's (or a whole answer's) generated text; chat counts reasoning like content."""
    choices = data.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if path != CHAT:
        return c.get("text") or ""
    msg = c.get("delta") or c.get("message") or {}
    reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
    return reasoning + (msg.get("content") or "")


class StreamTimer:
    """Folds one response's events into a record, timing them as SGLang does."""

    def __init__(self, path: str, row: DatasetRow, start: float) -> None:
        self.path, self.st, self.recent, self.last_count = path, start, start, 0
        self.usage_count: int | None = None
        self.rec = RequestRecord(prompt_len=row.prompt_len, start_time=start)
        self.rec.output_len = row.output_len

    def counts(self, data: dict) -> None:
        reported = data.get("usage") or data.get("meta_info") or {}
        if reported.get("prompt_tokens"):
            self.rec.prompt_len = reported["prompt_tokens"]
        if reported.get("completion_tokens") is not None:
            self.rec.output_len = reported["completion_tokens"]

    def event(self, t: float, data: dict) -> None:
        if "error" in data or data.get("object") == "error":
            raise RuntimeError(json.dumps(data)[:300])
        self.counts(data)
        if self.path == GENERATE:
            text = data.get("text") or ""
            if text:
                self.rec.generated_text = text
                self._tokens(t, self.rec.output_len - self.last_count, None)
            return
        text = _content(self.path, data)
        if text:
            self.rec.generated_text += text
            n = 1
            if self.usage_count is not None and (data.get("usage") or {}).get("completion_tokens"):
                n = self.rec.output_len - self.usage_count
            self._tokens(t, n, text)
        if (data.get("usage") or {}).get("completion_tokens") is not None:
            self.usage_count = self.rec.output_len

    def _tokens(self, t: float, n: int, text: str | None) -> None:
        if self.rec.ttft == 0.0:
            self.rec.ttft = t - self.st
        elif n <= 0 and self.path == GENERATE:
            return
        else:
            n = max(n, 1)
            self.rec.itl += [(t - self.recent) / n] * n
            if text is not None:
                self.rec.text_chunks.append(text)
        self.recent, self.last_count = t, self.rec.output_len


async def send_request(
    client: Any, base_url: str, backend: str, opts: RequestOptions, row: DatasetRow
) -> RequestRecord:
    path, body = build_request(backend, opts, row)
    timer = StreamTimer(path, row, time.perf_counter())
    rec = timer.rec
    try:
        async with client.stream("POST", base_url + path, json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"{resp.reason_phrase}: {(await resp.aread()).decode()[:300]}"
                return rec
            if not opts.stream:
                data = json.loads(await resp.aread())
                rec.latency = rec.ttft = time.perf_counter() - timer.st
                timer.counts(data)
                rec.generated_text = data.get("text") or _content(path, data)
            else:
                async for line in resp.aiter_lines():
                    line = line.strip()
                    if not line:
                        continue
                    t = time.perf_counter()
                    rec.latency = t - timer.st
                    line = line.removeprefix("data:").strip()
                    if line != "[DONE]":
                        timer.event(t, json.loads(line))
            rec.success = True
    except Exception as e:  # noqa: BLE001 - a failed request is recorded, not fatal
        rec.error = f"{type(e).__name__}: {e}"
    return rec


def http_client() -> Any:
    """An httpx.AsyncClient without timeouts or connection limits, with SGLang's auth header:
    $OPENAI_API_KEY as a bearer token, else $API_KEY as it is."""
    import httpx

    headers = {}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    elif os.environ.get("API_KEY"):
        headers["Authorization"] = os.environ["API_KEY"]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=None, limits=limits, headers=headers)


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
