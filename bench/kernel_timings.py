"""GPU kernel timings against the device's measured ceilings, one run: paged decode attention and
the fused MoE, the fp8 linear, and the fused small ops.

Attention — for each (batch, context): Scout's attention shape per layer (40 query heads, 8 KV
heads, head_dim 128, bf16), random pages, decode (one query token per request) on a global layer
and on a chunk-local layer (chunk 8192). Achieved bandwidth = K and V bytes the step must read /
time, as a fraction of the copy bandwidth.

MoE — Scout (H 5120, I 8192, 16 experts) and Maverick (128 experts) MoE layers, top-1, random
weights, at 1, 8, 64, 512 and 4096 tokens: the layer (MoE.forward: router, shared expert and
routed experts; the fused kernels up to 64 tokens, the torch path above) beside the torch path
alone (the kernels switched off). Decode (<= 64 tokens) also times the routed part alone
(fused_moe_gpu: routing + expert kernels) and its bandwidth on the bytes of the experts it
touches (the distinct experts routed to), as a fraction of the copy bandwidth; bf16 and fp8
weights (the device's fp8 format: e4m3fnuz on ROCm, e4m3fn on CUDA). 512 and 4096 tokens give
the layer's TFLOP/s (router, shared and routed experts' matmul FLOPs / time) against a measured
bf16 torch matmul rate (8192^3).

FP8 linear — Scout's dense linears (in -> out: 5120 -> 5120, 1024, 16384; 16384 -> 5120), fp8
weights in the device's format, per-token activation quantization (ub 1200), at 1, 2, 4, 8 and
16 tokens: fp8_linear_gpu (quantization + GEMV) and its bandwidth on the weight bytes (out * in)
as a fraction of the copy bandwidth, beside torch's bf16 matmul on the same shape.

Fused small ops — Scout's decode shapes (hidden 5120; 40 query and 8 KV heads of 128; the
shared expert's intermediate 8192) at 1, 16 and 100 tokens: add_rms_norm (residual add +
RMSNorm), rope_qk_norm_kv_write (a RoPE layer: RoPE + QK-norm + the KV cache write at scattered
slots) and silu_mul (gate and up: the halves of one [T, 2I] tensor), each beside the torch ops
it replaces; bandwidth on the bytes each must move (inputs read + outputs written) as a fraction
of the copy bandwidth. At these sizes the launch latency dominates, not the bandwidth.

Times: per call with device events after warm-up (median of --iters). The copy bandwidth is
measured in the same run (a 1 GiB device-to-device copy: read + write bytes / time).
Correctness is tests/gpu's job; this script only times.

Run: python bench/kernel_timings.py [--section attention|moe|fp8|fused]  (needs a GPU and the
built kernel library; prints markdown tables for docs/benchmarks.md with the card's name).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the case builder
from gpu.paged_cases import decode_case  # noqa: E402

from pyllama4 import (
    fp8_format,  # noqa: E402
    kernels,  # noqa: E402
)
from pyllama4.kernels import attention as gpu  # noqa: E402
from pyllama4.kernels import fp8 as fp8_gpu  # noqa: E402
from pyllama4.kernels import fused  # noqa: E402
from pyllama4.kernels import moe as moe_gpu  # noqa: E402
from pyllama4.layers.ffn import MoE  # noqa: E402
from pyllama4.layers.norm import RMSNorm, l2_norm  # noqa: E402
from pyllama4.layers.rope import apply_rope, inv_frequencies, rotation  # noqa: E402

SIZES = [(1, 1024), (1, 32768), (1, 131072), (8, 8192), (32, 32768), (64, 4096), (64, 16384)]


def median_us(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(times)


def copy_gbps(iters: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / us / 1e3


def attention_section(args: argparse.Namespace, copy: float) -> None:
    print(f"### Paged decode attention (page size {args.page_size})\n")
    print("| layer | batch | context | µs | GB/s | % of copy |")
    print("|---|---:|---:|---:|---:|---:|")
    for chunk in (None, 8192):
        for batch, context in SIZES:
            case = decode_case([context] * batch, page_size=args.page_size, chunk=chunk)
            tokens = gpu.kernel_tokens(
                case.rows,
                np.arange(batch + 1, dtype=np.int32),
                np.full(batch, context, dtype=np.int32),
                case.positions,
                chunk,
                (0, batch),
                case.k_cache.shape[1],
            )

            def step(case=case, tokens=tokens):
                gpu.paged_attention_gpu(
                    case.q,
                    case.k_cache,
                    case.v_cache,
                    case.table,
                    tokens,
                    case.page_size,
                    case.chunk,
                    128**-0.5,
                )

            us = median_us(step, args.iters)
            gbps = case.kv_bytes / us / 1e3
            layer = "global" if chunk is None else "chunk-local"
            print(
                f"| {layer} | {batch} | {context} | {us:.1f} | {gbps:.0f} | "
                f"{100 * gbps / copy:.0f}% |"
            )
            del case, tokens
            torch.cuda.empty_cache()
    print()


MOE_MODELS = {"Scout": (5120, 8192, 16), "Maverick": (5120, 8192, 128)}
MOE_TOKENS = [1, 8, 64, 512, 4096]


def matmul_tflops(iters: int) -> float:
    """The bf16 torch matmul rate on 8192 x 8192 x 8192."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    us = median_us(lambda: a @ b, iters)
    return 2 * 8192**3 / us / 1e6


