"""The command line: every command line of the seed (SGLang's Llama 4 page) either serves or stops
at start with one line naming the flag; ranges give one-line errors; a real start and a SIGTERM.

SEED_COMMANDS is that page's own command generator ported to Python (SGLang's docs page for
Llama 4: `Llama4ScoutDeployment` and `Llama4MaverickDeployment`'s generateCommand,
plus the page's fixed `sglang serve` commands), with every combination of its options enumerated
and duplicates dropped.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pyllama4.server import checks, cli
from pyllama4.server import flags as cli_flags
from pyllama4.server import launch as server_launch
from tiny_models import make_tiny_checkpoint, make_tiny_eagle3_draft

SCOUT = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
MAVERICK = "meta-llama/Llama-4-Maverick-17B-128E-Instruct"
SCOUT_EAGLE3 = "lmsys/sglang-EAGLE3-Llama-4-Scout-17B-16E-Instruct-v1"

SCOUT_HARDWARE = ("b200", "h100", "h200", "mi300x", "mi325x", "mi355x")
MAVERICK_HARDWARE = ("mi300x", "mi325x", "mi355x")


def generate_command(
    hardware: str,
    quantization: str | None,
    toolcall: str | None,
    speculative: str | None,
    host: str = "0.0.0.0",
    port: str = "8000",
) -> tuple[str, ...]:
    """generateCommand of the seed page, flag for flag (both generators share it; note that the
    page's Maverick generator also writes the Scout model path, and has no quantization, tool
    call or speculative options, so those are undefined there)."""
    cmd = ["--model-path", SCOUT]
    if hardware in ("h100", "h200", "b200", "mi300x", "mi325x", "mi355x"):
        cmd += ["--tp", "8"]
    if quantization == "fp8":
        cmd += ["--quantization", "fp8"]
    if toolcall == "enabled":
        cmd += ["--tool-call-parser", "pythonic"]
    if speculative == "enabled":
        cmd += [
            "--speculative-algorithm",
            "EAGLE3",
            "--speculative-draft-model-path",
            SCOUT_EAGLE3,
            "--speculative-num-steps",
            "3",
            "--speculative-eagle-topk",
            "1",
            "--speculative-num-draft-tokens",
            "4",
            "--mem-fraction-static",
            "0.75",
            "--cuda-graph-max-bs",
            "2",
        ]
    cmd += ["--enable-multimodal", "--context-length", "65536", "--dtype", "bfloat16"]
    cmd += ["--trust-remote-code", "--host", host or "0.0.0.0", "--port", port or "8000"]
    return tuple(cmd)


def _seed_commands() -> list[tuple[str, ...]]:
    commands: list[tuple[str, ...]] = []
    scout = itertools.product(
        SCOUT_HARDWARE, ("bf16", "fp8"), ("disabled", "enabled"), ("disabled", "enabled")
    )
    maverick = ((hw, None, None, None) for hw in MAVERICK_HARDWARE)
    for options in itertools.chain(scout, maverick):
        command = generate_command(*options)
        if command not in commands:
            commands.append(command)
    # The page's fixed MI300x deployment commands (`sglang serve`, i.e. `pyllama4 serve`).
    for model in (SCOUT, MAVERICK):
        commands.append(
            ("--model-path", model, "--tp", "8", "--context-length", "1000000")
            + ("--trust-remote-code",)
        )
    return commands


SEED_COMMANDS = _seed_commands()


def unsupported(command: tuple[str, ...] | list[str]) -> list[str]:
    """The flags a seed command cannot start with (model and draft paths replaced by local
    ones): --tp 8 together with FP8 or EAGLE3, combinations not built yet."""
    combined = "--quantization" in command or "--speculative-algorithm" in command
    return ["--tp"] if combined else []


VALUED = {"--trust-remote-code": False, "--enable-multimodal": False}


def _command_id(command: tuple[str, ...]) -> str:
    tags = {
        "--tp": "tp8",
        "--quantization": "fp8",
        "--tool-call-parser": "tools",
        "--speculative-algorithm": "eagle3",
        "--enable-multimodal": "multimodal",
    }
    parts = ["maverick" if MAVERICK in command else "scout"]
    parts += [tag for flag, tag in tags.items() if flag in command]
    parts.append("ctx" + command[command.index("--context-length") + 1])
    return "-".join(parts)


def test_the_seed_page_generates_ten_distinct_command_lines():
    # 6 Scout hardware choices all give --tp 8; 2 x 2 x 2 options: 8 lines; the Maverick
    # generator's only line repeats Scout's default; plus the two `sglang serve` lines.
    assert len(SEED_COMMANDS) == 10
    assert len(set(SEED_COMMANDS)) == 10


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama4")))


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory, tiny) -> str:
    return str(make_tiny_eagle3_draft(tmp_path_factory.mktemp("tiny-eagle3"), Path(tiny)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def for_test(command: tuple[str, ...], tiny: str, port: int, draft: str | None = None) -> list[str]:
    """The seed's command with the model path (and the EAGLE3 draft's, given one) replaced and
    host/port set for the test."""
    out = list(command)
    out[out.index("--model-path") + 1] = tiny
    if draft is not None and SCOUT_EAGLE3 in out:
        out[out.index(SCOUT_EAGLE3)] = draft
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


ROOT = Path(__file__).resolve().parents[1]


def launch(args: list[str], **kw) -> subprocess.Popen:
    """`python -m pyllama4.launch_server ARGS` as typed in the repository root."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.Popen(
        [sys.executable, "-m", "pyllama4.launch_server", *args], cwd=ROOT, text=True, **pipes
    )


