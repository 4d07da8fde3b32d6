"""How long /health takes to answer while the server works on heavy requests.

Starts the demo model's server (`python -m pyllama4.launch_server`, as users do), then for each
heavy request (a 50 MB chat message, a chat request with n=4 and a 1 MB stop string, a 10 MB and
a 600 KB /tokenize) sends it from a second thread and meanwhile calls /health every 20 ms; prints
the heavy request's status and duration and /health's latency (median, p99, max). With the event
loop free, /health stays in milliseconds; a request that blocks the loop shows up as a max of
seconds (and as /health timeouts, counted as failures).

Run: python bench/event_loop.py [--python PYTHON] [--cwd DIR] [--chat-mb 50] [--max-seconds 180]
                               [--context-length 8192]
(--python and --cwd pick another installation, e.g. another checkout's venv, for a before/after.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from pyllama4.demo import demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]

JSON = {"content-type": "application/json"}


def start_server(
    python: str, cwd: Path, port: int, context_length: int, log: Path
) -> subprocess.Popen:
    cmd = [python, "-m", "pyllama4.launch_server", "--model-path", str(demo_checkpoint())]
    cmd += ["--served-model-name", "demo", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu", "--dtype", "float32", "--context-length", str(context_length)]
    cmd += ["--max-total-tokens", str(4 * context_length)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited at start:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not come up")


def health_during(
    base: str, path: str, body: dict[str, Any], max_seconds: float
) -> tuple[list[float], int, str, float]:
    """/health latencies (s) while `body` is posted to `path`; (latencies, failures, the heavy
    request's status or error, its duration)."""
    result: dict[str, Any] = {}
    # Encoded before the /health calls start: encoding 50 MB holds this process's GIL, which
    # would stall the /health thread here, not the server.
    payload = json.dumps(body).encode()

    def heavy() -> None:
        start = time.perf_counter()
        try:
            r = httpx.post(base + path, content=payload, headers=JSON, timeout=max_seconds)
            result["status"] = str(r.status_code)
        except httpx.HTTPError as e:
            result["status"] = type(e).__name__
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=heavy)
    thread.start()
    latencies: list[float] = []
    failures = 0
    with httpx.Client(timeout=10) as client:
        while thread.is_alive():
            start = time.perf_counter()
            try:
                client.get(base + "/health")
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError:
                failures += 1
            time.sleep(0.02)
    thread.join()
    return latencies, failures, result["status"], result["seconds"]


def report(name: str, latencies: list[float], failures: int, status: str, seconds: float) -> None:
    ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(
        f"{name:34s} -> {status:>3s} in {seconds:7.2f} s | /health n={len(latencies):4d} "
        f"failed={failures:3d} median {statistics.median(ms):7.1f} ms  p99 {p99:8.1f} ms  "
        f"max {ms[-1]:8.1f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the server's interpreter")
    parser.add_argument("--cwd", type=Path, default=ROOT, help="the server's working directory")
    parser.add_argument("--chat-mb", type=int, default=50, help="the chat message's megabytes")
    parser.add_argument("--max-seconds", type=float, default=180, help="a heavy request's limit")
    parser.add_argument("--port", type=int, default=30123, help="the server's port")
    parser.add_argument("--context-length", type=int, default=8192, help="the server's context")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.mkdtemp()) / "server.log"
    proc = start_server(args.python, args.cwd, args.port, args.context_length, log)
    word = "hello world "

    def chat(content: str, **fields: Any) -> dict[str, Any]:
        messages = [{"role": "user", "content": content}]
        return {"model": "demo", "max_tokens": 1, **fields, "messages": messages}

    cases = [
        ("idle (a 1-token chat)", "/v1/chat/completions", chat("hi")),
        (
            f"chat, {args.chat_mb} MB message",
            "/v1/chat/completions",
            chat(word * ((args.chat_mb << 20) // len(word))),
        ),
        (
            "chat, n=4, a 1 MB stop string",
            "/v1/chat/completions",
            chat("hi", n=4, stop=["x" * (1 << 20)]),
        ),
        ("/tokenize, 10 MB", "/tokenize", {"prompt": word * ((10 << 20) // len(word))}),
        # Under the size bound at 8192 tokens (81 characters a token): tokenized, then refused.
        ("/tokenize, 600 KB", "/tokenize", {"prompt": word * (600_000 // len(word))}),
    ]
    try:
        for name, path, body in cases:
            report(name, *health_during(base, path, body, args.max_seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