def bf16_moe(hidden: int, inter: int, num_experts: int) -> MoE:
    """A top-1 bf16 MoE layer on the GPU with random weights (built on the meta device)."""
    with torch.device("meta"):
        moe = MoE(hidden, inter, num_experts, 1)
    moe = moe.to(torch.bfloat16).to_empty(device="cuda")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, p.shape[-2] ** -0.5 if p.dim() == 3 else p.shape[-1] ** -0.5)
    return moe.eval()


def fp8_experts(hidden: int, inter: int, num_experts: int, fmt: int) -> moe_gpu.Fp8ExpertWeights:
    def bits(*size: int) -> torch.Tensor:
        b = torch.randint(0, 256, size, dtype=torch.uint8, device="cuda")
        b[fp8_format.is_nan(b, fmt)] = 0
        return b

    return moe_gpu.Fp8ExpertWeights(
        bits(num_experts, hidden, 2 * inter),
        torch.full((num_experts, 2 * inter), 1e-4, device="cuda"),
        bits(num_experts, inter, hidden),
        torch.full((num_experts, hidden), 1e-4, device="cuda"),
        fmt,
    )


class TorchPath:
    """Within: MoE.forward takes the torch path whatever the batch (the kernels switched off)."""

    def __enter__(self) -> None:
        self.saved = moe_gpu.dispatches
        moe_gpu.dispatches = lambda *args: False

    def __exit__(self, *exc: object) -> None:
        moe_gpu.dispatches = self.saved


