"""Decode-step time of a tiny Llama 4 on the CPU: fp32 and bf16, with and without the CPU matmul
paths (pyllama4.layers.cpu_linear's packed bf16 weights; the MoE's expert-by-expert loop).

For each dtype and batch it builds engines in three variants (same checkpoint, same requests):
- `grouped`: the routed experts always in torch._grouped_mm, weights unpacked (the earlier path);
- `loop`: the CPU's choice (ffn.CPU_EXPERT_LOOP): one by one with fewer routed rows than experts,
  else grouped; weights unpacked;
- `packed`: the default: bf16 linears and experts on oneDNN-packed weights, packed experts one by
  one (the same as `loop` in fp32 or on a CPU without native bf16).
A step is runner.forward(plan) + argmax + scheduler commit on the main thread, one torch thread,
every request decoding (128-token prompts). The variants are timed interleaved, round after
round; each figure is the median (and the minimum) over rounds of the mean ms per step in a round.

A second table times one MoE block alone (hidden 256, intermediate 512, top-1, 4 and 16 experts,
random weights), the same variants interleaved: the routed experts' share of a step without the
attention's.

Run: python bench/cpu_arith.py [checkpoint] [--batch 1,16,64] [--rounds 7] [--steps 20]
(no checkpoint: a random tiny one of the same shape as the tests' is written to a temp dir).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

from pyllama4 import Engine
from pyllama4.layers import cpu_linear, ffn

VARIANTS = ("grouped", "loop", "packed")
TINY = dict(  # the shape of /tmp/tiny-llama4
    hidden_size=256,
    intermediate_size=512,
    intermediate_size_mlp=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=4,
    num_experts_per_tok=1,
    vocab_size=4096,
    interleave_moe_layer_step=1,
    max_position_embeddings=4096,
)


def tiny_checkpoint(directory: Path) -> Path:
    """A random bf16 Llama 4 text checkpoint of TINY's shape, saved by transformers."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(**TINY, initializer_range=0.1))
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The CPU paths of `name` switched on while an engine is built and run."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ffn, "CPU_EXPERT_LOOP", name != "grouped"))
        if name != "packed":
            stack.enter_context(mock.patch("pyllama4.loading.load.prepare_cpu", lambda m: 0))
        yield


class Setup:
    """One engine with `batch` requests all decoding, in one dtype and variant."""

    def __init__(self, checkpoint: Path, dtype: str, name: str, batch: int):
        self.name, self.dtype, self.batch = name, dtype, batch
        with variant(name):
            self.engine = Engine.from_checkpoint(
                checkpoint, dtype=dtype, context_len=2048, kv_tokens=batch * 2048, progress=False
            )
        self.runner, self.scheduler = self.engine.runner, self.engine.scheduler
        rng = random.Random(0)
        for i in range(batch):
            prompt = [rng.randrange(10, 1000) for _ in range(128)]
            self.scheduler.add_request(
                i + 1, prompt, max_new_tokens=100_000, stop_token_ids=[], reserve=0
            )
        with variant(name), torch.inference_mode():
            while self.step().num_decodes != batch:
                pass

    def step(self):  # noqa: ANN201 (the core's StepPlan)
        plan = self.scheduler.schedule()
        logits = self.runner.forward(plan)
        self.scheduler.commit(logits.argmax(-1).to(torch.int32).numpy())
        return plan

    def time_steps(self, steps: int) -> float:
        """Mean ms per step over `steps` steps."""
        with variant(self.name), torch.inference_mode():
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            return (time.perf_counter() - start) / steps * 1e3


def moe_block(dtype: torch.dtype, experts: int, packed: bool) -> ffn.MoE:
    torch.manual_seed(0)
    moe = ffn.MoE(256, 512, experts, 1)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    moe = moe.to(dtype).eval()
    if packed:
        cpu_linear.prepare_cpu(moe)
    return moe


def moe_table(dtypes: list[str], batches: list[int], names: list[str], rounds: int) -> None:
    """Median us per MoE block call, variants interleaved."""
    print("\nMoE block alone (hidden 256, intermediate 512, top-1), us per call")
    print("| dtype | experts | batch | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for dtype in dtypes:
        for experts in (4, 16):
            blocks = {n: moe_block(getattr(torch, dtype), experts, n == "packed") for n in names}
            for batch in batches:
                x = torch.randn(batch, 256, dtype=getattr(torch, dtype))
                times: dict[str, list[float]] = {n: [] for n in names}
                with torch.inference_mode():
                    for _ in range(rounds + 1):  # the first round warms up
                        for name in names:
                            with variant(name):
                                start = time.perf_counter()
                                for _ in range(30):
                                    blocks[name](x)
                                times[name].append((time.perf_counter() - start) / 30 * 1e6)
                row = " | ".join(f"{statistics.median(times[n][1:]):.0f}" for n in names)
                print(f"| {dtype} | {experts} | {batch} | {row} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=None)
    parser.add_argument("--batch", default="1,16,64")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(tmp))
        setups = [
            Setup(checkpoint, dtype, name, int(batch))
            for batch in args.batch.split(",")
            for dtype in args.dtypes.split(",")
            for name in args.variants.split(",")
        ]
        times: dict[int, list[float]] = {id(s): [] for s in setups}
        for s in setups:
            s.time_steps(3)  # warm-up
        for _ in range(args.rounds):
            for s in setups:
                times[id(s)].append(s.time_steps(args.steps))
    dtype_auto = cpu_linear.cpu_auto_dtype()
    print(f"checkpoint: {args.checkpoint or 'random tiny (temp dir)'}; torch {torch.__version__}")
    print(f"native bf16: {cpu_linear.fast_bf16_flag()}; auto dtype: {dtype_auto[1]}")
    print(f"median of {args.rounds} interleaved rounds of {args.steps} decode steps, ms/step")
    print("| dtype | batch | " + " | ".join(args.variants.split(",")) + " |")
    print("|---|---|" + "---|" * len(args.variants.split(",")))
    for batch in args.batch.split(","):
        for dtype in args.dtypes.split(","):
            row = [
                f"{statistics.median(times[id(s)]):.2f} (min {min(times[id(s)]):.2f})"
                for s in setups
                if s.batch == int(batch) and s.dtype == dtype
            ]
            print(f"| {dtype} | {batch} | " + " | ".join(row) + " |")
    for s in setups:
        s.engine.close()
    batches = [int(b) for b in args.batch.split(",")]
    moe_table(args.dtypes.split(","), batches, args.variants.split(","), args.rounds)


if __name__ == "__main__":
    main()
