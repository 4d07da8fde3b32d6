"""Decode graphs: the model's decode step captured once per batch size, then replayed.

Invariants:
- A captured step reads its inputs only from `StaticInputs` (token ids, positions, slots and
  block-table rows, [max_bs] each) and the KV cache, and writes its logits into one output
  per size; nothing it does depends on host values of the step it replays (attention takes a
  fixed split count, each token splitting its own keys: pyllama4.kernels.attention.graph_tokens).
- `forward(plan)` runs a plan of n one-token decodes (no images, no draft tree) padded to the
  smallest captured size b >= n: rows n..b-1 get token 0 at position 0, the KV cache's scratch
  slots and its scratch block-table row (pyllama4.kv_cache), so they read and write only the
  scratch page, never a request's KV. It returns the first n rows of the logits.
- Plans that do not fit (prefill chunks, speculative tokens, more than the largest size) and
  sizes whose capture failed run eagerly; a failed capture is logged once with its reason.

On a GPU the capture is torch.cuda.CUDAGraph (HIP graphs under ROCm), all sizes sharing one
memory pool, captured largest first. `EagerReplay` stands in for it where there are no graphs
(the CPU tests): it re-runs the step on the static buffers, which tests everything but the
capture itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from pyllama4.batch import StepBatch
from pyllama4.kv_cache import PagedKVCache

log = logging.getLogger("pyllama4.graphs")

Step = Callable[[], torch.Tensor]  # runs the model on the static inputs, returns the logits


class Replay(Protocol):
    """A captured step: replay() recomputes `output` in place from the static inputs."""

    output: torch.Tensor

    def replay(self) -> None: ...


Capture = Callable[[Step, Any], Replay]  # (step, memory pool) -> its captured replay


def capture_sizes(max_bs: int) -> tuple[int, ...]:
    """The batch sizes captured for --cuda-graph-max-bs max_bs: 1, 2, 4, 8, then every 8th,
    and max_bs itself (SGLang's ladder)."""
    if max_bs < 1:
        raise ValueError(f"the largest graph batch must be at least 1, not {max_bs}")
    ladder = [1, 2, 4, 8, *range(16, max_bs, 8)]
    return tuple(sorted({s for s in ladder if s < max_bs} | {max_bs}))


class CudaGraphReplay:
    """torch.cuda.CUDAGraph of one step: two warm-up runs on a side stream, then the capture."""

    def __init__(self, step: Step, pool: Any):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = step()

    def replay(self) -> None:
        self.graph.replay()


class EagerReplay:
    """The stand-in for a graph where there are none: runs the step again on replay."""

    def __init__(self, step: Step, pool: Any):
        self.step = step
        self.output = step()

    def replay(self) -> None:
        with torch.inference_mode():
            self.output.copy_(self.step())


class StaticInputs:
    """The buffers every captured step reads: one [5, max_bs] int64 device tensor (token ids,
    positions, global slots, local slots, block-table rows), filled by one host-to-device copy
    per step from a (pinned, on a GPU) host twin."""

    FIELDS = ("token_ids", "positions", "global_slots", "local_slots", "rows")

    def __init__(self, max_bs: int, cache: PagedKVCache, device: torch.device):
        self.device = device
        self.data = torch.zeros(len(self.FIELDS), max_bs, dtype=torch.int64, device=device)
        self.host = torch.zeros(
            len(self.FIELDS), max_bs, dtype=torch.int64, pin_memory=device.type == "cuda"
        )
        # Padding rows: token 0 at position 0 in the scratch slots, on the scratch table row.
        self.padding = np.array([0, 0, *cache.scratch_slots, cache.scratch_row], dtype=np.int64)
        self.data[:, :] = torch.from_numpy(self.padding)[:, None]
        self.arange = torch.arange(max_bs, device=device)

    def fill(self, plan: Any, size: int) -> None:
        """Rows [0, n) from the plan's n decodes, rows [n, size) padding."""
        n = int(len(plan.rows))
        host = self.host.numpy()
        for i, name in enumerate(self.FIELDS):
            host[i, :n] = getattr(plan, name)
        host[:, n:size] = self.padding[:, None]
        self.data.copy_(self.host, non_blocking=True)  # all of it: one contiguous copy

    def batch(self, size: int, max_keys: int) -> StepBatch:
        """The StepBatch a captured step of `size` rows reads (views of the buffers)."""
        token_ids, positions, global_slots, local_slots, rows = (d[:size] for d in self.data)
        ones = np.ones(size, dtype=np.int32)
        return StepBatch(
            token_ids=token_ids,
            positions=positions,
            global_slots=global_slots,
            local_slots=local_slots,
            rows=rows,
            sample_indices=self.arange[:size],
            query_start=np.arange(size + 1, dtype=np.int32),
            context_lens=ones - 1,
            seq_lens=ones,
            num_decodes=size,
            static_max_keys=max_keys,
        )


class DecodeGraphs:
    """The captured decode steps of one model and KV cache, for sizes up to max_bs."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        *,
        max_bs: int,
        max_keys: int,
        capture: Capture,
        pool: Any = None,
    ):
        """Captures every size of capture_sizes(max_bs), largest first (the smaller ones then
        reuse its memory in the pool). max_keys: the context length (what a token may see)."""
        device = cache.global_table.device
        self.inputs = StaticInputs(max_bs, cache, device)
        self.replays: dict[int, Replay] = {}
        self.failures: dict[int, str] = {}
        for size in sorted(capture_sizes(max_bs), reverse=True):
            batch = self.inputs.batch(size, max_keys)

            @torch.inference_mode()
            def step(batch: StepBatch = batch) -> torch.Tensor:
                return model.logits(model(batch, cache))

            try:
                self.replays[size] = capture(step, pool)
            except Exception as error:  # noqa: BLE001 - any failure: that size runs eagerly
                self.failures[size] = f"{type(error).__name__}: {error}"
        if self.failures:
            sizes = ", ".join(map(str, sorted(self.failures)))
            reason = next(iter(self.failures.values()))
            log.warning(
                "decode graphs: batch sizes %s run eagerly (capture failed: %s)", sizes, reason
            )
        self.sizes = tuple(sorted(self.replays))

    def size_for(self, plan: Any) -> int | None:
        """The captured size that runs this plan, or None when it must run eagerly: a plan of
        one-token decodes only, fewer than the largest captured size, no image features."""
        n = plan.num_requests
        if not self.sizes or n == 0 or plan.num_decodes != n or plan.num_tokens != n:
            return None
        return next((s for s in self.sizes if s >= n), None)

    def forward(self, plan: Any, size: int) -> torch.Tensor:
        """Logits [n, vocab] of the plan's n decodes (its block-table writes already applied)."""
        self.inputs.fill(plan, size)
        replay = self.replays[size]
        replay.replay()
        return replay.output[: plan.num_requests]
