"""The kernel library loader (pyllama4.kernels) on a machine without a GPU, and the C ABI of the
built libraries (loading them needs no GPU: nvcc links the CUDA runtime statically, a hipcc build
needs libamdhip64 installed). The libraries are the ones .ci/run builds into build/hip and
build/cuda, and the one pip installs next to the imported pyllama4 package; a missing one is
skipped, saying which.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pyllama4 import kernels

ROOT = Path(__file__).resolve().parent.parent
BUILT = {
    "package": Path(kernels.__file__).resolve().parent.parent / kernels.LIBRARY_NAME,
    "hip": ROOT / "build" / "hip" / "hip" / kernels.LIBRARY_NAME,
    "cuda": ROOT / "build" / "cuda" / "hip" / kernels.LIBRARY_NAME,
}


@pytest.fixture(autouse=True)
def fresh_loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test decides the outcome anew, and leaves no decision behind for other tests."""
    monkeypatch.delenv("PYLLAMA4_KERNELS", raising=False)
    kernels._load.cache_clear()
    yield
    kernels._load.cache_clear()


def built(kind: str) -> Path:
    path = BUILT[kind]
    if not path.is_file():
        how = {
            "package": "pip install . with a GPU toolchain",
            "hip": "the .ci/run hipcc compile check",
            "cuda": "the .ci/run nvcc compile check",
        }[kind]
        pytest.skip(f"no {path} (built by {how})")
    return path


def open_abi(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:  # e.g. a hipcc build without libamdhip64 on this machine
        pytest.skip(f"{path} does not load here: {error}")
    lib.pyllama4_abi_version.restype = ctypes.c_int32
    lib.pyllama4_last_error.restype = ctypes.c_char_p
    lib.pyllama4_platform.restype = ctypes.c_char_p
    return lib


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_means_no_library() -> None:
    assert kernels.library() is None
    assert kernels.library() is None  # cached: decided once
    assert kernels.reason() == "no GPU"
    assert kernels.describe(torch.device("cpu")) == "not used (no GPU); torch reference ops"
    assert kernels.last_error() == ""


def test_describe_names_the_library_or_why_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The start-up log line: on a GPU the reason the library is not used; a model kept on the
    CPU of a GPU machine does not use it either."""
    missing = tmp_path / kernels.LIBRARY_NAME
    monkeypatch.setenv("PYLLAMA4_KERNELS", str(missing))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.describe(torch.device("cuda")) == (
        f"not used (library not built (no {missing})); torch reference ops"
    )
    assert kernels.describe(torch.device("cpu")) == (
        "not used (the model runs on the cpu); torch reference ops"
    )


def test_missing_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / kernels.LIBRARY_NAME
    monkeypatch.setenv("PYLLAMA4_KERNELS", str(missing))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.library() is None
    why = kernels.reason()
    assert why is not None and "not built" in why and str(missing) in why


def test_unloadable_file_is_a_load_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    junk = tmp_path / kernels.LIBRARY_NAME
    junk.write_bytes(b"not a shared library")
    monkeypatch.setenv("PYLLAMA4_KERNELS", str(junk))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.library() is None
    assert (kernels.reason() or "").startswith("load error:")


def test_check_raises_with_the_message() -> None:
    kernels.check(0)
    with pytest.raises(RuntimeError, match=r"code 3"):
        kernels.check(3)


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_built_library_abi(kind: str) -> None:
    lib = open_abi(built(kind))
    assert lib.pyllama4_abi_version() == kernels.ABI_VERSION
    assert lib.pyllama4_platform() in (b"hip", b"cuda")
    # Bad arguments are refused before any launch (no GPU needed), with a message.
    c = ctypes
    signature = [c.c_void_p] * 5 + [c.c_int32, c.c_void_p, c.c_void_p] + [c.c_int32] * 6
    signature += [c.c_float, c.c_void_p, c.c_int32, c.c_int32, c.c_void_p]
    launch = kernels.declare(lib, "pyllama4_paged_attention", signature)
    assert launch(*([None] * 5), 0, None, None, *([0] * 6), 1.0, None, 0, 0, None) != 0
    assert lib.pyllama4_last_error().startswith(b"paged_attention:")
    # The message is per thread: a new thread has none.
    seen: list[bytes] = []
    thread = threading.Thread(target=lambda: seen.append(lib.pyllama4_last_error()))
    thread.start()
    thread.join()
    assert seen == [b""]


@pytest.mark.parametrize("kind", ["hip", "cuda"])
def test_loader_takes_a_library_for_torchs_runtime(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = built(kind)
    open_abi(path)  # skips when it cannot load here
    monkeypatch.setenv("PYLLAMA4_KERNELS", str(path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch_platform = "hip" if torch.version.hip else "cuda"
    if kind == torch_platform:
        assert kernels.library() is not None and kernels.reason() is None
    else:
        assert kernels.library() is None
        assert kernels.reason() == f"{path} is built for {kind}, torch uses {torch_platform}"
