"""SGLang's and vLLM's flags on pyllama4's command line: their spellings of pyllama4's settings,
the flags accepted without effect here (and why), and the one-line refusal of every other one.

Invariant: every flag a command line holds is either one the parser knows, with the peer's meaning,
or refused before parsing in one line that names it and says why (a flag of SGLang or vLLM that
pyllama4 does not implement) or that it is unknown. README's "Coming from SGLang / vLLM" table is
`markdown()`, made from the same tables the parser is built from.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import NamedTuple

from pyllama4.server.peer_flag_names import SGLANG_FLAGS, VLLM_FLAGS


class Alias(NamedTuple):
    """A peer's spelling of one of pyllama4's flags."""

    flag: str
    ours: str
    peer: str  # "SGLang", "vLLM" or "SGLang, vLLM"


class Ignored(NamedTuple):
    """A peer flag accepted and logged at start as having no effect here."""

    flag: str
    nargs: str | None  # "0": a switch; None: one value; "+": one or more
    why: str


ALIASES = (
    Alias("--model", "--model-path", "SGLang, vLLM"),
    Alias("--tensor-parallel-size", "--tp", "SGLang, vLLM"),
    Alias("-tp", "--tp", "vLLM"),
    Alias("--nccl-init-addr", "--dist-init-addr", "SGLang"),
    Alias("--speculative-draft-model", "--speculative-draft-model-path", "SGLang"),
    Alias("--cuda-graph-max-bs-decode", "--cuda-graph-max-bs", "SGLang"),
    Alias("--max-model-len", "--context-length", "vLLM"),
    Alias("--gpu-memory-utilization", "--mem-fraction-static", "vLLM"),
    Alias("--max-num-seqs", "--max-running-requests", "vLLM"),
    Alias("--max-num-batched-tokens", "--chunked-prefill-size", "vLLM"),
    Alias("--block-size", "--page-size", "vLLM"),
    Alias("--enforce-eager", "--disable-cuda-graph", "vLLM"),
    Alias("--no-enable-prefix-caching", "--disable-radix-cache", "vLLM"),
    Alias("--enable-log-requests", "--log-requests", "vLLM"),
)

# The compat group's flags (pyllama4.server.compat_flags) in vLLM's spelling, for the table.
VLLM_SPELLINGS = (
    ("MODEL (positional, as `vllm serve MODEL`)", "--model-path MODEL"),
    ("--seed", "--random-seed"),
    ("--tokenizer", "--tokenizer-path"),
    ("--data-parallel-size / -dp", "--dp-size"),
    ("--enable-expert-parallel", "--ep-size equal to --tp"),
    ("--generation-config auto / vllm / DIR", "--sampling-defaults model / openai / DIR's file"),
    ("--uvicorn-log-level", "--log-level-http"),
    ("--limit-mm-per-prompt '{\"image\": N}'", "--max-images-per-request N"),
    ("--kv-cache-dtype", "--kv-cache-dtype (auto, bfloat16)"),
    ("--attention-backend", "--attention-backend (accepted, no effect)"),
    ("--download-dir, --revision, --trust-remote-code, --served-model-name", "the same flags"),
    ("--port, --host, --api-key, --dtype, --quantization fp8", "the same flags"),
    ("--chat-template, --tool-call-parser llama4_pythonic", "the same flags"),
)

# The settings whose values decide what pyllama4 does (pyllama4.server.compat_flags.problem).
VALUES = (
    (
        "--kv-cache-dtype",
        "auto, bf16, bfloat16: the model's dtype; FP8 and FP4 refused (not built)",
    ),
    (
        "--attention-backend",
        "Llama 4's backends accepted, no effect (pyllama4's own attention); "
        "MLA / sparse ones refused",
    ),
    (
        "--dp-size / --dp",
        "N replicas behind sglang-router (the router extra), on GPUs from --base-gpu-id "
        "every --gpu-id-step",
    ),
    ("--ep-size / --ep", "1 or --tp (the MoE is sharded over the --tp ranks); others refused"),
    ("--random-seed", "seeds torch at start: unseeded requests repeat after a restart"),
    ("--max-prefill-tokens", "below --chunked-prefill-size it lowers the step budget"),
    ("--tokenizer-path", "the tokenizer and its chat template from that directory"),
    ("--sampling-defaults", "model (default: generation_config.json) or openai"),
    ("--chat-template llama-4", "the built-in llama4_pythonic (Llama 4's layout; lists tools)"),
    ("--log-level-http", "hypercorn's log level"),
)

_NO_COMPILE = "pyllama4 does not use torch.compile; decode steps replay CUDA/HIP graphs"
_EP = "expert parallelism is not built: the MoE is sharded over the --tp ranks"
_LORA = "LoRA adapters are not supported"
IGNORED = (
    Ignored("--enable-metrics", "0", "metrics are always on (GET /metrics)"),
    Ignored(
        "--skip-server-warmup",
        "0",
        "pyllama4 sends no warm-up request at start (the GPU memory plan's warm-up step is part "
        "of loading)",
    ),
    Ignored("--enable-torch-compile", "0", _NO_COMPILE),
    Ignored("--torch-compile-max-bs", None, _NO_COMPILE),
    Ignored(
        "--disable-custom-all-reduce",
        "0",
        "tensor-parallel all-reduces are torch.distributed's (NCCL / RCCL); there is no custom one",
    ),
    Ignored("--enable-p2p-check", "0", "ranks talk through torch.distributed only"),
    Ignored(
        "--watchdog-timeout",
        None,
        "there is no step watchdog; a tensor-parallel rank that dies stops the server at once",
    ),
    Ignored("--stream-interval", None, "each step's new text is streamed as soon as it is made"),
    Ignored("--reasoning-parser", None, "Llama 4 writes no reasoning section to parse"),
    Ignored("--enable-auto-tool-choice", "0", "tool calling is always on"),
    Ignored("--enable-mixed-chunk", "0", "decodes always share steps with prefill chunks"),
    Ignored("--enable-chunked-prefill", "0", "chunked prefill is always on"),
    Ignored("--enable-prefix-caching", "0", "prefix caching is on by default"),
    Ignored("--enable-cache-report", "0", "usage always reports cached prompt tokens"),
    Ignored(
        "--schedule-conservativeness",
        None,
        "admission reserves the pages each request is expected to need",
    ),
    Ignored("--cuda-graph-bs", "+", "decode graphs are captured up to --cuda-graph-max-bs"),
    Ignored("--tokenizer-mode", None, "the checkpoint's Hugging Face tokenizer is always used"),
    Ignored("--load-format", None, "checkpoints load from safetensors"),
    Ignored("--sampling-backend", None, "pyllama4 has one sampler"),
    Ignored("--grammar-backend", None, "structured outputs always use xgrammar"),
    Ignored("--mm-attention-backend", None, "the vision tower runs torch SDPA"),
    Ignored("--nccl-port", None, "the ranks meet on a free port (or --dist-init-addr)"),
    Ignored("--disable-log-stats", "0", "no periodic stats lines are logged"),
    Ignored("--disable-log-requests", "0", "requests are not logged by default"),
)

REFUSED = {
    "--pp-size": "pipeline parallelism is not built; use --tp (with --nnodes across machines)",
    "--pipeline-parallel-size": "pipeline parallelism is not built; use --tp",
    "-pp": "pipeline parallelism is not built; use --tp",
    "--enable-dp-attention": "data-parallel attention is not built; use --tp",
    "--enable-lora": _LORA,
    "--lora-paths": _LORA,
    "--lora-modules": _LORA,
    "--max-loras-per-batch": _LORA,
    "--cpu-offload-gb": "offloading weights to the CPU is not built",
    "--enable-hierarchical-cache": "a host-memory tier for the KV cache is not built",
    "--disaggregation-mode": "prefill / decode disaggregation is not built",
    "--is-embedding": "embeddings are not served; pyllama4 serves Llama 4 for generation",
    "--skip-tokenizer-init": "the server needs the tokenizer: it tokenizes and detokenizes itself",
    "--json-model-override-args": "config overrides are not supported; edit a copy of config.json",
    "--hf-overrides": "config overrides are not supported; edit a copy of config.json",
    "--preferred-sampling-params": "put sampling defaults in generation_config.json "
    "(--sampling-defaults model) or use --generation-config DIR",
    "--override-generation-config": "use --generation-config DIR with a generation_config.json",
    "--allow-auto-truncate": "a prompt longer than the context is refused (400), not truncated",
    "--load-balance-method": "with --dp, sglang-router routes: choose with --router-policy",
    "--enable-custom-logit-processor": "custom logit processors are not supported",
    "--logits-processors": "custom logit processors are not supported",
    "--config": "pyllama4 takes its settings as flags, not a config file",
    "--speculative-config": "use --speculative-algorithm EAGLE3 --speculative-draft-model-path DIR",
    "--ssl-keyfile": "TLS is not built in; terminate TLS in a proxy in front of the server",
    "--ssl-certfile": "TLS is not built in; terminate TLS in a proxy in front of the server",
    "--tool-server": "tool servers are not supported; the client runs the tools",
    "--distributed-executor-backend": "pyllama4 starts its own rank processes (torch.distributed)",
    "--hf-token": "set HF_TOKEN in the environment (or `hf auth login`)",
    "--enable-eplb": _EP,
    "--moe-a2a-backend": _EP,
    "--ep-num-redundant-experts": _EP,
    "--deepep-mode": _EP,
}


PEERS = (("SGLang", SGLANG_FLAGS), ("vLLM", VLLM_FLAGS))


def refusal(flag: str, prog: str = "pyllama4-serve") -> str:
    """The one line for a flag the parser does not know."""
    why = REFUSED.get(flag)
    peers = [peer for peer, names in PEERS if flag in names]
    if why is not None:
        return f"{flag}: {why}"
    if peers:
        return f"{flag}: a flag of {' and '.join(peers)} that pyllama4 does not implement"
    return f"unknown flag {flag}; see {prog} --help"


def add_peer_flags(p: argparse.ArgumentParser) -> None:
    """The peers' spellings of pyllama4's flags, and the flags accepted without effect."""
    g = p.add_argument_group("SGLang / vLLM spellings (same meaning as the flag named)")
    actions = p._option_string_actions
    for alias in ALIASES:
        target = actions[alias.ours]
        kw: dict = {"dest": target.dest, "default": argparse.SUPPRESS, "help": f"= {alias.ours}"}
        if target.nargs == 0:
            kw["action"] = "store_true"
        else:
            kw.update(type=target.type, choices=target.choices, metavar=target.metavar)
        g.add_argument(alias.flag, **kw)
    ignored = p.add_argument_group("accepted, no effect here (a warning at start says why)")
    for flag in IGNORED:
        dest = "ignored_" + flag.flag.lstrip("-").replace("-", "_")
        if flag.nargs == "0":
            ignored.add_argument(flag.flag, dest=dest, action="store_true", help=flag.why)
        else:
            ignored.add_argument(flag.flag, dest=dest, nargs=flag.nargs, help=flag.why)


def check_known(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """parser.error (one line, status 2) for the first flag of argv the parser does not know;
    a flag's values are skipped, as argparse would take them."""
    actions = parser._option_string_actions
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return
        if token.startswith("-") and len(token) > 1 and not token[1].isdigit():
            name, has_value = token.split("=", 1)[0], "=" in token
            action = actions.get(name)
            if action is None:
                parser.error(refusal(name, parser.prog))
            if not has_value and action.nargs is None:
                i += 1
            elif not has_value and action.nargs in ("+", "*"):
                while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    i += 1
        i += 1


