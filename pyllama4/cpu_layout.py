"""Where the CPU's cores go: torch's compute threads on some, the event loop and HTTP on the rest.

Invariant: the plan is decided once at start, from explicit settings first, then OMP_NUM_THREADS,
then the cores this process may use; it is applied on the model thread before its first torch
operation, so that torch's OpenMP team (created by that thread) inherits the thread count and
the core binding. By default one core is kept free of compute threads when there are two or
more: the event loop, HTTP and tokenization never wait for a compute thread to yield, and no
compute thread waits at an OpenMP barrier for a sibling that was descheduled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuLayout:
    """torch's compute threads and the cores they are bound to (None: not bound)."""

    threads: int
    cores: tuple[int, ...] | None
    usable: tuple[int, ...]  # the cores this process may use
    source: str  # where the thread count came from

    def apply(self) -> None:
        """Sets the calling thread's torch thread count and binds it (and the OpenMP threads it
        will start) to `cores`. Call it on the model thread before its first torch operation."""
        torch.set_num_threads(self.threads)
        if self.cores is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cores)  # 0: the calling thread on Linux

    @property
    def free(self) -> tuple[int, ...]:
        """The usable cores the compute threads are not bound to (none when unbound)."""
        if self.cores is None:
            return ()
        return tuple(c for c in self.usable if c not in self.cores)

    def keep_caller_off_compute_cores(self) -> None:
        """Binds the calling thread, and the threads it starts from now on (the event loop's
        workers), to the free cores, so the operating system never places them beside a compute
        thread. For a process that serves (the server's main thread, once the engine is built:
        plan() reads the calling thread's cores); a no-op without free cores."""
        if self.free and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.free)

    def describe(self) -> str:
        where = "unbound" if self.cores is None else f"bound to cores {_ranges(self.cores)}"
        rest = f"; cores {_ranges(self.free)} left to the event loop and HTTP" if self.free else ""
        return (
            f"CPU: {self.threads} torch compute thread(s) ({self.source}), {where}{rest} "
            f"({len(self.usable)} usable cores)"
        )


def plan(
    threads: int | None = None,
    bind: str = "auto",
    reserved: int | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    usable: Sequence[int] | None = None,
) -> CpuLayout:
    """The layout for these settings.

    threads: torch compute threads (None: OMP_NUM_THREADS if set, else the usable cores less
    `reserved`; with a core list, its length). bind: "auto" (the last `threads` usable cores,
    when the cores left over keep at least one free), "none", or a core list like "1-3,6".
    reserved: cores kept free of compute threads (None: 1 when there are two or more usable
    cores, else 0). ValueError for settings that cannot hold (a core list with cores that are
    not usable here)."""
    cores = tuple(sorted(usable if usable is not None else _usable_cores()))
    if reserved is None:
        reserved = 1 if len(cores) >= 2 else 0
    if not 0 <= reserved < max(len(cores), 1):
        raise ValueError(f"cannot reserve {reserved} of {len(cores)} usable cores")
    chosen = None if bind in ("auto", "none") else parse_cores(bind)
    source = "--cpu-threads"
    if threads is None and chosen is not None and "OMP_NUM_THREADS" not in environ:
        threads, source = len(chosen), f"--cpu-bind {bind}"
    if threads is None:
        if environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            threads, source = int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
        else:
            threads, source = max(1, len(cores) - reserved), f"{reserved} core(s) reserved"
    if threads < 1:
        raise ValueError(f"torch compute threads must be at least 1, not {threads}")
    if bind == "none":
        return CpuLayout(threads, None, cores, source)
    if bind == "auto":
        if threads + reserved > len(cores):
            return CpuLayout(threads, None, cores, source)  # oversubscribed: let the OS place
        return CpuLayout(threads, cores[len(cores) - threads :], cores, source)
    assert chosen is not None
    outside = sorted(set(chosen) - set(cores))
    if outside:
        raise ValueError(f"--cpu-bind {bind}: cores {outside} are not usable here ({cores})")
    return CpuLayout(threads, chosen, cores, source)


def parse_cores(text: str) -> tuple[int, ...]:
    """ "1-3,6" -> (1, 2, 3, 6). ValueError for anything else."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"not a core list: {text!r} (expected e.g. 1-3,6)")
        out.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(out))


def _usable_cores() -> tuple[int, ...]:
    if hasattr(os, "sched_getaffinity"):
        return tuple(os.sched_getaffinity(0))
    return tuple(range(os.cpu_count() or 1))


def _ranges(cores: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    parts: list[str] = []
    for c in sorted(cores):
        if parts and int(parts[-1].rpartition("-")[2]) == c - 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{c}"
        else:
            parts.append(str(c))
    return ",".join(parts)