def moe_rows(
    name: str,
    moe: MoE,
    fp8_weights: moe_gpu.Fp8ExpertWeights | None,
    copy: float,
    peak: float,
    iters: int,
) -> None:
    hidden, inter, num_experts = MOE_MODELS[name]
    expert_params = 3 * hidden * inter
    for tokens in MOE_TOKENS:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            layer_us = median_us(lambda x=x: moe(x), iters)
            with TorchPath():
                torch_us = median_us(lambda x=x: moe(x), iters)
            logits, shared = moe.router(x), moe.shared_expert(x)
        path = "kernels" if tokens <= moe_gpu.MAX_TOKENS else "torch"
        cells = [name, str(tokens), path, f"{layer_us:.1f}", f"{torch_us:.1f}"]
        if tokens <= moe_gpu.MAX_TOKENS:
            touched = logits.topk(1, dim=-1).indices.unique().numel()
            rows = [("bf16", moe.experts, 2)]
            if fp8_weights is not None:
                rows.append((fp8_format.NAMES[fp8_weights.format], fp8_weights, 1))
            for weights, experts, nbytes in rows:

                def routed(x=x, logits=logits, shared=shared, experts=experts):
                    moe_gpu.fused_moe_gpu(x, logits, experts, 1, shared)

                us = median_us(routed, iters)
                gbps = touched * expert_params * nbytes / us / 1e3
                print(
                    "| "
                    + " | ".join(cells)
                    + f" | {weights} | {touched} | {us:.1f} | {gbps:.0f} | "
                    + f"{100 * gbps / copy:.0f}% | | |"
                )
                cells = [name, str(tokens), path, "", ""]
        else:
            flops = 2 * tokens * (2 * expert_params + hidden * num_experts)  # routed + shared
            tflops = flops / layer_us / 1e6
            share = 100 * tflops / peak
            print("| " + " | ".join(cells) + f" | | | | | | {tflops:.0f} | {share:.0f}% |")
        del x, logits, shared


def moe_section(args: argparse.Namespace, copy: float) -> None:
    peak = matmul_tflops(args.iters)
    fmt = fp8_format.E4M3FNUZ if torch.version.hip else fp8_format.E4M3FN
    print(f"### Fused MoE (top-1; bf16 matmul {peak:.0f} TFLOP/s)\n")
    print(
        "| model | tokens | path | layer µs | torch path µs | routed weights | experts "
        "touched | routed µs | GB/s | % of copy | TFLOP/s | % of matmul |"
    )
    print("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, (hidden, inter, num_experts) in MOE_MODELS.items():
        moe = bf16_moe(hidden, inter, num_experts)
        weights = fp8_experts(hidden, inter, num_experts, fmt)
        moe_rows(name, moe, weights, copy, peak, args.iters)
        del moe, weights
        torch.cuda.empty_cache()
    print()


FP8_SHAPES = [(5120, 5120), (5120, 1024), (5120, 16384), (16384, 5120)]  # (in, out)
FP8_TOKENS = [1, 2, 4, 8, 16]


def fp8_rows(features: int, out: int, fmt: int, copy: float, iters: int) -> None:
    bits = torch.randint(0, 256, (out, features), dtype=torch.uint8, device="cuda")
    bits[fp8_format.is_nan(bits, fmt)] = 0
    weight = bits.view(fp8_format.torch_dtype(fmt))
    scale = torch.full((out,), 1e-4, device="cuda")
    dense = torch.randn(out, features, device="cuda", dtype=torch.bfloat16)
    for tokens in FP8_TOKENS:
        x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16)
        us = median_us(
            lambda x=x: fp8_gpu.fp8_linear_gpu(x, weight, scale, fmt, 1200.0, True), iters
        )
        bf16_us = median_us(lambda x=x: x @ dense.T, iters)
        gbps = out * features / us / 1e3
        print(
            f"| {features} | {out} | {tokens} | {us:.1f} | {gbps:.0f} | "
            f"{100 * gbps / copy:.0f}% | {bf16_us:.1f} |"
        )


