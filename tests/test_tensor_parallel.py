"""Tensor parallelism on CPU (gloo): a model split over 2 or 4 ranks computes what one process does.

The `world` fixture runs 4 processes (this file as a script, `rank_main`) in one gloo world
(file:// rendezvous) through STEPS: each job loads only its ranks' slices of a tiny random
checkpoint saved by transformers (load_model(tp=...), float32) in a process group of its own (the
whole world for tp 4, a new_group for tp 2), builds a ModelRunner (its own KV heads), and records
the greedy tokens of chunked prefills plus decodes, the last-token logits of a one-step prefill,
its KV cache's shape, its parameter count and its peak RSS while loading. The tests compare every
rank with this process running the unsplit model: greedy tokens identical, logits within FP32_TOL
(fp32; the ranks sum the same partial products in another order), parameter counts exactly
`expected_numel`. Scout-like (MoE every layer, chunked attention, QK-norm, llama3 RoPE) at tp 2
and tp 4 (4 query heads over 2 KV heads: tp 4 replicates each KV head on two ranks);
Maverick-like (dense and MoE interleaved, no QK-norm, 8 experts, top-1) at tp 2; a wider model
(~60 MiB) for the loading memory. Loading is also checked in-process (it needs no collectives):
every rank's parameters are exactly its slices of the full model's, from fused and per-expert
checkpoint layouts alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyllama4
from helpers import greedy_generate
from pyllama4.config import TextConfig
from pyllama4.distributed import (
    SINGLE,
    TensorParallel,
    attention_heads,
    init_tensor_parallel,
)
from pyllama4.distributed.parallel import Shard
from pyllama4.loading import weight_copy
from pyllama4.loading.checkpoint import CheckpointError
from pyllama4.loading.load import load_model
from pyllama4.loading.weights import load_weights
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner
from tiny_models import LLAMA3_ROPE, TINY_TEXT, last_token_logits

FP32_TOL = 1e-4
VOCAB = 512  # divisible by 4
# Across several attention chunks (8) and temperature-tuning boundaries (floor_scale 8).
PROMPTS = [
    torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (19, 11, 26)
]
NEW_TOKENS = 6
WORLD_TIMEOUT = 300.0
TESTS = Path(__file__).resolve().parent


# ---- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(path: Path, kind: str, **overrides) -> Path:
    """A random Scout-like or Maverick-like Llama4ForCausalLM saved by transformers (fp32)."""
    from transformers import Llama4ForCausalLM as HFLlama4
    from transformers import Llama4TextConfig

    common = dict(
        TINY_TEXT,
        vocab_size=VOCAB,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "scout":
        layout = dict(interleave_moe_layer_step=1, use_qk_norm=True, rope_parameters=LLAMA3_ROPE)
    else:
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        layout = dict(
            interleave_moe_layer_step=2,
            use_qk_norm=False,
            num_local_experts=8,
            rope_parameters=rope,
        )
    torch.manual_seed(0)
    hf = HFLlama4(Llama4TextConfig(**{**common, **layout, **overrides})).eval()
    with torch.no_grad():  # transformers leaves the fused experts uninitialised
        for name, p in hf.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0, 0.1)
    hf.save_pretrained(path)
    return path


# The memory test's wider model: ~60 MiB of fp32 parameters.
WIDE = dict(
    vocab_size=16384,
    hidden_size=256,
    head_dim=64,
    intermediate_size=512,
    num_hidden_layers=2,
    num_local_experts=8,
)


@pytest.fixture(scope="module")
def scout(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("scout"), "scout")


@pytest.fixture(scope="module")
def maverick(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("maverick"), "maverick")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("wide"), "scout", **WIDE)


def expected_numel(config: TextConfig, size: int) -> int:
    """A rank's parameter count: norms and routers whole, KV heads split or one replicated, all
    else split in `size` equal parts."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    experts = config.num_local_experts
    kv = config.num_key_value_heads // size if size <= config.num_key_value_heads else 1
    total = 2 * config.vocab_size * h // size + h  # embeddings, lm_head, final norm
    for moe in config.moe:
        total += 2 * h  # the two norms
        total += 2 * config.num_attention_heads * d * h // size + 2 * kv * d * h  # q, o; k, v
        if moe:
            total += experts * h + (3 * experts * h * i + 3 * h * i) // size  # router; experts
        else:
            total += 3 * h * config.intermediate_size_mlp // size
    return total


