"""Where the demo's files live, and the hidden temp siblings they are written in first.

Invariant: a file or directory appears under its final name only by an atomic rename of a sibling
named `.NAME.tmp-PID-RANDOM` (or is moved aside as `.NAME.old-PID-RANDOM` before deletion); such
siblings older than `STALE_TMP_SECONDS` are leftovers of killed runs and may be deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from pathlib import Path

# A temp directory this old is a leftover of a killed run (a conversion takes well under a minute).
STALE_TMP_SECONDS = 3600


def default_cache_dir() -> Path:
    """`$PYLLAMA4_CACHE`, else `$XDG_CACHE_HOME/pyllama4`, else `~/.cache/pyllama4`."""
    if os.environ.get("PYLLAMA4_CACHE"):
        return Path(os.environ["PYLLAMA4_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pyllama4"
    return Path.home() / ".cache" / "pyllama4"


def say(progress: bool, message: str) -> None:
    """A progress message on stderr, if `progress`."""
    if progress:
        print(f"pyllama4: {message}", file=sys.stderr, flush=True)


def unique_sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name next to `path`; created with the user's umask, unlike mkstemp."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_siblings(path: Path) -> None:
    """Delete temp siblings of `path` that killed runs left behind (live runs' are recent)."""
    now = time.time()
    for kind in ("tmp", "old"):
        for leftover in path.parent.glob(f".{path.name}.{kind}-*"):
            try:
                if now - leftover.lstat().st_mtime <= STALE_TMP_SECONDS:
                    continue
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
            except OSError:
                pass
