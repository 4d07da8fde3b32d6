"""ModelRunner: the model, its paged KV cache and the core scheduler that plans for them.

Invariant: the scheduler's pools and the cache's tensors describe the same pages (same page
size, page counts, chunk size and block table shapes), and every plan's block table writes are
applied before the forward that reads them.
"""

from __future__ import annotations

import numpy as np
import torch

from pyllama4._core import Scheduler, StepPlan
from pyllama4.batch import StepBatch
from pyllama4.kv_cache import PagedKVCache, local_layers
from pyllama4.model.llama4 import Llama4ForCausalLM


class ModelRunner:
    def __init__(
        self,
        model: Llama4ForCausalLM,
        *,
        kv_tokens: int,
        context_len: int,
        page_size: int = 16,
        max_running: int = 256,
        max_step_tokens: int = 8192,
        enable_prefix_cache: bool = True,
    ):
        """kv_tokens: capacity of the global pool in tokens. The chunk-local pool (when the model
        has chunk-local layers shorter than the context) holds each running request's window."""
        self.model = model
        config = model.config
        device = next(model.parameters()).device
        local = local_layers(config, context_len)
        chunk = config.attention_chunk_size if any(local) else 0
        global_pages = -(-kv_tokens // page_size)
        local_pages = 0
        if chunk:
            window = chunk // page_size + -(-max_step_tokens // page_size)
            local_pages = min(max_running * window, global_pages + window)
        self.scheduler = Scheduler(
            global_pages,
            page_size=page_size,
            local_pages=local_pages,
            chunk_size=chunk,
            context_len=context_len,
            max_running=max_running,
            max_step_tokens=max_step_tokens,
            enable_prefix_cache=enable_prefix_cache,
        )
        self.cache = PagedKVCache(
            config,
            page_size=page_size,
            global_pages=global_pages,
            local_pages=local_pages,
            local_layers=local,
            max_rows=max_running,
            global_table_width=self.scheduler.global_table_width,
            local_table_width=self.scheduler.local_table_width,
            dtype=next(model.parameters()).dtype,
            device=device,
        )
        self.device = device

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Runs one plan; returns the logits [num_samples, vocab] of its sampling positions."""
        self.cache.apply_writes(plan)
        batch = StepBatch.from_plan(plan, self.device)
        hidden = self.model(batch, self.cache)
        return self.model.logits(hidden[batch.sample_indices])


def greedy_generate(
    runner: ModelRunner,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Offline greedy decoding of a batch of prompts (tests and benchmarks use it)."""
    sched = runner.scheduler
    outputs: dict[int, list[int]] = {}
    base = 1 << 40  # request ids of this call; callers may reuse the runner
    for i, prompt in enumerate(prompts):
        sched.add_request(
            base + i,
            np.asarray(prompt, dtype=np.int32),
            max_new_tokens=max_new_tokens,
            stop_token_ids=list(stop_token_ids),
        )
        outputs[base + i] = []
    while sched.has_work():
        plan = sched.schedule()
        tokens = runner.forward(plan).argmax(-1).to(torch.int32).cpu().numpy()
        ids = plan.request_ids[plan.sample_requests]
        for rid, token in zip(ids.tolist(), tokens.tolist(), strict=True):
            outputs[rid].append(token)
        sched.commit(tokens)
    return [outputs[base + i] for i in range(len(prompts))]
