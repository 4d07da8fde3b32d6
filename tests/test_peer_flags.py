"""SGLang's and vLLM's command lines: a vLLM-style and an SGLang-style command line for the same
model parse to the same settings; the peers' flags pyllama4 does not implement are refused in one
line naming them (unknown ones too); the accepted-without-effect ones are logged with why; the
settings beyond pyllama4's own table (seed, tokenizer, KV dtype, attention backend, dp / ep,
prefill budget) behave as in SGLang; README's table is the parser's."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import httpx
import pytest

from pyllama4.server import checks, compat_flags, peer_flags
from pyllama4.server import flags as cli_flags
from pyllama4.server import launch as server_launch
from pyllama4.server.peer_flag_names import SGLANG_FLAGS, VLLM_FLAGS
from tiny_models import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def settings(argv: list[str]) -> dict:
    args = cli_flags.parse_args(argv)
    return {k: v for k, v in vars(args).items() if k != "given"}


def test_a_vllm_and_an_sglang_command_line_give_the_same_settings(tiny):
    sglang = (
        f"--model-path {tiny} --tp 2 --context-length 64 --mem-fraction-static 0.8 "
        "--max-running-requests 8 --chunked-prefill-size 256 --disable-radix-cache "
        f"--disable-cuda-graph --random-seed 3 --tokenizer-path {tiny} --trust-remote-code "
        "--served-model-name m --page-size 16 --dtype float32 --max-images-per-request 4 "
        "--sampling-defaults openai --log-level-http warning --dp-size 1"
    ).split()
    vllm = (
        f"{tiny} -tp 2 --max-model-len 64 --gpu-memory-utilization 0.8 --max-num-seqs 8 "
        "--max-num-batched-tokens 256 --no-enable-prefix-caching --enforce-eager --seed 3 "
        f"--tokenizer {tiny} --trust-remote-code --served-model-name m --block-size 16 "
        '--dtype float32 --limit-mm-per-prompt {"image":4} --generation-config vllm '
        "--uvicorn-log-level warning --data-parallel-size 1"
    ).split()
    a, b = settings(sglang), settings(vllm)
    assert a.pop("sampling_defaults") == "openai" and b.pop("generation_config") == "vllm"
    assert a.pop("generation_config") is None and b.pop("sampling_defaults") == "model"
    assert a == b
    args_a, args_b = cli_flags.parse_args(sglang), cli_flags.parse_args(vllm)
    assert server_launch.engine_config(args_a, Path(tiny)) == server_launch.engine_config(
        args_b, Path(tiny)
    )
    assert args_b.given[:3] == ["model_path", "tp", "context_length"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--no-such-flag"], "unknown flag --no-such-flag; see pyllama4-serve --help"),
        (["--pp-size", "2"], "--pp-size: pipeline parallelism is not built; use --tp"),
        (["-pp", "2"], "-pp: pipeline parallelism is not built"),
        (["--enable-lora"], "--enable-lora: LoRA adapters are not supported"),
        (["--enable-dp-attention"], "--enable-dp-attention: data-parallel attention is not"),
        (["--tool-server", "demo"], "--tool-server: tool servers are not supported"),
        (
            ["--max-num-partial-prefills", "2"],
            "--max-num-partial-prefills: a flag of vLLM that pyllama4 does not implement",
        ),
        (
            ["--hicache-ratio=2"],
            "--hicache-ratio: a flag of SGLang that pyllama4 does not implement",
        ),
        (
            ["--port", "8000", "--kv-transfer-config", "{}"],
            "--kv-transfer-config: a flag of vLLM that pyllama4 does not implement",
        ),
        (
            ["--cpu-offload-gb", "4"],
            "--cpu-offload-gb: offloading weights to the CPU is not built",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_flags_pyllama4_lacks_are_refused_in_one_line_naming_them(argv, line, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_flags.parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"pyllama4-serve: error: {line}"), err


def test_a_flags_value_is_not_taken_for_a_flag():
    """A flag's values (after =, or a list) are skipped as argparse takes them."""
    args = cli_flags.parse_args(["--api-key=-secret", "--allowed-media-domains", "a", "b"])
    assert args.api_key == "-secret" and args.allowed_media_domains == ["a", "b"]


def test_the_tables_name_real_peer_flags_that_the_parser_lacks_or_takes():
    parser = cli_flags.build_parser()
    known = parser._option_string_actions
    for alias in peer_flags.ALIASES:
        names = set()
        if "SGLang" in alias.peer:
            names |= SGLANG_FLAGS
        if "vLLM" in alias.peer:
            names |= VLLM_FLAGS
        assert alias.flag in names and alias.ours in known, alias
    for flag in peer_flags.IGNORED:
        assert flag.flag in SGLANG_FLAGS | VLLM_FLAGS and flag.flag in known, flag
    for flag in peer_flags.REFUSED:
        assert flag in SGLANG_FLAGS | VLLM_FLAGS and flag not in known, flag


def test_accepted_flags_without_effect_are_each_logged_with_why(tiny, caplog):
    argv = [
        "--model-path",
        tiny,
        "--enable-metrics",
        "--skip-server-warmup",
        "--enable-torch-compile",
        "--disable-custom-all-reduce",
        "--watchdog-timeout",
        "600",
        "--stream-interval",
        "4",
        "--reasoning-parser",
        "deepseek-r1",
        "--enable-auto-tool-choice",
        "--cuda-graph-bs",
        "1",
        "2",
        "4",
        "--attention-backend",
        "aiter",
    ]
    with caplog.at_level(logging.INFO, logger="pyllama4.serve"):
        checks.check_supported(cli_flags.parse_args(argv))
    for flag in [a for a in argv if a.startswith("--") and a != "--model-path"]:
        assert re.search(rf"{flag}( \S+)?: accepted, no effect: \w", caplog.text), flag
    assert "--enable-metrics: accepted, no effect: metrics are always on" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3: an FP8 KV cache is not"),
        (["--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype fp8_e5m2: an FP8 KV cache is not"),
        (["--kv-cache-dtype", "nvfp4"], "--kv-cache-dtype nvfp4: an FP4 KV cache is not"),
        (
            ["--dtype", "float32", "--kv-cache-dtype", "bf16"],
            "--kv-cache-dtype bf16: the KV cache is stored in the model's dtype (--dtype float32)",
        ),
        (["--attention-backend", "flashmla"], "--attention-backend flashmla: not an attention"),
        (
            ["--dp", "2", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:5000"],
            "--dp-size 2: replicas run on one machine",
        ),
        (["--tp", "2", "--ep-size", "4"], "--ep-size 4: expert parallelism is not built"),
        (["--tokenizer-path", "./no/such/dir"], "--tokenizer-path ./no/such/dir: no such"),
        (
            ["--sampling-defaults", "openai", "--generation-config", "auto"],
            "--generation-config auto: contradicts --sampling-defaults openai",
        ),
    ],
)
def test_peer_settings_pyllama4_cannot_honour_stop_in_one_line(argv, message, tiny):
    with pytest.raises(SystemExit) as stop:
        checks.check_supported(cli_flags.parse_args(["--model-path", tiny, *argv]))
    assert str(stop.value.code).startswith(f"pyllama4-serve: {message}")
    assert "\n" not in str(stop.value.code)


@pytest.mark.parametrize(
    "argv",
    [
        ["--kv-cache-dtype", "auto"],
        ["--kv-cache-dtype", "bfloat16", "--dtype", "bfloat16"],
        ["--attention-backend", "triton", "--decode-attention-backend", "fa3"],
        ["--dp-size", "1"],
        ["--tp", "2", "--ep-size", "2"],
        ["--tp", "2", "--ep", "1"],
        ["--tp", "2", "--enable-expert-parallel"],
        ["--chat-template", "llama-4"],
        ["--generation-config", "vllm", "--sampling-defaults", "openai"],
    ],
)
def test_peer_settings_pyllama4_honours_start(argv, tiny):
    checks.check_supported(cli_flags.parse_args(["--model-path", tiny, *argv]))


def test_model_positional_and_model_path_must_agree(tiny, capsys):
    assert cli_flags.parse_args([tiny, "--model-path", tiny]).model_path == tiny
    with pytest.raises(SystemExit):
        cli_flags.parse_args([tiny, "--model-path", "/elsewhere"])
    assert "give one of them" in capsys.readouterr().err


def test_enable_expert_parallel_is_ep_equal_to_tp():
    assert cli_flags.parse_args(["--tp", "4", "--enable-expert-parallel"]).ep_size == 4


def test_max_prefill_tokens_lowers_the_step_budget_only_below_the_chunk_size(tiny):
    from pyllama4.runner import MAX_STEP_TOKENS

    assert compat_flags.DEFAULT_STEP_TOKENS == MAX_STEP_TOKENS

    def budget(*argv: str) -> int:
        args = cli_flags.parse_args(["--model-path", tiny, "--dtype", "float32", *argv])
        return server_launch.engine_config(args, Path(tiny)).max_step_tokens

    assert budget() == MAX_STEP_TOKENS
    assert budget("--max-prefill-tokens", "16384") == MAX_STEP_TOKENS
    assert budget("--max-prefill-tokens", "2048") == 2048
    assert budget("--chunked-prefill-size", "1024", "--max-prefill-tokens", "4096") == 1024
    assert budget("--chunked-prefill-size", "4096", "--max-prefill-tokens", "1024") == 1024


def test_random_seed_seeds_torchs_default_generator():
    import torch

    args = cli_flags.parse_args(["--random-seed", "1234"])
    compat_flags.configure(args)
    first = torch.rand(4)
    compat_flags.configure(args)
    assert torch.equal(first, torch.rand(4))


def test_log_level_http_sets_the_http_servers_loggers():
    logger = logging.getLogger("hypercorn")
    before = logger.level
    try:
        compat_flags.configure(cli_flags.parse_args(["--uvicorn-log-level", "warning"]))
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)


def test_llama_4_is_sglangs_name_for_the_llama4_template():
    from pyllama4.chat_templates import builtin_template

    assert builtin_template("llama-4") == builtin_template("llama4_pythonic") is not None


@pytest.mark.parametrize(
    ("text", "images"), [('{"image": 4}', 4), ("image=2", 2), ('{"image": 3, "video": 0}', 3)]
)
def test_limit_mm_per_prompt_is_max_images_per_request(text, images):
    args = cli_flags.parse_args(["--limit-mm-per-prompt", text])
    assert args.max_images_per_request == images


def test_limit_mm_per_prompt_refuses_other_modalities(capsys):
    with pytest.raises(SystemExit):
        cli_flags.parse_args(["--limit-mm-per-prompt", '{"image": 1, "video": 2}'])
    assert "Llama 4 takes images only" in capsys.readouterr().err


def test_readmes_table_is_the_parsers():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert peer_flags.markdown(cli_flags.build_parser()) in readme


def test_a_vllm_style_command_line_serves(launch_server, demo_dir, tmp_path):
    """A server started with vLLM's flags: the positional model, --max-model-len,
    --tokenizer, --seed, --max-num-seqs, --enable-auto-tool-choice (LiveServer adds
    --model-path; the positional MODEL must agree with it)."""
    log = tmp_path / "server.log"
    vllm = [str(demo_dir), "--max-model-len", "512", "--tokenizer", str(demo_dir)]
    vllm += ["--seed", "0", "--max-num-seqs", "4", "--enable-auto-tool-choice", "--enforce-eager"]
    server = launch_server(log, *vllm)
    models = httpx.get(server.base + "/v1/models", timeout=30).json()
    assert models["data"][0]["max_model_len"] == 512
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    server.stop()
    text = log.read_text()
    assert "--enable-auto-tool-choice: accepted, no effect: tool calling is always on" in text
    assert "--random-seed 0: torch's generators seeded" in text


def test_namespaces_not_made_by_parse_args_check_the_peer_settings(tiny):
    args = cli_flags.parse_args(["--model-path", tiny, "--kv-cache-dtype", "fp8_e4m3"])
    del args.given
    assert isinstance(args, argparse.Namespace)
    with pytest.raises(SystemExit, match="an FP8 KV cache is not built yet"):
        checks.check_supported(args)
