"""Time per Sampler call at Llama 4's vocabulary (202048) for batch 1, 16, 64 and 256.

Cases: (a) all greedy; (b) all temperature 0.8 + top_p 0.95; (c) mixed, rows in turn: top_k 50
with repetition/frequency/presence penalties (1024-token prompt, 256 output tokens), seeded
temperature + top_p, greedy, seeded min_p 0.05 with 5 top logprobs (batch 1: the first only).
Random N(0, 9) logits: a flat distribution, so top_p keeps many thousands of tokens.

Run: python bench/sampler.py [--device cuda]  (prints milliseconds per call, median of repeats).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from pyllama4.sampler import Sampler, SampleRequest
from pyllama4.sampling_params import SamplingParams

VOCAB = 202048


def requests(case: str, batch: int, rng: np.random.Generator) -> list[SampleRequest]:
    prompt = rng.integers(0, VOCAB, 1024)
    output = rng.integers(0, VOCAB, 256)
    mixed = [
        SamplingParams(
            temperature=1.0,
            top_k=50,
            repetition_penalty=1.1,
            frequency_penalty=0.3,
            presence_penalty=0.2,
        ),
        SamplingParams(temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, min_p=0.05, seed=2, logprobs=5),
    ]
    out = []
    for i in range(batch):
        if case == "greedy":
            params = SamplingParams(temperature=0.0)
        elif case == "top_p":
            params = SamplingParams(temperature=0.8, top_p=0.95)
        else:
            params = mixed[i % len(mixed)]
        out.append(SampleRequest(params, prompt, output, (VOCAB - 1,), seed_offset=i))
    return out


def time_call(sampler: Sampler, logits: torch.Tensor, reqs: list[SampleRequest]) -> float:
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    sampler(logits, reqs)  # warm-up
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < 1.0 and len(times) < 50):
        t0 = time.perf_counter()
        sampler(logits, reqs).tokens.cpu()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} {platform.processor()}".strip()
    threads = torch.get_num_threads()
    print(f"device: {device} ({name}), torch {torch.__version__}, {threads} CPU threads")
    sampler = Sampler(VOCAB, device)
    rng = np.random.default_rng(0)
    print(f"{'batch':>6} {'greedy ms':>10} {'top_p ms':>10} {'mixed ms':>10}")
    for batch in args.batches:
        logits = torch.randn(batch, VOCAB, device=device) * 3
        row = [time_call(sampler, logits, requests(case, batch, rng)) * 1e3 for case in
               ("greedy", "top_p", "mixed")]  # fmt: skip
        print(f"{batch:>6} {row[0]:>10.2f} {row[1]:>10.2f} {row[2]:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
