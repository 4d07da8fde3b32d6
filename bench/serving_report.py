"""What bench/serving.py prints and draws: SGLang's "Serving Benchmark Result" block, label for
label and column for column, the summary comparing two servers' runs, and the optional plot.

Formatting only: the figures come in as serving_metrics.py's metrics dicts (and, for the plot,
the requests' records); nothing here measures or computes a metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
from serving_data import part_of_serving
from serving_metrics import RequestRecord, peak_buckets

CPU_LINES = (
    ("Server CPU seconds:", "server_cpu_seconds"),
    ("Server CPU ms per output token:", "server_cpu_ms_per_output_token"),
)
SECTIONS = (
    ("End-to-End Latency", "e2e_latency", "E2E Latency"),
    ("Time to First Token", "ttft", "TTFT"),
    ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
    ("Inter-Token Latency", "itl", "ITL"),
)
STAT_NAMES = {"mean": "Mean", "median": "Median", "p90": "P90", "p95": "P95", "p99": "P99"}


def _fmt(label: str, value: Any, spec: str = "") -> str:
    return f"{label:<40} {value:<10{spec}}"


def format_result(
    m: dict[str, Any],
    backend: str,
    request_rate: float,
    max_concurrency: int | None,
    accept_length: float | None = None,
) -> str:
    """The "Serving Benchmark Result" block, line for line as SGLang prints it (a leading blank
    line, the value column at 42, padded to 10); pyllama4's server CPU section comes last, before
    the closing line, and only when measured."""
    lines = [
        "",
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        _fmt("Backend:", backend),
        _fmt("Traffic request rate:", request_rate),
        _fmt("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
        _fmt("Successful requests:", m["completed"]),
        _fmt("Benchmark duration (s):", m["duration"], ".2f"),
        _fmt("Total input tokens:", m["total_input_tokens"]),
        _fmt("Total input text tokens:", m["total_input_text_tokens"]),
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
    if accept_length:
        lines.append(_fmt("Accept length:", accept_length, ".2f"))
    for title, key, label in SECTIONS:
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for s, name in STAT_NAMES.items():
            lines.append(_fmt(f"{name} {label} (ms):", m[f"{s}_{key}_ms"], ".2f"))
    lines.append(_fmt("Max ITL (ms):", m["max_itl_ms"], ".2f"))
    cpu = [_fmt(label, m[key], ".2f") for label, key in CPU_LINES if m.get(key) is not None]
    if cpu:
        lines += ["{s:{c}^{n}}".format(s="Server CPU", n=50, c="-"), *cpu]
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


def plot(path: str, records: list[RequestRecord], m: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    series = {
        "TTFT": [r.ttft * 1000 for r in ok],
        "E2E": [r.latency * 1000 for r in ok],
        "ITL": [x * 1000 for r in ok for x in r.itl],
        "TPOT": [(r.latency - r.ttft) * 1000 / (r.output_len - 1) for r in ok if r.output_len > 1],
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
    ax2.set_ylabel("output tokens per second")
    ax2.set_title("Output throughput over time")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
