"""Prefill and decode throughput of the built-in demo model on this machine, ours beside
transformers (Llama4ForCausalLM on the same converted checkpoint), in one run.

For each dtype and batch size: prefill tokens/s = batch * prompt_len / (time of the forward that
computes all prompts); decode tokens/s = batch * steps / (time of `steps` greedy decode steps).
Ours runs through the ModelRunner (core scheduler, paged KV cache); transformers runs its own
forward with a DynamicCache, greedy, the same prompts.

Run: python bench/model.py  (docs/benchmarks.md records the figures with the machine).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from transformers import DynamicCache
from transformers import Llama4ForCausalLM as HFLlama4

from pyllama4.demo import demo_checkpoint
from pyllama4.loading.load import DTYPES, load_model
from pyllama4.runner import ModelRunner


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=length).tolist() for _ in range(batch)]


def bench_ours(model, batch: list[list[int]], steps: int) -> tuple[float, float]:
    n = len(batch[0])
    runner = ModelRunner(
        model,
        kv_tokens=len(batch) * (n + steps + 16),
        context_len=n + steps + 16,
        max_step_tokens=len(batch) * n,
    )
    sched = runner.new_scheduler(enable_prefix_cache=False)
    for i, p in enumerate(batch):
        sched.add_request(i, np.asarray(p, dtype=np.int32), max_new_tokens=steps + 1)
    plan = sched.schedule()
    assert plan.num_tokens == len(batch) * n, "prefill did not fit one step"
    t0 = time.perf_counter()
    tokens = runner.forward(plan).argmax(-1).to(torch.int32).numpy()
    prefill = time.perf_counter() - t0
    sched.commit(tokens)
    t0 = time.perf_counter()
    for _ in range(steps):
        plan = sched.schedule()
        assert plan.num_decodes == len(batch)
        sched.commit(runner.forward(plan).argmax(-1).to(torch.int32).numpy())
    decode = time.perf_counter() - t0
    return len(batch) * n / prefill, len(batch) * steps / decode


@torch.inference_mode()
def bench_hf(model, batch: list[list[int]], steps: int) -> tuple[float, float]:
    ids = torch.tensor(batch)
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True)
    prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - t0
    return ids.numel() / prefill, len(batch) * steps / decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    args = ap.parse_args()
    path = demo_checkpoint()
    print(
        f"demo model (SmolLM2-135M-Instruct as Llama 4) on {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"prompt {args.prompt_len} tokens, {args.steps} decode steps"
    )
    print(f"{'dtype':>9} {'batch':>5} {'engine':>13} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name in args.dtypes:
        dtype = DTYPES[name]
        ours = load_model(path, dtype=dtype, progress=False)
        hf = HFLlama4.from_pretrained(path, dtype=dtype).eval()
        for b in args.batches:
            batch = prompts(b, args.prompt_len, ours.config.vocab_size, seed=b)
            bench_ours(ours, batch[:1], 2)  # warm-up
            engines = (("pyllama4", bench_ours, ours), ("transformers", bench_hf, hf))
            for engine, run, model in engines:
                pre, dec = run(model, batch, args.steps)
                print(f"{name:>9} {b:>5} {engine:>13} {pre:>14.1f} {dec:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
