"""The settings SGLang's and vLLM's command lines have beyond pyllama4's own table: the model as
`vllm serve MODEL` takes it, the tokenizer's directory, the random seed, the KV cache dtype, the
attention backend, data and expert parallel sizes, the prefill budget, the sampling defaults and
the HTTP server's log level.

Invariant: each flag here has the peer's meaning, or stops the server at start with one line that
says why and what to use (problem); an accepted value with no effect here is logged (notes).
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from pyllama4.server.flag_types import int_in
from pyllama4.server.model_source import is_hub_id

LOG_LEVELS_HTTP = ("trace", "debug", "info", "warning", "error", "critical")
SAMPLING_DEFAULTS = ("model", "openai")
ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")  # sglang-router's
# SGLang's --attention-backend choices for a model like Llama 4 (MHA): accepted, and pyllama4's
# own attention runs whatever they say (torch SDPA for prefill, its paged decode kernel on a GPU).
ATTENTION_BACKENDS = (
    "triton",
    "torch_native",
    "flex_attention",
    "fa3",
    "fa4",
    "flashinfer",
    "trtllm_mha",
    "aiter",
    "wave",
    "intel_amx",
    "dual_chunk_flash_attn",
    # vLLM's spellings
    "flash_attn",
    "flashinfer",
    "triton_attn",
    "rocm_aiter_fa",
    "rocm_attn",
    "torch_sdpa",
    "flex_attention",
)
KV_DTYPES = ("auto", "bf16", "bfloat16")
ATTENTION_DESTS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
_MODEL_DTYPE = "the KV cache is stored in the model's dtype (auto)"
DEFAULT_STEP_TOKENS = 8192  # pyllama4.runner.MAX_STEP_TOKENS (torch is not imported here)


def images_per_prompt(text: str) -> int:
    """vLLM's --limit-mm-per-prompt, '{"image": N}' or image=N: the images a request may hold."""
    try:
        limits: Any = json.loads(text)
    except ValueError:
        limits = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    if not isinstance(limits, dict) or "image" not in limits:
        raise argparse.ArgumentTypeError(f"{text!r}: expected '{{\"image\": N}}' or image=N")
    others = [k for k, v in limits.items() if k != "image" and str(v) != "0"]
    if others:
        raise argparse.ArgumentTypeError(f"{text!r}: Llama 4 takes images only, not {others[0]}")
    return int_in(1)(str(limits["image"]))


def add_compat_flags(p: argparse.ArgumentParser) -> None:
    """The group of SGLang / vLLM settings, with SGLang's spelling first."""
    g = p.add_argument_group("more SGLang / vLLM settings")
    g.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="the model as `vllm serve MODEL` takes it: the same as --model-path MODEL",
    )
    g.add_argument(
        "--tokenizer-path",
        "--tokenizer",
        metavar="DIR|ID",
        help="load the tokenizer (and its chat template) from here, not from --model-path",
    )
    g.add_argument(
        "--random-seed",
        "--seed",
        type=int,
        metavar="N",
        help="seed torch's generators at start, so that requests without a seed sample the same "
        "tokens after a restart (given the same requests in the same order)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        metavar="DTYPE",
        help="auto (the model's dtype) or bfloat16; FP8 / FP4 KV caches are not built yet",
    )
    for dest in ATTENTION_DESTS:
        g.add_argument(
            "--" + dest.replace("_", "-"),
            metavar="NAME",
            help="accepted (SGLang's and vLLM's names); pyllama4 runs its own attention",
        )
    _add_scheduling_flags(g)


