"""CPU seconds of a server's process tree, read from Linux's /proc.

A server's CPU time is user + system time of its process and of every live descendant
(tensor-parallel workers, a separate engine-core process), plus the children's time each of them
has already reaped (cutime + cstime), so a worker that exits between two readings still counts
once. Readings are only comparable as differences. Without /proc (not Linux) every reading is
None; processes this user cannot read are skipped.

bench/serving.py brackets its measured run with these readings. Standalone, it prints one
reading of the tree behind a pid or a local listening port:

    python bench/server_cpu.py --port 30000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

PROC = Path("/proc")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_TCP_LISTEN = "0A"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None if gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants found through the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for p in _pids():
        parent = _ppid(p)
        if parent is not None:
            children.setdefault(parent, []).append(p)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def cpu_available() -> bool:
    """Whether this system has the /proc that the readings come from."""
    return (PROC / "self" / "stat").exists()


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid`'s process tree (see the module docstring); None
    without /proc or when `pid` does not exist."""
    if not cpu_available() or _stat_fields(pid) is None:
        return None
    ticks = 0
    for p in process_tree(pid):
        fields = _stat_fields(p)
        if fields is not None:  # utime, stime, cutime, cstime: fields 14-17 of stat
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == _TCP_LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def listening_pid(port: int) -> int | None:
    """The process that listens on TCP `port` (the topmost one when several share the socket),
    among the processes whose open files this user can read; None if none is found."""
    sockets = {f"socket:[{i}]" for i in _listening_inodes(port)}
    holders = set()
    for p in _pids() if sockets else []:
        try:
            fds = list((PROC / str(p) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in sockets:
                    holders.add(p)
                    break
            except OSError:
                continue
    tops = [p for p in holders if _ppid(p) not in holders]
    return min(tops, default=None)


def local_server_pid(base_url: str) -> int | None:
    """The pid serving `base_url` when its host is this machine's loopback, else None."""
    url = urlsplit(base_url)
    if url.hostname not in LOCAL_HOSTS:
        return None
    return listening_pid(url.port or (443 if url.scheme == "https" else 80))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int, help="the server's process id")
    who.add_argument("--port", type=int, help="a port a local process listens on")
    args = ap.parse_args(argv)
    pid = args.pid if args.pid is not None else listening_pid(args.port)
    if pid is None:
        print(f"no readable process listens on port {args.port}", file=sys.stderr)
        return 1
    seconds = tree_cpu_seconds(pid)
    if seconds is None:
        print(f"CPU time of pid {pid} is unavailable (no such process, or no /proc)")
        return 1
    tree = process_tree(pid)
    print(f"pid {pid}, {len(tree)} processes {tree}: {seconds:.2f} CPU seconds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
