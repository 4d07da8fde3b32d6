"""bench/gsm8k.py: SGLang's answer extraction and prompt format, and one run against a live
pyllama4 server on the demo model (the accuracy is recorded elsewhere, not asserted)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyllama4.bench_data import GSM8K

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gsm8k.py"

_spec = importlib.util.spec_from_file_location("bench_gsm8k", SCRIPT)
gsm8k = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gsm8k)


@pytest.mark.parametrize(
    "text, value",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", 18),
        (" The total is 1,234 dollars.", 1234),
        ("3 apples and 4 pears make 7", 7),
        ("It costs $5.50", 50),  # SGLang's \d+: the last run of digits
        ("-12", 12),
        ("no number here", gsm8k.INVALID),
        ("", gsm8k.INVALID),
        ("the code is 007", gsm8k.INVALID),  # literal_eval refuses a leading zero, as in SGLang
        ("0", 0),
    ],
)
def test_get_answer_value(text, value):
    assert gsm8k.get_answer_value(text) == value


def test_prompt_format_is_sglangs():
    shots = [{"question": "q1?", "answer": "a1\n#### 1"}, {"question": "q2?", "answer": "#### 2"}]
    examples = gsm8k.get_few_shot_examples(shots)
    assert examples == "Question: q1?\nAnswer: a1\n#### 1\n\nQuestion: q2?\nAnswer: #### 2\n\n"
    prompt = gsm8k.build_prompt(examples, {"question": "q3?", "answer": "#### 3"})
    assert prompt == examples + "Question: q3?\nAnswer:"
    assert gsm8k.build_prompt("", {"question": "q", "answer": "x"}) == "Question: q\nAnswer:"


def test_shots_are_the_last_items_and_never_asked():
    lines = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)]
    shots, questions = gsm8k.split_dataset(lines, num_questions=100, num_shots=3)
    assert [s["question"] for s in shots] == ["q7", "q8", "q9"]
    assert [q["question"] for q in questions] == [f"q{i}" for i in range(7)]
    shots, questions = gsm8k.split_dataset(lines, num_questions=2, num_shots=0)
    assert shots == [] and [q["question"] for q in questions] == ["q0", "q1"]
    with pytest.raises(ValueError):
        gsm8k.split_dataset(lines, num_questions=2, num_shots=10)


def test_base_url_flags():
    args = gsm8k.parse_args(["--port", "1234"])
    assert gsm8k.resolve_base_url(args) == "http://127.0.0.1:1234"
    args = gsm8k.parse_args(["--host", "localhost", "--port", "8"])
    assert gsm8k.resolve_base_url(args) == "http://localhost:8"
    args = gsm8k.parse_args(["--base-url", "http://h:9/v1/"])
    assert gsm8k.resolve_base_url(args) == "http://h:9"


def test_packaged_questions_have_numeric_answers():
    lines = gsm8k.read_jsonl(GSM8K.path("--data-path"))
    assert len(lines) == 1319
    assert all(gsm8k.get_answer_value(x["answer"]) != gsm8k.INVALID for x in lines)
    assert all(x["answer"].rsplit("####", 1)[1].strip() for x in lines)


def test_runs_end_to_end_against_the_demo_server(launch_server, tmp_path):
    live = launch_server(tmp_path / "server.log", context_length=2048)
    port = live.port
    try:
        cmd = [sys.executable, str(SCRIPT), "--port", str(port), "--num-questions", "4"]
        cmd += ["--num-shots", "2", "--parallel", "4", "--max-new-tokens", "32"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        live.stop()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4, out.stdout
    patterns = [
        r"Accuracy: (\d+\.\d{3})",
        r"Invalid: (\d+\.\d{3})",
        r"Latency: (\d+\.\d{3}) s",
        r"Output throughput: (\d+\.\d{3}) token/s",
    ]
    values = []
    for line, pattern in zip(lines, patterns, strict=True):
        m = re.fullmatch(pattern, line)
        assert m, (line, pattern)
        values.append(float(m.group(1)))
    accuracy, invalid, latency, throughput = values
    assert 0 <= accuracy <= 1 and 0 <= invalid <= 1
    assert latency > 0 and throughput > 0
    assert "4/4 done" in out.stderr
