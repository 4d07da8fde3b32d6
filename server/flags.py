"""The flag table of `pyllama4-serve`: every flag, its type, default and help, and parse_args.

Every flag of the SGLang command lines our users type for Llama 4 is accepted with SGLang's
spelling and meaning (the peers' other flags and spellings: pyllama4.server.compat_flags and
pyllama4.server.peer_flags). This module only parses (one-line argparse errors); what a flag may
be set to on this machine is checked in pyllama4.server.checks. It is long because it is a table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from pyllama4.server.compat_flags import add_compat_flags, finish
from pyllama4.server.flag_types import fraction, int_in
from pyllama4.server.http_flags import add_http_flags
from pyllama4.server.peer_flags import add_peer_flags, check_known

PROG = "pyllama4-serve"
# pyllama4.kernels.moe.MAX_TOKENS: above it the MoE runs grouped matmuls, not tried in a graph yet
DEFAULT_GRAPH_MAX_BS = 64
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "half", "float")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # SGLang's (and vLLM's) spellings
SPEC_DEFAULTS = (3, 1)  # --speculative-num-steps, --speculative-eagle-topk (SGLang's for Llama 4)
SPEC_DEFAULT_TREE_TOKENS = 8

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


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog,
        description="Serve a Llama 4 checkpoint over the OpenAI API (and SGLang's native API). "
        "Flags follow SGLang's launch_server; with no --model-path the built-in demo model is "
        "served on the CPU.",
        allow_abbrev=False,  # a flag is spelled out, as in SGLang's documented command lines
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model-path",
        metavar="DIR|ID",
        help="a local Hugging Face Llama 4 checkpoint directory, or a Hub id such as "
        "meta-llama/Llama-4-Scout-17B-16E-Instruct (resolved in the Hugging Face cache, "
        "downloaded if missing; HF_TOKEN, HF_HUB_OFFLINE and HF_ENDPOINT apply) (default: the "
        "built-in demo model, SmolLM2-135M-Instruct as a Llama 4 text checkpoint, on the CPU)",
    )
    model.add_argument(
        "--revision",
        metavar="REV",
        help="with a Hub id: the branch, tag or commit to serve (default: main)",
    )
    model.add_argument(
        "--download-dir",
        metavar="DIR",
        help="with a Hub id: the Hugging Face cache directory to use (default: HF_HUB_CACHE, "
        "else $HF_HOME/hub)",
    )
    model.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights and KV cache dtype; auto = bfloat16 on a GPU, and on a CPU with native "
        "bf16 (AVX-512 BF16 / AMX) where it measures faster at start, else float32 (half = "
        "float16, float = float32)",
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
        type=int_in(1),
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
        "llama4_pythonic (Meta's pythonic tool-call format; SGLang's name: llama-4)",
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
        type=int_in(1),
        metavar="N",
        help="the most tiles an image is cut into, besides its global tile (default: the "
        "checkpoint's preprocessor_config.json max_patches, 16 for Llama 4)",
    )
    images.add_argument(
        "--max-images-per-request",
        type=int_in(1),
        default=10,
        metavar="N",
        help="more images in one request are refused with a 400 (default 10)",
    )
    images.add_argument(
        "--max-image-pixels",
        type=int_in(1),
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
        "--allowed-media-domains",
        nargs="+",
        metavar="HOST",
        help="fetch image URLs only from these hosts (exact names or IP literals, checked on "
        "every redirect too; default: any host)",
    )
    images.add_argument(
        "--image-fetch-networks",
        choices=("public", "private", "any"),
        default="private",
        help="addresses an image URL may be fetched from, checked for every resolved address of "
        "every redirect: public (globally routable only), private (default: also RFC 1918, "
        "CGNAT and fc00::/7; never loopback, link-local incl. 169.254.169.254, unspecified, "
        "multicast or reserved) or any (no check: tests and local development only)",
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
        "--cpu-threads",
        type=int_in(1),
        metavar="N",
        help="on the CPU: torch compute threads (default: OMP_NUM_THREADS if set, else the "
        "usable cores less --cpu-reserved-cores)",
    )
    hw.add_argument(
        "--cpu-reserved-cores",
        type=int_in(0),
        metavar="N",
        help="on the CPU: cores kept free of compute threads for the event loop and HTTP "
        "(default 1 with two or more cores)",
    )
    hw.add_argument(
        "--cpu-bind",
        default="auto",
        metavar="auto|none|LIST",
        help="on the CPU: bind the compute threads to cores; auto: the last --cpu-threads "
        "usable cores (unbound when they would take a reserved core); none; or a list like 1-3",
    )
    hw.add_argument(
        "--tp",
        "--tp-size",
        dest="tp",
        type=int_in(1),
        default=1,
        metavar="N",
        help="tensor parallel size: the model is sharded over N ranks (GPUs; processes on the "
        "CPU), this process being rank 0 (default 1)",
    )
    hw.add_argument(
        "--nnodes", type=int_in(1), default=1, metavar="N", help="machines the ranks span"
    )
    hw.add_argument(
        "--node-rank",
        type=int_in(0),
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
        type=fraction,
        metavar="F",
        help="fraction of GPU memory for weights + KV cache (default 0.85); no effect on the CPU",
    )
    hw.add_argument(
        "--cuda-graph-max-bs",
        type=int_in(1),
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
        type=int_in(1),
        metavar="N",
        help="the KV cache's size in tokens (default: from --mem-fraction-static on a GPU; on "
        "the CPU a quarter of RAM, at most 1 GiB)",
    )
    hw.add_argument(
        "--page-size", type=int_in(1), metavar="N", help="tokens per KV page (default 16)"
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
        type=int_in(1),
        metavar="N",
        help="the most tokens one step computes; longer prompts are prefilled in chunks "
        "(default 8192)",
    )
    sched.add_argument(
        "--max-running-requests",
        type=int_in(1),
        metavar="N",
        help="the most requests in a batch (default 256)",
    )
    sched.add_argument(
        "--max-queued-requests",
        type=int_in(1),
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

    add_http_flags(p)
    add_compat_flags(p)
    add_peer_flags(p)
    return p


def parse_args(argv: Sequence[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    """The server's options. `args.given` lists the dests of the flags typed, in typed order."""
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    check_known(parser, argv)
    args = parser.parse_args(argv)
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    args.prog = prog
    dests = {s: a.dest for a in parser._actions for s in a.option_strings}
    given: list[str] = []
    for token in argv:
        dest = dests.get(token.split("=", 1)[0]) if token.startswith("-") else None
        if dest is not None and dest not in given:
            given.append(dest)
    finish(parser, args, given)
    args.given = given
    return args
