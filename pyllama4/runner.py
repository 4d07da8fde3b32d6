"""ModelRunner: the model, its paged KV cache and its decode graphs; it runs the plans of a core
scheduler it makes (new_scheduler) but does not own.

Invariant: the scheduler's pools and the cache's tensors describe the same pages (same page
size, page counts, chunk size and block table shapes: new_scheduler and the cache take them from
one MemoryPlan and one table-width rule, the core's), and every plan's block table writes are
applied before the forward that reads them. Under tensor parallelism each rank's runner plans the
same pages (the same plans run on every rank) for its own KV heads (`model.kv_heads`), so `memory`
is this rank's KV memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyllama4._core import Scheduler, StepPlan
from pyllama4.batch import StepBatch
from pyllama4.config import TextConfig
from pyllama4.graphs import Capture, CudaGraphReplay, DecodeGraphs
from pyllama4.kernels import attention as attention_gpu
from pyllama4.kv_cache import PagedKVCache, local_layers
from pyllama4.model.llama4 import Llama4ForCausalLM

log = logging.getLogger("pyllama4.runner")

MAX_RUNNING = 256  # default: requests decoding together (block-table rows)
MAX_STEP_TOKENS = 8192  # default: tokens one step computes (the chunked-prefill budget)
# Logits are computed in blocks of this many rows when a step asks for more (prompt logprobs):
# a block of [rows, vocab] bounds the memory. The blocks depend on the row count alone, so that
# every tensor-parallel rank gathers the same ones.
LOGIT_BLOCK_ROWS = 1024
Reduce = Callable[[int, torch.Tensor], None]  # (first extra row, logits [B, vocab] of a block)


class ScoredPlan:
    """A plan whose sample indices are followed by extra rows whose logits are wanted too."""

    def __init__(self, plan: Any, extra: np.ndarray):
        self.plan = plan
        self.sample_indices = np.concatenate([plan.sample_indices, extra.astype(np.int32)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.plan, name)


@dataclass(frozen=True)
class MemoryPlan:
    """How the KV budget is split between the two pools."""

    page_size: int
    global_pages: int
    local_pages: int
    global_bytes_per_token: int  # over the layers that keep full history
    local_bytes_per_token: int  # over the chunk-local layers
    chunk_size: int  # 0: no chunk-local pool

    @property
    def max_tokens(self) -> int:
        """Tokens of full history the global pool holds (the most any sequence can have)."""
        return self.global_pages * self.page_size

    @property
    def total_bytes(self) -> int:
        p = self.page_size
        return p * (
            self.global_pages * self.global_bytes_per_token
            + self.local_pages * self.local_bytes_per_token
        )

    def describe(self) -> str:
        gib = self.total_bytes / 2**30
        text = (
            f"KV cache: {gib:.2f} GiB, {self.global_bytes_per_token} B/token in the global pool "
            f"({self.global_pages} pages of {self.page_size} = {self.max_tokens} tokens)"
        )
        if self.chunk_size:
            text += (
                f", {self.local_bytes_per_token} B/token in the chunk-local pool "
                f"({self.local_pages} pages, chunk {self.chunk_size})"
            )
        return text


def plan_memory(
    config: TextConfig,
    *,
    dtype: torch.dtype,
    context_len: int,
    page_size: int,
    max_running: int,
    max_step_tokens: int,
    kv_tokens: int | None = None,
    kv_bytes: int | None = None,
    extra_global_bytes_per_token: int = 0,
    kv_heads: int | None = None,
    kv_pages: tuple[int, int] | None = None,
) -> MemoryPlan:
    """Splits a budget given in tokens of full history (kv_tokens) or in bytes (kv_bytes), or
    takes exactly kv_pages = (global, local) pages (tensor-parallel workers take rank 0's).

    The chunk-local pool gets room for every running request's window (its current chunk plus
    one step) but never more than half a byte budget; the global pool gets the rest.
    extra_global_bytes_per_token: more KV indexed by the global pool's slots (an EAGLE3
    draft's layer). kv_heads: the KV heads per layer stored (one tensor-parallel rank's); None:
    the config's. Under tensor parallelism the budget and the plan are one rank's."""
    local = local_layers(config, context_len)
    heads = config.num_key_value_heads if kv_heads is None else kv_heads
    per_layer = 2 * heads * config.head_dim * dtype.itemsize
    g_bytes = per_layer * sum(not x for x in local) + extra_global_bytes_per_token
    l_bytes = per_layer * sum(local)
    chunk = config.attention_chunk_size if any(local) else 0
    window = chunk // page_size + -(-max_step_tokens // page_size) if chunk else 0
    if sum(x is not None for x in (kv_tokens, kv_bytes, kv_pages)) != 1:
        raise ValueError("give exactly one of kv_tokens, kv_bytes and kv_pages")
    if kv_pages is not None:
        global_pages, local_pages = kv_pages
    elif kv_tokens is not None:
        global_pages = -(-kv_tokens // page_size)
        local_pages = min(max_running * window, global_pages + window) if chunk else 0
    else:
        page_l, page_g = page_size * l_bytes, page_size * g_bytes
        local_pages = min(max_running * window, kv_bytes // 2 // page_l) if chunk else 0
        rest = kv_bytes - local_pages * page_l
        global_pages = rest // page_g if g_bytes else local_pages
    if global_pages < 1 or (chunk and local_pages < window):
        raise ValueError(
            f"the KV budget is too small: {global_pages} global pages, {local_pages} local pages "
            f"(at least {max(1, window)} needed)"
        )
    return MemoryPlan(page_size, global_pages, local_pages, g_bytes, l_bytes, chunk)


class ModelRunner:
    def __init__(
        self,
        model: Llama4ForCausalLM,
        *,
        context_len: int,
        kv_tokens: int | None = None,
        kv_bytes: int | None = None,
        page_size: int = 16,
        max_running: int = MAX_RUNNING,
        max_step_tokens: int = MAX_STEP_TOKENS,
        extra_global_bytes_per_token: int = 0,
        kv_pages: tuple[int, int] | None = None,
    ):
        """The KV budget: kv_tokens (tokens of full history), kv_bytes (this rank's, under
        tensor parallelism) or exact kv_pages; see plan_memory."""
        self.model = model
        config = model.config
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.memory = plan_memory(
            config,
            dtype=dtype,
            context_len=context_len,
            page_size=page_size,
            max_running=max_running,
            max_step_tokens=max_step_tokens,
            kv_tokens=kv_tokens,
            kv_bytes=kv_bytes,
            extra_global_bytes_per_token=extra_global_bytes_per_token,
            kv_heads=model.kv_heads,
            kv_pages=kv_pages,
        )
        mem = self.memory
        global_width, local_width = Scheduler.table_widths(
            page_size, mem.chunk_size, context_len, max_step_tokens
        )
        self.cache = PagedKVCache(
            config,
            page_size=page_size,
            global_pages=mem.global_pages,
            local_pages=mem.local_pages,
            local_layers=local_layers(config, context_len),
            max_rows=max_running,
            global_table_width=global_width,
            local_table_width=local_width,
            dtype=dtype,
            device=device,
            kv_heads=model.kv_heads,
        )
        self.device = device
        self.context_len = context_len
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.graphs: DecodeGraphs | None = None

    def new_scheduler(self, *, enable_prefix_cache: bool = True, policy: str = "fcfs") -> Scheduler:
        """A scheduler over this runner's KV cache (its pools' page counts, its block tables'
        shapes); whoever drives the runner owns it."""
        mem = self.memory
        return Scheduler(
            mem.global_pages,
            page_size=mem.page_size,
            local_pages=mem.local_pages,
            chunk_size=mem.chunk_size,
            context_len=self.context_len,
            max_running=self.max_running,
            max_step_tokens=self.max_step_tokens,
            enable_prefix_cache=enable_prefix_cache,
            policy=policy,
        )

    def capture_graphs(self, max_bs: int, capture: Capture | None = None) -> None:
        """Captures decode graphs for batch sizes up to max_bs (at most max_running; see
        pyllama4.graphs); forward() then replays them for the plans they fit. capture: the
        mechanism, CUDA/HIP graphs by default (a GPU with the kernel library: without its
        paged-attention kernel a graph would attend over the whole context; then this logs
        why and leaves every step eager). Under tensor parallelism every rank captures, in
        the same order."""
        pool = None
        if capture is None:
            k_cache = self.cache.k[0]
            if not attention_gpu.usable(k_cache):
                log.warning(
                    "decode graphs not captured: they need a bf16 model on a GPU with the kernel "
                    "library (%s); every step runs eagerly",
                    "dtype " + str(k_cache.dtype) if k_cache.is_cuda else "no GPU",
                )
                return
            capture, pool = CudaGraphReplay, torch.cuda.graph_pool_handle()
        self.graphs = None  # the old graphs' memory goes back to the pool first
        self.graphs = DecodeGraphs(
            self.model,
            self.cache,
            max_bs=min(max_bs, self.cache.scratch_row),
            max_keys=self.context_len,
            capture=capture,
            pool=pool,
        )

    def forward(
        self,
        plan: StepPlan,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        extra: tuple[np.ndarray, Reduce] | None = None,
    ) -> torch.Tensor:
        """Runs one plan; returns the logits [num_samples, vocab] of its sampling positions.
        embeds: (flat token index [K], features [K, hidden]) of the image positions it computes.
        extra: (flat token indices [E], reduce): the logits of those tokens too, handed to
        reduce block by block (never all at once), never returned. Plans of decodes that a
        captured graph fits replay it."""
        if extra is not None:
            scored = ScoredPlan(plan, extra[0])
            self.announce(scored, embeds)
            self.cache.apply_writes(plan)
            batch = StepBatch.from_plan(scored, self.device, embeds)
            hidden = self.model(batch, self.cache)
            return self.logits(hidden[batch.sample_indices], len(plan.sample_indices), extra[1])
        size = None if self.graphs is None or embeds is not None else self.graphs.size_for(plan)
        if size is None:
            return self.forward_with_hidden(plan, embeds)[0]
        self.announce(plan, None)
        self.cache.apply_writes(plan)
        return self.graphs.forward(plan, size)

    def announce(self, plan: Any, embeds: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Called before each step runs (ShardedRunner: sends it to the other ranks)."""

    def forward_with_hidden(
        self, plan: StepPlan, embeds: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As forward (never a graph), plus the final hidden states [num_tokens, hidden] of
        every token of the plan (what speculative decoding drafts from)."""
        self.announce(plan, embeds)
        self.cache.apply_writes(plan)
        batch = StepBatch.from_plan(plan, self.device, embeds)
        hidden = self.model(batch, self.cache)
        return self.logits(hidden[batch.sample_indices]), hidden

    def logits(
        self, rows: torch.Tensor, keep: int | None = None, reduce: Reduce | None = None
    ) -> torch.Tensor:
        """The logits of hidden rows [N, hidden], in blocks of LOGIT_BLOCK_ROWS when N is larger:
        rows [0, keep) are returned, the others go to reduce (keep None: all are returned)."""
        n = rows.shape[0]
        keep = n if keep is None else keep
        if n <= LOGIT_BLOCK_ROWS and reduce is None:
            return self.model.logits(rows)
        kept = []
        for a in range(0, n, LOGIT_BLOCK_ROWS):
            block = self.model.logits(rows[a : a + LOGIT_BLOCK_ROWS])
            if a < keep or a == 0:
                kept.append(block[: max(keep - a, 0)])
            if reduce is not None and a + block.shape[0] > keep:
                reduce(max(a, keep) - keep, block[max(keep - a, 0) :])
        return torch.cat(kept) if len(kept) != 1 else kept[0]