def run_to_exit(args: list[str], timeout: float = 60) -> tuple[int, list[str]]:
    proc = launch(args)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err.splitlines()


def drop(command: list[str], flag: str) -> list[str]:
    """The command without `flag` (and its value)."""
    i = command.index(flag)
    valued = VALUED.get(flag, True)
    return command[:i] + command[i + 1 + valued :]


# --------------------------------------------------------------------------------------------
# The seed's command lines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", SEED_COMMANDS, ids=_command_id)
def test_every_seed_command_parses(command, tiny):
    args = cli_flags.parse_args(for_test(command, tiny, 8000))
    if "--speculative-algorithm" in command:
        assert checks.speculative_config(args) == (3, 1, 4)
    assert args.tp == 8
    assert args.model_path == tiny
    assert args.trust_remote_code
    assert args.given[:2] == ["model_path", "tp"]


@pytest.mark.parametrize("command", [c for c in SEED_COMMANDS if unsupported(c)], ids=_command_id)
def test_seed_commands_combining_tp_with_fp8_or_eagle3_stop_at_start_in_one_line(
    command, tiny, tiny_draft
):
    port = free_port()
    start = time.monotonic()
    rc, err = run_to_exit(for_test(command, tiny, port, tiny_draft))
    assert rc != 0
    assert len(err) == 1, err
    feature = "EAGLE3" if "--speculative-algorithm" in command else "FP8"
    assert err[0].startswith(
        f"pyllama4-serve: --tp 8: {feature} with tensor parallelism is not built yet"
    )
    assert time.monotonic() - start < 30  # fails before any loading


@pytest.mark.parametrize("command", SEED_COMMANDS, ids=_command_id)
def test_each_unsupported_flag_of_a_seed_command_is_named_in_turn(
    command, tiny, tiny_draft, caplog
):
    """Drop the flag the server names, and it names the next one, until the rest starts."""
    remaining = for_test(command, tiny, 8000, tiny_draft)
    expected = unsupported(remaining)
    named = []
    while True:
        args = cli_flags.parse_args(remaining)
        try:
            with caplog.at_level(logging.INFO, logger="pyllama4.serve"):
                checks.check_supported(args)
        except SystemExit as stop:
            line = str(stop.code)
            assert "\n" not in line and line.startswith("pyllama4-serve: --")
            flag = line.split()[1].rstrip(":")
            named.append(flag)
            remaining = drop(remaining, flag)
            continue
        break
    assert named == expected
    # What remains starts; its accepted-but-no-effect flags are each logged, never silent.
    logged = caplog.text
    assert "--trust-remote-code: accepted" in logged
    if "--cuda-graph-max-bs" in remaining:
        assert "--cuda-graph-max-bs 2:" in logged
    if "--mem-fraction-static" in remaining and checks.resolve_device(args) == "cpu":
        assert "--mem-fraction-static 0.75: no effect on the CPU" in logged


