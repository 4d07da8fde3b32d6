"""Tensor parallelism over torch.distributed: which rank holds what, and the two collectives.

Invariant: a `TensorParallel` of size 1 (`SINGLE`) is the identity: `all_reduce` and
`all_gather` return their input unchanged, `split` gives the whole range, and no process group is
needed. At size > 1 every rank of `group` calls the same collectives in the same order (the model
runs the same plans everywhere), and rank r holds the r-th of `size` equal parts of whatever is
split (Megatron style; pyllama4.model.llama4 says what is split how); a parameter holding its
rank's part names it as a `Shard` of the full checkpoint tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SINGLE", "Shard", "TensorParallel", "attention_heads", "init_tensor_parallel"]


@dataclass(frozen=True)
class Shard:
    """The part of a full checkpoint tensor a parameter holds: along `dim` (of the module's layout),
    the full tensor's indices [start, stop) of each of `ranges`, concatenated in order; every other
    dim whole. `full`: the full tensor's size along dim."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int

    @property
    def size(self) -> int:
        """The parameter's size along dim."""
        return sum(stop - start for start, stop in self.ranges)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group of `size` ranks."""

    rank: int = 0
    size: int = 1
    group: Any = None  # the torch.distributed ProcessGroup (None when size == 1)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor parallel rank {self.rank} of size {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the group, in place; returns x."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along dim, in rank order; x itself when size == 1."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of n items split evenly; ValueError naming `what` when
        size does not divide n."""
        if n % self.size:
            raise ValueError(
                f"{what} ({n}) is not divisible by the tensor parallel size {self.size}"
            )
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per


SINGLE = TensorParallel()


def attention_heads(
    heads: int, kv_heads: int, tp: TensorParallel
) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's query heads and KV heads, each as [start, stop).

    size <= kv_heads: an equal share of each. size > kv_heads: KV heads are replicated, rank r
    holding KV head r * kv_heads // size; the size // kv_heads ranks sharing a KV head split the
    query heads that use it. Either way rank r's query heads are [r, r + 1) * heads / size, and
    each of them uses one of its KV heads (query head h uses KV head h // (heads / kv_heads)).
    ValueError unless size divides kv_heads or kv_heads divides size, and size divides heads."""
    if tp.size <= kv_heads:
        if kv_heads % tp.size:
            raise ValueError(
                f"KV heads ({kv_heads}) are not divisible by the tensor parallel size {tp.size}"
            )
        kv = tp.split(kv_heads, "KV heads")
    else:
        if tp.size % kv_heads:
            raise ValueError(
                f"the tensor parallel size {tp.size} is not a multiple of the KV heads "
                f"({kv_heads}): KV heads can be split or replicated, not both"
            )
        head = tp.rank * kv_heads // tp.size
        kv = (head, head + 1)
    return tp.split(heads, "attention heads"), kv


def init_tensor_parallel(
    rank: int, size: int, init_method: str, backend: str | None = None
) -> TensorParallel:
    """Joins the process group of `size` ranks (torch.distributed.init_process_group) and returns
    this rank's TensorParallel over the whole world. backend None: "nccl" when CUDA is available
    (RCCL on ROCm answers to the same name; the caller sets this rank's device first), else
    "gloo". size 1 needs no group: SINGLE, and nothing is initialised."""
    if size == 1:
        return TensorParallel(rank, size)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    return TensorParallel(rank, size, dist.group.WORLD)
