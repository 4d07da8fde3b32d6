"""Online serving benchmark, compatible with SGLang's `python -m sglang.bench_serving`.

It drives any OpenAI-compatible server (pyllama4, SGLang, vLLM) with streamed requests and prints
the same "Serving Benchmark Result" block as SGLang, with the same metric definitions:

- TTFT: first content chunk time - send time. ITL: gaps between successive content chunks (one
  chunk may carry several tokens). TPOT per request: (E2E - TTFT) / (output_tokens - 1), only for
  requests with more than one output token. E2E: send time -> end of the stream.
- Output tokens come from the server's usage (or /generate meta_info) when it reports them, else
  from retokenizing the generated text; the retokenized count is reported too.
- Throughputs are over the benchmark duration; peak output throughput is the largest number of
  content chunks in a 1-second bucket; concurrency = sum of E2E / duration.

- Server CPU (Linux): user + system seconds of the server's process and all its descendants over
  the measured run (bench/server_cpu.py), and those per output token. The server is --server-pid,
  or else the process listening on the port of a 127.0.0.1 / localhost base URL; the two lines are
  left out when neither is found.

Example (the demo model served by pyllama4 on port 30000):

    python bench/serving.py --backend pyllama4 --port 30000 --tokenizer demo \\
        --dataset-name random --random-input-len 512 --random-output-len 128 \\
        --num-prompts 64 --max-concurrency 16

Comparing two servers on one machine (--compare-port or --compare-base-url): the same sampled
prompts go to server A, then B, alternating for --rounds rounds each (A B A B ...), each run
printing its own block under its label; a summary follows with each server's median (min-max)
output throughput, mean TPOT, mean TTFT and server CPU ms per output token, and the ratios A/B.
E.g. pyllama4 on port 30000 against vLLM on port 8100, both through the OpenAI completions API,
each serving the checkpoint in $CKPT:

    python bench/serving.py --backend vllm --port 30000 --compare-port 8100 \\
        --label-a pyllama4 --label-b vllm --tokenizer $CKPT --rounds 3 \\
        --dataset-name random --random-input-len 256 --random-output-len 64 \\
        --num-prompts 32 --max-concurrency 8

One file on purpose (with its /proc reader beside it): a benchmark script that a user runs by
path, whose measuring and whose report belong together.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from server_cpu import cpu_available, local_server_pid, tree_cpu_seconds

from pyllama4.bench_data import SHAREGPT, iter_json_list

BACKENDS = ("sglang", "vllm", "openai", "openai-chat", "pyllama4")

# ---- requests and per-request records ---------------------------------------------------------


@dataclass
class DatasetRow:
    prompt: str | list[int]  # text, or token ids for --dataset-name random-ids
    prompt_len: int
    output_len: int


@dataclass
class RequestRecord:
    """What one request did, in perf_counter seconds; the metrics are computed from these."""

    prompt_len: int
    send_time: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    end_time: float = 0.0  # the stream ended
    generated_text: str = ""
    output_tokens: int | None = None  # the server's count (usage / meta_info) when it gives one
    success: bool = False
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time if self.chunk_times else 0.0

    @property
    def latency(self) -> float:
        return self.end_time - self.send_time

    @property
    def itl(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


# ---- metrics (pure functions) -----------------------------------------------------------------


def _stats(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / median / std / p95 / p99 / max of `values` times `scale` (0 for no values)."""
    if not values:
        return dict.fromkeys(("mean", "median", "std", "p95", "p99", "max"), 0.0)
    a = np.asarray(values, dtype=np.float64) * scale
    return {
        "mean": float(np.mean(a)),
        "median": float(np.median(a)),
        "std": float(np.std(a)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(np.max(a)),
    }


def peak_buckets(records: Sequence[RequestRecord]) -> tuple[list[float], list[int]]:
    """Content chunks and requests in flight per 1-second bucket from the first send (SGLang's
    max_output_tokens_per_s and max_concurrent_requests come from these)."""
    ok = [r for r in records if r.success]
    if not ok:
        return [], []
    t0 = min(r.send_time for r in ok)
    t1 = max(r.end_time for r in ok)
    n = int(math.ceil(t1 - t0)) + 1
    tokens = [0.0] * n
    active = [0] * n
    for r in ok:
        for t in r.chunk_times:
            tokens[int(t - t0)] += 1
        for s in range(int(r.send_time - t0), int(r.end_time - t0) + 1):
            active[s] += 1
    return tokens, active


def compute_metrics(
    records: Sequence[RequestRecord], duration: float, tokenizer_count: Callable[[str], int]
) -> dict[str, Any]:
    """SGLang's BenchmarkMetrics over the records of one run; times in ms, throughputs per s.

    `tokenizer_count(text)` is the number of tokens of a generated text (retokenized count).
    """
    output_lens, retok_lens, ttfts, e2es, tpots, itls = [], [], [], [], [], []
    total_input = 0
    for r in records:
        if not r.success:
            continue
        retok = tokenizer_count(r.generated_text)
        out = r.output_tokens if r.output_tokens is not None else retok
        output_lens.append(out)
        retok_lens.append(retok)
        total_input += r.prompt_len
        if out > 1:
            tpots.append((r.latency - r.ttft) / (out - 1))
        itls += r.itl
        ttfts.append(r.ttft)
        e2es.append(r.latency)
    completed = len(output_lens)
    total_output = sum(output_lens)
    tokens, active = peak_buckets(records)
    ttft, tpot, itl, e2e = _stats(ttfts), _stats(tpots), _stats(itls), _stats(e2es)
    m: dict[str, Any] = {
        "duration": duration,
        "completed": completed,
        "failed": sum(1 for r in records if not r.success),
        "total_input_tokens": total_input,
        "total_input_text_tokens": total_input,
        "total_input_vision_tokens": 0,
        "total_output_tokens": total_output,
        "total_output_tokens_retokenized": sum(retok_lens),
        "request_throughput": completed / duration,
        "input_throughput": total_input / duration,
        "output_throughput": total_output / duration,
        "output_throughput_retokenized": sum(retok_lens) / duration,
        "total_throughput": (total_input + total_output) / duration,
        "total_throughput_retokenized": (total_input + sum(retok_lens)) / duration,
        "max_output_tokens_per_s": float(max(tokens, default=0.0)),
        "max_concurrent_requests": int(max(active, default=0)),
        "concurrency": sum(e2es) / duration,
    }
    for name, s in (("e2e_latency", e2e), ("ttft", ttft), ("tpot", tpot)):
        for k in ("mean", "median", "std", "p99"):
            m[f"{k}_{name}_ms"] = s[k]
    for k in ("mean", "median", "std", "p95", "p99", "max"):
        m[f"{k}_itl_ms"] = itl[k]
    return m


def cpu_metrics(cpu_seconds: float | None, output_tokens: int) -> dict[str, float | None]:
    """The server's CPU seconds over a run and its CPU ms per output token (None: unmeasured)."""
    per_token = None
    if cpu_seconds is not None and output_tokens:
        per_token = 1000.0 * cpu_seconds / output_tokens
    return {"server_cpu_seconds": cpu_seconds, "server_cpu_ms_per_output_token": per_token}


CPU_LINES = (
    ("Server CPU seconds:", "server_cpu_seconds"),
    ("Server CPU ms per output token:", "server_cpu_ms_per_output_token"),
)


def _fmt(label: str, value: Any, spec: str = "") -> str:
    return f"{label:<40} {value:<10{spec}}".rstrip()


def format_result(
    m: dict[str, Any],
    backend: str,
    request_rate: float,
    max_concurrency: int | None,
    accept_length: float | None = None,
) -> str:
    """The "Serving Benchmark Result" block, label for label as SGLang prints it."""
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        _fmt("Backend:", backend),
        _fmt("Traffic request rate:", request_rate),
        _fmt("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
        _fmt("Successful requests:", m["completed"]),
        _fmt("Benchmark duration (s):", m["duration"], ".2f"),
        _fmt("Total input tokens:", m["total_input_tokens"]),
        _fmt("Total input text tokens:", m["total_input_text_tokens"]),
        _fmt("Total input vision tokens:", m["total_input_vision_tokens"]),
        _fmt("Total generated tokens:", m["total_output_tokens"]),
        _fmt("Total generated tokens (retokenized):", m["total_output_tokens_retokenized"]),
        _fmt("Request throughput (req/s):", m["request_throughput"], ".2f"),
        _fmt("Input token throughput (tok/s):", m["input_throughput"], ".2f"),
        _fmt("Output token throughput (tok/s):", m["output_throughput"], ".2f"),
        _fmt("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"], ".2f"),
        _fmt("Peak concurrent requests:", m["max_concurrent_requests"]),
        _fmt("Total token throughput (tok/s):", m["total_throughput"], ".2f"),
        _fmt("Concurrency:", m["concurrency"], ".2f"),
    ]
    if accept_length is not None:
        lines.append(_fmt("Accept length:", accept_length, ".2f"))
    for label, key in CPU_LINES:
        if m.get(key) is not None:
            lines.append(_fmt(label, m[key], ".2f"))
    sections = [
        ("End-to-End Latency", "e2e_latency", "E2E Latency", ("mean", "median")),
        ("Time to First Token", "ttft", "TTFT", ("mean", "median", "p99")),
        ("Time per Output Token (excl. 1st token)", "tpot", "TPOT", ("mean", "median", "p99")),
        ("Inter-Token Latency", "itl", "ITL", ("mean", "median", "p95", "p99", "max")),
    ]
    names = {"mean": "Mean", "median": "Median", "p95": "P95", "p99": "P99", "max": "Max"}
    for title, key, label, stats in sections:
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for s in stats:
            lines.append(_fmt(f"{names[s]} {label} (ms):", m[f"{s}_{key}_ms"], ".2f"))
    lines.append("=" * 50)
    return "\n".join(lines)


