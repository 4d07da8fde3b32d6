"""`--model-path ORG/NAME`: a Hugging Face Hub id resolves through huggingface_hub, against a
local fake Hub (tests/fake_hub.py, HF_ENDPOINT pointing at it): only the files serving needs are
downloaded, a second start with HF_HUB_OFFLINE=1 serves from the cache, and every failure is one
line at start with a non-zero exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from fake_hub import FakeHub, FakeRepo
from tiny_models import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/tiny-llama4"
DECOYS = {  # what a real Llama 4 repository also holds, and serving never reads
    "pytorch_model.bin": b"not for serving",
    "original/consolidated.00.pth": b"not for serving",
    "original/params.json": b"{}",
}
SCOUT = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
MAVERICK = "meta-llama/Llama-4-Maverick-17B-128E-Instruct"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama4"))
    fake = FakeHub(
        {
            REPO: FakeRepo.from_dir(tiny, **DECOYS),
            "org/gated-llama4": FakeRepo({"config.json": b"{}"}, gated=True),
        }
    )
    fake.start()
    yield fake
    fake.stop()


def hub_env(hub: FakeHub, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home), **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pyllama4.launch_server", *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def serve_and_chat(args: list[str], env: dict[str, str], log: Path) -> dict:
    """Starts the server, asks one chat completion, reads /get_model_info, stops it (exit 0)."""
    port = free_port()
    proc = launch([*args, "--host", "127.0.0.1", "--port", str(port)], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a wide margin for a loaded machine
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model=REPO, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        info = httpx.get(base + "/get_model_info").json()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        return info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


TINY_FLAGS = ["--device", "cpu", "--dtype", "float32", "--context-length", "256"]
TINY_FLAGS += ["--max-total-tokens", "4096"]


def test_a_hub_id_downloads_what_serving_needs_then_serves_from_the_cache_offline(hub, tmp_path):
    hf_home = tmp_path / "hf"
    args = ["--model-path", REPO, *TINY_FLAGS]
    info = serve_and_chat(args, hub_env(hub, hf_home), tmp_path / "online.log")
    assert info["model_path"] == REPO  # the id as given
    log = (tmp_path / "online.log").read_text()
    assert f"{REPO} (Hugging Face Hub, commit {FakeRepo.commit})" in log
    fetched = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    names = {path.split("/resolve/", 1)[1].split("/", 1)[1] for path in fetched}
    assert "config.json" in names and "model.safetensors" in names
    assert not names & set(DECOYS)  # never .bin, .pth or original/

    asked = len(hub.requests)
    offline = hub_env(hub, hf_home, HF_HUB_OFFLINE="1")
    info = serve_and_chat(args, offline, tmp_path / "offline.log")
    assert info["model_path"] == REPO
    assert len(hub.requests) == asked  # the second start never touched the network


def run_to_exit(args: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    proc = launch(args, env, log)
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, log.read_text()


@pytest.mark.parametrize(
    ("flags", "missing_status", "words"),
    [
        (["--model-path", "org/gated-llama4"], 401, "gated on the Hugging Face Hub"),
        (["--model-path", "org/no-such-model"], 401, "no such model on the Hugging Face Hub at"),
        (["--model-path", "org/no-such-model"], 404, "no such model on the Hugging Face Hub at"),
        (["--model-path", REPO, "--revision", "v9"], 401, "the Hub has no revision 'v9'"),
    ],
    ids=["gated", "unknown-id-401", "unknown-id-404", "unknown-revision"],
)
def test_each_hub_failure_is_one_line_and_a_nonzero_exit(
    hub, tmp_path, flags, missing_status, words, monkeypatch
):
    monkeypatch.setattr(hub, "missing_status", missing_status)
    code, out = run_to_exit([*flags, *TINY_FLAGS], hub_env(hub, tmp_path / "hf"), tmp_path / "log")
    assert code != 0
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"pyllama4-serve: --model-path {flags[1]}: ") and words in last


@pytest.mark.parametrize("model", [SCOUT, MAVERICK])
def test_the_seed_command_lines_get_as_far_as_resolving_the_id(model, tmp_path):
    """The seed's command line as typed (its plain form: --tp 8 and the tool-call parser; the
    FP8 and EAGLE3 forms stop earlier, at the flag checks, tested in test_cli.py), offline with
    an empty cache: the error names the id and the cache."""
    hf_home = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    args = ["--model-path", model, "--tp", "8", "--tool-call-parser", "pythonic"]
    args += ["--host", "127.0.0.1", "--port", str(free_port())]
    code, out = run_to_exit(args, env, tmp_path / "log")
    assert code != 0 and "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"pyllama4-serve: --model-path {model}: ")
    assert f"not in the Hugging Face cache {hf_home / 'hub'}" in last
    assert "HF_HUB_OFFLINE" in last