# ---- the ranks ------------------------------------------------------------------------------

# One world of 4 rank processes runs these jobs, step by step; the jobs of a step run at once, on
# disjoint ranks, each in its own process group. (name, checkpoint, ranks, mode)
STEPS = [
    [("scout-tp4", "scout", [0, 1, 2, 3], "run")],
    [("scout-tp2", "scout", [0, 1], "run"), ("maverick-tp2", "maverick", [2, 3], "run")],
    [("wide-tp2", "wide", [0, 1], "load"), ("wide-tp1", "wide", [2], "load")],
]
WORLD = 4


def peak_rss_kib() -> int:
    """This process's peak resident memory since the last reset_peak_rss (Linux)."""
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmHWM:")[1].split()[0])


def reset_peak_rss() -> int | None:
    """Resets the peak to the current resident memory, which it returns (KiB); None where the
    kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return peak_rss_kib()


def evaluate(model: Llama4ForCausalLM) -> dict:
    """What every rank (and the single-process reference) computes: greedy tokens of chunked
    prefills and decodes, one-step prefill last-token logits, and its KV cache's shape."""
    runner = ModelRunner(
        model, kv_tokens=256, context_len=64, page_size=4, max_step_tokens=16, max_running=8
    )
    return {
        "tokens": greedy_generate(runner, PROMPTS, max_new_tokens=NEW_TOKENS),
        "logits": last_token_logits(model, PROMPTS),
        "kv_shape": tuple(runner.cache.k[0].shape),
        "kv_bytes_per_token": runner.memory.global_bytes_per_token,
    }


def rank_main(rank: int, init_method: str, jobs: str, out: str) -> None:
    """One rank of the world: every job of every step it is in, each result saved to out."""
    torch.set_num_threads(1)
    world = init_tensor_parallel(rank, WORLD, init_method, backend="gloo")
    steps = json.loads(Path(jobs).read_text())
    # Once first, so that first-use costs (torch's meta-device machinery) stay out of the figures.
    load_model(steps[0][0][1], dtype=torch.float32, progress=False)
    for step in steps:
        mine = None
        for name, checkpoint, ranks, mode in step:
            # Every rank creates every group, in the same order (torch.distributed's rule).
            group = world.group if len(ranks) == WORLD else None
            if 1 < len(ranks) < WORLD:
                group = torch.distributed.new_group(ranks)
            if rank in ranks:
                tp = TensorParallel(ranks.index(rank), len(ranks), group)
                mine = (name, checkpoint, mode, tp)
        if mine is not None:
            name, checkpoint, mode, tp = mine
            before = reset_peak_rss()
            start = time.perf_counter()
            model = load_model(checkpoint, dtype=torch.float32, progress=False, tp=tp)
            result = {
                "load_s": time.perf_counter() - start,
                "peak_rss_delta": None if before is None else (peak_rss_kib() - before) * 1024,
                "numel": sum(p.numel() for p in model.parameters()),
                "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            }
            if mode == "run":
                result.update(evaluate(model))
            torch.save(result, Path(out) / f"{name}-rank{tp.rank}.pt")
            del model
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory, scout, maverick, wide) -> dict[str, list[dict]]:
    """Runs the world of rank processes over STEPS; job name -> its ranks' results."""
    work = tmp_path_factory.mktemp("world")
    paths = {"scout": scout, "maverick": maverick, "wide": wide}
    steps = [[(n, str(paths[c]), r, m) for n, c, r, m in step] for step in STEPS]
    (work / "jobs.json").write_text(json.dumps(steps))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The pyllama4 under test (installed in CI, the source tree here) before anything else.
    package_root = Path(pyllama4.__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), str(TESTS), env.get("PYTHONPATH", "")])
    init = f"file://{work / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), init, str(work / "jobs.json"), str(work)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    deadline = time.monotonic() + WORLD_TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break  # a rank failed (the others would wait for it forever), or too slow
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * WORLD, f"rank exit codes {codes}:\n" + "\n".join(logs)
    return {
        name: [torch.load(work / f"{name}-rank{i}.pt") for i in range(len(ranks))]
        for step in STEPS
        for name, _, ranks, _ in step
    }


