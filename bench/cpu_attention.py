"""CPU timings of the torch attention (pyllama4.layers.attention) per layer and of its per-step
metadata, on one torch thread.

Shapes: the tiny checkpoint's attention (8 query heads, 2 KV heads, head_dim 32) by default,
pages of 16, random pages; for each batch size R, R requests with key counts drawn uniformly from
[--min-keys, --max-keys] and Q query tokens each (Q = 1: decode; Q > 1: speculative queries or a
prefill chunk). Prints, for fp32 and bf16:
- prepare: attention.prepare for one pool (once per step);
- per layer: paged_attention (KV write, gather, attention) through the batched matmuls
  and through SDPA, whatever the rule (attention.MATMUL_MAX_QUERIES, MATMUL_MIN_REQUESTS)
  would pick; the path it picks is marked.
Times: median over --repeats of the mean of --iters calls, the variants interleaved.

Run: python bench/cpu_attention.py [--batches 1 16 64] [--queries 1 4 16 32 128]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch

from pyllama4.batch import StepBatch
from pyllama4.layers import attention


def random_step(
    batch: int, queries: int, keys: tuple[int, int], heads: tuple[int, int, int], dtype, seed: int
) -> tuple[StepBatch, SimpleNamespace, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, cache, q, k, v): `batch` requests of `queries` tokens each, the last of them
    seeing between keys[0] and keys[1] keys, over random pages of a one-layer global pool."""
    hq, hkv, d = heads
    page_size = 16
    rng = np.random.default_rng(seed)
    seq = rng.integers(keys[0], keys[1] + 1, batch).astype(np.int32)
    ctx = (seq - queries).astype(np.int32)
    width = -(-int(seq.max()) // page_size)
    pages = batch * width
    table = torch.from_numpy(rng.permutation(pages).reshape(batch, width).astype(np.int64))
    positions = np.concatenate([np.arange(c, s) for c, s in zip(ctx, seq, strict=True)])
    rows = np.repeat(np.arange(batch), queries)
    slots = table[torch.from_numpy(rows), torch.from_numpy(positions // page_size)]
    slots = slots * page_size + torch.from_numpy(positions % page_size)
    tokens = len(positions)
    step = StepBatch(
        token_ids=torch.zeros(tokens, dtype=torch.int64),
        positions=torch.from_numpy(positions.astype(np.int64)),
        global_slots=slots,
        local_slots=torch.full((tokens,), -1),
        rows=torch.arange(batch),
        sample_indices=torch.arange(tokens),
        query_start=np.arange(0, tokens + 1, queries, dtype=np.int32),
        context_lens=ctx,
        seq_lens=seq,
        num_decodes=batch if queries == 1 else 0,
    )
    pool = torch.randn((pages + 1) * page_size, hkv, d).to(dtype)
    cache = SimpleNamespace(
        k=[pool],
        v=[torch.randn_like(pool)],
        local_layers=(False,),
        chunk_size=None,
        page_size=page_size,
        global_table=table,
        local_table=table,
        local_table_width=0,
    )
    q = torch.randn(tokens, hq, d).to(dtype)
    k, v = torch.randn(tokens, hkv, d).to(dtype), torch.randn(tokens, hkv, d).to(dtype)
    return step, cache, q, k, v


def timed(fns: dict[str, Callable[[], object]], repeats: int, iters: int) -> dict[str, float]:
    """Median over repeats of the mean microseconds per call, the functions interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - t) / iters * 1e6)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def layer_call(
    step: StepBatch, cache: SimpleNamespace, q, k, v, max_queries: int
) -> Callable[[], torch.Tensor]:
    """One layer's paged_attention, its groups through the matmuls when they have at most
    max_queries queries per request, else through SDPA."""
    rule = attention.MATMUL_MAX_QUERIES, attention.MATMUL_MIN_REQUESTS
    attention.MATMUL_MAX_QUERIES, attention.MATMUL_MIN_REQUESTS = max_queries, 0
    try:
        meta = attention.prepare(step, cache, local=False)
    finally:
        attention.MATMUL_MAX_QUERIES, attention.MATMUL_MIN_REQUESTS = rule
    scale = q.shape[-1] ** -0.5
    slots = step.global_slots
    return lambda: attention.paged_attention(q, k, v, cache.k[0], cache.v[0], slots, meta, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--queries", type=int, nargs="+", default=[1])
    parser.add_argument("--min-keys", type=int, default=128)
    parser.add_argument("--max-keys", type=int, default=512)
    parser.add_argument(
        "--heads", type=int, nargs=3, default=[8, 2, 32], metavar=("HQ", "HKV", "D")
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"heads {args.heads}, keys {args.min_keys}-{args.max_keys}, pages of 16, 1 thread")
    print("dtype     R    Q  prepare us  matmul us/layer  sdpa us/layer  default")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for queries in args.queries:
                for batch in args.batches:
                    keys = (max(args.min_keys, queries), max(args.max_keys, queries))
                    step, cache, q, k, v = random_step(
                        batch, queries, keys, tuple(args.heads), dtype, seed=batch
                    )
                    t = timed(
                        {
                            "prepare": partial(attention.prepare, step, cache, local=False),
                            "matmul": layer_call(step, cache, q, k, v, max_queries=1 << 30),
                            "sdpa": layer_call(step, cache, q, k, v, max_queries=0),
                        },
                        args.repeats,
                        args.iters,
                    )
                    matmul = queries <= attention.MATMUL_MAX_QUERIES
                    matmul &= batch >= attention.MATMUL_MIN_REQUESTS
                    default = "matmul" if matmul else "sdpa"
                    name = str(dtype).removeprefix("torch.")
                    print(
                        f"{name:8s} {batch:3d} {queries:4d} {t['prepare']:11.1f}"
                        f" {t['matmul']:16.1f} {t['sdpa']:14.1f}  {default}"
                    )


if __name__ == "__main__":
    main()