def _add_scheduling_flags(g: argparse._ArgumentGroup) -> None:
    """Data and expert parallel sizes, the prefill budget, sampling defaults, HTTP logs."""
    g.add_argument(
        "--dp-size",
        "--dp",
        "--data-parallel-size",
        "-dp",
        dest="dp_size",
        type=int_in(1),
        default=1,
        metavar="N",
        help="data-parallel replicas, each with its own --tp ranks, behind sglang-router on "
        '--host/--port (default 1; more needs pip install "pyllama4[router]")',
    )
    g.add_argument(
        "--base-gpu-id",
        type=int_in(0),
        default=0,
        metavar="N",
        help="with --dp: the first GPU the replicas use (default 0)",
    )
    g.add_argument(
        "--gpu-id-step",
        type=int_in(1),
        default=1,
        metavar="N",
        help="with --dp: the distance between consecutive GPU ids (default 1)",
    )
    g.add_argument(
        "--router-policy",
        choices=ROUTER_POLICIES,
        default="cache_aware",
        help="with --dp: how sglang-router picks a replica (default cache_aware)",
    )
    g.add_argument(
        "--ep-size",
        "--ep",
        "--expert-parallel-size",
        dest="ep_size",
        type=int_in(1),
        metavar="N",
        help="expert parallel size: 1 or --tp (the MoE is sharded over the --tp ranks)",
    )
    g.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="vLLM's spelling of --ep-size equal to --tp",
    )
    g.add_argument(
        "--max-prefill-tokens",
        type=int_in(1),
        metavar="N",
        help="the most prompt tokens one step prefills; below --chunked-prefill-size it lowers "
        "the step budget to N (default: --chunked-prefill-size)",
    )
    g.add_argument(
        "--sampling-defaults",
        choices=SAMPLING_DEFAULTS,
        default="model",
        help="the values of temperature, top_p, top_k, min_p and repetition_penalty a request "
        "leaves unset: model (the checkpoint's generation_config.json, default) or openai",
    )
    g.add_argument(
        "--generation-config",
        metavar="auto|vllm|DIR",
        help="vLLM's spelling: auto = --sampling-defaults model, vllm = --sampling-defaults "
        "openai, DIR = the generation_config.json in DIR",
    )
    g.add_argument(
        "--log-level-http",
        "--uvicorn-log-level",
        type=str.lower,
        choices=LOG_LEVELS_HTTP,
        help="the HTTP server's log level (hypercorn's loggers; default: --log-level)",
    )
    g.add_argument(
        "--limit-mm-per-prompt",
        dest="max_images_per_request",
        type=images_per_prompt,
        default=argparse.SUPPRESS,
        metavar='{"image":N}',
        help="vLLM's spelling of --max-images-per-request N",
    )


def finish(parser: argparse.ArgumentParser, args: argparse.Namespace, given: list[str]) -> None:
    """Folds the positional MODEL into --model-path (a one-line error if both name different
    models) and --enable-expert-parallel into --ep-size."""
    model = args.__dict__.pop("model", None)
    if model is not None:
        if args.model_path is not None and args.model_path != model:
            parser.error(f"MODEL {model} and --model-path {args.model_path}: give one of them")
        args.model_path = model
        if "model_path" not in given:
            given.insert(0, "model_path")
    if args.enable_expert_parallel and args.ep_size is None:
        args.ep_size = args.tp


def _kv_problem(value: str, dtype: str) -> str | None:
    low = value.lower()
    if low.startswith(("fp8", "mxfp8")):
        return f"an FP8 KV cache is not built yet; {_MODEL_DTYPE}"
    if "fp4" in low:
        return f"an FP4 KV cache is not built yet; {_MODEL_DTYPE}"
    if low not in KV_DTYPES:
        return f"unknown KV cache dtype; the choices are {', '.join(KV_DTYPES)}"
    if low != "auto" and dtype not in ("auto", "bfloat16"):
        return f"the KV cache is stored in the model's dtype (--dtype {dtype}); use auto"
    return None


def _attention_problem(value: str) -> str | None:
    if value.lower() in ATTENTION_BACKENDS:
        return None
    names = ", ".join(sorted(set(ATTENTION_BACKENDS)))
    return (
        "not an attention backend for Llama 4 (MLA and sparse-attention backends are for "
        f"DeepSeek-style models); the accepted names are {names}"
    )


