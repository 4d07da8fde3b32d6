"""Planning a checkpoint load from the safetensors headers alone: which tensor goes where.

Invariant: `plan_copies` returns copies that write every unit of every target exactly once (a tied
parameter's second source only verifies the first), or raises a `CheckpointError` listing every
problem found (unsupported dtypes, repeated, unexpected, wrongly shaped or typed tensors, index
entries that do not match their file, missing tensors). No tensor data is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyllama4.loading.checkpoint import (
    CheckpointError,
    UnsupportedCheckpointError,
    listing,
    open_file,
)
from pyllama4.loading.weight_targets import FUSED_RE, Target, Targets, is_fp8, shape_str

# safetensors dtype -> bytes per element: the float dtypes cast to any float parameter, and the
# float8 ones (`_FP8_PARAMS`) that only go unchanged into a parameter of the same dtype.
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_FP8_PARAMS = {"F8_E4M3": torch.float8_e4m3fn}
_EXPERT_RE = re.compile(
    r"^(?P<experts>.+\.feed_forward\.experts)\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj"
    r"\.(?P<what>weight|weight_scale)$"
)
# fbgemm_fp8's names of the fused experts' scales -> the module's.
_FUSED_SCALE_NAME = re.compile(r"(\.feed_forward\.experts\.(?:gate_up|down))_proj_scale$")


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor, as its file's header describes it."""

    file: Path
    name: str  # the name in the checkpoint
    shape: tuple[int, ...]
    dtype: str  # the safetensors dtype, one of _FLOAT_DTYPES or _FP8_PARAMS
    nbytes: int


@dataclass
class Copy:
    """One checkpoint tensor into (a slice of) one target."""

    source: Source
    target: Target
    unit: object = None  # None: whole tensor; (expert, "gate" | "up" | "down"): one expert's slice
    verify: str | None = None  # tied: the tensor already written to the parameter; compare

    @property
    def nbytes(self) -> int:
        """The bytes read from the source: all, or the part the target's shard takes."""
        shard, size = self.target.shard, self.source.nbytes
        if shard is None:
            return size
        if self.unit is not None and shard.dim == 2:  # some of one expert's out columns
            first, count = self.target.part(self.unit[1])
            overlap = sum(
                max(0, min(stop, first + count) - max(start, first)) for start, stop in shard.ranges
            )
            return size * overlap // count
        return size * shard.size // shard.full


@dataclass
class _Problems:
    unsupported: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape: list[str] = field(default_factory=list)
    dtype: list[str] = field(default_factory=list)
    index: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def raise_if_any(self) -> None:
        if self.unsupported:
            raise UnsupportedCheckpointError(f"not supported yet: {listing(self.unsupported)}")
        sections = [
            ("tensor(s) given more than once", self.duplicate),
            ("unexpected tensor(s) (the module has no place for them)", self.unexpected),
            ("tensor(s) with the wrong shape", self.shape),
            ("tensor(s) with the wrong dtype", self.dtype),
            ("index entries that do not match the shard contents", self.index),
            ("missing tensor(s)", self.missing),
        ]
        lines = [f"{len(items)} {title}: {listing(items)}" for title, items in sections if items]
        if lines:
            raise CheckpointError("checkpoint does not match the module:\n  " + "\n  ".join(lines))


def plan_copies(
    files: list[Path],
    weight_map: dict[str, Path] | None,
    targets: Targets,
    *,
    rename: Callable[[str], str | None],
    tie_embeddings: bool,
    quantized: bool,
) -> list[Copy]:
    """The copies that load `files` into `targets`; raises `CheckpointError` on any mismatch."""
    planner = _Planner(targets, quantized)
    seen: dict[str, Path] = {}
    for path in files:
        keys = planner.read_headers(path, rename, seen)
        if weight_map is not None:
            planner.check_index(path, keys, weight_map)
    if tie_embeddings:
        planner.fill_tied()
    planner.find_missing()
    planner.problems.raise_if_any()
    return planner.copies


