"""`pyllama4-serve --dp N`: N data-parallel replicas of the server behind sglang-router, on one
port.

Invariants:
- Replica i is this very command line, less `--api-key`, with `--dp 1 --host 127.0.0.1 --port
  P_i` appended (the last value of a flag wins), so it serves exactly what one server would; the
  router checks the key (sglang-router does not pass it on). On a GPU a replica sees only
  its own devices, `base_gpu_id + (i * tp + rank) * gpu_id_step` for its tp ranks, through
  HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES; on the CPU the cores are shared out.
- The router (sglang-router, `--router-policy`) starts on `--host`/`--port` once every replica
  answers /health, so the port opens when the whole server can serve.
- A replica or the router that exits on its own ends the server: the others are stopped and the
  exit status is 1, after one line naming what exited and how.
- SIGTERM / SIGINT go to the router, then to every replica (each drains its requests); the exit
  status is 0 when they all stopped cleanly.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import httpx

log = logging.getLogger("pyllama4.serve")

ROUTER_EXTRA = 'pip install "pyllama4[router]"'
ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
POLL_S = 0.2
STOP_GRACE_S = 15.0  # beyond --graceful-shutdown-timeout, before a child is killed


def router_installed() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


@dataclass
class Child:
    """A process the server supervises: a replica or the router."""

    name: str
    proc: subprocess.Popen[bytes]


def replica_devices(args: argparse.Namespace, replica: int) -> list[int]:
    """The GPU ids replica `replica`'s tp ranks run on (SGLang's rule)."""
    first = replica * args.tp
    return [args.base_gpu_id + (first + rank) * args.gpu_id_step for rank in range(args.tp)]


def replica_command(argv: Sequence[str], port: int, cpu_threads: int | None) -> list[str]:
    """The replica's command line: argv without --api-key (the router checks the key; a
    replica listens on the loopback only), then the replica's own settings."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--api-key":
            skip = True
        elif not arg.startswith("--api-key="):
            kept.append(arg)
    cmd = [sys.executable, "-m", "pyllama4.launch_server", *kept]
    cmd += ["--dp", "1", "--host", "127.0.0.1", "--port", str(port)]
    if cpu_threads is not None:
        cmd += ["--cpu-threads", str(cpu_threads)]
    return cmd


def router_command(args: argparse.Namespace, workers: list[str], tokenizer: str) -> list[str]:
    """sglang-router in front of the workers; it reads the tokenizer from the local directory
    (else it would look the served name up on the Hub)."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", args.host]
    cmd += ["--tokenizer-path", tokenizer]
    cmd += ["--port", str(args.port), "--policy", args.router_policy]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    # The router waits for its requests in flight while the replicas drain theirs.
    grace = int(args.graceful_shutdown_timeout + STOP_GRACE_S)
    cmd += ["--shutdown-grace-period-secs", str(grace)]
    cmd += ["--log-level", "warn", "--worker-urls", *workers]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_replicas(args: argparse.Namespace, argv: Sequence[str], tokenizer: str) -> int:
    """Runs the replicas and the router until a signal or a failure; the exit status.
    tokenizer: the local directory of the served model's tokenizer."""
    stopping = threading.Event()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per /health poll

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        log.info("%s: stopping the router and %d replicas", name, args.dp_size)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: list[Child] = []
    try:
        ports = [free_port() for _ in range(args.dp_size)]
        threads = _cpu_threads(args, argv)
        for i, port in enumerate(ports):
            env = dict(os.environ)
            if args.device != "cpu":
                ids = ",".join(map(str, replica_devices(args, i)))
                env["HIP_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ids
            cmd = replica_command(argv, port, threads)
            children.append(Child(f"replica {i}", _spawn(cmd, env, f"[dp{i}] ")))
            log.info("replica %d: pid %d, port %d", i, children[-1].proc.pid, port)
        workers = [f"http://127.0.0.1:{port}" for port in ports]
        if not _wait_healthy(workers, children, stopping):
            return _stop(children, args, failed=not stopping.is_set())
        router = _spawn(router_command(args, workers, tokenizer), dict(os.environ), "[router] ")
        children.append(Child("the router", router))
        log.info(
            "%d replicas behind sglang-router (%s) on http://%s:%d",
            args.dp_size,
            args.router_policy,
            args.host,
            args.port,
        )
        while not stopping.wait(POLL_S):
            for child in children:
                status = child.proc.poll()
                if status is not None:
                    log.error("%s exited (status %d): stopping the server", child.name, status)
                    return _stop(children, args, failed=True)
        return _stop(children, args, failed=False)
    except BaseException:
        _stop(children, args, failed=True)
        raise


def _cpu_threads(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """On the CPU, each replica's share of the cores (None: the command line sets it)."""
    if args.device != "cpu" or any(a.split("=")[0] == "--cpu-threads" for a in argv):
        return None
    return max(1, (os.cpu_count() or 1) // args.dp_size)


def _spawn(cmd: list[str], env: dict[str, str], prefix: str) -> subprocess.Popen[bytes]:
    """A child whose output lines go to this process's stderr, each after `prefix`."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    assert proc.stdout is not None
    threading.Thread(target=_relay, args=(proc.stdout, prefix.encode()), daemon=True).start()
    return proc


def _relay(stream: IO[bytes], prefix: bytes) -> None:
    out = sys.stderr.buffer
    for line in stream:
        out.write(prefix + line)
        out.flush()


def _wait_healthy(workers: list[str], children: list[Child], stopping: threading.Event) -> bool:
    """Waits until every replica answers /health; False if one exited or a signal came."""
    pending = list(workers)
    while pending:
        if stopping.is_set():
            return False
        for child in children:
            status = child.proc.poll()
            if status is not None:
                log.error("%s exited (status %d) while starting", child.name, status)
                return False
        for url in list(pending):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    pending.remove(url)
            except httpx.HTTPError:
                pass
        time.sleep(POLL_S)
    return True


def _stop(children: list[Child], args: argparse.Namespace, *, failed: bool) -> int:
    """SIGTERM to each child (the router first), then waits; the exit status."""
    for child in reversed(children):  # the router was started last
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    clean = not failed
    deadline = time.monotonic() + args.graceful_shutdown_timeout + STOP_GRACE_S
    for child in reversed(children):
        try:
            status = child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("%s did not stop in time: killed", child.name)
            child.proc.kill()
            status = child.proc.wait()
        clean = clean and status == 0
    return 0 if clean else 1