COMPARED = (
    ("Output token throughput (tok/s):", "output_throughput"),
    ("Mean TPOT (ms):", "mean_tpot_ms"),
    ("Mean TTFT (ms):", "mean_ttft_ms"),
    ("Server CPU ms per output token:", "server_cpu_ms_per_output_token"),
)


def _median(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [m.get(key) for m in runs]
    return None if not values or None in values else float(np.median(values))


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.3f}"


def format_comparison(
    label_a: str, runs_a: Sequence[dict[str, Any]], label_b: str, runs_b: Sequence[dict[str, Any]]
) -> str:
    """Summary of two servers' runs: per metric each one's median (min-max), then the ratios A/B
    of the medians of output throughput and mean TPOT."""

    def cell(runs: Sequence[dict[str, Any]], key: str) -> str:
        med = _median(runs, key)
        if med is None:
            return "n/a"
        values = [m[key] for m in runs]
        return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"

    title = f" Comparison: median (min-max) of {len(runs_a)} / {len(runs_b)} runs "
    lines = [title.center(90, "="), f"{'':<34}{'A: ' + label_a:<28}{'B: ' + label_b}"]
    for title, key in COMPARED:
        lines.append(f"{title:<34}{cell(runs_a, key):<28}{cell(runs_b, key)}".rstrip())
    names = f"({label_a} / {label_b})"
    for title, key in (("Output throughput", "output_throughput"), ("Mean TPOT", "mean_tpot_ms")):
        ratio = _ratio(_median(runs_a, key), _median(runs_b, key))
        lines.append(f"{title} ratio A/B {names}: {ratio}")
    lines.append("=" * 90)
    return "\n".join(lines)


