"""GPU memory planning (--mem-fraction-static): what the KV cache gets once the weights, the
activations of the largest step and the decode graphs have been measured on the device.

Invariant: kv_bytes = total * fraction - used - activations - graphs, where `used` is the
device memory in use with the model loaded (weights, the GPU runtime's context, anything else
on the device), `activations` the peak a warm-up adds above that (a prefill chunk of the
largest step's tokens, then the sampler over the most running rows with top-k, top-p and
penalties: its sort and masks), and `graphs` what capturing the decode graphs took; each
measured by a Meter. A budget of zero or less is a ValueError naming --mem-fraction-static.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pyllama4.runner import ModelRunner
from pyllama4.sampler import Sampler, SampleRequest
from pyllama4.sampling_params import SamplingParams

GIB = 2**30


class Meter(Protocol):
    """Device memory as the planner reads it, in bytes."""

    def total(self) -> int: ...

    def used(self) -> int:
        """In use on the device (by anything), with cached free blocks returned first."""
        ...

    def allocated(self) -> int:
        """Held by torch's tensors now."""
        ...

    def reset_peak(self) -> None: ...

    def peak(self) -> int:
        """The most torch's tensors held since reset_peak()."""
        ...


class CudaMeter:
    """The Meter of one GPU (torch.cuda; HIP devices under ROCm alike)."""

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def used(self) -> int:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


@dataclass(frozen=True)
class MemoryReport:
    total: int
    fraction: float
    used: int  # weights, runtime, other processes
    activations: int  # the warm-up's peak above what was allocated before it
    graphs: int  # the decode graphs' memory

    @property
    def kv_bytes(self) -> int:
        return int(self.total * self.fraction) - self.used - self.activations - self.graphs

    def describe(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f} GiB"

        return (
            f"GPU memory: {gib(self.total)} x {self.fraction} = "
            f"{gib(int(self.total * self.fraction))} planned: in use with the model loaded "
            f"{gib(self.used)}, activations {gib(self.activations)} (warm-up peak), decode "
            f"graphs {gib(self.graphs)}, KV cache {gib(self.kv_bytes)}"
        )

    def check(self) -> None:
        """ValueError when nothing is left for the KV cache."""
        if self.kv_bytes <= 0:
            raise ValueError(
                f"--mem-fraction-static {self.fraction} leaves no memory for the KV cache: "
                f"{self.describe()}; raise it, lower --chunked-prefill-size or "
                "--cuda-graph-max-bs, or use more GPUs (--tp)"
            )


def warm_up(runner: ModelRunner, step_tokens: int, rows: int) -> None:
    """Runs the largest step shapes once on an idle runner, leaving it idle: one request's
    prefill of step_tokens tokens (at most the context less one), then the sampler over `rows`
    rows of logits with top-k, top-p and penalties."""
    sched = runner.new_scheduler(enable_prefix_cache=False)
    vocab = runner.model.config.vocab_size
    length = max(1, min(step_tokens, runner.context_len - 1))
    prompt = (np.arange(length, dtype=np.int64) % vocab).astype(np.int32)
    sched.add_request(1 << 42, prompt, max_new_tokens=1)
    while sched.has_work():
        plan = sched.schedule()
        runner.forward(plan)
        sched.commit(np.zeros(plan.num_samples, dtype=np.int32))
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1)
    request = SampleRequest(params=params, prompt_ids=[0], output_ids=[1])
    logits = torch.zeros(rows, vocab, dtype=runner.cache.k[0].dtype, device=runner.device)
    Sampler(vocab, runner.device)(logits, [request] * rows)


def measure(
    build_runner: Callable[[int], ModelRunner],
    meter: Meter,
    *,
    fraction: float,
    step_tokens: int,
    rows: int,
    graph_max_bs: int = 0,
) -> MemoryReport:
    """Measures the plan with a throw-away runner holding KV for one step (build_runner(kv
    tokens)): warm-up, then (graph_max_bs > 0) a trial capture of the decode graphs. The model
    must be loaded; the runner is dropped before returning."""
    used = meter.used()
    runner = build_runner(step_tokens + 1)
    base = meter.allocated()
    meter.reset_peak()
    warm_up(runner, step_tokens, rows)
    activations = max(0, meter.peak() - base)
    graphs = 0
    if graph_max_bs:
        before = meter.used()
        runner.capture_graphs(graph_max_bs)
        graphs = max(0, meter.used() - before)
    del runner
    meter.used()  # returns the trial runner's memory
    return MemoryReport(meter.total(), fraction, used, activations, graphs)
