"""Building an engine from an EngineConfig: the tokenizer, the tensor-parallel bootstrap, the
model (on the model thread), the KV budget and the step executor.

Invariants: all of the model's torch work happens on the one model thread the engine keeps
(torch's CPU threads are per calling thread). Under tensor parallelism this process is rank 0;
it spawns its node's other ranks, which build their runners with rank 0's exact page counts; if
the build fails, they are stopped before the error propagates.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pyllama4 import kernels
from pyllama4._core import Scheduler
from pyllama4.config import TextConfig
from pyllama4.distributed.parallel import (
    SINGLE,
    TensorParallel,
    attention_heads,
    init_tensor_parallel,
)
from pyllama4.distributed.runtime import (
    BuildRunner,
    PlanChannel,
    ShardedRunner,
    Workers,
    WorkerSpec,
    cpu_threads_per_rank,
    free_init_method,
)
from pyllama4.engine.config import EngineConfig
from pyllama4.loading.eagle3 import load_eagle3
from pyllama4.loading.load import load_model
from pyllama4.memory import CudaMeter, MemoryReport
from pyllama4.memory import measure as measure_memory
from pyllama4.model.eagle3 import Eagle3Draft
from pyllama4.multimodal.support import ImageSupport
from pyllama4.runner import ModelRunner
from pyllama4.speculative.eagle import EagleWorker, SpecConfig, draft_kv_bytes_per_token

log = logging.getLogger("pyllama4.engine")


@dataclass
class Built:
    """What the model thread builds."""

    runner: ModelRunner
    images: ImageSupport | None
    speculative: EagleWorker | None
    memory_report: MemoryReport | None


@dataclass
class EngineParts:
    """Everything an Engine is made of, built from an EngineConfig."""

    tokenizer: Any
    runner: ModelRunner
    scheduler: Scheduler
    model_thread: ThreadPoolExecutor
    images: ImageSupport | None
    speculative: EagleWorker | None
    workers: Workers | None
    memory_report: MemoryReport | None


def build(config: EngineConfig) -> EngineParts:
    """Loads config.checkpoint and its tokenizer, on the model thread the engine keeps; under
    tensor parallelism first starts this node's other ranks (stopped again if loading fails)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.checkpoint)
    sharded = None
    if config.tp > 1:
        check_shardable(TextConfig.from_checkpoint(config.checkpoint), config.tp)
        sharded = _Sharded.start(config)
    layout = config.cpu_layout()  # ValueError before anything starts
    if layout is not None:
        log.info(layout.describe())
    model_thread = ThreadPoolExecutor(1, "pyllama4-model", layout and layout.apply)
    try:
        built = model_thread.submit(_build_on_model_thread, config, tokenizer, sharded).result()
    except BaseException:
        if sharded is not None:
            sharded.workers.stop(timeout=1.0)
            if dist.is_initialized():
                dist.destroy_process_group()
        raise
    log.debug(built.runner.memory.describe())
    log.info("GPU kernels: %s", kernels.describe(built.runner.device))
    scheduler = built.runner.new_scheduler(
        enable_prefix_cache=config.enable_prefix_cache, policy=config.policy
    )
    return EngineParts(
        tokenizer,
        built.runner,
        scheduler,
        model_thread,
        built.images,
        built.speculative,
        None if sharded is None else sharded.workers,
        built.memory_report,
    )


def _build_on_model_thread(config: EngineConfig, tokenizer: Any, sharded: _Sharded | None) -> Built:
    model_device = config.device if sharded is None else sharded.join()
    model = load_model(
        config.checkpoint,
        dtype=config.dtype,
        device=model_device,
        progress=config.progress,
        quantization=config.quantization,
        fp8_format=config.fp8_format,
        tp=sharded.tp if sharded is not None else SINGLE,
    )
    model_dtype = next(model.parameters()).dtype
    images = None
    if config.enable_multimodal:
        images = ImageSupport.load(
            config.checkpoint,
            tokenizer,
            dtype=model_dtype,
            device=config.device,
            max_tiles=config.max_image_tiles,
            progress=config.progress,
        )
    context = config.context_len or model.config.max_position_embeddings
    draft = _load_draft(config, model) if config.speculative_draft is not None else None
    extra = {} if draft is None else {"extra_global_bytes_per_token": _draft_bytes(draft, model)}

    def build_runner(budget: dict[str, Any]) -> ModelRunner:
        options = config.runner_options() | extra | budget
        if sharded is not None:
            return sharded.runner(model, context, options)
        return ModelRunner(model, context_len=context, **options)

    budget, report = _kv_budget(config, model, build_runner)
    runner = build_runner(budget)
    if runner.device.type == "cuda" and config.cuda_graph_max_bs:
        runner.capture_graphs(config.cuda_graph_max_bs)
    worker = None
    if draft is not None:
        worker = EagleWorker(runner, draft, config.speculative or SpecConfig())
    return Built(runner, images, worker, report)


