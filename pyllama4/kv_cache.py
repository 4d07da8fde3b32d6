"""Paged KV memory for the model: per-layer K/V tensors in two pools plus the block tables.

Invariant: layer l stores its keys and values in the local pool when it is a chunk-local layer
whose chunk is shorter than the context (local_layers[l]), else in the global pool; slot s of a
pool is page s // page_size, offset s % page_size. The block tables mirror the core scheduler's:
they change only through `apply_writes` with the writes a StepPlan carries. Each pool has one
scratch page past the scheduler's pages and each block table one scratch row past its rows (all
entries the scratch page): padded rows of a decode graph (pyllama4.graphs) write and read only
there, never a request's KV. Under tensor
parallelism each rank's cache holds its own KV heads (`kv_heads`, Llama4ForCausalLM.kv_heads)
with the same pages and block tables as every other rank's.
"""

from __future__ import annotations

import numpy as np
import torch

from pyllama4._core import StepPlan
from pyllama4.config import TextConfig


def local_layers(config: TextConfig, context_len: int) -> tuple[bool, ...]:
    """Layers that keep only the current attention chunk; a chunk that covers the whole context
    makes chunked attention plain causal attention, kept in the global pool."""
    chunk = config.attention_chunk_size
    return tuple(c and chunk is not None and chunk < context_len for c in config.chunked)


class PagedKVCache:
    def __init__(
        self,
        config: TextConfig,
        *,
        page_size: int,
        global_pages: int,
        local_pages: int,
        local_layers: tuple[bool, ...],
        max_rows: int,
        global_table_width: int,
        local_table_width: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        kv_heads: int | None = None,
    ):
        """kv_heads: the KV heads this cache stores per layer (this rank's); None: the config's."""
        self.page_size = page_size
        self.local_layers = local_layers
        self.chunk_size = config.attention_chunk_size if any(local_layers) else None
        shape = (config.num_key_value_heads if kv_heads is None else kv_heads, config.head_dim)

        def pool(pages: int) -> torch.Tensor:
            return torch.zeros((pages + 1) * page_size, *shape, dtype=dtype, device=device)

        self.k = [pool(local_pages if loc else global_pages) for loc in local_layers]
        self.v = [pool(local_pages if loc else global_pages) for loc in local_layers]
        tables = {"dtype": torch.int64, "device": device}
        self.global_table = torch.zeros(max_rows + 1, global_table_width, **tables)
        self.local_table = torch.zeros(max_rows + 1, max(1, local_table_width), **tables)
        self.local_table_width = local_table_width
        # The scratch row, page and first slot of each pool (see the module docstring).
        self.scratch_row = max_rows
        self.global_table[max_rows] = global_pages
        self.local_table[max_rows] = local_pages
        self.scratch_slots = (global_pages * page_size, local_pages * page_size)

    def apply_writes(self, plan: StepPlan) -> None:
        """Applies the block table entries a plan carries (before its step runs)."""
        device = self.global_table.device
        for table, index, values in (
            (self.global_table, plan.global_table_index, plan.global_table_values),
            (self.local_table, plan.local_table_index, plan.local_table_values),
        ):
            if index.size:
                idx = torch.from_numpy(index).to(device, non_blocking=True)
                val = torch.from_numpy(values.astype(np.int64)).to(device, non_blocking=True)
                table.view(-1)[idx] = val