@functools.cache
def single_run(checkpoint: Path) -> tuple[int, dict]:
    """The unsplit model in this process: its parameter count and `evaluate`'s results. On one
    thread, like the ranks (tiny ops on threads that share busy cores crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(checkpoint, dtype=torch.float32, progress=False)
        return sum(p.numel() for p in model.parameters()), evaluate(model)
    finally:
        torch.set_num_threads(threads)


def compare_with_single(checkpoint: Path, ranks: list[dict]) -> None:
    """Every rank's results against one process's (this one), and its shapes and sizes."""
    size = len(ranks)
    config = TextConfig.from_checkpoint(checkpoint)
    numel, single = single_run(checkpoint)
    assert numel == expected_numel(config, 1)
    kv_heads = max(1, config.num_key_value_heads // size)
    for rank, got in enumerate(ranks):
        assert got["tokens"] == single["tokens"], f"rank {rank}: greedy tokens differ"
        assert got["logits"].shape == (len(PROMPTS), config.vocab_size)
        diff = (got["logits"] - single["logits"]).abs().max().item()
        assert diff <= FP32_TOL, f"rank {rank}: logits differ by {diff}"
        assert got["numel"] == expected_numel(config, size)
        assert got["kv_shape"] == (single["kv_shape"][0], kv_heads, config.head_dim)
        assert got["kv_bytes_per_token"] * config.num_key_value_heads == (
            single["kv_bytes_per_token"] * kv_heads
        )


def report(what: str, ranks: list[dict]) -> None:
    mib = 2**20
    print(f"\n{what}:")
    for rank, got in enumerate(ranks):
        peak = got["peak_rss_delta"]
        print(
            f"  rank {rank}: {got['param_bytes'] / mib:.2f} MiB of parameters, peak RSS "
            f"{'n/a' if peak is None else f'+{peak / mib:.1f} MiB'} while loading "
            f"({got['load_s']:.2f} s)"
        )


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 4])
def test_scout_like_model_over_ranks_equals_one_rank(world, scout, size):
    compare_with_single(scout, world[f"scout-tp{size}"])
    report(f"Scout-like tp {size}", world[f"scout-tp{size}"])


def test_maverick_like_model_over_two_ranks_equals_one_rank(world, maverick):
    compare_with_single(maverick, world["maverick-tp2"])
    report("Maverick-like tp 2", world["maverick-tp2"])


def test_a_rank_loads_about_its_share_of_memory(world, wide):
    """A wider model (~60 MiB fp32, mostly vocabulary rows and experts): each of 2 ranks holds
    half the parameters but the norms and routers, and its peak RSS while loading stays well under
    one process's (a loose bound: the memory-mapped checkpoint pages it reads count too)."""
    (single,), ranks = world["wide-tp1"], world["wide-tp2"]
    report("wide model tp 1", [single])
    report("wide model tp 2", ranks)
    config = TextConfig.from_checkpoint(wide)
    assert single["numel"] == expected_numel(config, 1)
    assert all(got["numel"] == expected_numel(config, 2) for got in ranks)
    if single["peak_rss_delta"] is None:
        pytest.skip("no peak RSS figures: /proc/self/clear_refs is not writable here")
    assert all(got["peak_rss_delta"] < 0.8 * single["peak_rss_delta"] for got in ranks)