def _dp_problem(args: argparse.Namespace) -> str | None:
    if importlib.util.find_spec("sglang_router") is None:
        return 'replicas run behind sglang-router: pip install "pyllama4[router]"'
    if args.nnodes > 1:
        return "replicas run on one machine; for several, run a server on each behind sglang-router"
    return None


def problem(dest: str, args: argparse.Namespace) -> str | None:
    """Why the server cannot start with the flag `dest` as given, or None."""
    value = getattr(args, dest, None)
    if value is None:
        return None
    if dest == "kv_cache_dtype":
        return _kv_problem(value, args.dtype)
    if dest.endswith("attention_backend"):
        return _attention_problem(value)
    if dest == "dp_size" and value > 1:
        return _dp_problem(args)
    if dest == "ep_size" and value not in (1, args.tp):
        return (
            f"expert parallelism is not built; the MoE is sharded over the --tp {args.tp} ranks "
            f"(pass --ep-size 1 or {args.tp})"
        )
    if dest == "tokenizer_path":
        path = Path(value).expanduser()
        if not path.is_dir() and not is_hub_id(value):
            return "no such directory"
    if dest == "generation_config":
        if value not in ("auto", "vllm") and not Path(value).expanduser().is_dir():
            return "not auto, vllm or a directory"
        if args.sampling_defaults == "openai" and value != "vllm":
            return "contradicts --sampling-defaults openai (give one of them)"
    return None


DESTS = (
    "tokenizer_path",
    "kv_cache_dtype",
    *ATTENTION_DESTS,
    "dp_size",
    "ep_size",
    "generation_config",
)


def notes(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(log level, line) for each flag of this group accepted without effect here."""
    given = getattr(args, "given", ())
    out = []
    for dest in ATTENTION_DESTS:
        if getattr(args, dest) is not None:
            out.append(
                (
                    logging.WARNING,
                    f"--{dest.replace('_', '-')} {getattr(args, dest)}: accepted, no effect: "
                    "pyllama4 runs its own attention (torch SDPA for prefill, its paged decode "
                    "kernel on a GPU)",
                )
            )
    if args.ep_size is not None and args.tp > 1 and "ep_size" in given:
        out.append(
            (
                logging.INFO,
                f"--ep-size {args.ep_size}: the MoE is sharded over the --tp {args.tp} ranks "
                "(each holds a slice of every expert); same outputs as expert parallelism",
            )
        )
    budget = args.chunked_prefill_size or DEFAULT_STEP_TOKENS
    if args.max_prefill_tokens is not None and args.max_prefill_tokens >= budget:
        out.append(
            (
                logging.INFO,
                f"--max-prefill-tokens {args.max_prefill_tokens}: no effect: a step already "
                f"prefills at most --chunked-prefill-size ({budget}) tokens",
            )
        )
    if args.kv_cache_dtype.lower() != "auto":
        out.append(
            (
                logging.INFO,
                f"--kv-cache-dtype {args.kv_cache_dtype}: the KV cache is stored in the model's "
                "dtype (--dtype)",
            )
        )
    return out


def step_budget(args: argparse.Namespace) -> int | None:
    """The engine's token budget per step: --chunked-prefill-size, lowered to
    --max-prefill-tokens when that is smaller (None: the engine's default)."""
    if args.max_prefill_tokens is None:
        return args.chunked_prefill_size
    return min(args.chunked_prefill_size or DEFAULT_STEP_TOKENS, args.max_prefill_tokens)


def configure(args: argparse.Namespace) -> None:
    """What these flags set at start, before the model loads: the HTTP loggers' level and, with
    --random-seed, torch's generators (unseeded requests sample from torch's default one)."""
    if args.log_level_http is not None:
        level = "DEBUG" if args.log_level_http == "trace" else args.log_level_http.upper()
        logging.getLogger("hypercorn").setLevel(level)
    if args.random_seed is not None:
        import torch

        torch.manual_seed(args.random_seed)
        logging.getLogger("pyllama4.serve").info(
            "--random-seed %d: torch's generators seeded", args.random_seed
        )