# ---- datasets ---------------------------------------------------------------------------------


def random_lengths(
    length: int, ratio: float, n: int, rng: np.random.Generator, floor: int = 1
) -> list[int]:
    """SGLang's --random-range-ratio: lengths uniform in [max(floor(L*r), floor), L]."""
    low = max(int(length * ratio), floor)
    high = max(length, low)
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def sample_random(
    tokenizer: Any,
    n: int,
    input_len: int,
    output_len: int,
    ratio: float,
    rng: np.random.Generator,
    as_ids: bool,
) -> list[DatasetRow]:
    """Prompts of token ids drawn from the vocabulary without special tokens (decoded to text
    unless `as_ids`); the prompt length is the number of ids drawn, as in SGLang."""
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    ins = random_lengths(input_len, ratio, n, rng)
    outs = random_lengths(output_len, ratio, n, rng)
    rows = []
    for il, ol in zip(ins, outs, strict=True):
        ids = [int(t) for t in rng.choice(vocab, size=il)]
        prompt: str | list[int] = ids if as_ids else tokenizer.decode(ids)
        rows.append(DatasetRow(prompt, il, ol))
    return rows


def sample_sharegpt(
    path: Path, tokenizer: Any, n: int, fixed_output_len: int | None, seed: int
) -> list[DatasetRow]:
    """SGLang's ShareGPT sampling: first human turn as prompt, the reply's length as output."""
    convs = [
        c["conversations"]
        for c in iter_json_list(path.read_text(encoding="utf-8", errors="replace"))
        if isinstance(c, dict) and len(c.get("conversations") or []) >= 2
    ]
    random.Random(seed).shuffle(convs)
    rows: list[DatasetRow] = []
    for conv in convs:
        if len(rows) == n:
            break
        prompt, completion = conv[0].get("value", ""), conv[1].get("value", "")
        prompt_len = len(tokenizer.encode(prompt))
        out_len = fixed_output_len or len(tokenizer.encode(completion))
        if prompt_len < 2 or out_len < 2:
            continue
        if fixed_output_len is None and (prompt_len > 1024 or prompt_len + out_len > 2048):
            continue
        rows.append(DatasetRow(prompt, prompt_len, out_len))
    if len(rows) < n:
        print(f"warning: only {len(rows)} ShareGPT prompts qualified", file=sys.stderr)
    return rows