@pytest.mark.parametrize("layout", ["fused", "per_expert", "fused_in_blocks"])
@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_loads_exactly_its_slices(maverick, tmp_path, monkeypatch, layout, size):
    """In-process (loading needs no collectives): rank r's parameters are the r-th parts of the
    full model's, for fused experts and for per-expert [out, in] checkpoint tensors, also when
    tensors are read in blocks of rows (as large ones are)."""
    checkpoint = maverick
    if layout == "fused_in_blocks":
        monkeypatch.setattr(weight_copy, "_CHUNK_BYTES", 1000)  # blocks of 1 to 3 rows
    if layout == "per_expert":
        checkpoint = tmp_path / "per_expert"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text((maverick / "config.json").read_text())
        save_file(
            per_expert(load_file(maverick / "model.safetensors")), checkpoint / "model.safetensors"
        )
    full = load_model(maverick, dtype=torch.float32, progress=False).state_dict()
    config = TextConfig.from_checkpoint(maverick)
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    for rank in range(size):
        tp = TensorParallel(rank, size)
        part = load_model(checkpoint, dtype=torch.float32, progress=False, tp=tp).state_dict()
        assert part.keys() == full.keys()
        (q0, q1), (k0, k1) = attention_heads(heads, kv_heads, tp)
        for name, tensor in part.items():
            whole = full[name]
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                lo, hi = (q0, q1) if "q_proj" in name else (k0, k1)
                expected = whole[lo * d : hi * d]
            elif name.endswith("o_proj.weight"):
                expected = whole[:, q0 * d : q1 * d]
            elif name.endswith("experts.gate_up_proj"):
                gate, up = whole.chunk(2, dim=-1)
                expected = torch.cat([chunk(gate, -1, tp), chunk(up, -1, tp)], dim=-1)
            elif name.endswith(("experts.down_proj", "down_proj.weight")):
                expected = chunk(whole, 1, tp)
            elif name.endswith(("gate_proj.weight", "up_proj.weight", "embed_tokens.weight")):
                expected = chunk(whole, 0, tp)
            elif name == "lm_head.weight":  # vocabulary rows, like the embeddings
                expected = chunk(whole, 0, tp)
            else:  # norms and routers
                expected = whole
            assert torch.equal(tensor, expected), f"rank {rank} of {size}: {name}"


