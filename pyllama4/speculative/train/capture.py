"""The target's auxiliary states of whole sequences: what an EAGLE3 draft is trained on.

Invariant: every position of every sequence is computed (prefill_capture plans without a prefix
cache, so no hit skips one), so a Sample's aux rows are the target's states at its positions
0..L-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyllama4.batch import StepBatch
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner
from pyllama4.speculative.train.log import log


@dataclass
class Sample:
    tokens: torch.Tensor  # [L] int64: prompt + answer
    aux: torch.Tensor  # [L - 1, 3 * target hidden] bf16: the target's aux states of positions
    prompt_len: int


def prefill_capture(
    runner: ModelRunner, sequences: list[list[int]], capture: tuple[int, ...]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefills each sequence (in batches the scheduler forms, chunked as it decides) and
    returns, per sequence, (aux [L, len(capture) * H], final-normed hidden [L, H]) for all of
    its L tokens: the residual stream entering the `capture` layers (see
    Llama4ForCausalLM.forward_with_aux). It plans on a scheduler of its own without a prefix
    cache (a hit would skip positions), so the runner's KV pages are its own for the call: what
    another scheduler of the runner holds or caches there is overwritten."""
    sched = runner.new_scheduler(enable_prefix_cache=False)
    base = 1 << 41
    parts: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for i, seq in enumerate(sequences):
        sched.add_request(base + i, np.asarray(seq, dtype=np.int32), max_new_tokens=1)
        parts[base + i] = []
    while sched.has_work():
        plan = sched.schedule()
        runner.cache.apply_writes(plan)
        batch = StepBatch.from_plan(plan, runner.device)
        hidden, aux = runner.model.forward_with_aux(batch, runner.cache, capture)
        assert aux is not None
        starts = plan.query_start.tolist()
        for r, rid in enumerate(plan.request_ids.tolist()):
            lo, hi = starts[r], starts[r + 1]
            parts[rid].append((int(plan.context_lens[r]), aux[lo:hi], hidden[lo:hi]))
        sched.commit(np.zeros(plan.num_samples, dtype=np.int32))
    out = []
    for i in range(len(sequences)):
        chunks = sorted(parts[base + i], key=lambda p: p[0])
        out.append((torch.cat([c[1] for c in chunks]), torch.cat([c[2] for c in chunks])))
    return out


def capture(
    model: Llama4ForCausalLM,
    pairs: list[tuple[list[int], list[int]]],
    aux_layers: tuple[int, ...],
    context: int,
    batch: int,
) -> list[Sample]:
    """Prefills prompt + answer again to keep the target's aux states (bf16)."""
    runner = ModelRunner(
        model,
        context_len=context,
        kv_tokens=max(4096, 8 * context),
        max_running=batch,
        max_step_tokens=4096,
    )
    samples = []
    for lo in range(0, len(pairs), batch):
        chunk = pairs[lo : lo + batch]
        captured = prefill_capture(runner, [p + a for p, a in chunk], aux_layers)
        for (p, a), (aux, _) in zip(chunk, captured, strict=True):
            samples.append(Sample(torch.tensor(p + a), aux[:-1].to(torch.bfloat16), len(p)))
        log(f"capture: {len(samples)}/{len(pairs)} sequences")
    return samples
