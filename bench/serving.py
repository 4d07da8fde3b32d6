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

The parts, beside this script in bench/ (it imports them by name, as a script run by path does):
serving_data.py samples the prompts, serving_clients.py streams one request per backend,
serving_load.py drives one measured run, serving_metrics.py computes the metrics from the
requests' records, serving_report.py prints the blocks and the comparison and draws --plot, and
server_cpu.py reads the server's CPU time from /proc. This script holds the command line, the
servers under test, and the order of the runs with their JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from server_cpu import cpu_available, local_server_pid, tree_cpu_seconds
from serving_clients import BACKENDS
from serving_data import DatasetRow, sample_random, sample_sharegpt
from serving_load import Target, run_benchmark, warm_up
from serving_metrics import RequestRecord, compute_metrics, cpu_metrics
from serving_report import format_comparison, format_result, plot

from pyllama4.bench_data import SHAREGPT

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
        epilog=__doc__[__doc__.index("Example") : __doc__.index("The parts, beside")],
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
