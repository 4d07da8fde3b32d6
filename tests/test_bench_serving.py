"""bench/serving.py and its parts: SGLang's bench_serving metrics on synthetic timelines, the
printed block's labels against the seed's, and one run against a live pyllama4 server on the demo
model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "serving.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# bench/serving.py and its parts import their siblings by name, as they do when run by path, so
# each is loaded under its own name after those it imports; the names leave sys.modules again,
# where no bench script's name may be importable.
PARTS = (
    "server_cpu",
    "serving_data",
    "serving_metrics",
    "serving_clients",
    "serving_args",
    "serving_load",
    "serving_report",
)
parts = {name: _load(name, ROOT / "bench" / f"{name}.py") for name in PARTS}
server_cpu, sampling, metrics = parts["server_cpu"], parts["serving_data"], parts["serving_metrics"]
clients, report = parts["serving_clients"], parts["serving_report"]
bs = _load("bench_serving", SCRIPT)
for name in PARTS:
    del sys.modules[name]

# The lines of SGLang's "Serving Benchmark Result" block, as sglang 0.5.23 prints them
# (python/sglang/benchmark/serving.py, `benchmark()`, for a text dataset and a generation
# backend). Header, section separators and footer are whole lines; the other entries are the
# text before the value column.
SGLANG_LABELS = [
    "============ Serving Benchmark Result ============",
    "Backend:",
    "Traffic request rate:",
    "Max request concurrency:",
    "Successful requests:",
    "Benchmark duration (s):",
    "Total input tokens:",
    "Total input text tokens:",
    "Total generated tokens:",
    "Total generated tokens (retokenized):",
    "Request throughput (req/s):",
    "Input token throughput (tok/s):",
    "Output token throughput (tok/s):",
    "Peak output token throughput (tok/s):",
    "Peak concurrent requests:",
    "Total token throughput (tok/s):",
    "Concurrency:",
    "----------------End-to-End Latency----------------",
    "Mean E2E Latency (ms):",
    "Median E2E Latency (ms):",
    "P90 E2E Latency (ms):",
    "P95 E2E Latency (ms):",
    "P99 E2E Latency (ms):",
    "---------------Time to First Token----------------",
    "Mean TTFT (ms):",
    "Median TTFT (ms):",
    "P90 TTFT (ms):",
    "P95 TTFT (ms):",
    "P99 TTFT (ms):",
    "-----Time per Output Token (excl. 1st token)------",
    "Mean TPOT (ms):",
    "Median TPOT (ms):",
    "P90 TPOT (ms):",
    "P95 TPOT (ms):",
    "P99 TPOT (ms):",
    "---------------Inter-Token Latency----------------",
    "Mean ITL (ms):",
    "Median ITL (ms):",
    "P90 ITL (ms):",
    "P95 ITL (ms):",
    "P99 ITL (ms):",
    "Max ITL (ms):",
    "==================================================",
]
CPU_SECTION = ["--------------------Server CPU--------------------"] + [
    label for label, _ in report.CPU_LINES
]
# Three value lines of a block SGLang printed, verbatim (the value starts in column 42, padded).
SGLANG_LINES = [
    "Backend:                                 sglang    ",
    "Benchmark duration (s):                  74.62     ",
    "Total input tokens:                      6101      ",
]


def labels_of(lines):
    return [ln if ln[0] in "=-" else ln[:40].rstrip() for ln in lines if ln]


def rec(prompt_len, start, ttft, itl, latency, text, out, success=True):
    return metrics.RequestRecord(
        prompt_len=prompt_len,
        start_time=start,
        ttft=ttft,
        itl=list(itl),
        latency=latency,
        generated_text=text,
        output_len=out,
        success=success,
    )


def timeline():
    """Three successful requests and one failure over a 2 s benchmark.

    A: sent 0.0, tokens at 0.1 0.2 0.3 0.5, 4 tokens, 5 retokenized.
    B: sent 0.5, tokens at 0.7 1.7, end 1.8, 2 tokens.
    C: sent 1.0, one token at 1.4, 1 token.
    """
    return [
        rec(10, 0.0, 0.1, [0.1, 0.1, 0.2], 0.5, "abcde", 4),
        rec(20, 0.5, 0.2, [1.0], 1.3, "xy", 2),
        rec(30, 1.0, 0.4, [], 0.4, "z", 1),
        rec(99, 1.2, 0.0, [], 0.1, "", 0, success=False),
    ]


def test_metrics_on_a_synthetic_timeline():
    m = metrics.compute_metrics(timeline(), 2.0, len)
    approx = pytest.approx
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60
    assert m["total_output_tokens"] == 4 + 2 + 1
    assert m["total_output_tokens_retokenized"] == 5 + 2 + 1
    assert m["request_throughput"] == approx(1.5)
    assert m["input_throughput"] == approx(30.0)
    assert m["output_throughput"] == approx(3.5)
    assert m["total_throughput"] == approx(33.5)
    assert m["concurrency"] == approx((0.5 + 1.3 + 0.4) / 2.0)
    # TTFT = first chunk - send
    assert m["mean_ttft_ms"] == approx(1000 * (0.1 + 0.2 + 0.4) / 3)
    assert m["median_ttft_ms"] == approx(200.0)
    for q in (90, 95, 99):
        assert m[f"p{q}_ttft_ms"] == approx(np.percentile([100, 200, 400], q))
        assert m[f"p{q}_e2e_latency_ms"] == approx(np.percentile([500, 1300, 400], q))
    assert m["std_ttft_ms"] == approx(np.std([100, 200, 400]))
    # E2E = end - send
    assert m["mean_e2e_latency_ms"] == approx(1000 * 2.2 / 3)
    assert m["median_e2e_latency_ms"] == approx(500.0)
    # TPOT = (E2E - TTFT) / (out - 1), only for out > 1: A (0.4 / 3) and B (1.1 / 1)
    tpots = [400 / 3, 1100.0]
    assert m["mean_tpot_ms"] == approx(np.mean(tpots))
    assert m["median_tpot_ms"] == approx(np.median(tpots))
    assert m["p90_tpot_ms"] == approx(np.percentile(tpots, 90))
    assert m["p99_tpot_ms"] == approx(np.percentile(tpots, 99))
    # ITL: every request's per-token gaps, A 0.1 0.1 0.2, B 1.0
    itls = [100, 100, 200, 1000]
    assert m["mean_itl_ms"] == approx(350.0)
    assert m["median_itl_ms"] == approx(150.0)
    assert m["p90_itl_ms"] == approx(np.percentile(itls, 90))
    assert m["p95_itl_ms"] == approx(np.percentile(itls, 95))
    assert m["p99_itl_ms"] == approx(np.percentile(itls, 99))
    assert m["max_itl_ms"] == approx(1000.0)
    # 1-second buckets from the first send: tokens [5, 2, 0]; requests in flight [2, 2, 0]
    assert metrics.peak_buckets(timeline()) == ([5, 2, 0], [2, 2, 0])
    assert m["max_output_tokens_per_s"] == 5.0
    assert m["max_concurrent_requests"] == 2


def test_one_request_at_a_time_has_concurrency_one():
    # Back-to-back requests, 1 s each, 10 chunks 0.1 s apart after a 0.1 s TTFT.
    records = []
    for i in range(5):
        records.append(rec(8, float(i), 0.1, [0.1] * 9, 1.0, "t" * 10, 10))
    m = metrics.compute_metrics(records, 5.0, len)
    assert m["concurrency"] == pytest.approx(1.0)
    assert m["mean_ttft_ms"] == pytest.approx(100.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # (1.0 - 0.1) / 9
    assert m["output_throughput"] == pytest.approx(10.0)


def test_no_successful_request_gives_zeros():
    m = metrics.compute_metrics([rec(5, 0.0, 0.0, [], 0.1, "", 0, success=False)], 1.0, len)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["max_concurrent_requests"] == 0
    lines = report.format_result(m, "pyllama4", float("inf"), None).splitlines()
    assert lines[4].rstrip().endswith("not set")


def test_printed_labels_equal_sglangs():
    m = metrics.compute_metrics(timeline(), 2.0, len)
    lines = report.format_result(m, "sglang", float("inf"), 1).splitlines()
    assert lines[0] == ""  # SGLang prints a blank line before its block
    assert labels_of(lines) == SGLANG_LABELS
    for ln in lines[1:]:
        if ln[0] not in "=-":
            assert ln[40] == " " and ln[41] != " ", ln  # the value starts in column 42
    assert lines[2] == "Backend:                                 sglang    "
    assert lines[3] == "Traffic request rate:                    inf       "


def test_value_lines_match_sglangs_format():
    m = metrics.compute_metrics(timeline(), 74.6213, len)
    m["total_input_tokens"] = 6101
    out = report.format_result(m, "sglang", float("inf"), 1).splitlines()
    for line in SGLANG_LINES:
        assert line in out


def test_accept_length_line_only_when_reported():
    m = metrics.compute_metrics(timeline(), 2.0, len)
    lines = report.format_result(m, "sglang", 4.0, 16, accept_length=2.5).splitlines()
    assert "Accept length:                           2.50      " in lines
    assert "Traffic request rate:                    4.0       " in lines
    assert not any(ln.startswith("Accept length:") for ln in report.format_result(m, "x", 4.0, 1))


def test_random_range_ratio_has_sglangs_meaning():
    sampling.seed_everything(0)
    assert set(sampling.random_lens(10, 0.5, 500)) == set(range(5, 11))
    assert set(sampling.random_lens(10, 0.0, 500)) == set(range(1, 11))
    assert sampling.random_lens(10, 1.0, 20) == [10] * 20
    assert sampling.random_lens(0, 0.5, 3) == [0, 0, 0]


def test_random_lengths_come_from_numpys_seeded_global_generator():
    sampling.seed_everything(42)
    first = sampling.random_lens(1024, 0.0, 8)
    np.random.seed(42)  # what SGLang draws: np.random.randint after np.random.seed(--seed)
    assert first == np.random.randint(1, 1025, size=8).tolist()


class WordTokenizer:
    def encode(self, text, add_special_tokens=True):
        return text.split()


def test_sharegpt_sampling_filters_like_sglang(tmp_path):
    def conv(q, a):
        return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}

    data = [conv("a b c", "d e"), conv("x", "y z"), {"conversations": []}, conv("p q", "r s t")]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data)[:-40])  # truncated inside the last conversation
    args = argparse.Namespace(
        num_prompts=5,
        sharegpt_output_len=None,
        sharegpt_context_len=None,
        prompt_suffix="",
        apply_chat_template=False,
    )
    sampling.seed_everything(0)
    rows = sampling.sample_sharegpt(args, WordTokenizer(), path)
    assert sorted((r.prompt, r.prompt_len, r.output_len) for r in rows) == [("a b c", 3, 2)]
    args.sharegpt_output_len = 7
    rows = sampling.sample_sharegpt(args, WordTokenizer(), path)
    assert {r.output_len for r in rows} == {7}
    args.sharegpt_context_len = 9  # 3 + 7 > 9
    assert sampling.sample_sharegpt(args, WordTokenizer(), path) == []


def test_requests_per_backend():
    row = sampling.DatasetRow([5, 6, 7], 3, 4)
    opts = clients.RequestOptions("m", extra={"top_k": 5})
    path, body = clients.build_request("sglang", opts, row)
    assert path == "/generate" and body["input_ids"] == [5, 6, 7] and body["top_k"] == 5
    assert body["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}
    no_eos = clients.RequestOptions("m", ignore_eos=False, extra={"temperature": 0.5})
    path, body = clients.build_request("sglang-oai", no_eos, row)
    assert path == "/v1/completions" and body["prompt"] == [5, 6, 7] and body["max_tokens"] == 4
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.5 and body["ignore_eos"] is False and body["best_of"] == 1
    text = sampling.DatasetRow("hi", 1, 4)
    for backend in ("sglang-oai-chat", "vllm-chat", "openai-chat"):
        path, body = clients.build_request(backend, clients.RequestOptions("m", stream=False), text)
        assert path == "/v1/chat/completions" and body["messages"][0]["content"] == "hi"
        assert body["max_completion_tokens"] == 4 and body["stream"] is False
        assert "stream_options" not in body
    assert clients.build_request("vllm", opts, text)[0] == "/v1/completions"


def test_itl_has_one_entry_per_token_on_generate():
    # /generate: cumulative text; meta_info counts the tokens. A chunk that adds no token is
    # skipped; one that adds k tokens gives k gaps of (gap / k), as SGLang's client does.
    timer = clients.StreamTimer("/generate", sampling.DatasetRow("p", 1, 9), 0.5)
    for t, text, n in ((1.0, "a", 1), (1.4, "abc", 3), (1.5, "abc", 3), (2.0, "abcd", 4)):
        timer.event(t, {"text": text, "meta_info": {"completion_tokens": n, "prompt_tokens": 7}})
    r = timer.rec
    assert r.ttft == pytest.approx(0.5) and r.itl == pytest.approx([0.2, 0.2, 0.6])
    assert r.output_len == 4 and r.prompt_len == 7 and r.generated_text == "abcd"


def test_itl_on_the_openai_apis_splits_by_per_chunk_usage_else_one_per_chunk():
    def chunk(text, n=None):
        ev = {"choices": [{"text": text}]}
        return ev if n is None else {**ev, "usage": {"completion_tokens": n, "prompt_tokens": 3}}

    plain = clients.StreamTimer("/v1/completions", sampling.DatasetRow("p", 1, 9), 0.0)
    for t, ev in ((1.0, chunk("a")), (1.5, chunk("bc")), (1.7, {"choices": [], **chunk("", 3)})):
        plain.event(t, ev)
    assert plain.rec.itl == pytest.approx([0.5]) and plain.rec.output_len == 3
    assert plain.rec.text_chunks == ["bc"] and plain.rec.prompt_len == 3
    usage = clients.StreamTimer("/v1/completions", sampling.DatasetRow("p", 1, 9), 0.0)
    for t, ev in ((1.0, chunk("a", 1)), (1.6, chunk("bcd", 4)), (1.8, chunk("e", 5))):
        usage.event(t, ev)
    assert usage.rec.itl == pytest.approx([0.2, 0.2, 0.2, 0.2])
    # Under speculative decoding SGLang splits an OpenAI chunk by its retokenized length.
    r = rec(1, 0.0, 0.1, [0.6, 0.2], 1.0, "abcd", 4)
    r.text_chunks = ["bcd", "e"]
    assert metrics.split_chunk_itls(r, len) == pytest.approx([0.2, 0.2, 0.2, 0.2])


# ---- end to end against a live server (the start/stop helpers of tests/test_server_e2e.py) ----


def test_bench_serving_against_a_live_server(launch_server, demo_dir, tmp_path):
    live = launch_server(tmp_path / "server.log")
    port = live.port
    out = tmp_path / "results.jsonl"
    try:
        cmd = [sys.executable, str(SCRIPT), "--backend", "pyllama4", "--port", str(port)]
        cmd += ["--tokenizer", str(demo_dir), "--dataset-name", "random"]
        cmd += ["--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "6"]
        cmd += ["--max-concurrency", "3", "--output-file", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    finally:
        live.stop()
    assert r.returncode == 0, r.stderr
    (line,) = out.read_text().splitlines()
    res = json.loads(line)
    assert res["backend"] == "pyllama4" and res["dataset_name"] == "random"
    assert res["completed"] == 6 and res["max_concurrency"] == 3
    for key in ("request_throughput", "input_throughput", "output_throughput", "total_throughput"):
        assert res[key] > 0, key
    assert 0 < res["mean_ttft_ms"] <= res["mean_e2e_latency_ms"]
    assert res["median_ttft_ms"] <= res["median_e2e_latency_ms"]
    assert res["total_output_tokens"] > 0 and res["total_output_tokens_retokenized"] > 0
    assert res["concurrency"] <= 3 + 1e-6
    # The server listens on 127.0.0.1: its CPU time is found from the port.
    assert res["server_cpu_seconds"] > 0 and res["server_cpu_ms_per_output_token"] > 0
    stdout = r.stdout.splitlines()
    start = stdout.index("============ Serving Benchmark Result ============")
    labels = SGLANG_LABELS[:-1] + CPU_SECTION + SGLANG_LABELS[-1:]
    block = stdout[start : start + len(labels)]
    assert labels_of(block) == labels
    assert "Successful requests:                     6         " in block


# ---- server CPU from /proc (bench/server_cpu.py) ---------------------------------------------

# A parent that starts a child burning ~0.3 s of its own CPU time, which then reports and waits
# for stdin to close (so it is a live descendant when read); the parent waits for the child.
BURNING_TREE = """
import subprocess, sys
child = '''
import sys, time
while time.process_time() < 0.3:
    pass
print("burnt", flush=True)
sys.stdin.read()
'''
subprocess.run([sys.executable, "-c", child])
"""


def test_cpu_seconds_of_a_busy_process_tree_grow():
    proc = subprocess.Popen(
        [sys.executable, "-c", BURNING_TREE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        before = server_cpu.tree_cpu_seconds(proc.pid)
        assert proc.stdout.readline().strip() == "burnt"
        assert len(server_cpu.process_tree(proc.pid)) == 2
        busy = server_cpu.tree_cpu_seconds(proc.pid)  # the child's time, read while it lives
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert before is not None and busy is not None
    assert 0.0 <= before <= busy
    assert busy - before > 0.1
    assert server_cpu.tree_cpu_seconds(proc.pid) is None  # gone


def test_cpu_seconds_are_unavailable_without_proc(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(server_cpu, "PROC", tmp_path / "no-proc")
    assert server_cpu.tree_cpu_seconds(os.getpid()) is None
    assert server_cpu.listening_pid(1) is None
    target = bs.make_target("A", "http://127.0.0.1:1", "vllm", "m", os.getpid())
    assert target.pid is None
    assert "server CPU is unavailable on this system" in capsys.readouterr().err


def test_the_port_lookup_finds_this_process_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert server_cpu.listening_pid(port) == os.getpid()
        assert server_cpu.local_server_pid(f"http://127.0.0.1:{port}") == os.getpid()
        assert server_cpu.local_server_pid(f"http://localhost:{port}/v1") == os.getpid()
        assert server_cpu.local_server_pid(f"http://example.com:{port}") is None
    assert server_cpu.listening_pid(port) is None  # closed


def test_cpu_lines_only_when_measured():
    m = metrics.compute_metrics(timeline(), 2.0, len)
    m.update(metrics.cpu_metrics(None, m["total_output_tokens"]))
    assert "Server CPU" not in report.format_result(m, "sglang", 1.0, None)
    m.update(metrics.cpu_metrics(0.35, m["total_output_tokens"]))  # 7 output tokens
    lines = report.format_result(m, "sglang", 1.0, None).splitlines()
    assert "Server CPU seconds:                      0.35      " in lines
    assert "Server CPU ms per output token:          50.00     " in lines
    assert labels_of(lines) == SGLANG_LABELS[:-1] + CPU_SECTION + SGLANG_LABELS[-1:]


def test_comparison_summary_has_medians_ranges_and_ratios():
    def run(tput, tpot, cpu=None):
        return {
            "output_throughput": tput,
            "mean_tpot_ms": tpot,
            "mean_ttft_ms": 10.0,
            "server_cpu_ms_per_output_token": cpu,
        }

    a = [run(100.0, 20.0, 5.0), run(120.0, 10.0, 7.0), run(110.0, 30.0, 6.0)]
    b = [run(50.0, 40.0), run(60.0, 40.0), run(55.0, 40.0)]
    lines = report.format_comparison("ours", a, "theirs", b).splitlines()
    assert "A: ours" in lines[1] and "B: theirs" in lines[1]
    (tput,) = [ln for ln in lines if ln.startswith("Output token throughput (tok/s):")]
    assert tput.split()[4:] == ["110.00", "(100.00-120.00)", "55.00", "(50.00-60.00)"]
    (cpu,) = [ln for ln in lines if ln.startswith("Server CPU ms per output token:")]
    assert cpu.split()[6:] == ["6.00", "(5.00-7.00)", "n/a"]
    assert "Output throughput ratio A/B (ours / theirs): 2.000" in lines
    assert "Mean TPOT ratio A/B (ours / theirs): 0.500" in lines


# ---- --compare against two fake OpenAI-compatible servers -------------------------------------

# Streams max_tokens chunks of " t" and then its usage, for any prompt; answers SGLang's and
# vLLM's cache flush routes; appends each POST's path and query to the file argv[1]; prints its
# port first.
FAKE_SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, ctype, body):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(200, "application/json", json.dumps({"data": [{"id": "fake"}]}).encode())
        else:
            self.reply(404, "text/plain", b"not found")

    def do_POST(self):
        with open(sys.argv[1], "a") as log:
            log.write(self.path + "\\n")
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0] in ("/flush_cache", "/reset_prefix_cache"):
            self.reply(200, "application/json", b"{}")
            return
        body = json.loads(raw)
        n = body["max_tokens"]
        events = [{"choices": [{"text": " t"}]}] * n
        events.append({"choices": [], "usage": {"completion_tokens": n}})
        lines = [f"data: {json.dumps(e)}" for e in events] + ["data: [DONE]"]
        self.reply(200, "text/event-stream", ("\\n\\n".join(lines) + "\\n\\n").encode())

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture
def fake_servers(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FAKE_SERVER, str(tmp_path / f"posts-{i}.log")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        yield [(p.pid, int(p.stdout.readline())) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def test_compare_alternates_the_two_servers_and_summarizes(fake_servers, demo_dir, tmp_path):
    (pid_a, port_a), (pid_b, port_b) = fake_servers
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(SCRIPT), "--backend", "vllm", "--port", str(port_a)]
    cmd += ["--compare-port", str(port_b), "--compare-server-pid", str(pid_b), "--rounds", "2"]
    cmd += ["--label-a", "first", "--label-b", "second", "--tokenizer", str(demo_dir)]
    cmd += ["--dataset-name", "random-ids", "--random-input-len", "8"]
    cmd += ["--random-output-len", "4", "--random-range-ratio", "1", "--num-prompts", "3"]
    cmd += ["--max-concurrency", "2"]
    cmd += ["--output-file", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    stdout = r.stdout.splitlines()
    heads = [ln for ln in stdout if ln.startswith("#### ")]
    assert heads == [
        f"#### first (http://127.0.0.1:{port_a}), round 1/2",
        f"#### second (http://127.0.0.1:{port_b}), round 1/2",
        f"#### first (http://127.0.0.1:{port_a}), round 2/2",
        f"#### second (http://127.0.0.1:{port_b}), round 2/2",
    ]
    marks = [ln[:4] for ln in stdout if ln in heads or ln == SGLANG_LABELS[0]]
    assert marks == ["####", "===="] * 4  # each run's heading, then its block
    assert stdout.count("Successful requests:                     3         ") == 4
    assert sum(ln.startswith("Server CPU seconds:") for ln in stdout) == 4
    summary = stdout[stdout.index(next(ln for ln in stdout if " Comparison: " in ln)) :]
    assert "A: first" in summary[1] and "B: second" in summary[1]
    assert any(ln.startswith("Output throughput ratio A/B (first / second): ") for ln in summary)
    assert any(ln.startswith("Mean TPOT ratio A/B (first / second): ") for ln in summary)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(res["label"], res["round"]) for res in results] == [
        ("first", 1),
        ("second", 1),
        ("first", 2),
        ("second", 2),
    ]
    for res in results:  # A's pid is found from its port, B's is given
        assert res["completed"] == 3 and res["backend"] == "vllm" and res["model"] == "fake"
        assert res["total_output_tokens"] == 12
        assert res["server_cpu_seconds"] >= 0.0
        assert res["server_cpu_ms_per_output_token"] >= 0.0


@pytest.mark.parametrize(
    "backend, route", [("vllm", "/reset_prefix_cache"), ("sglang-oai", "/flush_cache?timeout=60.0")]
)
def test_flush_cache_posts_the_backends_route_after_the_warmup(
    fake_servers, demo_dir, tmp_path, backend, route
):
    (_, port), _ = fake_servers
    cmd = [sys.executable, str(SCRIPT), "--backend", backend, "--port", str(port), "--flush-cache"]
    cmd += ["--tokenizer", str(demo_dir), "--dataset-name", "random-ids", "--num-prompts", "2"]
    cmd += ["--random-input-len", "4", "--random-output-len", "3", "--disable-tqdm"]
    cmd += ["--output-file", str(tmp_path / "out.jsonl")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    posts = (tmp_path / "posts-0.log").read_text().splitlines()
    assert posts == ["/v1/completions", route, "/v1/completions", "/v1/completions"]


def test_flush_cache_against_a_live_server(launch_server, demo_dir, tmp_path):
    live = launch_server(tmp_path / "server.log")
    try:
        cmd = [sys.executable, str(SCRIPT), "--backend", "sglang", "--base-url", live.base]
        cmd += ["--flush-cache", "--tokenizer", str(demo_dir), "--dataset-name", "random-ids"]
        cmd += ["--random-input-len", "16", "--random-output-len", "4", "--num-prompts", "3"]
        cmd += ["--disable-tqdm", "--output-file", str(tmp_path / "out.jsonl")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        live.stop()
    assert r.returncode == 0, r.stderr
    assert "Successful requests:                     3         " in r.stdout.splitlines()
