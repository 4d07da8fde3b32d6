"""Carrying out a planned checkpoint load: reading tensors and copying them into parameters.

Invariant: each copy reads only its target's shard of the source (large tensors in blocks of rows),
casts it to the parameter's dtype and writes it in place, on the parameter's device, so the extra
memory is about one block; a tied parameter's second source is compared instead, and a difference
is a `CheckpointError`. Progress goes to stderr, per shard file and at most every few seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pyllama4.distributed.parallel import Shard
from pyllama4.loading.checkpoint import CheckpointError, open_file
from pyllama4.loading.weight_plan import Copy, Source
from pyllama4.loading.weight_targets import Target

# Tensors bigger than this are copied in blocks of rows, to bound the extra memory.
_CHUNK_BYTES = 256 << 20
# Within a shard, progress is printed at most this often (seconds).
_PROGRESS_INTERVAL = 5.0


def execute(copies: list[Copy], files: list[Path], progress: bool) -> None:
    """Carry out `copies`, file by file in the order of `files`."""
    by_file: dict[Path, list[Copy]] = {}
    for copy in copies:
        by_file.setdefault(copy.source.file, []).append(copy)
    meter = _Progress(len(files), sum(c.nbytes for c in copies), enabled=progress)
    with torch.no_grad():
        for path in files:
            if path in by_file:
                with open_file(path) as handle:
                    for copy in by_file[path]:
                        _apply(handle, copy)
                        meter.advance(copy.nbytes)
            meter.shard_done()
    meter.finish()


def _apply(handle, copy: Copy) -> None:
    if copy.unit is not None:
        _copy_expert(handle, copy)
        return
    for block, tensor in _blocks(handle, copy.source, copy.target):
        if not copy.verify:
            block.copy_(tensor.reshape(block.shape))
            continue
        tensor = tensor.to(device=block.device, dtype=block.dtype).reshape(block.shape)
        if not torch.equal(tensor, block):
            raise CheckpointError(
                f"{copy.verify} and {copy.source.name} differ, but the module ties them into one "
                f"parameter ({' = '.join(copy.target.names)})"
            )


def _blocks(handle, source: Source, target: Target) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(a view of the parameter, the source's tensor for it): the whole tensor at once, or in
    blocks of leading-dim rows if it is large or sharded, reading only the shard's rows or
    columns. The tensor may have a scale's extra size-1 dim (the caller reshapes it away)."""
    param, shard = target.param, target.shard
    rows = source.shape[0] if source.shape else 1
    if shard is None:
        if source.nbytes <= _CHUNK_BYTES or rows < 2:
            yield param, handle.get_tensor(source.name)
            return
        shard = Shard(0, ((0, rows),), rows)
    step = max(1, _CHUNK_BYTES // max(1, source.nbytes // max(1, rows)))
    tensor_slice = handle.get_slice(source.name)
    offset = 0
    for start, stop in shard.ranges:
        if shard.dim == 0:
            for lo in range(start, stop, step):
                hi = min(stop, lo + step)
                yield param.narrow(0, offset + lo - start, hi - lo), tensor_slice[lo:hi]
        else:
            cols = (slice(None),) * (shard.dim - 1) + (slice(start, stop),)
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                block = param[lo:hi].narrow(shard.dim, offset, stop - start)
                yield block, tensor_slice[(slice(lo, hi), *cols)]
        offset += stop - start


def _copy_expert(handle, copy: Copy) -> None:
    """One expert's gate, up or down (weight [out, in] or scale [out] / [out, 1]) into its
    columns of the fused parameter (transposed: input-major), the shard's part of it only."""
    target, name = copy.target, copy.source.name
    expert, part = copy.unit
    param = target.param[expert]  # [in, out], or a scale's [out]
    first, count = target.part(part)
    if target.scale:
        param[first : first + count].copy_(handle.get_tensor(name).reshape(-1))
        return
    out = target.full_shape()[-1]
    shard = target.shard or Shard(2, ((0, out),), out)
    tensor_slice = handle.get_slice(name)  # nn.Linear [count, in]
    offset = 0
    for start, stop in shard.ranges:
        if shard.dim == 2:  # out columns of the parameter: rows of the source
            lo, hi = max(start, first), min(stop, first + count)
            if lo < hi:
                block = param.narrow(1, offset + lo - start, hi - lo)
                block.copy_(tensor_slice[lo - first : hi - first].t())
        else:  # in rows of the parameter: columns of the source
            block = param.narrow(0, offset, stop - start).narrow(1, first, count)
            block.copy_(tensor_slice[:, start:stop].t())
        offset += stop - start


class _Progress:
    def __init__(self, shards: int, total_bytes: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.shards = shards
        self.total = total_bytes
        self.done_shards = 0
        self.done_bytes = 0
        self.start = self.last = time.monotonic()
        self.unit, self.scale = ("GB", 1e9) if total_bytes >= 1e9 else ("MB", 1e6)

    def _print(self, suffix: str = "") -> None:
        if self.enabled:
            print(
                f"loading weights: {self.done_shards}/{self.shards} shards, "
                f"{self.done_bytes / self.scale:.1f}/{self.total / self.scale:.1f} {self.unit}"
                f"{suffix}",
                file=sys.stderr,
                flush=True,
            )
        self.last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if time.monotonic() - self.last >= _PROGRESS_INTERVAL:
            self._print()

    def shard_done(self) -> None:
        self.done_shards += 1
        if self.done_shards < self.shards:
            self._print()

    def finish(self) -> None:
        self._print(f", done in {time.monotonic() - self.start:.1f} s")