def _load_draft(config: EngineConfig, model: torch.nn.Module) -> Eagle3Draft:
    c = model.config
    assert config.speculative_draft is not None
    return load_eagle3(
        config.speculative_draft,
        c.hidden_size,
        c.vocab_size,
        c.num_hidden_layers,
        dtype=next(model.parameters()).dtype,
        device=config.device,
    ).eval()


def _draft_bytes(draft: Eagle3Draft, model: torch.nn.Module) -> int:
    """The draft's KV bytes per token, added to the global pool's cost per token."""
    return draft_kv_bytes_per_token(draft, next(model.parameters()).dtype)


def _kv_budget(
    config: EngineConfig, model: torch.nn.Module, build_runner: Any
) -> tuple[dict[str, int], MemoryReport | None]:
    """The runner's KV budget: as configured; else, on a GPU, mem_fraction_static of its memory
    less what the model, a warm-up's activations and the decode graphs take, measured
    (pyllama4.memory; under tensor parallelism on rank 0, every rank taking its page counts);
    on the CPU, a quarter of the machine's memory, at most 1 GiB."""
    if config.kv_tokens is not None:
        return {"kv_tokens": config.kv_tokens}, None
    if config.kv_bytes is not None:
        return {"kv_bytes": config.kv_bytes}, None
    device = next(model.parameters()).device
    if device.type != "cuda":
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"kv_bytes": min(1 << 30, physical // 4)}, None
    report = measure_memory(
        lambda tokens: build_runner({"kv_tokens": tokens}),
        CudaMeter(device),
        fraction=config.mem_fraction_static,
        step_tokens=config.max_step_tokens,
        rows=config.max_running,
        graph_max_bs=config.cuda_graph_max_bs,
    )
    report.check()
    return {"kv_bytes": report.kv_bytes}, report


def check_shardable(config: TextConfig, size: int) -> None:
    """ValueError, before any process starts, when the model does not split in `size`."""
    tp = TensorParallel(0, size)
    attention_heads(config.num_attention_heads, config.num_key_value_heads, tp)
    tp.split(config.vocab_size, "the vocabulary")


def spawn_node_ranks(config: EngineConfig, node_rank: int, init_method: str) -> Workers:
    """Spawns the worker ranks of one node: on node 0 ranks 1..tp/nnodes-1 (rank 0 is this
    process), on node k its ranks k*tp/nnodes.. (they load their shards at once)."""
    per_node = config.tp // config.nnodes
    on_cpu = config.device == "cpu"
    context = (
        config.context_len or TextConfig.from_checkpoint(config.checkpoint).max_position_embeddings
    )
    spec = WorkerSpec(
        checkpoint=str(config.checkpoint),
        dtype=config.dtype,
        device="cpu" if on_cpu else "cuda",
        context_len=context,
        runner_options=config.runner_options(),
        size=config.tp,
        init_method=init_method,
        threads=cpu_threads_per_rank(per_node) if on_cpu else None,
    )
    first = node_rank * per_node
    return Workers.spawn(spec, range(max(first, 1), first + per_node))


@dataclass
class _Sharded:
    """Rank 0 of a tensor-parallel engine while it loads: the spawned workers and the group."""

    workers: Workers
    size: int
    init_method: str
    device: str
    tp: Any = None
    channel: PlanChannel | None = None

    @classmethod
    def start(cls, config: EngineConfig) -> _Sharded:
        init_method = config.dist_init_method or free_init_method()
        workers = spawn_node_ranks(config, 0, init_method)
        return cls(workers, config.tp, init_method, config.device)

    def join(self) -> str:
        """Joins the group (on the model thread); returns rank 0's device."""
        device = self.device
        if device != "cpu":
            device = "cuda:0"
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(cpu_threads_per_rank(len(self.workers.processes) + 1))
        self.tp = init_tensor_parallel(0, self.size, self.init_method)
        return device

    def runner(self, model: Any, context: int, options: dict[str, Any]) -> ShardedRunner:
        """Rank 0's runner; the workers build theirs with its exact page counts."""
        if self.channel is None:
            self.channel = PlanChannel(self.tp)
        runner = ShardedRunner(model, context_len=context, **options)
        runner.channel = self.channel
        pages = (runner.memory.global_pages, runner.memory.local_pages)
        self.channel.send(BuildRunner(pages))
        return runner
