"""A module's parameters as the targets of checkpoint tensors.

Invariant: each distinct parameter is one `Target` (tied parameters are one target with several
names), materialised (not on the meta device), and holding at most one tensor-parallel `Shard`
that fits it; otherwise building `Targets` fails before anything is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from pyllama4.distributed.parallel import Shard
from pyllama4.loading.checkpoint import CheckpointError, listing

# Fused routed experts' parameters: weights (`..._proj`, 3-D) and their scales (`..._scale`, 2-D).
FUSED_RE = re.compile(r"\.feed_forward\.experts\.(gate_up|down)_(proj|scale)$")


@dataclass(eq=False)
class Target:
    """One distinct parameter (tied parameters are one target with several names)."""

    names: list[str]
    param: torch.nn.Parameter
    # "gate_up" / "down" for fused routed experts' weights [E, in, out] or their scales [E, out],
    # else None.
    fused: str | None
    # A per-output-channel scale (`weight_scale` [out], `gate_up_scale`, `down_scale`): the
    # checkpoint may store it with one more dimension of size 1.
    scale: bool
    # The part of the checkpoint tensor the parameter holds; None: all of it.
    shard: Shard | None = None

    @property
    def name(self) -> str:
        return self.names[0]

    def full_shape(self) -> tuple[int, ...]:
        """The shape of the whole tensor the parameter holds (a shard of)."""
        shape = list(self.param.shape)
        if self.shard is not None:
            shape[self.shard.dim] = self.shard.full
        return tuple(shape)

    def part(self, part: str) -> tuple[int, int]:
        """(first column, columns) of a fused expert parameter's full out dim that one expert's
        per-expert `part` ("gate", "up" or "down") provides."""
        out = self.full_shape()[-1]
        if self.fused == "gate_up":
            return (out // 2 if part == "up" else 0), out // 2
        return 0, out

    def units(self) -> list:
        """What must be written: the whole tensor (None), or (expert, part) for fused experts."""
        num_experts = self.param.shape[0]
        if self.fused == "gate_up":
            return [(e, p) for e in range(num_experts) for p in ("gate", "up")]
        if self.fused == "down":
            return [(e, "down") for e in range(num_experts)]
        return [None]

    def shapes(self) -> list[tuple[int, ...]]:
        """The accepted shapes of a whole-tensor source: the full tensor's, and for a scale the
        checkpoints' [out, 1] (Linear), [E, 1, 2I] (gate_up) or [E, H, 1] (down)."""
        shape = self.full_shape()
        if not self.scale:
            return [shape]
        if self.fused == "gate_up":
            return [shape, (shape[0], 1, shape[1])]
        return [shape, (*shape, 1)]


class Targets:
    """Every parameter of a module, by name (`by_name`) and once each (`all`)."""

    def __init__(self, model: torch.nn.Module, shards: Mapping[str, Shard]) -> None:
        by_id: dict[int, Target] = {}
        self.by_name: dict[str, Target] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            target = by_id.get(id(param))
            if target is None:
                target = by_id[id(param)] = _new_target(name, param)
            else:
                target.names.append(name)
            self.by_name[name] = target
        self.all = list(by_id.values())
        on_meta = [t.name for t in self.all if t.param.device.type == "meta"]
        if on_meta:
            raise CheckpointError(
                f"module parameters are on the meta device (materialise the module first, e.g. "
                f"with to_empty): {listing(on_meta)}"
            )
        for name, shard in shards.items():
            target = self.by_name.get(name)
            problem = "the module has no such parameter" if target is None else None
            problem = problem or _shard_problem(target, shard)
            if problem:
                raise ValueError(f"shard {shard} of {name}: {problem}")
            target.shard = shard


def _new_target(name: str, param: torch.nn.Parameter) -> Target:
    """The target of a parameter first seen under `name`: fused experts' or a scale, or plain."""
    fused = FUSED_RE.search(name)
    is_scale = fused.group(2) == "scale" if fused else name.endswith(".weight_scale")
    if fused and param.dim() != (2 if is_scale else 3):
        fused = None
    fused_kind = fused.group(1) if fused else None
    if fused_kind == "gate_up" and param.shape[-1] % 2:
        raise CheckpointError(
            f"module parameter {name} has an odd last dim: {shape_str(param.shape)}"
        )
    return Target([name], param, fused_kind, is_scale)


def _shard_problem(target: Target, shard: Shard) -> str | None:
    """Why `target` cannot hold `shard`; None if it can."""
    param = target.param
    if target.scale or is_fp8(param.dtype):
        return (
            "FP8 weights and scales are not sharded (tensor parallelism with FP8 is not supported)"
        )
    if target.shard not in (None, shard):
        return f"{' = '.join(target.names)} are one parameter, given shard {target.shard} too"
    if not (1 if target.fused else 0) <= shard.dim < param.dim():
        return f"dim {shard.dim} of a parameter of shape {shape_str(param.shape)}"
    if not all(0 <= start < stop <= shard.full for start, stop in shard.ranges):
        return f"ranges outside [0, {shard.full})"
    if shard.size != param.shape[shard.dim]:
        return f"{shard.size} indices for a parameter of shape {shape_str(param.shape)}"
    return None


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether `dtype` is a float8 dtype."""
    return dtype.is_floating_point and dtype.itemsize == 1


def shape_str(shape: Iterable[int]) -> str:
    """A shape as messages print it: [a, b, c]."""
    return str(list(shape))
