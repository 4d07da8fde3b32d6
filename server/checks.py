"""What the server can start with: a flag whose feature is not built yet, or cannot work on this
machine, stops the server at start with one line that names the flag and says why
(check_supported); a flag that is accepted but has no effect here is logged as such (notes).
Nothing is silently ignored. Also the values derived from flags (device, dtype, FP8 format,
decode graph sizes, speculative settings, chat template). Nothing here imports torch unless a
flag needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pyllama4.server import compat_flags, peer_flags
from pyllama4.server.flags import (
    CHECK_ORDER,
    DEFAULT_GRAPH_MAX_BS,
    DTYPE_ALIASES,
    PROG,
    SPEC_DEFAULT_TREE_TOKENS,
    SPEC_DEFAULTS,
)
from pyllama4.server.model_source import is_hub_id

log = logging.getLogger("pyllama4.serve")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(args: argparse.Namespace) -> str:
    """--device, else cpu for the demo model, else cuda when torch sees a GPU, else cpu."""
    if args.device is not None:
        return args.device
    if args.model_path is None:
        return "cpu"
    return "cuda" if _cuda_available() else "cpu"


def graph_max_bs(args: argparse.Namespace, device: str) -> int:
    """The largest decode batch captured in a graph; 0: none (the CPU, --disable-cuda-graph)."""
    if device == "cpu" or args.disable_cuda_graph:
        return 0
    return args.cuda_graph_max_bs or DEFAULT_GRAPH_MAX_BS


def resolve_fp8_format(args: argparse.Namespace, device: str) -> str:
    """--fp8-format, else e4m3fnuz on an MI300 (gfx942: its FP8 hardware format), else e4m3fn."""
    if args.fp8_format != "auto":
        return args.fp8_format
    if device == "cuda":
        import torch

        if torch.version.hip and "gfx942" in torch.cuda.get_device_properties(0).gcnArchName:
            return "e4m3fnuz"
    return "e4m3fn"


def checkpoint_is_quantized(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    text = config.get("text_config") or {}
    return bool(config.get("quantization_config") or text.get("quantization_config"))


def resolve_dtype(args: argparse.Namespace, device: str) -> str:
    """--dtype; auto: bfloat16 on a GPU; on the CPU bfloat16 where the CPU computes it natively
    and faster than float32 (measured at start, logged with why), else float32."""
    dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "bfloat16"
    from pyllama4.engine import auto_dtype

    chosen, why = auto_dtype(device)
    log.info("--dtype auto on the CPU: %s", why)
    return chosen


def _check_model_path(value: str) -> str | None:
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return "no config.json in it: not a Hugging Face checkpoint directory"
        return None
    if path.exists():
        return "not a directory: give the checkpoint's directory"
    if is_hub_id(value):
        return None  # a Hugging Face Hub id: resolved at start (pyllama4.server.model_source)
    return "no such directory"


TOOL_CALL_PARSERS = {"pythonic": "pythonic", "llama4_pythonic": "pythonic"}


def _check_tool_call_parser(value: str) -> str | None:
    if value in TOOL_CALL_PARSERS:
        return None
    return f"unknown parser; the choices are {', '.join(TOOL_CALL_PARSERS)}"


def chat_template_text(value: str) -> str:
    """The template --chat-template names: a built-in one, else a file's text (OSError)."""
    from pyllama4.chat_templates import builtin_template

    builtin = builtin_template(value)
    if builtin is not None:
        return builtin
    return Path(value).expanduser().read_text(encoding="utf-8")


def _check_chat_template(value: str) -> str | None:
    try:
        chat_template_text(value)
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot read it ({getattr(e, 'strerror', None) or e})"


class SpecSettings(NamedTuple):
    """pyllama4.speculative.eagle.SpecConfig's fields (torch is not imported to parse flags)."""

    num_steps: int
    topk: int
    num_draft_tokens: int


def _check_algorithm(value: str) -> str | None:
    if value.upper() == "EAGLE3":
        return None
    return "the supported algorithm is EAGLE3 (with an EAGLE3 draft, e.g. SGLang's published ones)"


def _check_spec_count(least: int) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= least else f"must be at least {least}"


def speculative_config(args: argparse.Namespace) -> SpecSettings | None:
    """The EAGLE3 settings the flags ask for (SGLang's rules: a chain verifies num-steps + 1
    tokens, whatever --speculative-num-draft-tokens says), or None without the algorithm."""
    if args.speculative_algorithm is None:
        return None
    steps = args.speculative_num_steps or SPEC_DEFAULTS[0]
    topk = args.speculative_eagle_topk or SPEC_DEFAULTS[1]
    tokens = args.speculative_num_draft_tokens
    if topk == 1:
        if tokens is not None and tokens != steps + 1:
            log.warning(
                "--speculative-num-draft-tokens %d: a chain (--speculative-eagle-topk 1) of %d "
                "steps verifies %d tokens; using %d",
                tokens,
                steps,
                steps + 1,
                steps + 1,
            )
        tokens = steps + 1
    elif tokens is None:
        tokens = min(SPEC_DEFAULT_TREE_TOKENS, 1 + topk + (steps - 1) * topk * topk)
    return SpecSettings(steps, topk, tokens)


