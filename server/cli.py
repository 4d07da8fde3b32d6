"""The command line: `pyllama4-serve`, `pyllama4 serve` and `python -m pyllama4.launch_server`.

Every flag of the SGLang command lines our users type for Llama 4 is accepted with SGLang's
spelling and meaning. A flag whose feature is not built yet, or cannot work on this machine, stops
the server at start with one line that names the flag and says why (`check_supported`); a flag
that is accepted but has no effect here is logged as such. Nothing is silently ignored.

Start-up order, so that a bad command line fails in well under a second with a single line on
stderr: parse (one-line argparse errors), check_supported (before any logging, torch import or
loading), then the port is bound (a busy port fails before minutes of loading), then the model is
loaded and the app served with hypercorn until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

log = logging.getLogger("pyllama4.serve")

PROG = "pyllama4-serve"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000  # SGLang's default
# pyllama4.kernels.moe.MAX_TOKENS: above it the MoE runs grouped matmuls, not tried in a graph yet
DEFAULT_GRAPH_MAX_BS = 64
# In-flight requests get this long to finish after SIGTERM / SIGINT; then they are aborted.
SHUTDOWN_TIMEOUT_S = 30.0
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "half", "float")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # SGLang's (and vLLM's) spellings
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# The order check_supported uses when a namespace does not say in which order the flags were
# typed (it was not made by parse_args): the order of the seed's command lines.
CHECK_ORDER = (
    "model_path",
    "tp",
    "quantization",
    "tool_call_parser",
    "speculative_algorithm",
    "speculative_draft_model_path",
    "speculative_num_steps",
    "speculative_eagle_topk",
    "speculative_num_draft_tokens",
    "device",
    "chat_template",
    "allowed_local_media_path",
)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            expected = f"{low}..{high}" if high is not None else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range (expected {expected})")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is out of range (expected 0 < value <= 1)")
    return value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Serve a Llama 4 checkpoint over the OpenAI API (and SGLang's native API). "
        "Flags follow SGLang's launch_server; with no --model-path the built-in demo model is "
        "served on the CPU.",
        allow_abbrev=False,  # a flag is spelled out, as in SGLang's documented command lines
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model-path",
        metavar="DIR",
        help="a local Hugging Face Llama 4 checkpoint directory (default: the built-in demo "
        "model, SmolLM2-135M-Instruct as a Llama 4 text checkpoint, on the CPU in float32)",
    )
    model.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights and KV cache dtype; auto = bfloat16 on a GPU, float32 on the CPU "
        "(half = float16, float = float32)",
    )
    model.add_argument(
        "--quantization",
        metavar="METHOD",
        help="fp8: quantize a bf16 checkpoint's weights to FP8 at load (per-channel weight "
        "scales, dynamic per-token activation scales); FP8 checkpoints (fbgemm_fp8, "
        "compressed-tensors) are detected from their config.json with or without this flag",
    )
    model.add_argument(
        "--fp8-format",
        choices=("auto", "e4m3fn", "e4m3fnuz"),
        default="auto",
        help="FP8 encoding of the weights: e4m3fnuz on MI300 (gfx942), else e4m3fn (auto)",
    )
    model.add_argument(
        "--context-length",
        type=_int_in(1),
        metavar="N",
        help="the longest prompt + completion in tokens (default: the model's "
        "max_position_embeddings)",
    )
    model.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for SGLang compatibility; pyllama4 never runs code from a checkpoint",
    )
    model.add_argument(
        "--chat-template",
        metavar="FILE|NAME",
        help="a Jinja chat template file that replaces the checkpoint's, or a built-in one: "
        "llama4_pythonic (Meta's pythonic tool-call format)",
    )

    images = p.add_argument_group("images (with --enable-multimodal)")
    images.add_argument(
        "--enable-multimodal",
        action="store_true",
        help="take images (OpenAI image_url content parts, /generate image_data); needs a "
        "multimodal checkpoint (config.json with a vision_config)",
    )
    images.add_argument(
        "--max-image-tiles",
        type=_int_in(1),
        metavar="N",
        help="the most tiles an image is cut into, besides its global tile (default: the "
        "checkpoint's preprocessor_config.json max_patches, 16 for Llama 4)",
    )
    images.add_argument(
        "--max-images-per-request",
        type=_int_in(1),
        default=10,
        metavar="N",
        help="more images in one request are refused with a 400 (default 10)",
    )
    images.add_argument(
        "--max-image-pixels",
        type=_int_in(1),
        default=40_000_000,
        metavar="N",
        help="images with more pixels (width x height) are refused before decoding "
        "(default 40000000)",
    )
    images.add_argument(
        "--image-fetch-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds allowed to fetch an http(s) image URL (default 10)",
    )
    images.add_argument(
        "--disable-image-url-fetch",
        action="store_true",
        help="refuse http(s) image URLs (data: URLs still work)",
    )
    images.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="accept file:// image URLs and paths, only below DIR (default: refused)",
    )

    hw = p.add_argument_group("device and memory")
    hw.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="cuda (also AMD GPUs under ROCm) or cpu (default: cuda when a GPU is visible, "
        "else cpu; the demo model defaults to cpu)",
    )
    hw.add_argument(
        "--tp",
        "--tp-size",
        dest="tp",
        type=_int_in(1),
        default=1,
        metavar="N",
        help="tensor parallel size: the model is sharded over N ranks (GPUs; processes on the "
        "CPU), this process being rank 0 (default 1)",
    )
    hw.add_argument(
        "--nnodes", type=_int_in(1), default=1, metavar="N", help="machines the ranks span"
    )
    hw.add_argument(
        "--node-rank",
        type=_int_in(0),
        default=0,
        metavar="R",
        help="this machine's index; node 0 serves HTTP, the others only run their ranks",
    )
    hw.add_argument(
        "--dist-init-addr",
        metavar="HOST:PORT",
        help="where the ranks meet (torch.distributed's TCP store); needed with --nnodes > 1",
    )
    hw.add_argument(
        "--mem-fraction-static",
        type=_fraction,
        metavar="F",
        help="fraction of GPU memory for weights + KV cache (default 0.85); no effect on the CPU",
    )
    hw.add_argument(
        "--cuda-graph-max-bs",
        type=_int_in(1),
        metavar="N",
        help="decode steps of up to N requests replay a captured CUDA/HIP graph, padded to the "
        f"next captured size (default {DEFAULT_GRAPH_MAX_BS}, the fused MoE kernels' largest "
        "batch; GPU only)",
    )
    hw.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run every step eagerly (no decode graphs)",
    )
    hw.add_argument(
        "--max-total-tokens",
        type=_int_in(1),
        metavar="N",
        help="the KV cache's size in tokens (default: from --mem-fraction-static on a GPU; on "
        "the CPU a quarter of RAM, at most 1 GiB)",
    )
    hw.add_argument(
        "--page-size", type=_int_in(1), metavar="N", help="tokens per KV page (default 16)"
    )

    tools = p.add_argument_group("tool calling and structured outputs")
    tools.add_argument(
        "--tool-call-parser",
        metavar="NAME",
        help="turn tool-call outputs into OpenAI tool_calls: pythonic (Llama 4's format, also "
        "parses JSON-style calls; alias llama4_pythonic); off by default",
    )

    sched = p.add_argument_group("scheduling")
    sched.add_argument(
        "--chunked-prefill-size",
        type=_int_in(1),
        metavar="N",
        help="the most tokens one step computes; longer prompts are prefilled in chunks "
        "(default 8192)",
    )
    sched.add_argument(
        "--max-running-requests",
        type=_int_in(1),
        metavar="N",
        help="the most requests in a batch (default 256)",
    )
    sched.add_argument(
        "--max-queued-requests",
        type=_int_in(1),
        metavar="N",
        help="the most requests waiting for a batch slot; more are answered 503 with "
        "Retry-After (default: no bound)",
    )
    sched.add_argument(
        "--schedule-policy",
        choices=("fcfs", "lpm"),
        help="fcfs: first come first served (default); lpm: longest cached prefix first",
    )
    sched.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="do not reuse the KV cache of shared prompt prefixes",
    )
    sched.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="make each step's text before the next step starts (by default it is made while "
        "the next step computes)",
    )

    spec = p.add_argument_group("speculative decoding")
    spec.add_argument(
        "--speculative-algorithm",
        metavar="NAME",
        help="EAGLE3: draft tokens with an EAGLE3 draft model, verified exactly by the target",
    )
    spec.add_argument(
        "--speculative-draft-model-path",
        metavar="PATH",
        help="the EAGLE3 draft checkpoint directory (SGLang's layout: config.json + safetensors)",
    )
    spec.add_argument(
        "--speculative-num-steps",
        type=int,
        metavar="N",
        help=f"draft forwards per step (default {SPEC_DEFAULTS[0]})",
    )
    spec.add_argument(
        "--speculative-eagle-topk",
        type=int,
        metavar="N",
        help=f"branching per draft step; 1 drafts a chain (default {SPEC_DEFAULTS[1]})",
    )
    spec.add_argument(
        "--speculative-num-draft-tokens",
        type=int,
        metavar="N",
        help="tree nodes verified per step, the root included (a chain: num-steps + 1; "
        f"trees: default {SPEC_DEFAULT_TREE_TOKENS})",
    )

    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    http.add_argument(
        "--port",
        type=_int_in(0, 65535),
        default=DEFAULT_PORT,
        help=f"default {DEFAULT_PORT}; 0 picks a free port (logged)",
    )
    http.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name in the API (default: --model-path as given)",
    )
    http.add_argument(
        "--api-key",
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every endpoint except /health",
    )
    http.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info")
    return p


def parse_args(argv: Sequence[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    """The server's options. `args.given` lists the dests of the flags typed, in typed order."""
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    args.prog = prog
    dests = {s: a.dest for a in parser._actions for s in a.option_strings}
    given: list[str] = []
    for token in argv:
        dest = dests.get(token.split("=", 1)[0]) if token.startswith("--") else None
        if dest is not None and dest not in given:
            given.append(dest)
    args.given = given
    return args


