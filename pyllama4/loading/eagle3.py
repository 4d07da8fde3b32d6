"""Reading and writing EAGLE3 draft checkpoints (config.json + safetensors, maybe sharded), in
SGLang's published layout (`pyllama4.model.eagle3`).

Invariant: `load_eagle3` checks the whole checkpoint (config against the target model, every
tensor's name and shape from the headers) before reading a tensor, and returns a draft whose
state holds exactly the checkpoint's tensors; `save_eagle3` writes what `load_eagle3` reads.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pyllama4.loading.checkpoint import checkpoint_files
from pyllama4.model.eagle3 import Eagle3Config, Eagle3Draft


def load_eagle3(
    path: str | Path,
    target_hidden_size: int,
    target_vocab_size: int,
    target_num_layers: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> Eagle3Draft:
    """Reads and checks a draft checkpoint (config.json + safetensors, maybe sharded); a
    ValueError names the draft's directory."""
    directory = Path(path)
    try:
        config = Eagle3Config.from_dict(
            json.loads((directory / "config.json").read_text()), target_num_layers
        )
    except ValueError as e:
        raise ValueError(f"the EAGLE3 draft {directory}: {e}") from None
    for key, ours, theirs in (
        ("target_hidden_size", config.target_hidden_size, target_hidden_size),
        ("vocab_size", config.vocab_size, target_vocab_size),
    ):
        if ours != theirs:
            raise ValueError(
                f"the EAGLE3 draft {directory}: its config's {key} {ours} != the target's {theirs}"
            )
    with torch.device("meta"):
        draft = Eagle3Draft(config)
    with ExitStack() as stack:
        files = checkpoint_files(directory)
        handles = [stack.enter_context(safe_open(f, framework="pt", device="cpu")) for f in files]
        state = _read_state(directory, handles, draft.state_dict(), dtype, device)
    draft.load_state_dict(state, assign=True)
    targets = draft.to_target(torch.arange(config.draft_vocab_size, device=device))
    if targets.min() < 0 or targets.max() >= config.vocab_size:
        raise ValueError(
            f"d2t maps draft ids outside the target vocabulary [0, {config.vocab_size})"
        )
    return draft


def _read_state(
    directory: Path,
    handles: list,
    expected: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the draft's names, checked against `expected` (meta
    tensors) from the headers before any is read; a leading `model.` is dropped, embed_tokens
    skipped."""
    found = {}
    for handle in handles:
        for key in handle.keys():
            name = key.removeprefix("model.")
            if name in found:
                raise ValueError(f"tensor {name} appears twice in {directory}")
            if name != "embed_tokens.weight":
                found[name] = (handle, key)
    problems = [f"missing tensor {n}" for n in expected if n not in found]
    problems += [f"unexpected tensor {n}" for n in found if n not in expected]
    for name in expected.keys() & found.keys():
        handle, key = found[name]
        shape = tuple(handle.get_slice(key).get_shape())
        if shape != tuple(expected[name].shape):
            problems.append(
                f"{name}: expected shape {list(expected[name].shape)}, found {list(shape)}"
            )
    if problems:
        raise ValueError(f"{directory}: " + "; ".join(sorted(problems)))
    state = {}
    for name, meta in expected.items():
        handle, key = found[name]
        want = dtype if meta.is_floating_point() else meta.dtype
        state[name] = handle.get_tensor(key).to(device=device, dtype=want)
    return state


def save_eagle3(draft: Eagle3Draft, path: str | Path) -> None:
    """Writes config.json and model.safetensors with exactly the published tensor names."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(draft.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
