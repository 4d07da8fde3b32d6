"""EngineConfig: everything that shapes an engine, from the command line (or Python) to the
runner, in one frozen record. Serving and tensor-parallel workers build from the same record.

Invariant: the runner's options come only from `runner_options()`; no other flag → option map
exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyllama4 import cpu_layout
from pyllama4.cpu_layout import CpuLayout
from pyllama4.layers.cpu_linear import cpu_auto_dtype
from pyllama4.runner import MAX_RUNNING, MAX_STEP_TOKENS
from pyllama4.speculative.eagle import SpecConfig


def auto_dtype(device: str) -> tuple[str, str]:
    """The dtype a model runs in when none is asked for, and why: bfloat16 on a GPU; on the CPU
    bfloat16 where it computes it natively and faster than float32 (measured once), else
    float32."""
    if device != "cpu":
        return "bfloat16", "bfloat16 on a GPU"
    chosen, why = cpu_auto_dtype()
    return str(chosen).removeprefix("torch."), why


@dataclass(frozen=True)
class EngineConfig:
    checkpoint: Path
    dtype: torch.dtype | str = torch.bfloat16
    device: str = "cpu"
    context_len: int | None = None  # None: the model's max_position_embeddings
    progress: bool = True  # progress bars while loading
    tokenizer: str | None = None  # a directory or Hub id; None: the checkpoint's tokenizer
    # ---- the model
    enable_multimodal: bool = False  # also load the vision tower (ValueError if text-only)
    max_image_tiles: int | None = None  # None: the checkpoint's preprocessor setting
    quantization: str | None = None  # "fp8": quantize a bf16 checkpoint at load
    fp8_format: str = "e4m3fn"  # or e4m3fnuz (MI300)
    speculative_draft: Path | None = None  # an EAGLE3 draft checkpoint (SGLang's layout)
    speculative: SpecConfig | None = None  # None with a draft: SpecConfig()'s defaults
    # ---- tensor parallelism
    tp: int = 1
    nnodes: int = 1
    dist_init_method: str | None = None  # None: a free local port
    # ---- the KV cache and batching (kv_tokens / kv_bytes None: planned from memory)
    kv_tokens: int | None = None
    kv_bytes: int | None = None
    mem_fraction_static: float = 0.85
    page_size: int = 16
    max_running: int = MAX_RUNNING
    max_step_tokens: int = MAX_STEP_TOKENS
    enable_prefix_cache: bool = True
    policy: str = "fcfs"
    # ---- the step loop
    cuda_graph_max_bs: int = 0  # > 0 on a GPU: decode steps up to this batch replay graphs
    overlap: bool = True  # make a step's text while the next step computes
    # ---- the CPU's cores (pyllama4.cpu_layout.plan; None: its defaults)
    cpu_threads: int | None = None
    cpu_bind: str = "auto"
    cpu_reserved_cores: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if self.speculative_draft is not None:
            object.__setattr__(self, "speculative_draft", Path(self.speculative_draft))
        if self.tp > 1 and self.speculative_draft is not None:
            raise ValueError("EAGLE3 with tensor parallelism is not supported yet (use tp 1)")

    def cpu_layout(self) -> CpuLayout | None:
        """Where the model thread's torch threads go on the CPU (None on a GPU, and under tensor
        parallelism, whose ranks share the cores evenly)."""
        if self.device != "cpu" or self.tp > 1:
            return None
        return cpu_layout.plan(self.cpu_threads, self.cpu_bind, self.cpu_reserved_cores)

    def runner_options(self) -> dict[str, Any]:
        """ModelRunner's keyword arguments other than its KV budget (the build decides that)."""
        return {
            "page_size": self.page_size,
            "max_running": self.max_running,
            "max_step_tokens": self.max_step_tokens,
        }
