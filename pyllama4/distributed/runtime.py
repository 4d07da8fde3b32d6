"""Tensor-parallel serving: rank 0 orchestrates, ranks 1..N-1 are worker processes.

Invariants:
- Every rank runs the same plans in the same order. Rank 0 sends each plan (its flat arrays and
  the image features it feeds) to the workers over a CPU group before running it, so the
  collectives inside the model pair up; the transport is torch.distributed's (object broadcast
  over gloo), never one of ours. Activations and weights travel only through the model's
  collectives.
- Workers keep the same block tables and page counts as rank 0 (rank 0 sends BuildRunner with
  its (global, local) pages whenever it builds a runner: a throw-away one to measure memory,
  then the serving one), with their own KV heads and weight slices; they capture decode graphs
  when rank 0 does (CaptureGraphs), in the same order.
- Supervision: a worker that exits while the server runs is reported (callback) within a poll
  interval; rank 0's shutdown sends the workers a stop message and joins them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pyllama4.distributed.parallel import TensorParallel, init_tensor_parallel
from pyllama4.runner import ModelRunner

log = logging.getLogger("pyllama4.distributed")

_PLAN_FIELDS = (
    "query_start",
    "context_lens",
    "seq_lens",
    "token_ids",
    "positions",
    "global_slots",
    "local_slots",
    "rows",
    "global_table_index",
    "global_table_values",
    "local_table_index",
    "local_table_values",
    "sample_indices",
)


@dataclass(frozen=True)
class PlanMessage:
    """What a worker needs of a StepPlan (ModelRunner.forward reads exactly these), plus the
    image features the step feeds (on the CPU)."""

    arrays: dict[str, np.ndarray]
    num_decodes: int
    embeds: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_plan(cls, plan: Any, embeds: tuple[torch.Tensor, torch.Tensor] | None) -> PlanMessage:
        cpu = None if embeds is None else (embeds[0].cpu(), embeds[1].cpu())
        arrays = {name: np.array(getattr(plan, name)) for name in _PLAN_FIELDS}
        return cls(arrays, int(plan.num_decodes), cpu)

    @property
    def num_requests(self) -> int:
        return len(self.arrays["rows"])

    @property
    def num_tokens(self) -> int:
        return len(self.arrays["token_ids"])

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker builds its shard: the checkpoint, load options and the group to join."""

    checkpoint: str
    dtype: str
    device: str  # "cpu", or "cuda" (a worker takes cuda:<local rank>)
    context_len: int
    runner_options: dict[str, Any]
    size: int
    init_method: str
    backend: str | None = None
    threads: int | None = None  # torch threads per worker on the CPU


@dataclass(frozen=True)
class BuildRunner:
    """Workers: (re)build the runner with exactly these (global, local) pages (rank 0's)."""

    pages: tuple[int, int]


@dataclass(frozen=True)
class CaptureGraphs:
    """Workers: capture decode graphs up to max_bs, as rank 0 does at the same time, with
    rank 0's capture mechanism (None: CUDA graphs; pyllama4.graphs.EagerReplay in CPU tests)."""

    max_bs: int
    capture: Any = None


Message = PlanMessage | BuildRunner | CaptureGraphs | None  # None: stop


class PlanChannel:
    """Rank 0's side (send / close) and a worker's side (receive) of the plan broadcast."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        backend = dist.get_backend(tp.group) if tp.group is not None else "gloo"
        # Objects go over gloo; a GPU run's collectives keep NCCL / RCCL for tensors.
        self.group = tp.group if backend == "gloo" else dist.new_group(backend="gloo")

    def send(self, message: Message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> Message:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class ShardedRunner(ModelRunner):
    """Rank 0's runner: sends each plan to the workers, then runs its own shard of it."""

    channel: PlanChannel

    def announce(self, plan: Any, embeds: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.channel.send(PlanMessage.from_plan(plan, embeds))

    def capture_graphs(self, max_bs: int, capture: Any = None) -> None:
        """Every rank captures, in step (the graphs hold collectives)."""
        self.channel.send(CaptureGraphs(max_bs, capture))
        super().capture_graphs(max_bs, capture)


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """A worker process: join the group, load this rank's shard, build the runner with rank 0's
    memory plan, then run every plan rank 0 sends until it sends None."""
    from pyllama4.loading.load import load_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = spec.device if spec.device == "cpu" else f"cuda:{rank % torch.cuda.device_count()}"
    if device != "cpu":
        torch.cuda.set_device(device)
    tp = init_tensor_parallel(rank, spec.size, spec.init_method, spec.backend)
    model = load_model(spec.checkpoint, dtype=spec.dtype, device=device, progress=False, tp=tp)
    channel = PlanChannel(tp)
    runner: ModelRunner | None = None
    while (message := channel.receive()) is not None:
        if isinstance(message, BuildRunner):
            runner = None  # the old runner's KV is freed before the new one's is taken
            runner = ModelRunner(
                model, context_len=spec.context_len, kv_pages=message.pages, **spec.runner_options
            )
        elif isinstance(message, CaptureGraphs):
            assert runner is not None
            runner.capture_graphs(message.max_bs, message.capture)
        else:
            assert runner is not None
            embeds = None
            if message.embeds is not None:
                embeds = (message.embeds[0].to(device), message.embeds[1].to(device))
            runner.follow(message, embeds)
    # Rank 0 may be gone already (on another node, its server stops without waiting for this
    # one): tearing the group down could then abort inside the backend's threads (SIGABRT,
    # "terminate called without an active exception"). All work is done; only logs to flush.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class Workers:
    """Ranks 1..N-1 of this node, spawned and watched by rank 0."""

    processes: list[mp.process.BaseProcess]
    on_exit: Callable[[str], None] | None = None
    stopping: bool = False
    _watch: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def spawn(cls, spec: WorkerSpec, ranks: range) -> Workers:
        context = mp.get_context("spawn")
        processes = []
        for rank in ranks:
            p = context.Process(
                target=worker_main, args=(rank, spec), name=f"pyllama4-tp{rank}", daemon=True
            )
            p.start()
            processes.append(p)
        return cls(processes)

    def dead(self) -> str | None:
        """What is wrong if a worker has exited unasked (a message naming it), else None."""
        for p in self.processes:
            if p.exitcode is not None and not self.stopping:
                name, pid, code = p.name, p.pid, p.exitcode
                return f"tensor-parallel worker {name} (pid {pid}) exited with code {code}"
        return None

    def watch(self, on_exit: Callable[[str], None], interval: float = 0.2) -> None:
        """Calls on_exit(message) from a thread once a worker exits unasked."""
        self.on_exit = on_exit

        def run() -> None:
            while not self.stopping:
                message = self.dead()
                if message is not None:
                    on_exit(message)
                    return
                threading.Event().wait(interval)

        self._watch = threading.Thread(target=run, name="pyllama4-tp-watch", daemon=True)
        self._watch.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Joins the workers (rank 0 has sent the stop message); kills what is left."""
        self.stopping = True
        for p in self.processes:
            p.join(timeout)
            if p.exitcode is None:
                p.kill()
                p.join(1)


def free_init_method() -> str:
    """A tcp:// rendezvous on a free local port (single node)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def cpu_threads_per_rank(size: int) -> int:
    return max(1, (os.cpu_count() or 1) // size)