def test_unsupported_flags_are_named_in_the_order_typed(tiny):
    line = f"--model-path {tiny} --chat-template /nonexistent --quantization awq --tp 2".split()
    with pytest.raises(SystemExit, match=r"^pyllama4-serve: --chat-template /nonexistent: cannot"):
        checks.check_supported(cli_flags.parse_args(line))
    args = cli_flags.parse_args(line)
    del args.given  # a namespace not made by parse_args: the seed's order
    with pytest.raises(SystemExit, match=r"^pyllama4-serve: --quantization awq: 'awq' is not"):
        checks.check_supported(args)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantization", "awq"], "--quantization awq: 'awq' is not supported; the supported"),
        (
            ["--speculative-num-steps", "3"],
            "--speculative-num-steps 3: needs --speculative-algorithm EAGLE3",
        ),
        (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm EAGLE: the supported"),
        (
            ["--speculative-algorithm", "EAGLE3"],
            "--speculative-algorithm EAGLE3: needs --speculative-draft-model-path",
        ),
        (
            ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "./no-draft"],
            "--speculative-draft-model-path ./no-draft: no such directory",
        ),
        (
            [
                "--speculative-algorithm",
                "EAGLE3",
                "--speculative-draft-model-path",
                "/tmp",
                "--speculative-num-draft-tokens",
                "1",
            ],
            "--speculative-draft-model-path /tmp: no config.json",
        ),
        (
            ["--tool-call-parser", "llama4"],
            "--tool-call-parser llama4: unknown parser; the choices",
        ),
        (["--chat-template", "/nonexistent.jinja"], "--chat-template /nonexistent.jinja: cannot"),
    ],
)
def test_each_unsupported_flag_alone_stops_with_its_reason(flags, message, tiny):
    with pytest.raises(SystemExit) as stop:
        checks.check_supported(cli_flags.parse_args(["--model-path", tiny, *flags]))
    assert str(stop.value.code).startswith(f"pyllama4-serve: {message}")
    assert "\n" not in str(stop.value.code)


def test_model_path_must_be_a_checkpoint_directory_or_a_hub_id(tmp_path):
    args = cli_flags.parse_args(["--model-path", SCOUT])
    checks.check_supported(args)  # a Hub id: resolved at start (tests/test_hub_model.py)
    for path, why in [
        (str(tmp_path / "missing"), "no such directory"),
        ("./org/name", "no such directory"),
        (str(tmp_path), "no config.json in it"),
    ]:
        with pytest.raises(SystemExit) as stop:
            checks.check_supported(cli_flags.parse_args(["--model-path", path]))
        assert str(stop.value.code).startswith(f"pyllama4-serve: --model-path {path}: ")
        assert why in str(stop.value.code)


@pytest.mark.skipif(checks._cuda_available(), reason="a GPU is visible")
def test_device_cuda_without_a_gpu_stops(tiny):
    with pytest.raises(SystemExit, match=r"^pyllama4-serve: --device cuda: no GPU is visible"):
        checks.check_supported(cli_flags.parse_args(["--model-path", tiny, "--device", "cuda"]))


def test_a_command_with_only_supported_flags_passes(tiny, tmp_path, caplog):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    args = cli_flags.parse_args(
        ["--model-path", tiny, "--tp", "1", "--dtype", "auto", "--device", "cpu"]
        + ["--context-length", "256", "--mem-fraction-static", "0.8", "--cuda-graph-max-bs", "8"]
        + ["--chunked-prefill-size", "64", "--max-running-requests", "4", "--page-size", "8"]
        + ["--max-total-tokens", "4096"]
        + ["--schedule-policy", "lpm", "--disable-radix-cache", "--max-queued-requests", "16"]
        + ["--served-model-name", "tiny", "--api-key", "k", "--log-level", "DEBUG"]
        + ["--chat-template", str(template), "--trust-remote-code", "--host", "::1", "--port", "0"]
    )
    with caplog.at_level(logging.INFO, logger="pyllama4.serve"):
        checks.check_supported(args)
    assert checks.resolve_dtype(args, checks.resolve_device(args)) == cpu_auto()
    assert (args.chunked_prefill_size, args.max_running_requests, args.page_size) == (64, 4, 8)
    assert args.schedule_policy == "lpm" and args.disable_radix_cache and args.log_level == "debug"
    notes = [r.getMessage() for r in caplog.records]
    assert any(n.startswith("--cuda-graph-max-bs 8: no effect on the CPU") for n in notes)
    assert any(n.startswith("--mem-fraction-static 0.8: no effect on the CPU") for n in notes)
    assert any(n.startswith("--trust-remote-code: accepted") for n in notes)


