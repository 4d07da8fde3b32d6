"""Load the text (or vision) weights of a Hugging Face Llama 4 checkpoint into a torch module.

The target module must name its parameters like transformers' `Llama4ForCausalLM`:
`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, dense layers'
`model.layers.{i}.feed_forward.{gate,up,down}_proj.weight`, MoE layers'
`model.layers.{i}.feed_forward.router.weight`, `...feed_forward.experts.gate_up_proj` [E, H, 2I]
and `...feed_forward.experts.down_proj` [E, I, H] (input-major, no `.weight` suffix),
`...feed_forward.shared_expert.{gate,up,down}_proj.weight`, `model.norm.weight`, `lm_head.weight`.
Buffers (RoPE frequencies) are not loaded: they are computed, and checkpoints do not store them.

Invariant: every parameter of the module is written exactly once from the checkpoint (from its
shard of the tensor, for a sharded parameter), or the call fails with a `CheckpointError` naming
what is wrong (missing, unexpected, wrongly shaped or repeated tensors, absent shard files,
unsupported dtypes). The whole checkpoint is checked from its headers before the first byte is
copied, so a bad checkpoint leaves the module untouched.

Accepted checkpoints:
- `model.safetensors`, or the shards listed in `model.safetensors.index.json` (like transformers,
  a single `model.safetensors` wins when both exist).
- Text-only names (`model.*`, `lm_head.weight`) and multimodal ones: `language_model.model.*` plus
  `language_model.lm_head.weight` (what transformers 4.x and 5.24 both write for
  `Llama4ForConditionalGeneration`), and the `model.language_model.*` plus `lm_head.weight` style
  that other transformers 5.x multimodal models use. The vision tower and the projector
  (`vision_model.*`, `multi_modal_projector.*`, also under `model.`) are skipped; any other tensor
  the module has no place for is an error.
- Routed experts either fused (`experts.gate_up_proj` [E, H, 2I], `experts.down_proj` [E, I, H])
  or per expert in nn.Linear layout (`experts.{e}.gate_proj.weight` [I, H],
  `experts.{e}.up_proj.weight` [I, H], `experts.{e}.down_proj.weight` [H, I]); the latter are
  transposed into the fused parameters, gate in the first half of the last dim of `gate_up_proj`,
  up in the second half.
- A checkpoint without `lm_head.weight` whose config.json ties the word embeddings: lm_head gets a
  copy of the embeddings. (A module that ties the two itself needs only one of them.)
- FP8 checkpoints (config.json `quantization_config`, ../shared/LLAMA4.md §4.1), into a module built
  for them (`pyllama4.loading.fp8_checkpoint`; the caller names the `quant_method`): float8_e4m3fn
  (`F8_E4M3`) tensors go byte for byte into float8_e4m3fn parameters and nowhere else, and every
  float8 parameter takes only those. Scales are float tensors cast to the fp32 parameter: a Linear's
  `weight_scale` [out] from [out] or [out, 1]; fused experts' `gate_up_scale` [E, 2I] and
  `down_scale` [E, H] from `experts.gate_up_proj_scale` [E, 1, 2I] and
  `experts.down_proj_scale` [E, H, 1] (fbgemm_fp8), or from per-expert
  `experts.{e}.{gate,up,down}_proj.weight_scale` [out] or [out, 1], gate and up concatenated like
  the weights. A float8 tensor for an unquantized parameter, or a float tensor for a float8 one, is
  an error naming it.

Tensor parallelism: a parameter may hold only a `Shard` of its checkpoint tensor (a tensor-parallel
part, unrelated to the checkpoint's shard files; the `shards` argument gives them by parameter name,
pyllama4.model.llama4 says which): the full tensor's indices in a few [start, stop) ranges along one
dim of the module's layout, concatenated in order (dim 0 for column-parallel weights [out, in] and
vocabulary rows, dim 1 for row-parallel ones, the same range of both halves of the last dim of a
fused `gate_up_proj` [E, H, 2I], dim 1 of `down_proj` [E, I, H]). Per-expert checkpoint tensors
shard the same way (gate/up rows, down columns of their [out, in]). Shapes are still checked against
the FULL tensor, and only the shard is read (safetensors `get_slice`), so a rank never holds a whole
sharded tensor. FP8 parameters and scales are never sharded (tensor parallelism with FP8 is not
supported yet).

`rename` maps checkpoint names to the module's (None: not this module's tensor, skipped); the
default, `text_name`, does the above. `vision_name` instead selects the vision tower and the
projector, for `pyllama4.model.vision.VisionTower` (`vision_model.*`, `multi_modal_projector.*`),
and skips the text tensors.

Not supported: a quantization_config or float8 tensors when no `quant_method` is given (the module
has no FP8 parameters), float8 formats other than e4m3fn, integer tensors.

Tensors are read one at a time from memory-mapped files (large ones in row blocks), so the extra
memory is about one tensor (one shard of it); each is cast to the parameter's dtype and copied in
place.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from pyllama4.distributed.parallel import Shard

__all__ = [
    "CheckpointError",
    "UnsupportedCheckpointError",
    "checkpoint_files",
    "load_weights",
    "read_quantization_config",
    "text_name",
    "vision_name",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors bigger than this are copied in blocks of rows, to bound the extra memory.
_CHUNK_BYTES = 256 << 20
# At most this many names are listed per kind of problem.
_MAX_LISTED = 10
# Within a shard, progress is printed at most this often (seconds).
_PROGRESS_INTERVAL = 5.0

_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
# safetensors dtype -> bytes per element: the float dtypes cast to any float parameter, and the
# float8 ones (`_FP8_PARAMS`) that only go unchanged into a parameter of the same dtype.
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_FP8_PARAMS = {"F8_E4M3": torch.float8_e4m3fn}
_EXPERT_RE = re.compile(
    r"^(?P<experts>.+\.feed_forward\.experts)\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj"
    r"\.(?P<what>weight|weight_scale)$"
)
# Fused routed experts' parameters: weights (`..._proj`, 3-D) and their scales (`..._scale`, 2-D).
_FUSED_RE = re.compile(r"\.feed_forward\.experts\.(gate_up|down)_(proj|scale)$")
# fbgemm_fp8's names of the fused experts' scales -> the module's.
_FUSED_SCALE_NAME = re.compile(r"(\.feed_forward\.experts\.(?:gate_up|down))_proj_scale$")


class CheckpointError(ValueError):
    """The checkpoint does not fit the module; the message names the offending tensors or files."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint is of a kind this loader does not handle (a quantization scheme or float8
    format it cannot run, or a quantized checkpoint for a module without FP8 parameters)."""


def text_name(name: str) -> str | None:
    """The `Llama4ForCausalLM` name of a checkpoint tensor; None for vision/projector tensors."""
    if vision_name(name) is not None:
        return None
    if name.startswith("language_model."):
        rest = name[len("language_model.") :]
        return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def vision_name(name: str) -> str | None:
    """The `VisionTower` name of a checkpoint tensor; None for text tensors."""
    if name.startswith("model.") and name[len("model.") :].startswith(_VISION_PREFIXES):
        return name[len("model.") :]
    return name if name.startswith(_VISION_PREFIXES) else None


def checkpoint_files(checkpoint_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or every shard named in the index."""
    return _resolve(Path(checkpoint_dir))[0]