# dest -> check(value) -> why the server cannot start with it, or None.
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "model_path": lambda v: _check_model_path(v) if v is not None else None,
    "quantization": lambda v: (
        None
        if v is None or v.lower() == "fp8"
        else f"{v!r} is not supported; the supported method is fp8 (FP8 checkpoints are "
        "detected from their config.json)"
    ),
    "tool_call_parser": lambda v: None if v is None else _check_tool_call_parser(v),
    "speculative_algorithm": lambda v: None if v is None else _check_algorithm(v),
    "speculative_draft_model_path": lambda v: None if v is None else _check_model_path(v),
    "speculative_num_steps": _check_spec_count(1),
    "speculative_eagle_topk": _check_spec_count(1),
    "speculative_num_draft_tokens": _check_spec_count(2),
    "allowed_local_media_path": lambda v: (
        None if v is None or Path(v).expanduser().is_dir() else "not a directory"
    ),
    "device": lambda v: (
        "no GPU is visible to torch (torch.cuda.is_available() is False)"
        if v == "cuda" and not _cuda_available()
        else None
    ),
    "chat_template": lambda v: _check_chat_template(v) if v is not None else None,
}


_IMAGE_FLAGS = (
    "max_image_tiles",
    "max_images_per_request",
    "max_image_pixels",
    "image_fetch_timeout",
    "disable_image_url_fetch",
    "allowed_media_domains",
    "image_fetch_networks",
    "allowed_local_media_path",
)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


_SPEC_FLAGS = (
    "speculative_draft_model_path",
    "speculative_num_steps",
    "speculative_eagle_topk",
    "speculative_num_draft_tokens",
)


def _distributed_problem(args: argparse.Namespace) -> str | None:
    nnodes, tp = args.nnodes, args.tp
    if tp % nnodes:
        return f"--tp {tp}: not divisible by --nnodes {nnodes} (each node runs tp / nnodes ranks)"
    if args.node_rank >= nnodes:
        return f"--node-rank {args.node_rank}: must be below --nnodes {nnodes}"
    if nnodes > 1 and not args.dist_init_addr:
        return f"--nnodes {nnodes}: needs --dist-init-addr HOST:PORT (where the ranks meet)"
    if tp > 1 and args.speculative_algorithm is not None:
        return f"--tp {tp}: EAGLE3 with tensor parallelism is not built yet (use --tp 1)"
    if tp > 1 and (args.quantization or "").lower() == "fp8":
        return f"--tp {tp}: FP8 with tensor parallelism is not built yet (use --tp 1)"
    return None


def first_problem(args: argparse.Namespace) -> str | None:
    """'--flag value: why' for the first flag (in typed order) the server cannot start with."""
    order = getattr(args, "given", None)
    if order is None:
        order = (*CHECK_ORDER, *compat_flags.DESTS)
    for dest in order:
        if dest in ("tp", "nnodes", "node_rank", "dist_init_addr"):
            problem = _distributed_problem(args)
            if problem is not None:
                return problem
        if dest in _SPEC_FLAGS and getattr(args, dest) is not None:
            if args.speculative_algorithm is None:
                return f"{_flag(dest)} {getattr(args, dest)}: needs --speculative-algorithm EAGLE3"
        algorithm = args.speculative_algorithm
        if dest == "speculative_algorithm" and algorithm is not None:
            if _check_algorithm(algorithm) is None and args.speculative_draft_model_path is None:
                return (
                    f"--speculative-algorithm {algorithm}: needs "
                    "--speculative-draft-model-path (an EAGLE3 draft checkpoint directory)"
                )
        check = _CHECKS.get(dest)
        value = getattr(args, dest, None)
        why = check(value) if check is not None else compat_flags.problem(dest, args)
        if why is not None:
            shown = "" if isinstance(value, bool) else f" {value}"
            return f"{_flag(dest)}{shown}: {why}"
    return None


def notes(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(log level, line) for each accepted flag that has no effect here."""
    out = peer_flags.notes(args) + compat_flags.notes(args)
    device = resolve_device(args)
    if args.trust_remote_code:
        out.append(
            (
                logging.INFO,
                "--trust-remote-code: accepted; no code from the checkpoint is ever run "
                "(pyllama4 implements Llama 4 itself)",
            )
        )
    if args.cuda_graph_max_bs is not None and device == "cpu":
        # A tuning knob: CUDA graphs only exist on a GPU, on the CPU it means nothing.
        out.append(
            (
                logging.INFO,
                f"--cuda-graph-max-bs {args.cuda_graph_max_bs}: no effect on the CPU "
                "(CUDA graphs are a GPU feature)",
            )
        )
    if not args.enable_multimodal:
        for dest in _IMAGE_FLAGS:
            if dest in getattr(args, "given", ()):
                out.append(
                    (logging.WARNING, f"{_flag(dest)}: no effect without --enable-multimodal")
                )
    if args.mem_fraction_static is not None and device == "cpu":
        out.append(
            (
                logging.INFO,
                f"--mem-fraction-static {args.mem_fraction_static}: no effect on the CPU "
                "(the KV cache there gets a quarter of RAM, at most 1 GiB)",
            )
        )
    return out


def check_supported(args: argparse.Namespace) -> None:
    """Stops (SystemExit with one line naming the flag) when a flag cannot be honoured; then
    logs a line for each accepted flag that has no effect here."""
    problem = first_problem(args)
    if problem is not None:
        raise SystemExit(f"{getattr(args, 'prog', PROG)}: {problem}")
    for level, line in notes(args):
        log.log(level, line)
