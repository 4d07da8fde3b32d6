"""bench/serving.py beside SGLang's own client (sglang 0.5.23's `python -m sglang.bench_serving`,
installed without its dependencies by .ci/run) against one demo server, with the same flags and
seed: the same number of completed requests, the same prompts (each request's input token count,
as the server counted it, request by request), and the same lines in the result block.

SGLang's client is run from its module with four stand-ins that cannot change its results: the
`sglang` package and two of its subpackages as bare namespaces (their __init__ files load the
serving runtime: torch, CUDA kernels; the client itself says it does not want them), its
disaggregation utils as the one constant the client reads (used only with --fake-prefill), and,
when the `datasets` package is absent, a `datasets` whose load_dataset fails (used only by the
MMMU dataset).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyllama4.bench_data import SHAREGPT, iter_json_list

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "serving.py"
# What SGLang's bench_serving imports beyond this project's own dependencies.
CLIENT_MODULES = ("sglang", "aiohttp", "msgspec", "orjson", "pybase64", "zmq")

RUN_SGLANG = """
import importlib.util, runpy, sys, types
from pathlib import Path

root = Path(list(importlib.util.find_spec("sglang").submodule_search_locations)[0])
for name in ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.disaggregation"):
    module = types.ModuleType(name)
    module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
    sys.modules[name] = module
utils = types.ModuleType("sglang.srt.disaggregation.utils")
utils.FAKE_BOOTSTRAP_HOST = "2.2.2.2"
sys.modules[utils.__name__] = utils
if importlib.util.find_spec("datasets") is None:
    datasets = types.ModuleType("datasets")
    def load_dataset(*args, **kwargs):
        raise RuntimeError("the datasets package is not installed")
    datasets.load_dataset = load_dataset
    sys.modules["datasets"] = datasets
sys.argv = ["sglang.bench_serving", *sys.argv[1:]]
runpy.run_module("sglang.benchmark.serving", run_name="__main__")
"""

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in CLIENT_MODULES),
    reason="SGLang's client is not installed (.ci/run installs it: sglang==0.5.23 --no-deps)",
)


def block_of(stdout: str) -> list[str]:
    """The labels of the result block: whole separator lines, else the text before the value."""
    lines = stdout.splitlines()
    start = lines.index("============ Serving Benchmark Result ============")
    end = lines.index("=" * 50, start)
    return [ln if ln[0] in "=-" else ln[:40].rstrip() for ln in lines[start : end + 1]]


@pytest.fixture
def sharegpt_json(tmp_path) -> Path:
    """The first 300 conversations of the packaged ShareGPT as a complete JSON file: SGLang's
    client json.loads its file, and the packaged one is truncated."""
    items = []
    text = SHAREGPT.path("--dataset-path").read_text(encoding="utf-8", errors="replace")
    for item in iter_json_list(text):
        items.append(item)
        if len(items) == 300:
            break
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(items))
    return path


def run_client(cmd: list[str], out: Path, flags: list[str], cwd: Path) -> tuple[str, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [*cmd, *flags, "--output-file", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (line,) = out.read_text().splitlines()
    return r.stdout, json.loads(line)


def test_same_requests_and_block_as_sglangs_client(
    launch_server, demo_dir, sharegpt_json, tmp_path
):
    live = launch_server(tmp_path / "server.log")
    try:
        for backend in ("sglang", "sglang-oai"):
            flags = ["--backend", backend, "--base-url", live.base, "--tokenizer", str(demo_dir)]
            flags += ["--dataset-name", "random", "--dataset-path", str(sharegpt_json)]
            flags += ["--random-input-len", "32", "--random-output-len", "8"]
            flags += ["--num-prompts", "6", "--max-concurrency", "3", "--seed", "7"]
            flags += ["--output-details", "--disable-tqdm"]
            theirs_cmd = [sys.executable, "-c", RUN_SGLANG]
            theirs_out, theirs = run_client(
                theirs_cmd, tmp_path / f"{backend}-sglang.jsonl", flags, tmp_path
            )
            ours_out, ours = run_client(
                [sys.executable, str(SCRIPT)], tmp_path / f"{backend}-ours.jsonl", flags, tmp_path
            )
            assert theirs["completed"] == ours["completed"] == 6, backend
            assert ours["output_lens"] == theirs["output_lens"], backend
            if backend == "sglang":  # /generate reports each prompt's token count to both
                assert ours["input_lens"] == theirs["input_lens"]
                assert ours["total_input_tokens"] == sum(theirs["input_lens"])
            assert ours["total_input_tokens"] == theirs["total_input_tokens"], backend
            assert [len(x) for x in ours["itls"]] == [len(x) for x in theirs["itls"]], backend
            assert set(theirs) <= set(ours), set(theirs) - set(ours)  # SGLang's JSON keys
            cpu = ["--------------------Server CPU--------------------"]
            cpu += ["Server CPU seconds:", "Server CPU ms per output token:"]
            ours_block = block_of(ours_out)
            assert ours_block[-4:-1] == cpu  # pyllama4's own lines, last
            assert ours_block[:-4] + ours_block[-1:] == block_of(theirs_out), backend
    finally:
        live.stop()