def fp8_section(args: argparse.Namespace, copy: float) -> None:
    fmt = fp8_format.E4M3FNUZ if torch.version.hip else fp8_format.E4M3FN
    print(f"### FP8 linear ({fp8_format.NAMES[fmt]} weights, per-token activations, ub 1200)\n")
    print("| in | out | tokens | µs | GB/s | % of copy | bf16 matmul µs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for features, out in FP8_SHAPES:
        fp8_rows(features, out, fmt, copy, args.iters)
        torch.cuda.empty_cache()
    print()


FUSED_TOKENS = [1, 16, 100]
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTER = 5120, 40, 8, 128, 8192


def fused_rows(tokens: int, copy: float, iters: int) -> None:
    """One table row per fused op at `tokens`: its time, bandwidth and the torch ops' time."""
    bf16 = {"dtype": torch.bfloat16, "device": "cuda"}
    x, residual = torch.randn(tokens, HIDDEN, **bf16), torch.randn(tokens, HIDDEN, **bf16)
    norm = RMSNorm(HIDDEN, 1e-5).to(**bf16)
    weight = norm.weight.detach()
    pool = 1 << 16
    qkv = torch.randn(tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, **bf16)
    sizes = [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    q, k, v = (part.view(tokens, -1, HEAD_DIM) for part in qkv.split(sizes, 1))
    k_cache = torch.zeros(pool, KV_HEADS, HEAD_DIM, **bf16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(pool, device="cuda")[:tokens]
    positions = torch.randint(0, 1 << 17, (tokens,), device="cuda")
    inv_freq = inv_frequencies(HEAD_DIM, 500000.0, None).cuda()
    rot = rotation(positions, inv_freq)
    gate_up = torch.randn(tokens, 2 * INTER, **bf16)
    gate, up = gate_up[:, :INTER], gate_up[:, INTER:]

    def rope_torch() -> torch.Tensor:
        qr, kr = l2_norm(apply_rope(q, rot), 1e-5), l2_norm(apply_rope(k, rot), 1e-5)
        k_cache.index_copy_(0, slots, kr)
        v_cache.index_copy_(0, slots, v)
        return qr

    qkv_rows = tokens * (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    ops = [
        (
            "add_rms_norm",
            lambda: fused.add_rms_norm(x, residual, weight, 1e-5),
            lambda: norm(residual + x),
            (4 * tokens + 1) * HIDDEN * 2,
        ),
        (
            "rope_qk_norm_kv_write",
            lambda: fused.rope_qk_norm_kv_write(
                q, k, v, k_cache, v_cache, slots, positions, inv_freq, True, 1e-5
            ),
            rope_torch,
            2 * qkv_rows * 2,
        ),
        (
            "silu_mul",
            lambda: fused.silu_mul(gate, up),
            lambda: torch.nn.functional.silu(gate) * up,
            3 * tokens * INTER * 2,
        ),
    ]
    with torch.no_grad():
        for name, kernel, reference, nbytes in ops:
            us, torch_us = median_us(kernel, iters), median_us(reference, iters)
            gbps = nbytes / us / 1e3
            print(
                f"| {name} | {tokens} | {us:.1f} | {gbps:.0f} | {100 * gbps / copy:.1f}% | "
                f"{torch_us:.1f} |"
            )


def fused_section(args: argparse.Namespace, copy: float) -> None:
    print(
        f"### Fused small ops (hidden {HIDDEN}, {Q_HEADS} / {KV_HEADS} heads of {HEAD_DIM}, "
        f"intermediate {INTER})\n"
    )
    print("| op | tokens | µs | GB/s | % of copy | torch ops µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for tokens in FUSED_TOKENS:
        fused_rows(tokens, copy, args.iters)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument(
        "--section", choices=["all", "attention", "moe", "fp8", "fused"], default="all"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() or kernels.library() is None:
        sys.exit(f"needs a GPU and the kernel library: {kernels.reason() or 'no GPU'}")
    name = torch.cuda.get_device_name()
    copy = copy_gbps(args.iters)
    print(f"device: {name}; copy bandwidth {copy:.0f} GB/s\n")
    if args.section in ("all", "attention"):
        attention_section(args, copy)
    if args.section in ("all", "moe"):
        moe_section(args, copy)
    if args.section in ("all", "fp8"):
        if fp8_gpu._functions() is None:
            print("fp8: the kernel library predates the fp8 kernels (rebuild it)")
        else:
            fp8_section(args, copy)
    if args.section in ("all", "fused"):
        if fused._functions() is None:
            print("fused: the kernel library predates the fused small ops (rebuild it)")
        else:
            fused_section(args, copy)


if __name__ == "__main__":
    main()
