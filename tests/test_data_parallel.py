"""`pyllama4-serve --dp N`: N replicas behind sglang-router on one port, supervised: a replica
that dies stops the server with a non-zero status and a line naming it; SIGTERM stops it with 0."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from pyllama4.server import checks
from pyllama4.server import flags as cli_flags

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct-llama4"  # the demo model's served name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DataParallelServer:
    """`pyllama4-serve --dp 2` on the demo model, as README shows it (plus a free port)."""

    def __init__(self, log: Path, *flags: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "pyllama4.launch_server", "--dp", "2"]
        cmd += ["--port", str(self.port), "--context-length", "1024", *flags]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 600  # loading two replicas on a loaded machine
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.proc.kill()
        raise AssertionError(f"--dp 2 did not come up:\n{log.read_text()}")

    def replicas(self) -> list[psutil.Process]:
        children = psutil.Process(self.proc.pid).children()
        return [p for p in children if "pyllama4.launch_server" in " ".join(p.cmdline())]


def chat(base: str, key: str = "unused") -> str:
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    return r.choices[0].finish_reason


def test_two_replicas_answer_on_one_port_and_sigterm_exits_0(tmp_path):
    server = DataParallelServer(tmp_path / "dp.log", "--api-key", "k")
    try:
        assert len(server.replicas()) == 2
        assert all(chat(server.base, "k") == "length" for _ in range(4))
        with pytest.raises(openai.AuthenticationError):  # the router checks the key
            chat(server.base, "wrong")
        assert httpx.get(server.base + "/health", timeout=10).status_code == 200  # no key
    finally:
        server.proc.send_signal(signal.SIGTERM)
        status = server.proc.wait(timeout=120)
    log = server.log.read_text()
    assert status == 0, log
    assert "[dp0]" in log and "[dp1]" in log  # each replica's lines, prefixed
    assert "2 replicas behind sglang-router (cache_aware)" in log


def test_a_replica_that_dies_stops_the_server_with_a_nonzero_status(tmp_path):
    server = DataParallelServer(tmp_path / "dp.log")
    try:
        replicas = server.replicas()
        replicas[1].kill()
        status = server.proc.wait(timeout=120)  # wide: the others drain first
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    log = server.log.read_text()
    assert status != 0, log
    assert "exited (status -9): stopping the server" in log, log
    assert "replica 1 exited" in log
    gone, alive = psutil.wait_procs(replicas, timeout=30)
    assert not alive  # the other replica was stopped too, not left behind


def test_without_the_router_extra_dp_is_refused_in_one_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sglang_router" else find_spec(name, *a),
    )
    with pytest.raises(SystemExit) as stop:
        checks.check_supported(cli_flags.parse_args(["--dp", "2"]))
    message = str(stop.value.code)
    assert message.startswith("pyllama4-serve: --dp-size 2: replicas run behind sglang-router")
    assert 'pip install "pyllama4[router]"' in message and "\n" not in message


def test_replicas_get_disjoint_gpus_sglangs_way():
    from pyllama4.server.data_parallel import replica_devices

    args = cli_flags.parse_args(
        ["--tp", "2", "--dp", "2", "--base-gpu-id", "1", "--gpu-id-step", "2"]
    )
    assert [replica_devices(args, i) for i in range(2)] == [[1, 3], [5, 7]]
