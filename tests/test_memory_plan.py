"""GPU memory planning (pyllama4.memory) on the CPU, with a Meter the test drives.

The warm-up runs for real (a tiny random Llama 4 on the CPU): one prefill of the largest step,
the sampler over the most running rows, the trial graph capture; the Meter reports what a GPU
would (a scripted ledger), so the plan's arithmetic and its order of measurements are checked.
What CudaMeter reads on a real GPU is tests/gpu's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4ForCausalLM as HFLlama4
from transformers import Llama4TextConfig

from pyllama4 import memory
from pyllama4.config import TextConfig
from pyllama4.memory import MemoryReport, measure
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner
from tiny_models import TINY_TEXT

GIB, MIB = 2**30, 2**20


@pytest.fixture(scope="module")
def model() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        **TINY_TEXT, vocab_size=256, attention_chunk_size=16, max_position_embeddings=1024
    )
    ours = Llama4ForCausalLM(TextConfig.from_dict(cfg.to_dict()))
    ours.load_state_dict(HFLlama4(cfg).state_dict(), strict=False)
    return ours.eval()


class LedgerMeter:
    """10 GiB in all, 4 GiB in use; the warm-up's peak is 3 MiB above what was allocated;
    each graph capture adds 5 MiB in use. Records the order of the calls."""

    def __init__(self) -> None:
        self.in_use = 4 * GIB
        self.calls: list[str] = []

    def total(self) -> int:
        return 10 * GIB

    def used(self) -> int:
        self.calls.append("used")
        return self.in_use

    def allocated(self) -> int:
        self.calls.append("allocated")
        return 100 * MIB

    def reset_peak(self) -> None:
        self.calls.append("reset_peak")

    def peak(self) -> int:
        self.calls.append("peak")
        return 103 * MIB


def test_the_plan_measures_after_a_warm_up_of_the_largest_step(model, monkeypatch):
    meter = LedgerMeter()
    built: list[ModelRunner] = []
    schedulers: list = []  # the warm-up's
    sampled: list[int] = []

    class RecordingSampler(memory.Sampler):
        def __call__(self, logits, requests):
            sampled.append(len(requests))
            assert all(r.params.top_p < 1 and r.params.top_k > 0 for r in requests)
            return super().__call__(logits, requests)

    monkeypatch.setattr(memory, "Sampler", RecordingSampler)

    def build(kv_tokens: int) -> ModelRunner:
        r = ModelRunner(
            model, context_len=512, kv_tokens=kv_tokens, page_size=8, max_step_tokens=48
        )

        def capture(max_bs: int) -> None:
            meter.calls.append(f"capture {max_bs}")
            meter.in_use += 5 * MIB

        def new_scheduler(**options):
            schedulers.append(ModelRunner.new_scheduler(r, **options))
            return schedulers[-1]

        r.capture_graphs = capture
        r.new_scheduler = new_scheduler
        built.append(r)
        return r

    report = measure(build, meter, fraction=0.9, step_tokens=48, rows=12, graph_max_bs=8)
    (runner,) = built
    (sched,) = schedulers
    stats = sched.stats()
    assert stats.prompt_tokens == 48  # one prefill of the largest step
    assert not sched.has_work() and stats.global_free == stats.global_total
    assert sampled == [12]  # the sampler over the most running rows
    # In use measured before the trial runner; the peak around the warm-up only; the graphs'
    # memory as the difference around their capture.
    assert meter.calls[:3] == ["used", "allocated", "reset_peak"]
    assert meter.calls.index("peak") < meter.calls.index("capture 8")
    assert report == MemoryReport(10 * GIB, 0.9, 4 * GIB, 3 * MIB, 5 * MIB)
    assert report.kv_bytes == int(10 * GIB * 0.9) - 4 * GIB - 8 * MIB
    text = report.describe()
    assert "KV cache 4.99 GiB" in text and "activations 0.00 GiB" in text
    report.check()  # room left: no error


def test_no_room_for_the_kv_cache_names_the_flag():
    report = MemoryReport(80 * GIB, 0.3, 24 * GIB, 1 * GIB, 0)
    assert report.kv_bytes < 0
    with pytest.raises(ValueError, match=r"--mem-fraction-static 0.3 leaves no memory"):
        report.check()