def test_tied_embeddings_give_lm_head_the_same_rows(scout, tmp_path):
    tied = tmp_path / "tied"
    tied.mkdir()
    config_json = json.loads((scout / "config.json").read_text())
    config_json["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config_json))
    tensors = load_file(scout / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tied / "model.safetensors")
    model = load_model(tied, dtype=torch.float32, progress=False, tp=TensorParallel(1, 2))
    expected = tensors["model.embed_tokens.weight"][VOCAB // 2 :]
    assert torch.equal(model.lm_head.weight, expected)
    assert torch.equal(model.model.embed_tokens.weight, expected)


def test_checks_compare_full_shapes_and_shards_must_fit(scout, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config_json = json.loads((scout / "config.json").read_text())
    config_json["vocab_size"] = 2 * VOCAB
    (bad / "config.json").write_text(json.dumps(config_json))
    (bad / "model.safetensors").symlink_to(scout / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: expected shape \[1024, 64\]"):
        load_model(bad, progress=False, tp=TensorParallel(1, 2))
    model = Llama4ForCausalLM(TextConfig.from_checkpoint(scout))
    with pytest.raises(ValueError, match=r"10 indices for a parameter of shape \[512, 64\]"):
        load_weights(
            model, scout, progress=False, shards={"lm_head.weight": Shard(0, ((0, 10),), 20)}
        )


def chunk(tensor: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    return tensor.chunk(tp.size, dim=dim)[tp.rank]


def per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused experts rewritten as per-expert nn.Linear weights [out, in]."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, w in enumerate(tensor):
                gate, up = w.chunk(2, dim=-1)
                out[f"{prefix}{e}.gate_proj.weight"] = gate.t().contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = up.t().contiguous()
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, w in enumerate(tensor):
                out[f"{prefix}{e}.down_proj.weight"] = w.t().contiguous()
        else:
            out[name] = tensor
    return out


def test_sizes_that_do_not_divide_the_model_are_value_errors(scout, tmp_path):
    config = TextConfig.from_checkpoint(scout)
    with torch.device("meta"):
        with pytest.raises(ValueError, match=r"vocab_size \(510\)"):
            Llama4ForCausalLM(dataclasses.replace(config, vocab_size=510), TensorParallel(0, 4))
        # 2 KV heads over 3 ranks: neither divides the other (the vocabulary does divide).
        with pytest.raises(ValueError, match=r"KV heads \(2\)"):
            Llama4ForCausalLM(dataclasses.replace(config, vocab_size=513), TensorParallel(0, 3))
        with pytest.raises(ValueError, match=r"attention heads \(4\)"):
            Llama4ForCausalLM(config, TensorParallel(0, 8))
    with pytest.raises(ValueError, match="tensor parallelism with FP8 is not supported yet"):
        load_model(scout, quantization="fp8", tp=TensorParallel(0, 2), progress=False)
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    config_json = json.loads((scout / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "fbgemm_fp8"}
    (fp8 / "config.json").write_text(json.dumps(config_json))
    (fp8 / "model.safetensors").symlink_to(scout / "model.safetensors")
    with pytest.raises(ValueError, match="tensor parallelism with FP8 is not supported yet"):
        load_model(fp8, tp=TensorParallel(1, 2), progress=False)


def test_split_and_attention_heads():
    tp = TensorParallel(2, 4)
    assert tp.split(512, "vocab_size") == (256, 384)
    assert [TensorParallel(r, 4).split(8, "x") for r in range(4)] == [
        (0, 2),
        (2, 4),
        (4, 6),
        (6, 8),
    ]
    with pytest.raises(ValueError, match=r"intermediate_size \(30\)"):
        tp.split(30, "intermediate_size")
    with pytest.raises(ValueError):
        TensorParallel(4, 4)
    # 8 query heads over 4 KV heads: split over 2 ranks, each KV head on 2 of 8 ranks.
    assert [attention_heads(8, 4, TensorParallel(r, 2)) for r in range(2)] == [
        ((0, 4), (0, 2)),
        ((4, 8), (2, 4)),
    ]
    for r in range(8):
        (q0, q1), (k0, k1) = attention_heads(8, 4, TensorParallel(r, 8))
        assert (q0, q1) == (r, r + 1) and (k0, k1) == (r // 2, r // 2 + 1)
        assert q0 // 2 == k0  # its query head uses its KV head (2 query heads per KV head)


def test_a_single_rank_is_the_identity():
    x = torch.randn(3, 5)
    assert SINGLE.all_reduce(x) is x and SINGLE.all_gather(x, dim=0) is x
    assert SINGLE.split(7, "anything") == (0, 7)
    assert init_tensor_parallel(0, 1, "file:///nonexistent") == SINGLE
    assert not torch.distributed.is_initialized()
    with torch.device("meta"):
        model = Llama4ForCausalLM(TextConfig.from_dict(dict(TINY_TEXT, vocab_size=VOCAB)))
    assert model.tp == SINGLE and model.weight_shards() == {}
    assert model.kv_heads == TINY_TEXT["num_key_value_heads"]


if __name__ == "__main__":  # one rank of the `world` fixture
    rank_main(int(sys.argv[1]), *sys.argv[2:])


def test_the_engine_serves_sharded_over_worker_processes(tmp_path, demo_dir):
    """Engine.from_checkpoint(tp=2): rank 0 here, rank 1 a spawned worker receiving each plan;
    a batch with chunked prefill and the prefix cache gives tp 1's greedy tokens, also with
    decode graphs captured on both ranks; close() stops the worker."""
    from transformers import AutoTokenizer, Llama4TextConfig
    from transformers import Llama4ForCausalLM as HFLlama4

    from pyllama4 import Engine, SamplingParams
    from pyllama4.graphs import EagerReplay
    from tiny_models import TINY_TEXT

    torch.manual_seed(0)
    config = Llama4TextConfig(
        **TINY_TEXT,
        vocab_size=49152,
        attention_chunk_size=8,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    HFLlama4(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(demo_dir).save_pretrained(tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = ["Hello there", "Hello there, general", "The quick brown fox jumps over", "1 2 3"]
    options = dict(dtype=torch.float32, kv_tokens=1024, page_size=4, max_step_tokens=8)
    one = Engine.from_checkpoint(tmp_path, progress=False, **options)
    two = Engine.from_checkpoint(tmp_path, progress=False, tp=2, **options)
    try:
        assert two.runner.memory.global_pages == one.runner.memory.global_pages
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
        assert [o.outputs[0].token_ids for o in two.generate(prompts, params)] == want
        # Decode graphs on both ranks (the worker captures when rank 0 does; EagerReplay stands
        # in for CUDA graphs): the decode steps replay them, padded, with the same tokens.
        capture = two._model_thread.submit(two.runner.capture_graphs, 4, EagerReplay)
        capture.result()
        graphs = two.runner.graphs
        assert graphs is not None and graphs.sizes == (1, 2, 4)
        replays = []
        forward = graphs.forward
        graphs.forward = lambda plan, size: replays.append(size) or forward(plan, size)
        assert [o.outputs[0].token_ids for o in two.generate(prompts, params)] == want
        assert len(replays) >= 9 and 4 in replays  # at the end 4 requests decode together
        workers = two.workers.processes
    finally:
        two.close()
    assert all(p.exitcode == 0 for p in workers)
