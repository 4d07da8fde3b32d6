"""SGLang's bench_serving metrics, computed from what each request did.

Pure functions of the per-request records (send time, content chunk arrivals, end of stream,
token counts) and the run's duration; bench/serving.py's docstring states the definitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
from serving_data import part_of_serving


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


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
