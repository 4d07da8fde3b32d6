"""load_model: a saved transformers checkpoint becomes our model, whatever its config key style."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Llama4ForCausalLM as HFLlama4
from transformers import Llama4TextConfig

from helpers import greedy_generate
from pyllama4.config import TextConfig
from pyllama4.loading.load import load_model
from pyllama4.runner import ModelRunner
from tiny_models import TINY_TEXT

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        **TINY_TEXT,
        vocab_size=256,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
        floor_scale=8,
        max_position_embeddings=1024,
        rope_parameters={**LLAMA3, "rope_theta": 500000.0},
    )
    hf = HFLlama4(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ckpt5x")
    hf.save_pretrained(path)
    return hf, path


def test_4x_and_5x_config_keys_load_identical_models(saved, tmp_path):
    hf, path5 = saved
    config = json.loads((path5 / "config.json").read_text())
    assert "rope_parameters" in config and "rope_theta" not in config  # 5.x wrote it
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    config["attn_temperature_tuning"] = 4  # as older copies of the real configs say
    for f in path5.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))

    m5 = load_model(path5, dtype=torch.float32, progress=False)
    m4 = load_model(tmp_path, dtype=torch.float32, progress=False)
    assert m4.config == m5.config == TextConfig.from_dict(hf.config.to_dict())
    assert torch.equal(m4.inv_freq, m5.inv_freq)
    s4, s5, ref = m4.state_dict(), m5.state_dict(), hf.state_dict()
    assert s4.keys() == s5.keys() == ref.keys()
    assert all(torch.equal(s4[k], s5[k]) and torch.equal(s5[k], ref[k]) for k in ref)


def test_loaded_model_generates_like_transformers(saved):
    hf, path = saved
    model = load_model(path, dtype=torch.float32, progress=False)
    runner = ModelRunner(model, kv_tokens=512, context_len=64, page_size=4, max_step_tokens=12)
    prompt = list(range(5, 24))
    (ours,) = greedy_generate(runner, [prompt], max_new_tokens=10)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )
    assert ours == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_model_casts_to_the_requested_dtype(saved, dtype):
    _, path = saved
    model = load_model(path, dtype=dtype, progress=False)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.inv_freq.dtype == torch.float32


def test_runner_returns_hidden_states_of_every_token(saved):
    _, path = saved
    model = load_model(path, dtype=torch.float32, progress=False)
    runner = ModelRunner(model, kv_tokens=512, context_len=64, page_size=4)
    sched = runner.new_scheduler()
    sched.add_request(1, np.arange(5, 17, dtype=np.int32), max_new_tokens=2)
    plan = sched.schedule()
    logits, hidden = runner.forward_with_hidden(plan)
    assert hidden.shape == (12, model.config.hidden_size)
    assert torch.allclose(logits, model.logits(hidden[-1:]))
