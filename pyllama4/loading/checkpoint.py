"""A Hugging Face checkpoint directory: its safetensors files, its config.json, its tensor names.

Invariant: every problem with the directory itself (absent, no weights file, an unreadable index,
absent shard files, invalid config.json, a quantization method other than the module's) is a
`CheckpointError` naming the file; nothing here reads tensor data.

`model.safetensors` wins over `model.safetensors.index.json` when both exist (like transformers).
`text_name` and `vision_name` map checkpoint tensor names to the names of the text model
(`Llama4ForCausalLM`) and of the vision tower and projector (`VisionTower`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

__all__ = [
    "CheckpointError",
    "UnsupportedCheckpointError",
    "checkpoint_files",
    "read_quantization_config",
    "text_name",
    "vision_name",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# At most this many names are listed per kind of problem.
_MAX_LISTED = 10

_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


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
    return resolve(Path(checkpoint_dir))[0]


def read_quantization_config(checkpoint_dir: str | Path) -> dict | None:
    """config.json's `quantization_config` (top level, else in text_config); None if absent."""
    directory = Path(checkpoint_dir)
    return _quantization_config(directory, read_config(directory))


def resolve(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
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
            f"{index} lists shard file(s) that are absent from {directory}: {listing(absent)}"
        )
    return [directory / s for s in shards], {k: directory / v for k, v in weight_map.items()}


def open_file(path: Path):
    """A safetensors file, memory-mapped on the CPU, as a context manager."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: e.g. a Git LFS pointer instead of data
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


def read_config(directory: Path) -> dict:
    """The directory's config.json as a dict; {} if there is none."""
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


def check_quant_method(directory: Path, config: dict, quant_method: str | None) -> None:
    """Refuse a checkpoint whose quantization method is not `quant_method` (None: unquantized)."""
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


def ties_embeddings(config: dict) -> bool:
    """Whether config.json ties lm_head to the embeddings (text_config's word first)."""
    text = _text_config(config)
    if "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", False))


def listing(items: list[str]) -> str:
    """The first few of `items`, comma-separated, and how many more there are."""
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")