def load_weights(
    model: torch.nn.Module,
    checkpoint_dir: str | Path,
    *,
    progress: bool = True,
    rename: Callable[[str], str | None] = text_name,
    quant_method: str | None = None,
    shards: Mapping[str, Shard] | None = None,
) -> None:
    """Copy a Llama 4 checkpoint's weights into `model`'s parameters, in place.

    `rename` gives each checkpoint tensor's name in `model`, or None to skip it: `text_name`
    (the default) loads the text model, `vision_name` the vision tower and projector.

    `quant_method`: None for an unquantized checkpoint, else the config.json
    `quantization_config.quant_method` that `model` was built for (its FP8 modules placed as the
    checkpoint's scheme says, `pyllama4.loading.fp8_checkpoint`, which also vets the scheme); a
    checkpoint whose config states another method, or none, is refused.

    `shards`: parameter name -> the `Shard` of the checkpoint tensor it holds (tensor
    parallelism); the others hold the whole tensor. A shard that does not fit its parameter is a
    ValueError.

    Every parameter is written exactly once, cast to its own dtype (float8 ones only from the
    same float8 dtype, unchanged) and kept on its device. Raises `CheckpointError` (a ValueError)
    if the checkpoint and the module do not match; the checks run before anything is copied.
    """
    directory = Path(checkpoint_dir)
    files, weight_map = _resolve(directory)
    config = _read_config(directory)
    _check_quant_method(directory, config, quant_method)
    targets = _Targets(model, shards or {})
    plan = _plan(
        files,
        weight_map,
        targets,
        rename=rename,
        tie_embeddings=_ties_embeddings(config),
        quantized=quant_method is not None,
    )
    _execute(plan, files, progress)