def test_tool_call_parsers_and_the_builtin_chat_template_are_accepted(tiny):
    for name in ("pythonic", "llama4_pythonic"):
        args = cli_flags.parse_args(["--model-path", tiny, "--tool-call-parser", name])
        checks.check_supported(args)
        assert checks.TOOL_CALL_PARSERS[args.tool_call_parser] == "pythonic"
    checks.check_supported(
        cli_flags.parse_args(["--model-path", tiny, "--chat-template", "llama4_pythonic"])
    )
    assert "<|python_start|>" not in checks.chat_template_text("llama4_pythonic")
    assert "ipython" in checks.chat_template_text("llama4_pythonic")


def test_enable_multimodal_on_a_text_only_checkpoint_stops_with_one_line(tiny):
    rc, err = run_to_exit(["--model-path", tiny, "--enable-multimodal", "--port", "0"])
    assert rc != 0
    assert len(err) == 1, err
    assert err[0].startswith(f"pyllama4-serve: --enable-multimodal: {tiny} is a text-only")


def test_image_flags_without_enable_multimodal_are_logged_as_ignored(tiny, tmp_path, caplog):
    args = cli_flags.parse_args(
        ["--model-path", tiny, "--max-image-tiles", "4", "--allowed-local-media-path"]
        + [str(tmp_path), "--disable-image-url-fetch"]
    )
    with caplog.at_level(logging.INFO, logger="pyllama4.serve"):
        checks.check_supported(args)
    notes = [r.getMessage() for r in caplog.records]
    for flag in ("--max-image-tiles", "--allowed-local-media-path", "--disable-image-url-fetch"):
        assert f"{flag}: no effect without --enable-multimodal" in notes


def test_allowed_local_media_path_must_be_a_directory(tiny, tmp_path):
    line = ["--model-path", tiny, "--enable-multimodal", "--allowed-local-media-path"]
    with pytest.raises(SystemExit, match="--allowed-local-media-path .*: not a directory"):
        checks.check_supported(cli_flags.parse_args([*line, str(tmp_path / "missing")]))
    checks.check_supported(cli_flags.parse_args([*line, str(tmp_path)]))


def cpu_auto() -> str:
    """What --dtype auto is on this CPU: bfloat16 where it has native bf16 and it measures
    faster, else float32."""
    from pyllama4.engine import auto_dtype

    return auto_dtype("cpu")[0]


def test_defaults_follow_sglang_and_the_demo_runs_on_the_cpu():
    args = cli_flags.parse_args([])
    assert (args.host, args.port, args.tp, args.model_path) == ("127.0.0.1", 30000, 1, None)
    assert checks.resolve_device(args) == "cpu"
    assert checks.resolve_dtype(args, "cpu") == cpu_auto() in ("float32", "bfloat16")
    assert checks.resolve_dtype(args, "cuda") == "bfloat16"
    assert cli_flags.parse_args(["--dtype", "half"]).dtype == "float16"
    checks.check_supported(args)