# ---- HTTP clients -----------------------------------------------------------------------------


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


async def arrivals(rows: list[DatasetRow], rate: float, rng: np.random.Generator):
    """The rows, spaced by exponential gaps at `rate` requests/s (Poisson; none for inf)."""
    for i, row in enumerate(rows):
        yield row
        if math.isinf(rate) or i == len(rows) - 1:
            continue
        await asyncio.sleep(float(rng.exponential(1.0 / rate)))


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.failed, self.t0 = total, 0, 0, time.perf_counter()

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.success
        el = time.perf_counter() - self.t0
        sys.stderr.write(
            f"\r[bench] {self.done}/{self.total} requests, {self.failed} failed, {el:.1f} s"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@dataclass
class Target:
    """One server under test: where it listens, how it is asked, and its pid for CPU readings."""

    label: str
    base_url: str
    backend: str
    model: str
    pid: int | None


def http_client() -> Any:
    """An httpx.AsyncClient without timeouts or connection limits, with $OPENAI_API_KEY."""
    import httpx

    headers = {}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=None, limits=limits, headers=headers)


async def warm_up(args: argparse.Namespace, target: Target, row: DatasetRow) -> None:
    """--warmup-requests untimed requests of `row`'s prompt and at most 16 output tokens."""
    short = DatasetRow(row.prompt, row.prompt_len, min(row.output_len, 16))
    async with http_client() as client:
        for _ in range(args.warmup_requests):
            rec = await send_request(
                client,
                target.base_url,
                target.backend,
                target.model,
                short,
                not args.disable_ignore_eos,
            )
            if not rec.success:
                raise SystemExit(f"error: the warmup request to {target.label} failed: {rec.error}")


async def run_benchmark(
    args: argparse.Namespace, rows: list[DatasetRow], target: Target
) -> tuple[list[RequestRecord], float, float | None, float | None]:
    """Send the rows to `target`; returns the records, the duration, the server's accept length
    if it reports one, and the server's CPU seconds over the run (None: unmeasured)."""
    ignore_eos = not args.disable_ignore_eos
    async with http_client() as client:

        def go(row: DatasetRow):
            return send_request(
                client, target.base_url, target.backend, target.model, row, ignore_eos
            )

        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        progress = Progress(len(rows))

        async def one(row: DatasetRow) -> RequestRecord:
            if sem is None:
                rec = await go(row)
            else:
                async with sem:
                    rec = await go(row)
            progress.update(rec)
            return rec

        rng = np.random.default_rng(args.seed + 1)
        cpu_start = tree_cpu_seconds(target.pid) if target.pid is not None else None
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(one(row)) async for row in arrivals(rows, args.request_rate, rng)
        ]
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        cpu_end = tree_cpu_seconds(target.pid) if target.pid is not None else None
        cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
        accept_length = None
        try:
            info = (await client.get(target.base_url + "/get_server_info", timeout=5)).json()
            states = info.get("internal_states") or [info]
            accept_length = states[0].get("avg_spec_accept_length")
        except Exception:  # noqa: BLE001 - the server may not have the endpoint
            pass
    return list(records), duration, accept_length, cpu


# ---- plot -------------------------------------------------------------------------------------