def read_quantization_config(checkpoint_dir: str | Path) -> dict | None:
    """config.json's `quantization_config` (top level, else in text_config); None if absent."""
    directory = Path(checkpoint_dir)
    return _quantization_config(directory, _read_config(directory))


# ----------------------------------------------------------------------------------------------
# Files and config


def _resolve(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The files to read and, for a sharded checkpoint, the index's tensor -> file map."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single], None
    index = directory / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: cannot read its weight_map ({exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is empty or not an object")
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (directory / s).is_file()]
    if absent:
        raise CheckpointError(
            f"{index} lists shard file(s) that are absent from {directory}: {_listing(absent)}"
        )
    return [directory / s for s in shards], {k: directory / v for k, v in weight_map.items()}


def _open(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: e.g. a Git LFS pointer instead of data
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    return config if isinstance(config, dict) else {}


def _text_config(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) else {}


def _quantization_config(directory: Path, config: dict) -> dict | None:
    quant = config.get("quantization_config") or _text_config(config).get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise CheckpointError(f"{directory}/config.json: quantization_config is not an object")
    return quant


def _check_quant_method(directory: Path, config: dict, quant_method: str | None) -> None:
    quant = _quantization_config(directory, config)
    method = None if quant is None else quant.get("quant_method", "unknown")
    if method == quant_method:
        return
    if quant_method is None:
        raise UnsupportedCheckpointError(
            f"{directory}: quantized checkpoints are not supported yet into a module without FP8 "
            f"parameters (config.json quantization_config.quant_method = {method!r}); "
            f"pyllama4.loading.load.load_model builds the FP8 modules, or use a bf16 checkpoint"
        )
    raise CheckpointError(
        f"{directory}: the module was built for quant_method {quant_method!r}, but config.json "
        f"says {'no quantization_config' if method is None else repr(method)}"
    )


def _ties_embeddings(config: dict) -> bool:
    text = _text_config(config)
    if "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------
# The module's parameters


@dataclass(eq=False)
class _Target:
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


class _Targets:
    def __init__(self, model: torch.nn.Module, shards: Mapping[str, Shard]) -> None:
        by_id: dict[int, _Target] = {}
        self.by_name: dict[str, _Target] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            target = by_id.get(id(param))
            if target is None:
                fused = _FUSED_RE.search(name)
                is_scale = fused.group(2) == "scale" if fused else name.endswith(".weight_scale")
                if fused and param.dim() != (2 if is_scale else 3):
                    fused = None
                fused_kind = fused.group(1) if fused else None
                if fused_kind == "gate_up" and param.shape[-1] % 2:
                    raise CheckpointError(
                        f"module parameter {name} has an odd last dim: {_shape(param.shape)}"
                    )
                target = by_id[id(param)] = _Target([name], param, fused_kind, is_scale)
            else:
                target.names.append(name)
            self.by_name[name] = target
        self.all = list(by_id.values())
        on_meta = [t.name for t in self.all if t.param.device.type == "meta"]
        if on_meta:
            raise CheckpointError(
                f"module parameters are on the meta device (materialise the module first, e.g. "
                f"with to_empty): {_listing(on_meta)}"
            )
        for name, shard in shards.items():
            target = self.by_name.get(name)
            problem = "the module has no such parameter" if target is None else None
            problem = problem or _shard_problem(target, shard)
            if problem:
                raise ValueError(f"shard {shard} of {name}: {problem}")
            target.shard = shard


def _shard_problem(target: _Target, shard: Shard) -> str | None:
    """Why `target` cannot hold `shard`; None if it can."""
    param = target.param
    if target.scale or _is_fp8(param.dtype):
        return (
            "FP8 weights and scales are not sharded (tensor parallelism with FP8 is not supported)"
        )
    if target.shard not in (None, shard):
        return f"{' = '.join(target.names)} are one parameter, given shard {target.shard} too"
    if not (1 if target.fused else 0) <= shard.dim < param.dim():
        return f"dim {shard.dim} of a parameter of shape {_shape(param.shape)}"
    if not all(0 <= start < stop <= shard.full for start, stop in shard.ranges):
        return f"ranges outside [0, {shard.full})"
    if shard.size != param.shape[shard.dim]:
        return f"{shard.size} indices for a parameter of shape {_shape(param.shape)}"
    return None


# ----------------------------------------------------------------------------------------------
# Planning: headers only, all checks


@dataclass(frozen=True)
class _Source:
    file: Path
    name: str  # the name in the checkpoint
    shape: tuple[int, ...]
    dtype: str  # the safetensors dtype, one of _FLOAT_DTYPES or _FP8_PARAMS
    nbytes: int


@dataclass
class _Copy:
    source: _Source
    target: _Target
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
            raise UnsupportedCheckpointError(f"not supported yet: {_listing(self.unsupported)}")
        sections = [
            ("tensor(s) given more than once", self.duplicate),
            ("unexpected tensor(s) (the module has no place for them)", self.unexpected),
            ("tensor(s) with the wrong shape", self.shape),
            ("tensor(s) with the wrong dtype", self.dtype),
            ("index entries that do not match the shard contents", self.index),
            ("missing tensor(s)", self.missing),
        ]
        lines = [f"{len(items)} {title}: {_listing(items)}" for title, items in sections if items]
        if lines:
            raise CheckpointError("checkpoint does not match the module:\n  " + "\n  ".join(lines))


def _plan(
    files: list[Path],
    weight_map: dict[str, Path] | None,
    targets: _Targets,
    *,
    rename: Callable[[str], str | None],
    tie_embeddings: bool,
    quantized: bool,
) -> list[_Copy]:
    problems = _Problems()
    copies: list[_Copy] = []
    seen: dict[str, Path] = {}
    claimed: dict[_Target, dict[object, str]] = {t: {} for t in targets.all}
    whole: dict[_Target, _Source] = {}

    def claim(source: _Source, target: _Target, unit: object, *, usable: bool = True) -> None:
        """Assign `source` to (a slice of) `target`; an unusable one (wrong shape, already
        reported) only marks the slice as provided, so that it is not also reported missing."""
        units = target.units() if unit is None else [unit]
        if not usable:
            for u in units:
                claimed[target].setdefault(u, source.name)
            return
        taken = [u for u in units if u in claimed[target]]
        if taken:
            first = claimed[target][taken[0]]
            if unit is None and len(target.names) > 1 and target in whole:
                copies.append(_Copy(source, target, verify=first))  # tied: must agree
                return
            problems.duplicate.append(
                f"{source.name} and {first} both provide {_describe(target, taken[0])}"
            )
            for u in units:  # no copy (the call fails), but no spurious "missing" either
                claimed[target].setdefault(u, source.name)
            return
        for u in units:
            claimed[target][u] = source.name
        if unit is None:
            whole[target] = source
        copies.append(_Copy(source, target, unit))

    for path in files:
        with _open(path) as handle:
            keys = list(handle.keys())
            for key in keys:
                if key in seen:
                    problems.duplicate.append(f"{key} is in both {seen[key].name} and {path.name}")
                    continue
                seen[key] = path
                name = rename(key)
                if name is None:
                    continue
                tensor_slice = handle.get_slice(key)
                shape = tuple(tensor_slice.get_shape())
                dtype = tensor_slice.get_dtype()
                unsupported = _unsupported_dtype(key, dtype, quantized)
                if unsupported:
                    problems.unsupported.append(unsupported)
                    continue
                size = _FLOAT_DTYPES.get(dtype, 1)
                source = _Source(path, key, shape, dtype, _numel(shape) * size)
                _place(source, name, targets, problems, claim)
        if weight_map is not None:
            present = set(keys)
            for key, shard in weight_map.items():
                if shard == path and key not in present:
                    problems.index.append(f"{key} is listed in {path.name} but not stored there")

    if tie_embeddings:
        _fill_tied(targets, claimed, whole, problems, claim)

    for target in targets.all:
        units = target.units()
        gaps = [u for u in units if u not in claimed[target]]
        if len(gaps) == len(units):
            problems.missing.append(" = ".join(_checkpoint_name(n) for n in target.names))
        else:
            problems.missing.extend(_expert_name(target, u) for u in gaps)

    problems.raise_if_any()
    return copies


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


def _dtype_problem(source: _Source, target: _Target) -> str | None:
    """Why `source` cannot go into `target` as its dtype stands; None if it can."""
    param_dtype = target.param.dtype
    if source.dtype in _FP8_PARAMS:
        if _FP8_PARAMS[source.dtype] == param_dtype:
            return None
        if _is_fp8(param_dtype):
            return f"{source.name} is {source.dtype}, but {target.name} holds {param_dtype}"
        return (
            f"{source.name} is float8 ({source.dtype}), but {target.name} is not quantized "
            f"({param_dtype}): the checkpoint's quantization_config leaves it unquantized, or "
            f"pyllama4 runs it unquantized"
        )
    if _is_fp8(param_dtype):
        return f"{source.name} is {source.dtype}, but {target.name} expects fp8 ({param_dtype})"
    return None


def _place(source: _Source, name: str, targets: _Targets, problems: _Problems, claim) -> None:
    target = targets.by_name.get(name) or targets.by_name.get(
        _FUSED_SCALE_NAME.sub(r"\1_scale", name)
    )
    if target is not None:
        usable = _check(source, target, target.shapes(), problems)
        claim(source, target, None, usable=usable)
        return
    match = _EXPERT_RE.match(name)
    if match:
        part, is_scale = match.group("part"), match.group("what") == "weight_scale"
        fused = match.group("experts") + (".down" if part == "down" else ".gate_up")
        fused += "_scale" if is_scale else "_proj"
        target = targets.by_name.get(fused)
        if target is not None and target.fused is not None and target.scale == is_scale:
            num_experts, *rest = target.full_shape()
            expert = int(match.group("e"))
            if expert >= num_experts:
                problems.unexpected.append(
                    f"{source.name} (expert {expert}, but {fused} has {num_experts} experts)"
                )
                return
            if is_scale:  # [out] (or [out, 1]) of a [E, out] parameter; gate_up: half of out
                out = rest[0] // 2 if target.fused == "gate_up" else rest[0]
                shapes = [(out,), (out, 1)]
            else:  # nn.Linear [out, in] of an input-major [E, in, out] parameter
                rows, cols = rest
                shapes = [(cols // 2 if target.fused == "gate_up" else cols, rows)]
            usable = _check(source, target, shapes, problems)
            claim(source, target, (expert, part), usable=usable)
            return
    problems.unexpected.append(source.name)


def _check(
    source: _Source, target: _Target, shapes: list[tuple[int, ...]], problems: _Problems
) -> bool:
    """Whether `source` fits `target` (shape, dtype); records what does not."""
    usable = True
    if source.shape not in shapes:
        problems.shape.append(_shape_problem(source, shapes))
        usable = False
    dtype_problem = _dtype_problem(source, target)
    if dtype_problem:
        problems.dtype.append(dtype_problem)
        usable = False
    return usable


def _fill_tied(targets: _Targets, claimed, whole, problems: _Problems, claim) -> None:
    """config.json ties the embeddings: lm_head may come from the embeddings (and vice versa)."""
    embed = targets.by_name.get("model.embed_tokens.weight")
    head = targets.by_name.get("lm_head.weight")
    if embed is None or head is None or embed is head:
        return
    for have, need in ((embed, head), (head, embed)):
        if have in whole and not claimed[need]:
            source = whole[have]
            expected = need.full_shape()
            if source.shape != expected:
                problems.shape.append(
                    _shape_problem(source, [expected]) + f" (tied to {need.name})"
                )
            claim(source, need, None, usable=source.shape == expected)


# ----------------------------------------------------------------------------------------------
# Copying


def _execute(copies: list[_Copy], files: list[Path], progress: bool) -> None:
    by_file: dict[Path, list[_Copy]] = {}
    for copy in copies:
        by_file.setdefault(copy.source.file, []).append(copy)
    meter = _Progress(len(files), sum(c.nbytes for c in copies), enabled=progress)
    with torch.no_grad():
        for path in files:
            if path in by_file:
                with _open(path) as handle:
                    for copy in by_file[path]:
                        _apply(handle, copy)
                        meter.advance(copy.nbytes)
            meter.shard_done()
    meter.finish()


def _apply(handle, copy: _Copy) -> None:
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


def _blocks(
    handle, source: _Source, target: _Target
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


def _copy_expert(handle, copy: _Copy) -> None:
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


# ----------------------------------------------------------------------------------------------
# Messages


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shape(shape: Iterable[int]) -> str:
    return str(list(shape))


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _shape_problem(source: _Source, expected: list[tuple[int, ...]]) -> str:
    shapes = " or ".join(_shape(s) for s in expected)
    return f"{source.name}: expected shape {shapes}, got {_shape(source.shape)}"


def _checkpoint_name(name: str) -> str:
    """A module parameter's name as checkpoints spell it (fused experts' scales differ)."""
    match = _FUSED_RE.search(name)
    if match and match[2] == "scale":
        return f"{name[: match.start()]}.feed_forward.experts.{match[1]}_proj_scale"
    return name


def _describe(target: _Target, unit: object) -> str:
    return target.name if unit is None else f"{_expert_name(target, unit)} (in {target.name})"


def _expert_name(target: _Target, unit: tuple[int, str]) -> str:
    """The per-expert checkpoint name of one slice of a fused expert parameter."""
    expert, part = unit
    prefix = target.name.rsplit(".", 1)[0]
    return f"{prefix}.{expert}.{part}_proj.{'weight_scale' if target.scale else 'weight'}"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")
