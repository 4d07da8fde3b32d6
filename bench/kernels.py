"""GPU kernel timings: paged decode attention against the device's copy bandwidth, one run.

For each (batch, context): Scout's attention shape per layer (40 query heads, 8 KV heads,
head_dim 128, bf16), random pages, decode (one query token per request) on a global layer and
on a chunk-local layer (chunk 8192). Time per call with device events after warm-up (median of
--iters); achieved bandwidth = K and V bytes the step must read / time, as a fraction of the
copy bandwidth measured in the same run (a 1 GiB device-to-device copy: read + write bytes /
time). Correctness is tests/gpu's job; this script only times.

Run: python bench/kernels.py  (needs a GPU and the built kernel library; prints a markdown table
for docs/benchmarks.md with the card's name).
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

from pyllama4 import kernels  # noqa: E402
from pyllama4.kernels import attention as gpu  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available() or kernels.library() is None:
        sys.exit(f"needs a GPU and the kernel library: {kernels.reason() or 'no GPU'}")
    name = torch.cuda.get_device_name()
    copy = copy_gbps(args.iters)
    print(f"device: {name}; copy bandwidth {copy:.0f} GB/s; page size {args.page_size}\n")
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


if __name__ == "__main__":
    main()