# --------------------------------------------------------------------------------------------
# What is supported
# --------------------------------------------------------------------------------------------


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
    dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def _check_model_path(value: str) -> str | None:
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return "no config.json in it: not a Hugging Face checkpoint directory"
        return None
    if path.exists():
        return "not a directory: give the checkpoint's directory"
    if not value.startswith(("/", ".", "~")) and value.count("/") == 1:
        return (
            "no such directory; downloading from the Hugging Face Hub is not built yet: "
            f"fetch it first (hf download {value} --local-dir DIR) and give DIR"
        )
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


SPEC_DEFAULTS = (3, 1)  # --speculative-num-steps, --speculative-eagle-topk (Llama 4's, PEERS.md)
SPEC_DEFAULT_TREE_TOKENS = 8


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
        order = CHECK_ORDER
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
        why = check(value) if check is not None else None
        if why is not None:
            shown = "" if isinstance(value, bool) else f" {value}"
            return f"{_flag(dest)}{shown}: {why}"
    return None


def notes(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(log level, line) for each accepted flag that has no effect here."""
    out: list[tuple[int, str]] = []
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


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived before the server was serving."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def _exit_now(code: int) -> NoReturn:
    """Exit without waiting for the model thread (it may be in the middle of loading)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _fail(args: argparse.Namespace, message: str) -> NoReturn:
    raise SystemExit(f"{args.prog}: {message}")


def _bind(args: argparse.Namespace) -> socket.socket:
    """The listening socket, bound now (not listening until hypercorn serves on it), so that a
    busy port or a bad host fails before the model is loaded."""
    try:
        infos = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        _fail(args, f"--host {args.host} --port {args.port}: cannot listen there ({e})")
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> None:
    args = parse_args(argv, prog=prog)
    _configure_logging(args.log_level)
    check_supported(args)
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    try:
        _start_and_serve(args)
    except _Stopped as stop:
        name = signal.Signals(stop.signum).name
        log.info("%s before the server was up: stopped", name)
        _exit_now(0 if stop.signum == signal.SIGTERM else 128 + stop.signum)


def _start_and_serve(args: argparse.Namespace) -> None:
    import anyio
    import torch

    from pyllama4.config import ConfigError, TextConfig, VisionConfig
    from pyllama4.engine import Engine
    from pyllama4.multimodal.media import MediaPolicy
    from pyllama4.server.app import create_app  # a broken install fails before loading

    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    if args.node_rank > 0:
        _serve_ranks(args, device, dtype)
        return
    chat_template = None
    if args.chat_template is not None:
        chat_template = chat_template_text(args.chat_template)

    if args.model_path is None:
        from pyllama4.demo import CHECKPOINT_SUBDIR, demo_checkpoint

        log.info("no --model-path: serving the built-in demo model (SmolLM2-135M-Instruct)")
        path = demo_checkpoint()
        served_model_name = args.served_model_name or CHECKPOINT_SUBDIR
    else:
        path = Path(args.model_path).expanduser()
        served_model_name = args.served_model_name or args.model_path
    try:
        config = TextConfig.from_checkpoint(path)
        if args.enable_multimodal and VisionConfig.from_checkpoint(path) is None:
            _fail(
                args,
                f"--enable-multimodal: {path} is a text-only checkpoint (its config.json has no "
                "vision_config); serve a multimodal Llama 4 checkpoint, or drop the flag",
            )
    except ConfigError as e:
        _fail(args, f"--model-path {path}: {e}")
    context = args.context_length or config.max_position_embeddings
    if context > config.max_position_embeddings:
        _fail(
            args,
            f"--context-length {context}: longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings})",
        )
    sock = _bind(args)

    options: dict[str, Any] = {}
    if args.mem_fraction_static is not None:
        options["mem_fraction_static"] = args.mem_fraction_static
    if args.max_total_tokens is not None:
        options["kv_tokens"] = args.max_total_tokens
    if args.page_size is not None:
        options["page_size"] = args.page_size
    if args.max_running_requests is not None:
        options["max_running"] = args.max_running_requests
    if args.chunked_prefill_size is not None:
        options["max_step_tokens"] = args.chunked_prefill_size
    if args.disable_radix_cache:
        options["enable_prefix_cache"] = False
    if args.schedule_policy is not None:
        options["policy"] = args.schedule_policy

    spec = speculative_config(args)
    if spec is not None:
        from pyllama4.speculative.eagle import SpecConfig

        options["speculative_draft"] = Path(args.speculative_draft_model_path).expanduser()
        options["speculative"] = SpecConfig(*spec)

    quantization = None
    if args.quantization is not None:
        if checkpoint_is_quantized(path):
            log.info("--quantization %s: the checkpoint is already quantized", args.quantization)
        else:
            quantization = args.quantization.lower()
    log.info(
        "loading %s as %r: dtype %s on %s, context %d tokens",
        path,
        served_model_name,
        dtype,
        device,
        context,
    )
    start = time.monotonic()
    try:
        engine = Engine.from_checkpoint(
            path,
            dtype=dtype,
            device=device,
            context_len=context,
            enable_multimodal=args.enable_multimodal,
            max_image_tiles=args.max_image_tiles,
            quantization=quantization,
            fp8_format=resolve_fp8_format(args, device),
            tp=args.tp,
            nnodes=args.nnodes,
            dist_init_method=_init_method(args),
            cuda_graph_max_bs=graph_max_bs(args, device),
            overlap=not args.disable_overlap_schedule,
            **options,
        )
    except torch.OutOfMemoryError as e:
        log.debug("loading failed", exc_info=True)
        _fail(args, f"out of memory loading {path} on {device}: {str(e).splitlines()[0]}")
    except (ValueError, OSError) as e:  # ConfigError, a KV budget too small, missing files
        log.debug("loading failed", exc_info=True)
        _fail(args, f"cannot load {path}: {e}")
    if engine.workers is not None:
        engine.workers.watch(lambda message: _worker_died(engine, message))
    modules = [engine.runner.model] + ([engine.images.tower] if engine.images else [])
    weight_bytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    memory = engine.runner.memory
    log.info(
        "loaded in %.1f s; memory plan%s: weights %.2f GiB (%d bytes); %s; max total tokens "
        "%d; max context %d tokens",
        time.monotonic() - start,
        f" per rank (tp {args.tp}, rank 0's shown; every rank alike)" if args.tp > 1 else "",
        weight_bytes / 2**30,
        weight_bytes,
        memory.describe(),
        memory.max_tokens,
        context,
    )
    if engine.memory_report is not None:
        log.info("%s", engine.memory_report.describe())
    graphs = engine.runner.graphs
    if graphs is not None:
        log.info("decode graphs captured for batch sizes %s", ", ".join(map(str, graphs.sizes)))
    if memory.max_tokens < context:
        log.warning(
            "the KV cache holds %d tokens, fewer than the context length %d: a single request "
            "cannot grow past %d tokens",
            memory.max_tokens,
            context,
            memory.max_tokens,
        )

    if engine.images is not None:
        log.info("%s", engine.images.describe())
    if engine.speculative is not None:
        log.info("%s", engine.speculative.describe())
    local_media = args.allowed_local_media_path
    app = create_app(
        engine,
        served_model_name=served_model_name,
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        chat_template=chat_template,
        context_length=context,
        media=MediaPolicy(
            allow_fetch=not args.disable_image_url_fetch,
            fetch_timeout=args.image_fetch_timeout,
            allowed_local_path=Path(local_media).expanduser() if local_media else None,
            max_pixels=args.max_image_pixels,
        ),
        max_images_per_request=args.max_images_per_request,
        tool_call_parser=TOOL_CALL_PARSERS.get(args.tool_call_parser or ""),
    )
    anyio.run(_serve, app, sock, SHUTDOWN_TIMEOUT_S, backend="asyncio")
    engine.close()
    log.info("stopped")


def _init_method(args: argparse.Namespace) -> str | None:
    return f"tcp://{args.dist_init_addr}" if args.dist_init_addr else None


def _worker_died(engine: Any, message: str) -> None:
    """A tensor-parallel rank is gone: the others would wait for it forever. /health reports
    it at once; the process exits (status 1) a moment later, whatever it is doing."""
    log.error("%s: the server cannot go on and exits", message)
    engine.fail(message)
    threading.Timer(1.0, _exit_now, args=(1,)).start()


def _serve_ranks(args: argparse.Namespace, device: str, dtype: Any) -> None:
    """--node-rank > 0: run this node's ranks as workers of node 0's server until it stops
    them; exits non-zero if one fails."""
    from pyllama4.config import TextConfig
    from pyllama4.distributed.runtime import Workers, WorkerSpec, cpu_threads_per_rank

    per_node = args.tp // args.nnodes
    first = args.node_rank * per_node
    options: dict[str, Any] = {}
    for flag, key in (
        ("page_size", "page_size"),
        ("max_running_requests", "max_running"),
        ("chunked_prefill_size", "max_step_tokens"),
        ("schedule_policy", "policy"),
    ):
        if getattr(args, flag) is not None:
            options[key] = getattr(args, flag)
    if args.disable_radix_cache:
        options["enable_prefix_cache"] = False
    path = Path(args.model_path).expanduser()
    context = args.context_length or TextConfig.from_checkpoint(path).max_position_embeddings
    spec = WorkerSpec(
        checkpoint=str(path),
        dtype=dtype,
        device="cpu" if device == "cpu" else "cuda",
        context_len=context,
        runner_options=options,
        size=args.tp,
        init_method=_init_method(args) or "",
        threads=cpu_threads_per_rank(per_node) if device == "cpu" else None,
    )
    log.info("node %d: running ranks %d..%d", args.node_rank, first, first + per_node - 1)
    workers = Workers.spawn(spec, range(first, first + per_node))
    for p in workers.processes:
        p.join()
    codes = [p.exitcode for p in workers.processes]
    if any(codes):
        _fail(args, f"ranks {first}..{first + per_node - 1} exited with codes {codes}")
    log.info("node %d: its ranks stopped", args.node_rank)


async def _serve(app: Any, sock: socket.socket, shutdown_timeout: float) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, give in-flight requests up to
    shutdown_timeout to finish (app.shutdown aborts the rest) and return. A second signal
    during the drain exits at once (status 1)."""
    import anyio
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    url = _url(sock)
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn takes the socket over
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = (
        logging.getLogger("hypercorn.access") if log.isEnabledFor(logging.DEBUG) else None
    )
    # hypercorn's own wait for open connections: a backstop behind app.shutdown's timeout.
    config.graceful_timeout = shutdown_timeout + 5.0

    stop = anyio.Event()

    # Only the watcher is ever cancelled (cancelling the task that awaits hypercorn's serve
    # makes the cancellation escape its scope: hypercorn mixes in asyncio.TaskGroup).
    watching = anyio.CancelScope()

    async def watch_signals(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with watching, anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if stop.is_set():
                    log.warning("%s again: stopping now, without waiting for requests", name)
                    _exit_now(1)
                log.info(
                    "%s: shutting down; no new connections, in-flight requests get up to "
                    "%.0f s (send it again to stop at once)",
                    name,
                    shutdown_timeout,
                )
                stop.set()

    drain_scope = anyio.CancelScope()

    async def drain() -> None:
        with drain_scope:
            await stop.wait()
        if not stop.is_set():
            return
        with anyio.move_on_after(shutdown_timeout + 10.0) as scope:
            await app.shutdown(shutdown_timeout)
        if scope.cancelled_caught:
            log.warning("the app did not shut down within %.0f s", shutdown_timeout + 10.0)

    async def shutdown_trigger() -> None:
        # hypercorn awaits this once the app has started and the socket is accepting.
        log.info("serving on %s", url)
        await stop.wait()

    async with anyio.create_task_group() as tg:
        await tg.start(watch_signals)
        tg.start_soon(drain)
        await serve(app, config, shutdown_trigger=shutdown_trigger)
        # The task group still waits for drain() when a signal started it.
        if not stop.is_set():
            drain_scope.cancel()
        watching.cancel()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def serve_main() -> None:
    """`pyllama4-serve ...`"""
    main(prog=PROG)


def pyllama4_main(argv: Sequence[str] | None = None) -> None:
    """`pyllama4 COMMAND ...`; the one command so far is `serve`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        main(argv[1:], prog="pyllama4 serve")
        return
    from pyllama4 import __version__

    parser = _Parser(prog="pyllama4", description="pyllama4: a Llama 4 serving engine.")
    parser.add_argument("--version", action="version", version=f"pyllama4 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "serve",
        help="serve a model over the OpenAI API (pyllama4 serve --help lists its flags)",
        add_help=False,
    )
    parser.parse_args(argv)  # "serve" was handled above: only help, --version and errors remain


if __name__ == "__main__":
    serve_main()