# --------------------------------------------------------------------------------------------
# Out-of-range values and unknown flags: one line each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--port", "70000"],
        ["--port", "-1"],
        ["--port", "http"],
        ["--mem-fraction-static", "0"],
        ["--mem-fraction-static", "1.5"],
        ["--mem-fraction-static", "nan"],
        ["--context-length", "0"],
        ["--page-size", "0"],
        ["--max-total-tokens", "0"],
        ["--chunked-prefill-size", "0"],
        ["--chunked-prefill-size", "-1"],
        ["--max-running-requests", "0"],
        ["--max-queued-requests", "0"],
        ["--tp", "0"],
        ["--cuda-graph-max-bs", "0"],
        ["--dtype", "int8"],
        ["--schedule-policy", "random"],
        ["--device", "tpu"],
        ["--log-level", "loud"],
        ["--no-such-flag"],
        ["--model"],  # no abbreviations: flags are spelled out
    ],
    ids=lambda f: "=".join(f),
)
def test_bad_values_give_one_line_naming_the_flag(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_flags.parse_args(flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pyllama4-serve: error: ")
    assert flags[0] in err[0]


def test_a_bad_value_stops_the_process_with_one_line():
    rc, err = run_to_exit(["--mem-fraction-static", "1.5"])
    assert rc == 2
    assert err == [
        "pyllama4-serve: error: argument --mem-fraction-static: 1.5 is out of range "
        "(expected 0 < value <= 1)"
    ]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def test_pyllama4_help_lists_serve(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.pyllama4_main(["--help"])
    assert stop.value.code == 0
    assert "serve" in capsys.readouterr().out


def test_pyllama4_serve_takes_the_same_flags(tiny):
    with pytest.raises(SystemExit) as stop:
        cli.pyllama4_main(["serve", "--model-path", tiny, "--tp", "8", "--quantization", "fp8"])
    assert str(stop.value.code).startswith("pyllama4 serve: --tp 8: FP8 with tensor parallelism")
    with pytest.raises(SystemExit) as stop:
        cli.pyllama4_main(["serv"])
    assert stop.value.code == 2


def test_launch_server_module_is_sglangs_spelling():
    import pyllama4.launch_server as launch_server

    assert launch_server.main is server_launch.main
    assert isinstance(cli_flags.build_parser(), argparse.ArgumentParser)


# --------------------------------------------------------------------------------------------
# A real start: serves /health, then SIGTERM stops it with status 0
# --------------------------------------------------------------------------------------------


def test_serves_until_sigterm_then_exits_zero(tiny):
    port = free_port()
    args = ["--model-path", tiny, "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    # --max-total-tokens: a small KV cache, quick to allocate.
    proc = launch(args + ["--context-length", "256", "--max-total-tokens", "4096"])
    try:
        deadline = time.monotonic() + 600  # a wide margin for a loaded machine
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        assert status == 200, f"exit {proc.poll()}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"serving on http://127.0.0.1:{port}" in err
    assert "SIGTERM: shutting down" in err
    assert "memory plan: weights" in err
    assert "GPU kernels: not used (" in err  # the kernel path, named at start


def test_the_demo_model_serves_with_online_fp8(launch_server, demo_dir, tmp_path):
    """--quantization fp8 on a bf16 server (MI300's e4m3fnuz): it answers, and the weights it
    logs at start take about two thirds of the bf16 bytes (the demo's embedding and lm_head, a
    third of its parameters, stay bf16)."""
    import math
    import re

    import httpx
    from safetensors import safe_open

    with safe_open(demo_dir / "model.safetensors", framework="pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    log = tmp_path / "server.log"
    flags = ("--quantization", "fp8", "--dtype", "bfloat16", "--fp8-format", "e4m3fnuz")
    live = launch_server(log, *flags)
    try:
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(live.base + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        live.stop()
    weights = int(re.search(r"weights [\d.]+ GiB \((\d+) bytes\)", log.read_text()).group(1))
    assert 0.55 * 2 * params < weights < 0.75 * 2 * params


def test_the_seed_eagle3_command_serves(tiny_mm_dir, tmp_path):
    """The seed's EAGLE3 line (Scout on MI300X, tool calls, EAGLE3 3/1/4, --mem-fraction-static
    0.75, --cuda-graph-max-bs 2, multimodal, 65536 context, bf16) with the model and draft paths
    replaced by tiny local ones and --tp 8 dropped (EAGLE3 does not run under tensor
    parallelism): it starts,
    answers the openai client, and reports the accept length in /get_server_info, in /generate's
    meta_info and in /metrics."""
    import json
    import shutil

    import httpx
    import openai

    model = tmp_path / "model"
    shutil.copytree(tiny_mm_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 65536
    (model / "config.json").write_text(json.dumps(config))
    draft = make_tiny_eagle3_draft(tmp_path / "draft", model, draft_vocab=256)
    port = free_port()
    command = generate_command("mi300x", None, "enabled", "enabled")
    args = drop(for_test(command, str(model), port, str(draft)), "--tp")
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = launch(args + ["--max-total-tokens", "4096"], stdout=None, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert proc.poll() is None, log.read_text()
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        reply = client.chat.completions.create(
            model=str(model),
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=12,
            temperature=0,
        )
        assert reply.usage.completion_tokens == 12
        gen = httpx.post(
            base + "/generate",
            json={"text": "Hello", "sampling_params": {"max_new_tokens": 10, "temperature": 0}},
            timeout=60,
        ).json()
        meta = gen["meta_info"]
        assert meta["completion_tokens"] == 10 and meta["spec_verify_ct"] >= 1
        assert meta["spec_accept_length"] == pytest.approx(10 / meta["spec_verify_ct"])
        info = httpx.get(base + "/get_server_info", timeout=10).json()
        assert info["avg_spec_accept_length"] >= 1.0
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert "pyllama4_spec_accept_length" in metrics
        assert "pyllama4_spec_verify_steps_total" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "speculative decoding: EAGLE3, 3 steps, topk 1, 4 draft tokens" in text
    assert proc.returncode == 0, text


def test_tp2_serves_and_a_dead_worker_stops_the_server(tiny, tmp_path):
    """--tp 2 on the CPU (gloo): the server answers the openai client (greedy text equal to
    --tp 1's), logs its per-rank memory plan; killing the worker process makes /health fail
    (503, or no answer) and the server exit non-zero within seconds, naming the worker."""
    import httpx
    import openai
    import psutil

    answers = {}
    for tp in (1, 2):
        port = free_port()
        log = tmp_path / f"tp{tp}.log"
        args = ["--model-path", tiny, "--host", "127.0.0.1", "--port", str(port), "--tp", str(tp)]
        with log.open("w") as out:
            proc = launch(args + ["--max-total-tokens", "2048"], stdout=None, stderr=out)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            assert proc.poll() is None, log.read_text()
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            reply = client.completions.create(
                model=tiny, prompt="Hello, world", max_tokens=8, temperature=0
            )
            answers[tp] = reply.choices[0].text
            if tp == 1:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
                continue
            cut: dict[str, object] = {}
            running = threading.Thread(target=_long_completion, args=(base, tiny, cut))
            running.start()
            while time.monotonic() < deadline and not httpx.get(base + "/metrics").text.count(
                "pyllama4_num_running_reqs 1.0"
            ):
                time.sleep(0.05)
            workers = psutil.Process(proc.pid).children(recursive=True)
            worker = next(p for p in workers if "spawn_main" in " ".join(p.cmdline()))
            worker.kill()
            killed = time.monotonic()
            health = 200
            while time.monotonic() - killed < 60 and health == 200:
                try:
                    health = httpx.get(base + "/health", timeout=1).status_code
                except httpx.HTTPError:
                    health = None
                time.sleep(0.1)
            assert health != 200
            assert proc.wait(timeout=60) != 0  # within seconds; 60 s for a loaded machine
            running.join(timeout=60)
            # The request running on the dead worker ends with a 503 naming the worker and no
            # internals (or, if the server exited first, with its connection dropped).
            reply = cut["reply"]
            if isinstance(reply, httpx.Response):
                assert reply.status_code == 503, reply.text
                message = reply.json()["error"]["message"]
                assert "pyllama4-tp1" in message and ".py" not in message, message
            else:
                assert isinstance(reply, httpx.TransportError), reply
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert answers[1] == answers[2]
    text = (tmp_path / "tp2.log").read_text()
    assert "tensor-parallel worker pyllama4-tp1" in text and "exits" in text
    assert "memory plan" in text


def _long_completion(base: str, model: str, out: dict[str, object]) -> None:
    import httpx

    body = {"model": model, "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True}
    try:
        out["reply"] = httpx.post(base + "/v1/completions", json=body, timeout=120)
    except httpx.TransportError as e:
        out["reply"] = e


def test_two_nodes_serve_one_model(tiny, tmp_path):
    """--nnodes 2 on one machine: node 0 (rank 0, HTTP) and node 1 (rank 1 only) meet at
    --dist-init-addr; the server answers; stopping node 0 stops node 1's rank, which exits 0."""
    import httpx

    port, store = free_port(), free_port()
    common = ["--model-path", tiny, "--tp", "2", "--nnodes", "2"]
    common += ["--dist-init-addr", f"127.0.0.1:{store}", "--max-total-tokens", "2048"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    with logs[1].open("w") as out:
        node1 = launch(common + ["--node-rank", "1"], stdout=None, stderr=out)
    with logs[0].open("w") as out:
        node0 = launch(
            common + ["--node-rank", "0", "--host", "127.0.0.1", "--port", str(port)],
            stdout=None,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and node0.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert node0.poll() is None, logs[0].read_text() + logs[1].read_text()
        body = {"model": tiny, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        node0.send_signal(signal.SIGTERM)
        assert node0.wait(timeout=60) == 0
        assert node1.wait(timeout=120) == 0, logs[1].read_text()
    finally:
        for proc in (node0, node1):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "node 1: running ranks 1..1" in logs[1].read_text()