def plot(path: str, records: list[RequestRecord], m: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    series = {
        "TTFT": [r.ttft * 1000 for r in ok],
        "E2E": [r.latency * 1000 for r in ok],
        "ITL": [x * 1000 for r in ok for x in r.itl],
        "TPOT": [
            (r.latency - r.ttft) * 1000 / (len(r.chunk_times) - 1)
            for r in ok
            if len(r.chunk_times) > 1
        ],
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, vals in series.items():
        if vals:
            v = np.sort(vals)
            ax1.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=name)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("fraction of samples")
    ax1.set_title("Latency CDFs")
    ax1.legend()
    tokens, _ = peak_buckets(records)
    ax2.plot(range(len(tokens)), tokens, drawstyle="steps-post")
    ax2.axhline(m["output_throughput"], linestyle="--", color="gray", label="mean")
    ax2.set_xlabel("time since first request (s)")
    ax2.set_ylabel("output chunks per second")
    ax2.set_title("Output throughput over time")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line -----------------------------------------------------------------------------


def _base_url(url: str | None, host: str, port: int | None, backend: str) -> str:
    if url is None:
        url = f"http://{host}:{port or (8000 if backend == 'vllm' else 30000)}"
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _add_compare_args(ap: argparse.ArgumentParser) -> None:
    cmp = ap.add_argument_group("comparing with a second server B (A is --base-url / --port)")
    cmp.add_argument("--compare-base-url", default=None, help="server B's URL")
    cmp.add_argument("--compare-port", type=int, default=None, help="server B's port on --host")
    cmp.add_argument("--compare-backend", choices=BACKENDS, default=None, help="default --backend")
    cmp.add_argument("--compare-model", default=None, help="default --model")
    cmp.add_argument("--compare-server-pid", type=int, default=None)
    cmp.add_argument("--rounds", type=int, default=3, help="runs per server, A B A B ...")
    cmp.add_argument("--label-a", default="A")
    cmp.add_argument("--label-b", default="B")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Example") : __doc__.index("One file on purpose")],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--backend", choices=BACKENDS, default="sglang")
    ap.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None, help="default 30000 (8000 for vllm)")
    ap.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer path or name; default the model if it is a local directory; "
        "'demo' means pyllama4's demo checkpoint",
    )
    ap.add_argument(
        "--dataset-name", choices=("random", "sharegpt", "random-ids"), default="sharegpt"
    )
    ap.add_argument("--dataset-path", default=None, help="ShareGPT JSON (default: the package's)")
    ap.add_argument("--sharegpt-output-len", type=int, default=None)
    ap.add_argument("--random-input-len", type=int, default=1024)
    ap.add_argument("--random-output-len", type=int, default=1024)
    ap.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="SGLang's meaning: lengths uniform in [max(floor(r*L), 1), L]. Note vLLM's\n"
        "benchmark uses the same flag for the symmetric range [L*(1-r), L*(1+r)].",
    )
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals, req/s"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--warmup-requests",
        type=int,
        default=1,
        help="untimed requests of at most 16 output tokens to each server before\nthe first run",
    )
    ap.add_argument("--disable-ignore-eos", action="store_true")
    ap.add_argument("--output-file", default=None, help="append one JSON line per run")
    ap.add_argument("--plot", default=None, metavar="FILE", help="PNG: latency CDFs, throughput")
    ap.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the server's pid, for its CPU time (default: the process listening on\n"
        "the port of a 127.0.0.1 / localhost base URL)",
    )
    _add_compare_args(ap)
    args = ap.parse_args(argv)
    args.base_url = _base_url(args.base_url, args.host, args.port, args.backend)
    args.compare = args.compare_base_url is not None or args.compare_port is not None
    if args.compare:
        args.compare_backend = args.compare_backend or args.backend
        args.compare_model = args.compare_model or args.model
        args.compare_base_url = _base_url(
            args.compare_base_url, args.host, args.compare_port, args.compare_backend
        )
        if args.plot:
            ap.error("--plot draws one run; it does not go with --compare")
        if args.label_a == args.label_b or args.rounds < 1:
            ap.error("--compare needs two different labels and --rounds >= 1")
    return args


def resolve_tokenizer(name: str | None, model: str) -> Any:
    from transformers import AutoTokenizer

    if name == "demo":
        from pyllama4.demo import demo_checkpoint

        name = str(demo_checkpoint())
    if name is None:
        if not Path(model).is_dir():
            raise SystemExit(f"error: --tokenizer is required (the model {model!r} is not a dir)")
        name = model
    return AutoTokenizer.from_pretrained(name)


