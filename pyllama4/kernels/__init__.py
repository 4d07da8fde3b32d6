"""The GPU kernel library (libpyllama4_kernels.so, built from hip/), loaded once with ctypes.

Invariant: library() returns the loaded library only when torch sees a GPU, the file loads, it
was built for torch's GPU runtime (hip or cuda) and its pyllama4_abi_version() is ABI_VERSION;
otherwise None, with reason() saying why (the callers then use the torch reference ops). The
outcome is decided on the first call and cached; describe() is the line the engine logs at start.

The file is `PYLLAMA4_KERNELS` (a path) when that is set, else libpyllama4_kernels.so in the
pyllama4 package directory, where the wheel installs it when a GPU toolchain was found.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ABI_VERSION = 3  # hip/abi.hip's kAbiVersion: bump both on any change of the C ABI
LIBRARY_NAME = "libpyllama4_kernels.so"


def library_path() -> Path:
    """Where the library is looked for: $PYLLAMA4_KERNELS, else next to the pyllama4 package."""
    override = os.environ.get("PYLLAMA4_KERNELS")
    return Path(override) if override else Path(__file__).resolve().parent.parent / LIBRARY_NAME


def _torch_platform() -> str:
    return "hip" if getattr(torch.version, "hip", None) else "cuda"


def _open(path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """The library at path with its ABI functions declared, or None and the reason."""
    if not torch.cuda.is_available():
        return None, "no GPU"
    if not path.is_file():
        return None, f"library not built (no {path})"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"load error: {error}"
    declare(lib, "pyllama4_abi_version", [], ctypes.c_int32)
    declare(lib, "pyllama4_last_error", [], ctypes.c_char_p)
    version = lib.pyllama4_abi_version()
    if version != ABI_VERSION:
        return None, f"ABI mismatch: {path} has version {version}, pyllama4 needs {ABI_VERSION}"
    if hasattr(lib, "pyllama4_platform"):  # an AMD build loads on NVIDIA too, but cannot launch
        built_for = declare(lib, "pyllama4_platform", [], ctypes.c_char_p)().decode()
        if built_for != _torch_platform():
            return None, f"{path} is built for {built_for}, torch uses {_torch_platform()}"
    return lib, None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    return _open(library_path())


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (see reason())."""
    return _load()[0]


def reason() -> str | None:
    """Why library() is None ("no GPU", "library not built (...)", ...); None when loaded."""
    return _load()[1]


def describe(device: torch.device) -> str:
    """The kernel path of a model on device, for the start-up log: the library's file, or
    "not used (why); torch reference ops"."""
    if device.type == "cuda":
        lib, why = _load()
        if lib is not None:
            return str(library_path())
    elif torch.cuda.is_available():
        why = f"the model runs on the {device.type}"
    else:
        why = "no GPU"
    return f"not used ({why}); torch reference ops"


def declare(
    lib: ctypes.CDLL, name: str, argtypes: Sequence[Any], restype: Any = ctypes.c_int
) -> Any:
    """lib's function `name` with its C signature set (launchers: restype int, the default)."""
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def last_error() -> str:
    """The message of the last failed kernel call on this thread ("" if none or no library)."""
    lib = library()
    return "" if lib is None else (lib.pyllama4_last_error() or b"").decode(errors="replace")


def check(code: int) -> None:
    """Raise RuntimeError with the library's message when a launcher returned nonzero."""
    if code != 0:
        raise RuntimeError(f"pyllama4 GPU kernel failed (code {code}): {last_error()}")


_workspaces: dict[tuple[str, torch.device], torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown workspaces: captured graphs may still point at them


def workspace(owner: str, device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A scratch buffer of at least numel elements for `owner`'s launches on device, grown as
    needed and shared by its calls (one stream runs them in order). An outgrown buffer is kept
    alive, never freed: a captured graph (pyllama4.graphs) replays with its address."""
    key = (owner, device)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        if buffer is not None:
            _retired.append(buffer)
        buffer = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer
