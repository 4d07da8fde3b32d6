"""Sampling defaults: a request field left unset takes the checkpoint's generation_config.json
value (--sampling-defaults model, the default, as SGLang) or OpenAI's (--sampling-defaults openai,
vLLM's --generation-config vllm); a field the request sets is never changed. Unit tests of the
merge, then live servers on a copy of the demo model whose generation_config.json says
temperature 0.6, top_p 0.9 (Llama 4's own values)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from pyllama4.server import protocol as p
from pyllama4.server.sampling import native_params, openai_params
from pyllama4.server.sampling_defaults import (
    SamplingDefaults,
    read_generation_config,
    resolve,
)

LLAMA4_GENERATION = {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.9}


def _write(directory: Path, config: dict) -> Path:
    (directory / "generation_config.json").write_text(json.dumps(config))
    return directory


def test_reads_the_sampling_fields_generation_config_holds(tmp_path):
    _write(tmp_path, {**LLAMA4_GENERATION, "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.1})
    defaults, warnings = read_generation_config(tmp_path)
    assert warnings == []
    assert (defaults.temperature, defaults.top_p, defaults.min_p) == (0.6, 0.9, 0.05)
    assert defaults.top_k == -1  # transformers' 0: no top-k
    assert defaults.repetition_penalty == 1.1
    assert defaults.describe() == (
        "sampling defaults from generation_config.json: temperature=0.6 top_p=0.9 top_k=-1 "
        "min_p=0.05 repetition_penalty=1.1"
    )


def test_fields_it_lacks_keep_openais_and_bad_values_are_skipped_with_a_warning(tmp_path):
    _write(tmp_path, {"temperature": 7, "top_p": 0.5, "top_k": "many"})
    defaults, warnings = read_generation_config(tmp_path)
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (1.0, 0.5, -1)
    assert defaults.from_file == ("top_p",)
    assert len(warnings) == 2 and "temperature=7" in warnings[0] and "top_k='many'" in warnings[1]


def test_no_or_unreadable_generation_config_gives_openais(tmp_path):
    defaults, warnings = read_generation_config(tmp_path)
    assert defaults == SamplingDefaults(source=f"no generation_config.json in {tmp_path}")
    assert warnings == []
    (tmp_path / "generation_config.json").write_text("{not json")
    defaults, warnings = read_generation_config(tmp_path)
    assert defaults.temperature == 1.0 and len(warnings) == 1


def test_modes_and_vllms_generation_config(tmp_path, caplog):
    model = tmp_path / "model"
    model.mkdir()
    _write(model, LLAMA4_GENERATION)
    other = tmp_path / "other"
    other.mkdir()
    _write(other, {"temperature": 0.3})
    with caplog.at_level(logging.INFO, logger="pyllama4.serve"):
        assert resolve("model", model, None).temperature == 0.6
    assert "sampling defaults from generation_config.json: temperature=0.6 top_p=0.9" in caplog.text
    assert resolve("model", model, "auto").top_p == 0.9
    assert resolve("openai", model, None) == SamplingDefaults(source="--sampling-defaults openai")
    assert resolve("model", model, "vllm").temperature == 1.0
    assert resolve("model", model, str(other)).temperature == 0.3


def _chat(**fields) -> p.ChatCompletionRequest:
    return p.ChatCompletionRequest(model="m", messages=[], **fields)


def test_unset_fields_take_the_defaults_and_set_ones_are_kept():
    defaults = SamplingDefaults(0.6, 0.9, 20, 0.05, 1.1)
    kw = {"prompt_len": 3, "context_length": 64, "logprobs": None, "grammar": None}
    params = openai_params(_chat(), defaults=defaults, **kw)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 20)
    assert (params.min_p, params.repetition_penalty) == (0.05, 1.1)
    fields = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0}
    params = openai_params(_chat(**fields, repetition_penalty=1.0), defaults=defaults, **kw)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, -1)
    assert (params.min_p, params.repetition_penalty) == (0.0, 1.0)
    params = openai_params(_chat(temperature=0.0), defaults=defaults, **kw)
    assert params.temperature == 0.0  # greedy stays greedy
    native = native_params(
        p.NativeSamplingParams(top_k=5),
        prompt_len=3,
        prompt_field="text",
        context_length=64,
        grammar=None,
        defaults=defaults,
    )
    assert (native.temperature, native.top_p, native.top_k) == (0.6, 0.9, 5)
    plain = openai_params(_chat(), **kw)  # no defaults given: OpenAI's
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (
        1.0,
        1.0,
        -1,
        1.0,
    )


# ---- live servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama4_style_demo(demo_dir, tmp_path_factory) -> Path:
    """The demo checkpoint with Llama 4's generation_config.json sampling values."""
    out = tmp_path_factory.mktemp("demo-gen")
    for f in demo_dir.iterdir():
        if f.name != "generation_config.json":
            (out / f.name).symlink_to(f)
    return _write(
        out, {**json.loads((demo_dir / "generation_config.json").read_text()), **LLAMA4_GENERATION}
    )


PROMPT = "Once upon a time, in a land far away,"


def _complete(base: str, **fields) -> list[str]:
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 24, "seed": 7, "n": 3, **fields}
    r = httpx.post(base + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def _generate(base: str, **fields) -> str:
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 24, "seed": 7, **fields}}
    r = httpx.post(base + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_generation_config_defaults_apply_to_requests_that_omit_them(
    launch_server, llama4_style_demo, tmp_path
):
    log = tmp_path / "model.log"
    server = launch_server(log, model_dir=llama4_style_demo)
    omitted = _complete(server.base)
    assert omitted == _complete(server.base, temperature=0.6, top_p=0.9)
    assert omitted == _complete(server.base, temperature=0.6)  # top_p 0.9 from the file
    at_one = _complete(server.base, temperature=1.0, top_p=1.0)
    assert omitted != at_one
    chat = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}], "seed": 7}
    chat |= {"max_tokens": 24, "n": 3}
    r1 = httpx.post(server.base + "/v1/chat/completions", json=chat, timeout=300).json()
    r2 = httpx.post(
        server.base + "/v1/chat/completions", json=chat | {"temperature": 0.6}, timeout=300
    ).json()
    assert [c["message"] for c in r1["choices"]] == [c["message"] for c in r2["choices"]]
    server.stop()
    assert "sampling defaults from generation_config.json: temperature=0.6 top_p=0.9" in (
        log.read_text()
    )

    openai = launch_server(
        tmp_path / "openai.log", "--sampling-defaults", "openai", model_dir=llama4_style_demo
    )
    assert _complete(openai.base) == at_one
    openai.stop()


def test_generate_takes_the_defaults_too(launch_server, llama4_style_demo, tmp_path):
    """/generate's sampling_params left unset: the file's values; vLLM's --generation-config
    vllm: OpenAI's."""
    server = launch_server(tmp_path / "model.log", model_dir=llama4_style_demo)
    omitted = _generate(server.base)
    assert omitted == _generate(server.base, temperature=0.6, top_p=0.9)
    at_one = _generate(server.base, temperature=1.0, top_p=1.0)
    server.stop()
    vllm = launch_server(
        tmp_path / "vllm.log", "--generation-config", "vllm", model_dir=llama4_style_demo
    )
    assert _generate(vllm.base) == at_one
    vllm.stop()
