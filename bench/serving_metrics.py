"""SGLang's bench_serving metrics, computed from what each request did.

Pure functions of the per-request records and the run's duration, with SGLang's definitions:
TTFT = first content - send; ITL = one entry per output token after the first chunk (a chunk that
carries k tokens gives k entries of gap/k); TPOT per request = (E2E - TTFT) / (output_len - 1) for
output_len > 1; E2E = send -> last line of the stream; peak output throughput = the most tokens
whose arrival (send + TTFT + running sum of the ITLs) falls in one 1-second bucket from the first
send; concurrency = sum of E2E / duration. Percentiles are numpy's (linear interpolation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
from serving_data import part_of_serving

STATS = ("mean", "median", "std", "p90", "p95", "p99")


@dataclass
class RequestRecord:
    """What one request did, in perf_counter seconds; the metrics are computed from these."""

    prompt_len: int  # the server's count when it reports one, else the row's
    start_time: float
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # one gap per output token after the first chunk
    latency: float = 0.0
    generated_text: str = ""
    output_len: int = 0  # the server's count when it reports one, else the tokens asked for
    text_chunks: list[str] = field(default_factory=list)  # the chunks after the first
    success: bool = False
    error: str = ""

    @property
    def end_time(self) -> float:
        return self.start_time + self.latency


def _stats(values: Sequence[float]) -> dict[str, float]:
    """SGLang's statistics of `values` in ms; an empty list counts as [0]."""
    a = np.asarray(values if values else [0.0], dtype=np.float64) * 1000.0
    s = {"mean": np.mean(a), "median": np.median(a), "std": np.std(a), "max": np.max(a)}
    s.update({f"p{q}": np.percentile(a, q) for q in (90, 95, 99)})
    return {k: float(v) for k, v in s.items()}


def token_times(r: RequestRecord) -> list[float]:
    """When each output token arrived: the first chunk, then one per ITL entry."""
    times = [r.start_time + r.ttft]
    for gap in r.itl:
        times.append(times[-1] + gap)
    return times


def peak_buckets(records: Sequence[RequestRecord]) -> tuple[list[float], list[int]]:
    """Output tokens and requests in flight per 1-second bucket from the first send."""
    ok = [r for r in records if r.success]
    if not ok:
        return [], []
    t0 = min(r.start_time for r in ok)
    n = int(np.ceil(max(r.end_time for r in ok) - t0)) + 1
    tokens, active = [0.0] * n, [0] * n
    for r in ok:
        for t in token_times(r):
            if 0 <= int(t - t0) < n:
                tokens[int(t - t0)] += 1
        for s in range(int(r.start_time - t0), min(int(r.end_time - t0) + 1, n)):
            active[s] += 1
    return tokens, active


def split_chunk_itls(r: RequestRecord, count: Callable[[str], int]) -> list[float]:
    """The ITLs of a stream whose chunks carry several tokens without saying how many (OpenAI
    APIs under speculative decoding): each chunk's gap split over its retokenized length."""
    itls: list[float] = []
    for gap, text in zip(r.itl, r.text_chunks, strict=False):
        n = max(count(text), 1)
        itls += [gap / n] * n
    return itls


def compute_metrics(
    records: Sequence[RequestRecord],
    duration: float,
    tokenizer_count: Callable[[str], int],
    retokenize_itl: bool = False,
) -> dict[str, Any]:
    """SGLang's BenchmarkMetrics over the records of one run, under its JSON keys; times in ms.

    `tokenizer_count(text)` is the number of tokens of a generated text (retokenized count);
    `retokenize_itl` splits each chunk's gap over its retokenized length (SGLang does so on its
    OpenAI backends when the server reports a speculative accept length).
    """
    output_lens, retok_lens, ttfts, e2es, tpots, itls = [], [], [], [], [], []
    total_input = 0
    for r in records:
        if not r.success:
            continue
        output_lens.append(r.output_len)
        retok_lens.append(tokenizer_count(r.generated_text))
        total_input += r.prompt_len
        if r.output_len > 1:
            tpots.append((r.latency - r.ttft) / (r.output_len - 1))
        itls += split_chunk_itls(r, tokenizer_count) if retokenize_itl else r.itl
        ttfts.append(r.ttft)
        e2es.append(r.latency)
    completed, total_output, total_retok = len(output_lens), sum(output_lens), sum(retok_lens)
    tokens, active = peak_buckets(records)
    m: dict[str, Any] = {
        "duration": duration,
        "completed": completed,
        "failed": len(records) - completed,
        "total_input_tokens": total_input,
        "total_input_text_tokens": total_input,
        "total_input_vision_tokens": 0,
        "total_output_tokens": total_output,
        "total_output_tokens_retokenized": total_retok,
        "request_throughput": completed / duration,
        "input_throughput": total_input / duration,
        "output_throughput": total_output / duration,
        "output_throughput_retokenized": total_retok / duration,
        "total_throughput": (total_input + total_output) / duration,
        "total_throughput_retokenized": (total_input + total_retok) / duration,
    }
    for name, values in (("e2e_latency", e2es), ("ttft", ttfts), ("tpot", tpots), ("itl", itls)):
        s = _stats(values)
        for k in STATS:
            m[f"{k}_{name}_ms"] = s[k]
    m["max_itl_ms"] = _stats(itls)["max"]
    m["concurrency"] = sum(e2es) / duration
    m["max_output_tokens_per_s"] = float(max(tokens, default=0.0))
    m["max_concurrent_requests"] = int(max(active, default=0))
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