def notes(args: argparse.Namespace) -> list[tuple[int, str]]:
    """A warning for each accepted flag without effect that the command line holds."""
    out = []
    for flag in IGNORED:
        dest = "ignored_" + flag.flag.lstrip("-").replace("-", "_")
        if getattr(args, dest, None):
            out.append((logging.WARNING, f"{flag.flag}: accepted, no effect: {flag.why}"))
    return out


def supported(parser: argparse.ArgumentParser) -> list[str]:
    """SGLang's flags the parser takes with SGLang's meaning, one entry per setting with all its
    spellings (the peers' spellings and the flags without effect are in their own tables)."""
    elsewhere = {a.flag for a in ALIASES} | {f.flag for f in IGNORED}
    out = []
    for action in parser._actions:
        names = [s for s in action.option_strings if s not in elsewhere]
        if any(s in SGLANG_FLAGS for s in names):
            out.append(" / ".join(f"`{s}`" for s in names))
    return out


def markdown(parser: argparse.ArgumentParser) -> str:
    """README's flag tables: SGLang's flags, then vLLM's spellings."""
    lines = ["Supported with SGLang's meaning: " + ", ".join(supported(parser)) + "."]
    lines += ["", "| SGLang / vLLM flag | pyllama4 |", "| --- | --- |"]
    lines += [f"| `{flag}` | {what} |" for flag, what in VALUES]
    lines += [f"| `{a.flag}` ({a.peer}) | = `{a.ours}` |" for a in ALIASES]
    lines += [f"| `{f.flag}` | accepted, no effect: {f.why} |" for f in IGNORED]
    lines += [f"| `{flag}` | refused: {why} |" for flag, why in REFUSED.items()]
    lines += [
        "",
        "| vLLM | pyllama4 |",
        "| --- | --- |",
        *(f"| {vllm} | {ours} |" for vllm, ours in VLLM_SPELLINGS),
    ]
    return "\n".join(lines) + "\n"