class _Planner:
    """The copies planned so far, what each target has been given, and the problems found."""

    def __init__(self, targets: Targets, quantized: bool) -> None:
        self.targets = targets
        self.quantized = quantized
        self.problems = _Problems()
        self.copies: list[Copy] = []
        # Per target, the checkpoint name that provides each unit so far.
        self.claimed: dict[Target, dict[object, str]] = {t: {} for t in targets.all}
        # Targets written whole, and by which source.
        self.whole: dict[Target, Source] = {}

    def read_headers(
        self, path: Path, rename: Callable[[str], str | None], seen: dict[str, Path]
    ) -> list[str]:
        """Place every tensor of one file (`seen`: the files of the tensors placed before);
        returns the file's tensor names."""
        with open_file(path) as handle:
            keys = list(handle.keys())
            for key in keys:
                if key in seen:
                    self.problems.duplicate.append(
                        f"{key} is in both {seen[key].name} and {path.name}"
                    )
                    continue
                seen[key] = path
                name = rename(key)
                if name is None:
                    continue
                tensor_slice = handle.get_slice(key)
                shape = tuple(tensor_slice.get_shape())
                dtype = tensor_slice.get_dtype()
                unsupported = _unsupported_dtype(key, dtype, self.quantized)
                if unsupported:
                    self.problems.unsupported.append(unsupported)
                    continue
                size = _FLOAT_DTYPES.get(dtype, 1)
                self.place(Source(path, key, shape, dtype, _numel(shape) * size), name)
        return keys

    def check_index(self, path: Path, keys: list[str], weight_map: dict[str, Path]) -> None:
        """Report the index's entries for `path` that the file does not store."""
        present = set(keys)
        for key, shard in weight_map.items():
            if shard == path and key not in present:
                self.problems.index.append(f"{key} is listed in {path.name} but not stored there")

    def place(self, source: Source, name: str) -> None:
        """Claim the target (or one expert's slice of it) that the module's `name` denotes."""
        targets = self.targets
        target = targets.by_name.get(name) or targets.by_name.get(
            _FUSED_SCALE_NAME.sub(r"\1_scale", name)
        )
        if target is not None:
            usable = self.check(source, target, target.shapes())
            self.claim(source, target, None, usable=usable)
            return
        match = _EXPERT_RE.match(name)
        if match:
            part, is_scale = match.group("part"), match.group("what") == "weight_scale"
            fused = match.group("experts") + (".down" if part == "down" else ".gate_up")
            fused += "_scale" if is_scale else "_proj"
            target = targets.by_name.get(fused)
            if target is not None and target.fused is not None and target.scale == is_scale:
                self._place_expert(source, target, fused, int(match.group("e")), part)
                return
        self.problems.unexpected.append(source.name)

    def _place_expert(
        self, source: Source, target: Target, fused: str, expert: int, part: str
    ) -> None:
        """One expert's per-expert tensor into its slice of the fused target named `fused`."""
        num_experts, *rest = target.full_shape()
        if expert >= num_experts:
            self.problems.unexpected.append(
                f"{source.name} (expert {expert}, but {fused} has {num_experts} experts)"
            )
            return
        if target.scale:  # [out] (or [out, 1]) of a [E, out] parameter; gate_up: half of out
            out = rest[0] // 2 if target.fused == "gate_up" else rest[0]
            shapes = [(out,), (out, 1)]
        else:  # nn.Linear [out, in] of an input-major [E, in, out] parameter
            rows, cols = rest
            shapes = [(cols // 2 if target.fused == "gate_up" else cols, rows)]
        usable = self.check(source, target, shapes)
        self.claim(source, target, (expert, part), usable=usable)

    def check(self, source: Source, target: Target, shapes: list[tuple[int, ...]]) -> bool:
        """Whether `source` fits `target` (shape, dtype); records what does not."""
        usable = True
        if source.shape not in shapes:
            self.problems.shape.append(_shape_problem(source, shapes))
            usable = False
        dtype_problem = _dtype_problem(source, target)
        if dtype_problem:
            self.problems.dtype.append(dtype_problem)
            usable = False
        return usable

    def claim(self, source: Source, target: Target, unit: object, *, usable: bool = True) -> None:
        """Assign `source` to (a slice of) `target`; an unusable one (wrong shape, already
        reported) only marks the slice as provided, so that it is not also reported missing."""
        claimed = self.claimed[target]
        units = target.units() if unit is None else [unit]
        if not usable:
            for u in units:
                claimed.setdefault(u, source.name)
            return
        taken = [u for u in units if u in claimed]
        if taken:
            first = claimed[taken[0]]
            if unit is None and len(target.names) > 1 and target in self.whole:
                self.copies.append(Copy(source, target, verify=first))  # tied: must agree
                return
            self.problems.duplicate.append(
                f"{source.name} and {first} both provide {_describe(target, taken[0])}"
            )
            for u in units:  # no copy (the call fails), but no spurious "missing" either
                claimed.setdefault(u, source.name)
            return
        for u in units:
            claimed[u] = source.name
        if unit is None:
            self.whole[target] = source
        self.copies.append(Copy(source, target, unit))

    def fill_tied(self) -> None:
        """config.json ties the embeddings: lm_head may come from the embeddings (and vice
        versa)."""
        embed = self.targets.by_name.get("model.embed_tokens.weight")
        head = self.targets.by_name.get("lm_head.weight")
        if embed is None or head is None or embed is head:
            return
        for have, need in ((embed, head), (head, embed)):
            if have in self.whole and not self.claimed[need]:
                source = self.whole[have]
                expected = need.full_shape()
                if source.shape != expected:
                    self.problems.shape.append(
                        _shape_problem(source, [expected]) + f" (tied to {need.name})"
                    )
                self.claim(source, need, None, usable=source.shape == expected)

    def find_missing(self) -> None:
        """Report the targets, or fused experts' slices, that no tensor provides."""
        for target in self.targets.all:
            units = target.units()
            gaps = [u for u in units if u not in self.claimed[target]]
            if len(gaps) == len(units):
                self.problems.missing.append(" = ".join(_checkpoint_name(n) for n in target.names))
            else:
                self.problems.missing.extend(_expert_name(target, u) for u in gaps)


def _unsupported_dtype(key: str, dtype: str, quantized: bool) -> str | None:
    """Why a checkpoint tensor's dtype cannot be loaded at all; None if it may be."""
    if dtype in _FLOAT_DTYPES:
        return None
    if dtype in _FP8_PARAMS:
        if quantized:
            return None
        return (
            f"{key} has float8 dtype {dtype} (the module has no FP8 parameters: load quantized "
            f"checkpoints with pyllama4.loading.load.load_model)"
        )
    if dtype.startswith("F8"):
        supported = ", ".join(f"{k} ({v})" for k, v in _FP8_PARAMS.items())
        return f"{key} has float8 dtype {dtype} (supported: {supported})"
    return f"{key} has unsupported dtype {dtype}"


def _dtype_problem(source: Source, target: Target) -> str | None:
    """Why `source` cannot go into `target` as its dtype stands; None if it can."""
    param_dtype = target.param.dtype
    if source.dtype in _FP8_PARAMS:
        if _FP8_PARAMS[source.dtype] == param_dtype:
            return None
        if is_fp8(param_dtype):
            return f"{source.name} is {source.dtype}, but {target.name} holds {param_dtype}"
        return (
            f"{source.name} is float8 ({source.dtype}), but {target.name} is not quantized "
            f"({param_dtype}): the checkpoint's quantization_config leaves it unquantized, or "
            f"pyllama4 runs it unquantized"
        )
    if is_fp8(param_dtype):
        return f"{source.name} is {source.dtype}, but {target.name} expects fp8 ({param_dtype})"
    return None


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shape_problem(source: Source, expected: list[tuple[int, ...]]) -> str:
    shapes = " or ".join(shape_str(s) for s in expected)
    return f"{source.name}: expected shape {shapes}, got {shape_str(source.shape)}"


def _checkpoint_name(name: str) -> str:
    """A module parameter's name as checkpoints spell it (fused experts' scales differ)."""
    match = FUSED_RE.search(name)
    if match and match[2] == "scale":
        return f"{name[: match.start()]}.feed_forward.experts.{match[1]}_proj_scale"
    return name


def _describe(target: Target, unit: object) -> str:
    return target.name if unit is None else f"{_expert_name(target, unit)} (in {target.name})"


def _expert_name(target: Target, unit: tuple[int, str]) -> str:
    """The per-expert checkpoint name of one slice of a fused expert parameter."""
    expert, part = unit
    prefix = target.name.rsplit(".", 1)[0]
    return f"{prefix}.{expert}.{part}_proj.{'weight_scale' if target.scale else 'weight'}"
