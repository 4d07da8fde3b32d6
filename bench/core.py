"""Timings of the compiled core through its Python API (what the engine's step loop pays).

1. schedule() + commit() per decode step with 64, 256 and 1024 running requests (Llama 4 layout:
   16-token pages, 8192-token attention chunks, two pools).
2. Radix cache match_prefix and insert throughput, in tokens per second, on a tree holding about
   100k cached tokens built from prompts that share prefixes.

Run: python bench/core.py  (prints the figures; docs/benchmarks.md records them with the machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from pyllama4 import KVPool, RadixCache, Scheduler

PAGE = 16
CHUNK = 8192


def bench_decode_step(running: int, prompt_len: int, steps: int, rng: np.random.Generator) -> dict:
    # Early requests decode while later ones still prefill: leave room for those steps too.
    max_new = steps + 2 * (running * prompt_len // 16384) + 64
    pages_per_req = (prompt_len + max_new) // PAGE + 2
    sched = Scheduler(
        running * pages_per_req,
        page_size=PAGE,
        chunk_size=CHUNK,
        local_pages=running * pages_per_req,
        context_len=1 << 20,
        max_running=running,
        max_step_tokens=16384,
    )
    for rid in range(running):
        prompt = rng.integers(0, 200_000, size=prompt_len, dtype=np.int32)
        sched.add_request(rid, prompt, max_new_tokens=max_new)
    # Prefill everything, so that every step below is a pure decode step of `running` requests.
    while True:
        plan = sched.schedule()
        sched.commit(np.ones(plan.num_samples, dtype=np.int32))
        if plan.num_decodes == running:
            break
    tokens = np.ones(running, dtype=np.int32)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = sched.schedule()
        sched.commit(tokens)
        times.append(time.perf_counter() - t0)
    assert plan.num_decodes == running and sched.check() == ""
    return {
        "running": running,
        "median_us": statistics.median(times) * 1e6,
        "p90_us": sorted(times)[int(0.9 * len(times))] * 1e6,
        "mean_us": statistics.fmean(times) * 1e6,
    }


def bench_radix(target_tokens: int, rng: np.random.Generator) -> dict:
    """Prompts = one of 64 shared 512-token prefixes + a 256-token unique suffix."""
    prefixes = [rng.integers(0, 200_000, size=512, dtype=np.int32) for _ in range(64)]
    n_prompts = max(1, (target_tokens - 64 * 512) // 256)
    prompts = [
        np.concatenate([prefixes[i % 64], rng.integers(0, 200_000, size=256, dtype=np.int32)])
        for i in range(n_prompts)
    ]
    pages_total = sum(len(p) for p in prompts) // PAGE + 64
    pool = KVPool(pages_total, PAGE)
    cache = RadixCache(pool)

    def insert(tokens: np.ndarray) -> None:
        pages = pool.alloc(len(tokens) // PAGE)
        cache.insert(tokens, pages)
        for page in pages:  # the tree holds its own references now
            pool.unref(page)

    t0 = time.perf_counter()
    for p in prompts:
        insert(p)
    insert_s = time.perf_counter() - t0
    inserted_tokens = sum(len(p) for p in prompts)
    cached_tokens = cache.cached_global_pages * PAGE

    queries = [prompts[i] for i in rng.integers(0, len(prompts), size=2000)]
    t0 = time.perf_counter()
    matched = sum(cache.match_prefix(q)["length"] for q in queries)
    match_s = time.perf_counter() - t0
    assert cache.check() == ""
    return {
        "cached_tokens": cached_tokens,
        "nodes": cache.num_nodes,
        "insert_tok_s": inserted_tokens / insert_s,
        "insert_us": insert_s / len(prompts) * 1e6,
        "match_tok_s": matched / match_s,
        "match_us": match_s / len(queries) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--steps", type=int, default=2000, help="timed decode steps per size")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--radix-tokens", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    print(
        f"pyllama4 core benchmark on {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"python {platform.python_version()}"
    )
    print(
        f"\nschedule()+commit() per decode step (prompt {args.prompt_len}, page {PAGE}, "
        f"chunk {CHUNK}, {args.steps} steps)"
    )
    print(f"{'running':>8} {'median us':>10} {'p90 us':>10} {'mean us':>10} {'us/request':>11}")
    for size in args.sizes:
        r = bench_decode_step(size, args.prompt_len, args.steps, rng)
        print(
            f"{r['running']:>8} {r['median_us']:>10.1f} {r['p90_us']:>10.1f} "
            f"{r['mean_us']:>10.1f} {r['median_us'] / size:>11.3f}",
            flush=True,
        )

    r = bench_radix(args.radix_tokens, rng)
    print(f"\nradix cache: {r['cached_tokens']} cached tokens in {r['nodes']} nodes")
    for op in ("insert", "match"):
        rate, per_call = r[f"{op}_tok_s"] / 1e6, r[f"{op}_us"]
        print(f"  {op + ':':<7} {rate:8.1f} M tokens/s ({per_call:.1f} us per 768-token prompt)")


if __name__ == "__main__":
    main()