def make_target(
    label: str, base_url: str, backend: str, model: str | None, pid: int | None
) -> Target:
    """The server at `base_url`: its model (else the first of GET /v1/models) and the pid whose
    process tree's CPU time is read (`pid`, else the local listener on the URL's port)."""
    import httpx

    if model is None:
        try:
            model = httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"error: cannot read {base_url}/v1/models: {e}") from None
    if not cpu_available():
        print("note: server CPU is unavailable on this system (it reads /proc)", file=sys.stderr)
        pid = None
    elif pid is None:
        pid = local_server_pid(base_url)
    elif tree_cpu_seconds(pid) is None:
        print(
            f"warning: server CPU is not measured: there is no process {pid}",
            file=sys.stderr,
        )
        pid = None
    return Target(label, base_url, backend, model, pid)


def sample_rows(
    args: argparse.Namespace, tokenizer: Any, sharegpt: Path | None
) -> list[DatasetRow]:
    """The workload, the same for every run: --num-prompts rows of the dataset, from --seed."""
    random.seed(args.seed)
    if sharegpt is not None:
        n, out_len = args.num_prompts, args.sharegpt_output_len
        return sample_sharegpt(sharegpt, tokenizer, n, out_len, args.seed)
    return sample_random(
        tokenizer,
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        np.random.default_rng(args.seed),
        as_ids=args.dataset_name == "random-ids",
    )


def bench_one(
    args: argparse.Namespace,
    rows: list[DatasetRow],
    target: Target,
    count: Callable[[str], int],
    record: dict[str, Any],
) -> tuple[dict[str, Any], list[RequestRecord]]:
    """One measured run against `target`: prints its block, appends its JSON line (with
    `record`'s fields) to --output-file, and returns its metrics and records."""
    records, duration, accept_length, cpu = asyncio.run(run_benchmark(args, rows, target))
    failed = [r for r in records if not r.success]
    if failed:
        print(f"warning: {len(failed)} requests failed; first: {failed[0].error}", file=sys.stderr)
    m = compute_metrics(records, duration, count)
    m.update(cpu_metrics(cpu, m["total_output_tokens"]))
    print(format_result(m, target.backend, args.request_rate, args.max_concurrency, accept_length))
    if args.output_file:
        result = {
            **record,
            "backend": target.backend,
            "dataset_name": args.dataset_name,
            "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
            "max_concurrency": args.max_concurrency,
            "sharegpt_output_len": args.sharegpt_output_len,
            "random_input_len": args.random_input_len,
            "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio,
            "model": target.model,
            **m,
            "accept_length": accept_length,
        }
        with open(args.output_file, "a") as f:
            f.write(json.dumps(result) + "\n")
    return m, records


def compare(
    args: argparse.Namespace,
    rows: list[DatasetRow],
    a: Target,
    b: Target,
    count: Callable[[str], int],
) -> bool:
    """Warm both servers up, then --rounds runs of each, alternating A B A B ..., then the
    summary; True if every run completed some request."""
    for t in (a, b):
        asyncio.run(warm_up(args, t, rows[0]))
    runs: dict[str, list[dict[str, Any]]] = {a.label: [], b.label: []}
    for r in range(1, args.rounds + 1):
        for t in (a, b):
            print(f"\n#### {t.label} ({t.base_url}), round {r}/{args.rounds}", flush=True)
            record = {"label": t.label, "round": r, "base_url": t.base_url}
            runs[t.label].append(bench_one(args, rows, t, count, record)[0])
    print()
    print(format_comparison(a.label, runs[a.label], b.label, runs[b.label]))
    return all(m["completed"] for ms in runs.values() for m in ms)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("error: --plot needs matplotlib, which is not installed")
    sharegpt = None
    if args.dataset_name == "sharegpt":
        sharegpt = Path(args.dataset_path or SHAREGPT.path("--dataset-path"))
    a = make_target(args.label_a, args.base_url, args.backend, args.model, args.server_pid)
    tokenizer = resolve_tokenizer(args.tokenizer, a.model)
    rows = sample_rows(args, tokenizer, sharegpt)
    if not rows:
        raise SystemExit("error: no prompts to send")
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}", file=sys.stderr)
    print(f"#Output tokens: {sum(r.output_len for r in rows)}", file=sys.stderr)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    if args.compare:
        b = make_target(
            args.label_b,
            args.compare_base_url,
            args.compare_backend,
            args.compare_model,
            args.compare_server_pid,
        )
        return 0 if compare(args, rows, a, b, count) else 1
    asyncio.run(warm_up(args, a, rows[0]))
    m, records = bench_one(args, rows, a, count, {})
    if args.plot:
        plot(args.plot, records, m)
    return 0 if m["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
