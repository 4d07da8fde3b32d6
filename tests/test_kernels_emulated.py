"""The GPU kernels of hip/ run on the CPU: the REAL sources, emulated by hip/emu/, against torch.

CI has no GPU, so tests/gpu/ never runs there. This module compiles hip/abi.hip,
hip/paged_attention.hip, hip/fused_moe.hip, hip/fp8_gemm.hip and hip/fused_ops.hip (each launch
`k<<<grid, block, 0, stream>>>(...)` rewritten to `::pyllama4_emu::launch(k, grid, block, 0,
stream)(...)` in a temporary copy) with g++ and -I hip/emu before -I hip, where <cuda_runtime.h> and
<hip/hip_runtime.h> are CPU shims:
the real hip/portable.h then takes its CUDA branch (warp 32: the "cuda" library) or, with
-D__HIP_PLATFORM_AMD__, its HIP branch (warp 64, as on CDNA: the "hip" library). Each block's
threads run as fibers with __syncthreads and the lane shuffles as barriers (hip/emu/
emu_runtime.h says what is and is not modeled: no concurrency, so no races are found; a
deadlocking barrier or a shuffle with an exited lane is reported as a launch error). The
launchers get host pointers (torch CPU tensors) and a null stream; launches are synchronous.

Checked, on both libraries (small shapes, so the module takes well under a minute on 2 cores):
  - the libraries: ABI version, platform and warp width; the emulator's own self-test kernels
    (hip/emu/emu_selftest.hip: sums by shuffles, shared memory and atomics are right, and a
    shuffle with an exited lane, a divergent barrier, a 2048-thread block are reported).
  - paged attention: mixed batches of decode and extend tokens, global and chunk-local (ring
    table) layouts, page sizes 16 and 64, GQA 8 q heads over 2 kv heads, head_dim 64, 1 and 4
    splits (contexts span several splits; short ones leave splits empty); other head layouts
    (groups 1, 5 and 8; head_dim 32 to 256, every template instance the warp width allows);
    against tests/gpu/paged_cases.py's fp32 `reference`, tolerance 2e-2 absolute as the GPU
    test (bf16 output rounding, |out| <= ~3). Guard regions after `out` and the workspace must
    stay untouched, and the workspace starts as NaN (every part the combine reads is written).
    Bad arguments return nonzero with pyllama4_last_error() naming the problem.
  - fused MoE routing, exactly: torch.topk's experts, the fp32 sigmoid (as the GPU test:
    rtol 1e-6 and equal after bf16 rounding), counts, offsets, torch.argsort(stable=True), and
    the work list in the workspace (its layout, documented in fused_moe.hip); ties and NaN.
  - fused MoE experts in bf16, e4m3fn and e4m3fnuz against oracles.moe_reference
    (fp32 from the same or dequantized weights), tolerance as the GPU test: per element
    2^-8 * |ref| + 1e-3 * max |ref|. Shapes: H 264, I 136 (column tiles cut short, 2 row chunks)
    and H 1040, I 520 (2 column tiles, 5 row chunks); 1, 2, 3 and 9 tokens, top-1, 2 and 4
    (the 1-, 2-, 4- and 8-token kernels), one expert with 9 tokens (two work items), row splits
    that divide, that do not, and of 3 rows; a workspace of garbage (must be zeroed); a second
    call gives the same bits; NaN fp8 weights give NaN where the reference has them; bad
    arguments are refused. W8A8 (per-row activation quantization in the kernels, with and
    without the upper clamp) against moe_reference's W8A8 computation, spread W8A8_SPREAD.
  - FP8 linear: both formats, W8A8 with and without ub and weight-only, 1, 3 and 16 tokens, two
    shapes, against pyllama4.quant.fp8.scaled_mm (the GPU test's tolerance); the activation
    quantization byte for byte against torch's float8 cast (ties aside); bad arguments.
  - fused small ops (hip/fused_ops.hip) against their torch references in bf16, counted in bf16
    steps (tests/gpu/fused_cases.py: at most 1, on at most 0.1% of the elements, for fp32
    detail the references leave open; measured here: all equal): residual add + RMSNorm
    (hidden 100, 1000 and Scout's 5120, with and without the residual, out in place of x; the
    residual sum exactly); RoPE + QK-norm + temperature + the KV cache write for Scout's heads
    (40 q, 8 kv, head_dim 128) and head_dim 64 / 96 / 256 layouts, RoPE and QK-norm on and off,
    temperature on and off, positions up to 2^20 with Scout's llama3-scaled frequencies, q / k /
    v as row-strided views of one fused projection, scattered slots (a negative one writes
    nothing), every other cache slot untouched; SwiGLU's silu(gate) * up on separate tensors and
    on fused gate_up halves. Guard regions after every output; bad arguments are refused. Then
    pyllama4.kernels.fused's wrappers on the emulated library inside a tiny bf16 Llama 4 (the
    model's wiring: fused attention prologue with kv_written, the residual carried through
    fused add + norm, forward_with_aux's captures): logits, hidden states and captures equal
    the torch path's bit for bit.

Skipped, with the reason, off Linux or when g++ is missing or cannot compile C++17. A kernel
source that does not compile in the emulation fails the tests (with the compiler's output).
$PYLLAMA4_EMU_CXXFLAGS adds compile and link flags, e.g. to look for out-of-bounds accesses:
  PYLLAMA4_EMU_CXXFLAGS="-fsanitize=address -g" LD_PRELOAD=$(g++ -print-file-name=libasan.so) \
  ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0 pytest tests/test_kernels_emulated.py
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gpu.fused_cases import (
    EPS,
    SCOUT_ROPE,
    SCOUT_THETA,
    assert_bf16_close,
    bf16_randn,
    rope_reference,
    temperature,
)
from gpu.paged_cases import DecodeCase, decode_case, reference
from oracles import moe_reference

from pyllama4 import fp8_format, kernels
from pyllama4.kernels import attention, declare, fused
from pyllama4.kernels import fp8 as fp8_gpu
from pyllama4.kernels import moe as moe_gpu
from pyllama4.layers.ffn import Experts
from pyllama4.layers.norm import RMSNorm
from pyllama4.layers.rope import inv_frequencies
from pyllama4.quant import fp8 as fp8_ref
from tiny_models import TINY_TEXT

HIP_DIR = Path(__file__).resolve().parents[1] / "hip"
EMU_DIR = HIP_DIR / "emu"
# The kernel sources under test (the GPU build compiles every hip/*.hip into one library).
SOURCES = [
    HIP_DIR / name
    for name in ("abi.hip", "paged_attention.hip", "fused_moe.hip", "fp8_gemm.hip", "fused_ops.hip")
]
SELFTEST = EMU_DIR / "emu_selftest.hip"
# name -> (extra g++ flags, the warp width portable.h must pick with them)
FLAVORS = {"cuda": ([], 32), "hip": (["-D__HIP_PLATFORM_AMD__"], 64)}
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-pthread", "-fno-gnu-unique", "-Wall"]
CXXFLAGS += ["-Wno-unknown-pragmas"]  # #pragma unroll
# `name<targs><<<config>>>(` (whitespace and newlines allowed before <<< and before the `(`).
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;{}()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)

ATTENTION_TOL = 2e-2  # absolute, as tests/gpu/test_paged_attention.py
# Fused MoE W8A8: x max |ref| allowed per element beyond 2^-8 * |ref|. Most runs stay within
# 1e-3; a flipped fp8 rounding of one down input moves a whole output row by up to ~4.4e-3.
W8A8_SPREAD = 6e-3
GUARD = 64  # elements after each output / workspace that must stay untouched


# ---- Building the emulated libraries ----------------------------------------------------------


def rewrite_launches(text: str) -> tuple[str, int]:
    """`kernel<<<config>>>(args)` -> `::pyllama4_emu::launch(kernel, config)(args)`; the
    rewritten text and the number of launches."""
    out, count = LAUNCH.subn(lambda m: f"::pyllama4_emu::launch({m[1]}, {m[2]})(", text)
    if "<<<" in out or ">>>" in out:
        raise AssertionError("a launch the rewrite does not understand is left")
    return out, count


def compiler_or_skip() -> str:
    """g++, or skip the module naming what is missing."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"the kernel emulation (hip/emu) needs Linux, not {sys.platform}")
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CPU emulation of the GPU kernels is compiled with g++")
    probe = "#include <tuple>\ninline int v = std::apply([](int a) { return a; }, std::tuple(1));"
    result = subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", "-x", "c++", "-"],
        input=probe,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        pytest.skip(f"{cxx} ({version.splitlines()[0]}) cannot compile C++17: {result.stderr}")
    return cxx


@dataclass
class Library:
    """One emulated build, its launchers as pyllama4.kernels' wrappers declare them
    (`launchers(lib)` of kernels.attention, moe, fp8 and fused)."""

    flavor: str
    path: Path
    cdll: ctypes.CDLL
    attention: Any
    workspace_bytes: Any
    route: Any
    experts: Any
    fp8_workspace_bytes: Any
    fp8_quantize: Any
    fp8_linear: Any
    add_rms_norm: Any
    rope: Any
    silu_mul: Any
    selftest: Any

    @property
    def warp(self) -> int:
        return self.cdll.pyllama4_emu_warp_width()

    def last_error(self) -> str:
        return self.cdll.pyllama4_last_error().decode()


def build(cxx: str, out_dir: Path) -> dict[str, Path]:
    """Both flavors' libraries from the rewritten sources (compiles run in parallel)."""
    sources = []
    for src in [*SOURCES, SELFTEST]:
        text, launches = rewrite_launches(src.read_text())
        if src.name != "abi.hip" and launches == 0:
            raise AssertionError(f"no launch found in {src}")
        copy = out_dir / f"{src.stem}.cpp"
        copy.write_text(f'#line 1 "{src}"\n{text}')
        sources.append(copy)
    sources.append(EMU_DIR / "emu_runtime.cpp")
    includes = ["-I", str(EMU_DIR), "-I", str(HIP_DIR)]  # the shims first
    extra = shlex.split(os.environ.get("PYLLAMA4_EMU_CXXFLAGS", ""))
    jobs = []
    sources.sort(key=lambda src: src.stat().st_size, reverse=True)  # the longest compiles first
    for src in sources:
        for flavor, (flags, _) in FLAVORS.items():
            obj = out_dir / f"{flavor}.{src.stem}.o"
            cmd = [cxx, *CXXFLAGS, *extra, *flags, *includes, "-c", str(src), "-o", str(obj)]
            jobs.append((obj, cmd))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: subprocess.run(job[1], capture_output=True), jobs))
    for (_, cmd), result in zip(jobs, results, strict=True):
        if result.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{result.stderr.decode()}", pytrace=False)
    paths = {}
    for flavor in FLAVORS:
        objs = [str(obj) for obj, _ in jobs if obj.name.startswith(f"{flavor}.")]
        paths[flavor] = out_dir / f"libpyllama4_kernels_emu_{flavor}.so"
        link = [cxx, "-shared", "-pthread", *extra, *objs, "-o", str(paths[flavor])]
        result = subprocess.run(link, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(link)} failed:\n{result.stderr}", pytrace=False)
    return paths


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The references run on small tensors, where torch's intra-op threads only cost (and,
    when another process holds a core, spin for seconds): one thread for this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return build(compiler_or_skip(), tmp_path_factory.mktemp("kernels-emu"))


@pytest.fixture(scope="module", params=list(FLAVORS), ids=lambda f: f"{f}-warp{FLAVORS[f][1]}")
def lib(request, built) -> Library:
    path = built[request.param]
    cdll = ctypes.CDLL(str(path))
    declare(cdll, "pyllama4_last_error", [], ctypes.c_char_p)
    declare(cdll, "pyllama4_abi_version", [], ctypes.c_int32)
    declare(cdll, "pyllama4_platform", [], ctypes.c_char_p)
    declare(cdll, "pyllama4_emu_warp_width", [], ctypes.c_int)
    workspace_bytes, route, experts = moe_gpu.launchers(cdll)
    fp8_workspace_bytes, fp8_quantize, fp8_linear = fp8_gpu.launchers(cdll)
    add_rms_norm, rope, silu_mul = fused.launchers(cdll)
    selftest_args = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return Library(
        flavor=request.param,
        path=path,
        cdll=cdll,
        attention=attention.launcher(cdll),
        workspace_bytes=workspace_bytes,
        route=route,
        experts=experts,
        fp8_workspace_bytes=fp8_workspace_bytes,
        fp8_quantize=fp8_quantize,
        fp8_linear=fp8_linear,
        add_rms_norm=add_rms_norm,
        rope=rope,
        silu_mul=silu_mul,
        selftest=declare(cdll, "pyllama4_emu_selftest", selftest_args),
    )


def guarded(numel: int, dtype: torch.dtype, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a buffer of numel + GUARD elements filled with `fill`, and its first numel
    elements (what the kernel may write)."""
    buffer = torch.full((numel + GUARD,), fill, dtype=dtype)
    return buffer, buffer[:numel]


def assert_guard_intact(buffer: torch.Tensor, numel: int, fill: float, what: str) -> None:
    tail = buffer[numel:]
    assert torch.equal(tail, torch.full_like(tail, fill)), f"{what}: written past its end"


# ---- The libraries and the emulator ---------------------------------------------------------


def test_the_libraries_are_the_emulated_builds(lib):
    """ABI version as pyllama4.kernels expects, the platform of the branch of portable.h that
    was compiled, and its warp width (CUDA 32, HIP host pass 64)."""
    assert lib.cdll.pyllama4_abi_version() == kernels.ABI_VERSION
    assert lib.cdll.pyllama4_platform().decode() == lib.flavor
    assert lib.warp == FLAVORS[lib.flavor][1]


def test_the_emulator_runs_blocks_and_reports_hangs(lib):
    """Shuffle, shared-memory and atomic sums are exact (3 blocks of 4 warps); a shuffle that
    reads a lane which returned, a divergent __syncthreads and a 2048-thread block make the
    launcher fail with the emulator's message."""
    w = lib.warp
    out = torch.zeros(4096, dtype=torch.int32)
    assert lib.selftest(0, out.data_ptr(), 3, 4 * w) == 0, lib.last_error()
    n = 4 * w
    expected = [sum(range(b * n, (b + 1) * n)) for b in range(3)]
    assert out[:4].tolist() == [*expected, sum(expected)]
    assert lib.selftest(1, out.data_ptr(), 1, 2 * w) != 0
    assert "reads lane 0 of its warp, which returned before this shuffle" in lib.last_error()
    assert lib.selftest(2, out.data_ptr(), 1, 2 * w) != 0
    assert f"1 threads wait at __syncthreads and {w - 1} at a warp shuffle" in lib.last_error()
    assert lib.selftest(0, out.data_ptr(), 1, 2048) != 0
    assert "invalid configuration argument" in lib.last_error()
    assert lib.selftest(0, out.data_ptr(), 1, w) == 0  # the error was reported once, and reset


# ---- Paged attention ------------------------------------------------------------------------


def kernel_tokens(
    case: DecodeCase, num_splits: int, monkeypatch, dynamic: bool = False
) -> attention.KernelTokens:
    """pyllama4.kernels.attention.kernel_tokens for all of the case's requests, with
    num_splits splits (its split_plan asks the GPU for its size); dynamic: split_len 0, each
    token splitting its own keys (what decode graphs launch)."""
    monkeypatch.setattr(
        attention,
        "split_plan",
        lambda keys, blocks, device: (num_splits, 0 if dynamic else -(-keys // num_splits)),
    )
    return attention.kernel_tokens(
        case.rows,
        case.query_start,
        case.seq_lens,
        case.positions,
        case.chunk,
        (0, len(case.seq_lens)),
        case.k_cache.shape[1],
    )


def attend(lib: Library, case: DecodeCase, tokens: attention.KernelTokens) -> torch.Tensor:
    """The kernel's output for the case's query tokens (arguments as paged_attention_gpu's);
    also checks that nothing is written past out or the workspace."""
    count, heads, dim = case.q.shape
    out_buffer, out = guarded(count * heads * dim, torch.bfloat16, 4096.0)
    need = count * heads * tokens.num_splits * (dim + 2)
    ws_buffer, _ = guarded(need, torch.float32, float("nan"))
    ws_buffer[need:] = 12345.0
    code = lib.attention(
        out.data_ptr(),
        case.q.data_ptr(),
        case.k_cache.data_ptr(),
        case.v_cache.data_ptr(),
        case.table.data_ptr(),
        case.table.shape[1],
        tokens.token_rows.data_ptr(),
        tokens.positions.data_ptr(),
        count,
        heads,
        case.k_cache.shape[1],
        dim,
        case.page_size,
        case.chunk or 0,
        dim**-0.5,
        ws_buffer.data_ptr(),
        tokens.num_splits,
        tokens.split_len,
        None,
    )
    assert code == 0, lib.last_error()
    assert_guard_intact(out_buffer, out.numel(), 4096.0, "out")
    assert_guard_intact(ws_buffer, need, 12345.0, "workspace")
    return out.view(count, heads, dim)


def assert_attention_close(
    lib: Library, case: DecodeCase, splits: int, monkeypatch, dynamic: bool = False
) -> None:
    out = attend(lib, case, kernel_tokens(case, splits, monkeypatch, dynamic))
    err = (out.float() - reference(case, case.q.shape[2] ** -0.5)).abs().max().item()
    assert err <= ATTENTION_TOL, f"{splits} splits: max error {err:.3g}"


@pytest.mark.parametrize("chunk", [None, 128], ids=["global", "chunk-local"])
@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_attention_matches_the_reference(lib, page_size, chunk, monkeypatch):
    """A mixed batch: three decodes (contexts 1, 17, 129) and two extends (positions 222..229
    and 254..269), GQA 8 over 2, head_dim 64; 1 and 4 splits (the 1-key request leaves 3
    empty). Chunk-local with chunks of 128: position 128 sees only itself, the second extend
    crosses into a new chunk at 256. Also per-token splits (split_len 0, decode graphs): 3 and
    7 splits of each token's own key range (the 1-key request leaves all but one empty)."""
    case = decode_case(
        [1, 17, 129, 230, 270],
        queries=[1, 1, 1, 8, 16],
        q_heads=8,
        kv_heads=2,
        head_dim=64,
        page_size=page_size,
        chunk=chunk,
        seed=page_size,
        device="cpu",
    )
    for splits in (1, 4):
        assert_attention_close(lib, case, splits, monkeypatch)
    for splits in (3, 7):
        assert_attention_close(lib, case, splits, monkeypatch, dynamic=True)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"),
    [(4, 4, 32), (10, 2, 128), (8, 1, 256)],
    ids=["group1-d32", "group5-d128", "group8-d256"],
)
def test_paged_attention_other_head_layouts(lib, q_heads, kv_heads, head_dim, monkeypatch):
    """Groups of 1, 5 (Scout, Maverick) and 8 (the most) query heads per kv head, head_dim 32 to
    256 (head_dim / warp: every instance of the split kernel), chunk-local (chunks of 64: a
    decode at position 64), 2 splits. head_dim 32 at warp 64 is refused (not a multiple of the
    warp width)."""
    case = decode_case(
        [5, 65, 200],
        queries=[1, 1, 4],
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        chunk=64,
        seed=head_dim,
        device="cpu",
    )
    if head_dim % lib.warp:
        tokens = kernel_tokens(case, 2, monkeypatch)
        with pytest.raises(AssertionError, match="head_dim must be a multiple of the warp width"):
            attend(lib, case, tokens)
        return
    assert_attention_close(lib, case, 2, monkeypatch)


def test_paged_attention_refuses_bad_arguments(lib):
    """Each bad argument: nonzero, and pyllama4_last_error() names it. Pointers are never
    dereferenced (the checks come before any launch)."""
    p = 16
    good = [p] * 5 + [4, p, p, 3, 8, 2, 64, 16, 0, 0.125, p, 2, 100, None]
    bad = {
        "a pointer argument is null": {1: None},
        "num_q_heads must be a multiple of num_kv_heads": {9: 7},
        "more than 8 query heads per kv head": {9: 18},
        "head_dim must be a multiple of the warp width": {11: lib.warp + 16},
        "page_size, table_width and num_splits must be positive": {16: 0},
        "chunk_size and split_len >= 0": {17: -1},
    }
    for message, changes in bad.items():
        args = list(good)
        for index, value in changes.items():
            args[index] = value
        assert lib.attention(*args) != 0, message
        assert message in lib.last_error()
    assert lib.attention(*good[:11], 512, *good[12:]) != 0  # head_dim over 256
    assert "<= 256" in lib.last_error()


# ---- Fused MoE: routing -----------------------------------------------------------------------


def moe_inputs(
    tokens: int, hidden: int, num_experts: int, seed: int, hot_expert: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As tests/gpu/test_fused_moe.py's inputs, on the CPU: x [T, H], router logits [T, E]
    distinct per row ((permutation - E/2) / 16, exact in bf16 up to 256 experts; above, the
    consecutive bf16 values from 1.0 up), shared_out [T, H]; bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    perm = torch.rand(tokens, num_experts, generator=g).argsort(dim=1)
    if num_experts > 256:
        logits = (0x3F80 + perm).to(torch.int16).view(torch.bfloat16)
    else:
        logits = ((perm.float() - num_experts // 2) / 16).bfloat16()
    if hot_expert is not None:
        logits[:, hot_expert] = num_experts / 16
    shared = torch.randn(tokens, hidden, generator=g).bfloat16()
    return x, logits, shared


def route(lib: Library, logits: torch.Tensor, top_k: int, workspace: torch.Tensor):
    """pyllama4_moe_route: (code, ids [T, k], scores [T, k], counts, offsets, order)."""
    tokens, num_experts = logits.shape
    pairs = tokens * top_k
    ids = torch.empty(pairs, dtype=torch.int32)
    scores = torch.empty(pairs, dtype=torch.float32)
    order = torch.empty(pairs, dtype=torch.int32)
    counts = torch.empty(num_experts, dtype=torch.int32)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32)
    code = lib.route(
        logits.data_ptr(),
        tokens,
        num_experts,
        top_k,
        ids.data_ptr(),
        scores.data_ptr(),
        counts.data_ptr(),
        offsets.data_ptr(),
        order.data_ptr(),
        workspace.data_ptr(),
        workspace.numel(),
        None,
    )
    return code, ids.view(tokens, top_k), scores.view(tokens, top_k), counts, offsets, order


@pytest.mark.parametrize(
    ("tokens", "num_experts", "top_k"),
    [(1, 16, 1), (3, 5, 2), (9, 16, 2), (64, 128, 8), (512, 128, 8), (4096, 16, 1), (3, 1024, 8)],
)
def test_routing_is_exact(lib, tokens, num_experts, top_k):
    """Experts = torch.topk's; scores = torch.sigmoid in fp32 (rtol 1e-6, and equal in bf16, as
    the GPU test); counts, offsets = bincount and its cumsum; order =
    torch.argsort(stable=True); the work list = (expert, first sorted pair, count <= 8) for each
    group of 8 pairs of each expert, in expert order (workspace: int32 count at byte 0, items
    from byte 16, as fused_moe.hip lays it out)."""
    _, logits, _ = moe_inputs(tokens, 8, num_experts, seed=tokens + top_k)
    nbytes = lib.workspace_bytes(tokens, top_k, num_experts, 0, 0)
    workspace = torch.full((nbytes,), 0xAB, dtype=torch.uint8)
    code, ids, scores, counts, offsets, order = route(lib, logits, top_k, workspace)
    assert code == 0, lib.last_error()
    top_logits, top_ids = torch.topk(logits.float(), top_k, dim=-1)
    assert torch.equal(ids.long(), top_ids)
    expected = torch.sigmoid(top_logits)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)
    assert torch.equal(scores.bfloat16(), expected.bfloat16())
    flat = top_ids.reshape(-1)
    expected_counts = torch.bincount(flat, minlength=num_experts)
    assert torch.equal(counts.long(), expected_counts)
    assert offsets[0].item() == 0
    assert torch.equal(offsets[1:].long(), expected_counts.cumsum(0))
    assert torch.equal(order.long(), torch.argsort(flat, stable=True))
    num_work = workspace[:4].view(torch.int32).item()
    work = workspace[16 : 16 + 16 * num_work].view(torch.int32).view(num_work, 4)[:, :3].tolist()
    expected_work = [
        [e, int(offsets[e]) + g, min(8, int(expected_counts[e]) - g)]
        for e in range(num_experts)
        for g in range(0, int(expected_counts[e]), 8)
    ]
    assert work == expected_work


def test_routing_ties_and_nan(lib):
    """Ties go to the lower expert index; a NaN logit ranks as -inf and keeps its NaN score."""
    logits = torch.tensor(
        [[1.0, 3.0, 3.0, -1.0], [float("nan"), -2.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    ).bfloat16()
    workspace = torch.zeros(4096, dtype=torch.uint8)
    code, ids, *_ = route(lib, logits, 2, workspace)
    assert code == 0 and ids.tolist() == [[1, 2], [2, 3], [0, 1]]
    code, ids, scores, *_ = route(lib, logits, 4, workspace)
    assert code == 0 and ids[1].tolist() == [2, 3, 1, 0]
    assert torch.isnan(scores[1, 3]).item()


# ---- Fused MoE: the experts -----------------------------------------------------------------

# name -> (hidden, intermediate, experts)
MOE_SHAPES = {"h264-i136-e5": (264, 136, 5), "h1040-i520-e4": (1040, 520, 4)}
# (tokens, top_k, (gate_up_splits, down_splits), hot expert)
MOE_RUNS = [
    (1, 1, (1, 1), None),  # the 1-token kernels
    (2, 2, (3, 2), None),  # 2-token kernels; splits that do not divide the rows
    (3, 2, (5, 3), None),  # 4-token kernels
    (3, 4, (1, 2), None),  # top-4: most experts get every token
    (9, 1, (2, 1), 1),  # every token on expert 1: work items of 8 and 1 pairs
    (9, 2, (100, 50), None),  # 8-token kernels; slices of a few rows (fewer than asked)
]


def bf16_experts(num_experts: int, hidden: int, inter: int, seed: int) -> Experts:
    """pyllama4's Experts module in bf16, normal weights scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    experts = Experts(num_experts, hidden, inter)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(num_experts, hidden, 2 * inter, generator=g))
        experts.gate_up_proj.mul_(hidden**-0.5)
        experts.down_proj.copy_(torch.randn(num_experts, inter, hidden, generator=g) * inter**-0.5)
    return experts.to(torch.bfloat16)


def fp8_experts(
    num_experts: int, hidden: int, inter: int, fmt: int, seed: int
) -> moe_gpu.Fp8ExpertWeights:
    """As tests/gpu/test_fused_moe.py's random_fp8_experts: every finite fp8 byte, random
    per-column scales."""
    g = torch.Generator().manual_seed(seed)

    def bits(*size: int) -> torch.Tensor:
        b = torch.randint(0, 256, size, dtype=torch.uint8, generator=g)
        b[fp8_format.is_nan(b, fmt)] = 0x3C
        return b

    def scales(rows: int, *size: int) -> torch.Tensor:
        return (torch.rand(size, generator=g) + 0.5) / (100 * rows**0.5)

    return moe_gpu.Fp8ExpertWeights(
        bits(num_experts, hidden, 2 * inter),
        scales(hidden, num_experts, 2 * inter),
        bits(num_experts, inter, hidden),
        scales(inter, num_experts, hidden),
        fmt,
    )


def reference_experts(experts: Experts | moe_gpu.Fp8ExpertWeights) -> Experts:
    """What moe_reference computes with: fp8 experts dequantized by pyllama4.fp8_format (as
    it does per expert and call; here once, into a float32 Experts), bf16 ones as they are."""
    if not isinstance(experts, moe_gpu.Fp8ExpertWeights):
        return experts
    num_experts, hidden, two_inter = experts.gate_up.shape
    out = Experts(num_experts, hidden, two_inter // 2)
    with torch.no_grad():
        out.gate_up_proj.copy_(
            fp8_format.dequantize(experts.gate_up, experts.gate_up_scale[:, None], experts.format)
        )
        out.down_proj.copy_(
            fp8_format.dequantize(experts.down, experts.down_scale[:, None], experts.format)
        )
    return out


def fused_moe(lib: Library, x, logits, experts, top_k: int, shared, splits) -> torch.Tensor:
    """Routing then the experts, as fused_moe_gpu does (workspace first filled with garbage,
    which the experts' launcher must zero); checks nothing is written past out."""
    gate_up = moe_gpu._weights(experts)[0]
    tokens, hidden = x.shape
    num_experts, _, two_inter = gate_up.shape
    nbytes = lib.workspace_bytes(tokens, top_k, num_experts, hidden, two_inter // 2)
    workspace = torch.full((nbytes,), 0xAB, dtype=torch.uint8)
    code, _, scores, _, _, order = route(lib, logits, top_k, workspace)
    assert code == 0, lib.last_error()
    routing = moe_gpu.Routing(None, scores.reshape(-1), None, None, order)
    out_buffer, out = guarded(tokens * hidden, torch.bfloat16, 4096.0)
    args = moe_gpu.experts_arguments(out, x, shared, routing, experts, top_k, splits, workspace)
    code = lib.experts(*args, None)
    assert code == 0, lib.last_error()
    assert_guard_intact(out_buffer, out.numel(), 4096.0, "out")
    return out.view(tokens, hidden)


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, what: str, spread=1e-3) -> None:
    """tests/gpu/test_fused_moe.py's tolerance: 2^-8 * |ref| + spread * max |ref| per element
    (spread 1e-3; W8A8 takes W8A8_SPREAD, room for a flipped rounding of an intermediate)."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs()
    bound = 2**-8 * ref.abs() + spread * ref.abs().max()
    assert (err - bound).max().item() <= 0, (
        f"{what}: max error {err.max().item():.3g} (max |ref| {ref.abs().max().item():.3g})"
    )


@pytest.mark.parametrize(
    "fmt", [fp8_format.BF16, fp8_format.E4M3FN, fp8_format.E4M3FNUZ], ids=fp8_format.NAMES.get
)
@pytest.mark.parametrize("shape", list(MOE_SHAPES))
def test_experts_match_the_reference(lib, shape, fmt):
    """Every run of MOE_RUNS against moe_reference (fp32 on the same bf16 / dequantized fp8
    weights, see reference_experts); the first run twice, bit-identical (the workspace is
    re-zeroed each call)."""
    hidden, inter, num_experts = MOE_SHAPES[shape]
    if fmt == fp8_format.BF16:
        experts = bf16_experts(num_experts, hidden, inter, seed=hidden)
    else:
        experts = fp8_experts(num_experts, hidden, inter, fmt, seed=fmt)
    weights = reference_experts(experts)
    for tokens, top_k, splits, hot in MOE_RUNS:
        x, logits, shared = moe_inputs(tokens, hidden, num_experts, seed=tokens, hot_expert=hot)
        out = fused_moe(lib, x, logits, experts, top_k, shared, splits)
        ref = moe_reference(x, logits, weights, top_k, shared)
        assert_kernel_close(out, ref, f"{tokens} tokens, top-{top_k}, splits {splits}")
        if tokens == 1:
            assert torch.equal(out, fused_moe(lib, x, logits, experts, top_k, shared, splits))


@pytest.mark.parametrize("ub", [None, 0.5], ids=["no-ub", "ub0.5"])
@pytest.mark.parametrize("fmt", [fp8_format.E4M3FN, fp8_format.E4M3FNUZ], ids=fp8_format.NAMES.get)
def test_w8a8_experts_match_the_reference(lib, fmt, ub):
    """W8A8 (Fp8Experts' default: each expert input row quantized per row) against
    moe_reference's W8A8 computation, every run of MOE_RUNS on the larger shape; ub 0.5 clamps
    most rows' amax (|x| reaches ~3), so saturation is exercised. shared_out is zero, so the
    tolerance (as above) is relative to the routed experts alone. The fp32 sums differ in order
    only, so an fp8 or bf16 rounding of an intermediate value flips rarely and moves one term of
    a long sum by one step."""
    hidden, inter, num_experts = MOE_SHAPES["h1040-i520-e4"]
    experts = dataclasses.replace(
        fp8_experts(num_experts, hidden, inter, fmt, seed=fmt),
        quantize_input=True,
        activation_scale_ub=ub,
    )
    for tokens, top_k, splits, hot in MOE_RUNS:
        x, logits, shared = moe_inputs(tokens, hidden, num_experts, seed=tokens, hot_expert=hot)
        shared = torch.zeros_like(shared)
        out = fused_moe(lib, x, logits, experts, top_k, shared, splits)
        ref = moe_reference(x, logits, experts, top_k, shared)
        weight_only = moe_reference(x, logits, reference_experts(experts), top_k, shared)
        what = f"W8A8, {tokens} tokens, top-{top_k}, splits {splits}"
        assert_kernel_close(out, ref, what, spread=W8A8_SPREAD)
        # The activation quantization shows, far beyond the tolerance.
        assert (ref - weight_only).abs().max() > 0.02 * ref.abs().max()


@pytest.mark.parametrize("fmt", [fp8_format.E4M3FN, fp8_format.E4M3FNUZ], ids=fp8_format.NAMES.get)
def test_fp8_nan_weights_give_nan_outputs(lib, fmt):
    """As the GPU test: a NaN byte in an expert's gate column makes its tokens' whole output NaN,
    one in a down column that column; other outputs stay finite and close."""
    hidden, inter, num_experts = MOE_SHAPES["h264-i136-e5"]
    experts = fp8_experts(num_experts, hidden, inter, fmt, seed=3)
    nan_byte = 0x7F if fmt == fp8_format.E4M3FN else 0x80
    experts.gate_up[2, 17, 5] = nan_byte
    experts.down[4, 3, 100] = nan_byte
    x, logits, shared = moe_inputs(20, hidden, num_experts, seed=5)
    out = fused_moe(lib, x, logits, experts, 1, shared, (2, 2))
    ref = moe_reference(x, logits, experts, 1, shared)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    routed = logits.float().argmax(dim=1)
    assert (routed == 2).any() and torch.isnan(out[routed == 2]).all()
    assert (routed == 4).any() and torch.isnan(out[routed == 4][:, 100]).all()
    finite = ~torch.isnan(ref)
    assert_kernel_close(out.where(finite, 0), ref.where(finite, 0), "finite outputs")


def test_moe_refuses_bad_arguments(lib):
    """As the GPU test: top_k over 8, sizes that are not multiples of 8, an unknown weight
    format, and (here too) a workspace too small; each names the problem."""
    p = 16  # never dereferenced: the checks come before any launch
    assert lib.route(p, 4, 16, 9, p, p, p, p, p, p, 1 << 20, None) != 0
    assert lib.last_error().startswith("moe_route: top_k")
    args = [p] * 9 + [0, 0, 0.0, 4, 16, 1, 5120, 8196, 1, 1, p, 1 << 30, None]
    assert lib.experts(*args) != 0
    assert "multiples of 8" in lib.last_error()
    args[9] = 3
    assert lib.experts(*args) != 0
    assert "weight_format" in lib.last_error()
    args[9], args[10], args[16] = 0, 1, 8192
    assert lib.experts(*args) != 0
    assert "quantize_input needs fp8 weights" in lib.last_error()
    args[10], args[20] = 0, 1024
    assert lib.experts(*args) != 0
    assert "workspace of 1024 bytes, needs" in lib.last_error()


# ---- FP8 linear (hip/fp8_gemm.hip) --------------------------------------------------------------

FP8_LINEAR_SHAPES = [(512, 96), (1040, 40)]  # (in, out): rows per warp cut short in the second
FP8_MODES = [(True, 1200.0), (True, None), (False, None)]  # (quantize_input, activation_scale_ub)


def fp8_weight(features: int, out: int, fmt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As tests/gpu/test_fp8_gemm.py: every finite fp8 byte, per-row scales; [out, in] float8."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (out, features), dtype=torch.uint8, generator=g)
    bits[fp8_format.is_nan(bits, fmt)] = 0x3C
    scale = (torch.rand(out, generator=g) + 0.5) / (100 * features**0.5)
    return bits.view(fp8_format.torch_dtype(fmt)), scale


def fp8_x(tokens: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[0, 7] = 3000.0  # beyond ub = 1200: saturates when the clamp applies
    return x.to(torch.bfloat16)


def fp8_linear(lib: Library, x, weight, scale, fmt: int, ub, quantize_input: bool):
    """pyllama4_fp8_linear with a garbage workspace; checks nothing is written past y."""
    tokens, features = x.shape
    out = weight.shape[0]
    workspace = torch.full((lib.fp8_workspace_bytes(tokens, features),), 0xAB, dtype=torch.uint8)
    y_buffer, y = guarded(tokens * out, torch.bfloat16, 4096.0)
    args = fp8_gpu.linear_arguments(y, x, weight, scale, fmt, ub, quantize_input, workspace)
    assert lib.fp8_linear(*args, None) == 0, lib.last_error()
    assert_guard_intact(y_buffer, y.numel(), 4096.0, "y")
    return y.view(tokens, out)


@pytest.mark.parametrize(("quantize_input", "ub"), FP8_MODES, ids=["quant-ub", "noub", "w8a16"])
@pytest.mark.parametrize("fmt", [fp8_format.E4M3FN, fp8_format.E4M3FNUZ], ids=fp8_format.NAMES.get)
def test_fp8_linear_matches_the_reference(lib, fmt, quantize_input, ub):
    """As the GPU test: pyllama4.quant.fp8.scaled_mm on the same tensors, tolerance 2^-8 * |ref|
    + 1e-3 * max |ref| of the token's row; 1, 3 and 16 tokens (the 1-, 4- and 16-token kernels)."""
    for features, out in FP8_LINEAR_SHAPES:
        weight, scale = fp8_weight(features, out, fmt, seed=features + fmt)
        for tokens in (1, 3, 16):
            x = fp8_x(tokens, features, seed=tokens)
            y = fp8_linear(lib, x, weight, scale, fmt, ub, quantize_input)
            ref = fp8_ref.scaled_mm(x, weight.T, scale, ub, quantize_input)
            err = (y.float() - ref).abs()
            tol = 2**-8 * ref.abs() + 1e-3 * ref.abs().amax(dim=-1, keepdim=True)
            assert (err <= tol).all(), f"{features}x{out}, {tokens} tokens: {err.max():.3g}"


def _ties(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Which fp32 values v lie exactly halfway between two fp8 values (q: v cast to fp8)."""
    r = q.float()
    other = 2 * v - r
    return (v != r) & (other.to(q.dtype).float() == other)


@pytest.mark.parametrize("ub", [1200.0, None], ids=["ub", "noub"])
@pytest.mark.parametrize("fmt", [fp8_format.E4M3FN, fp8_format.E4M3FNUZ], ids=fp8_format.NAMES.get)
def test_fp8_quantize_per_token_is_torchs_cast(lib, fmt, ub):
    """The activation bytes equal torch's float8 cast of the clamped, scaled values (except on
    exact rounding ties, where the division's last bit decides), the scales bit for bit; a zero
    row takes the 1e-12 floor; tiny values exercise the subnormals."""
    x = fp8_x(5, 1024, seed=100)
    x[-1, :] = 0
    x[0, 100:356] = (torch.arange(256) - 128).to(torch.bfloat16) * 2**-12
    q = torch.empty(x.shape, dtype=torch.uint8)
    scale = torch.empty(x.shape[0], dtype=torch.float32)
    assert lib.fp8_quantize(*fp8_gpu.quantize_arguments(q, scale, x, fmt, ub), None) == 0
    name = fp8_format.NAMES[fmt]
    ref_q, ref_scale = fp8_ref.quantize_activation(x, name, ub)
    assert torch.equal(scale, ref_scale)
    fmax = fp8_format.FP8_MAX[name]
    v = (x.float() / ref_scale.unsqueeze(-1)).clamp(-fmax, fmax)
    cast = v.to(fp8_format.torch_dtype(fmt))
    assert torch.equal(cast.view(torch.uint8), ref_q.view(torch.uint8))
    differs = (q != cast.view(torch.uint8)) & ~_ties(v, cast)
    assert not differs.any(), f"{int(differs.sum())} bytes differ from torch's cast"


def test_fp8_linear_refuses_bad_arguments(lib):
    """17 tokens and an in_features that is not a multiple of 16 are refused, named."""
    p = 16
    assert lib.fp8_linear(p, p, p, p, 1, 17, 32, 16, 0.0, 1, p, 1 << 20, None) != 0
    assert "num_tokens" in lib.last_error()
    assert lib.fp8_linear(p, p, p, p, 1, 2, 24, 16, 0.0, 1, p, 1 << 20, None) != 0
    assert "in_features" in lib.last_error()


# ---- Fused small ops (hip/fused_ops.hip) ------------------------------------------------------

# The tolerance is tests/gpu/fused_cases.py's (FUSED_ULPS on FUSED_FLIPS of the elements).
# Measured here: every element equal (0 ulps), in both flavours.


@pytest.mark.parametrize("hidden", [100, 1000, 5120])
def test_add_rms_norm_matches_rmsnorm(lib, hidden):
    """residual <- residual + x exactly (bf16), out = RMSNorm(that sum) within FUSED_ULPS; with
    residual null, RMSNorm(x) written over x itself. hidden 100 and 1000: a block's last warp
    part-filled; 5120: Scout's (several elements a thread)."""
    tokens = 3
    x = bf16_randn(tokens, hidden, seed=hidden)
    residual = bf16_randn(tokens, hidden, seed=hidden + 1, scale=8.0)
    norm = RMSNorm(hidden, EPS).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(bf16_randn(hidden, seed=hidden + 2).abs() + 0.5)
        total = residual + x
        ref = norm(total)
        ref_plain = norm(x)
    weight = norm.weight.detach()
    res_buffer, res = guarded(tokens * hidden, torch.bfloat16, 4096.0)
    res.copy_(residual.view(-1))
    out_buffer, out = guarded(tokens * hidden, torch.bfloat16, 4096.0)
    args = (x.data_ptr(), weight.data_ptr(), tokens, hidden, EPS, None)
    assert lib.add_rms_norm(out.data_ptr(), res.data_ptr(), *args) == 0, lib.last_error()
    assert torch.equal(res.view(tokens, hidden), total)
    assert_bf16_close(out.view(tokens, hidden), ref, f"add + norm, hidden {hidden}")
    assert_guard_intact(res_buffer, res.numel(), 4096.0, "residual")
    assert_guard_intact(out_buffer, out.numel(), 4096.0, "out")
    y_buffer, y = guarded(tokens * hidden, torch.bfloat16, 4096.0)
    y.copy_(x.view(-1))
    args = (y.data_ptr(), None, y.data_ptr(), weight.data_ptr(), tokens, hidden, EPS, None)
    assert lib.add_rms_norm(*args) == 0, lib.last_error()
    assert_bf16_close(y.view(tokens, hidden), ref_plain, f"norm in place, hidden {hidden}")
    assert_guard_intact(y_buffer, y.numel(), 4096.0, "out (in place)")


# name -> (q heads, kv heads, head_dim); d96: head-dim pairs cut short in a warp
ROPE_LAYOUTS = {"scout": (40, 8, 128), "d64": (8, 2, 64), "d96": (4, 1, 96), "d256": (8, 8, 256)}
# name -> (rope, qk-norm, temperature): the model's RoPE and NoPE layers, and all at once
ROPE_MODES = {
    "rope-qknorm": (True, True, False),
    "rope": (True, False, False),
    "nope-temperature": (False, False, True),
    "nope": (False, False, False),
    "all": (True, True, True),
}
POSITIONS = [0, 7, 8191, 131071, (1 << 20) - 1]  # the last two: large fp32 angles


@pytest.mark.parametrize("mode", list(ROPE_MODES))
@pytest.mark.parametrize("layout", list(ROPE_LAYOUTS))
def test_rope_qk_norm_kv_write_matches_attention(lib, layout, mode):
    """q and the cached k within FUSED_ULPS of the reference, v's bits in the cache, at
    scattered slots of a cache of garbage; token 1's slot is -1 (nothing written for it); every
    other slot, and the guards after q_out and the caches, untouched. q, k, v are row-strided
    views of one fused projection output; the temperature is StepContext's formula (Scout's
    floor_scale 8192, attn_scale 0.1)."""
    q_heads, kv_heads, dim = ROPE_LAYOUTS[layout]
    rope, qk_norm, use_temperature = ROPE_MODES[mode]
    tokens, pool = len(POSITIONS), 64
    qkv = bf16_randn(tokens, (q_heads + 2 * kv_heads) * dim, seed=dim, scale=2.0)
    q, k, v = (
        part.view(tokens, -1, dim) for part in qkv.split([q_heads * dim, *[kv_heads * dim] * 2], 1)
    )
    positions = torch.tensor(POSITIONS)
    inv_freq = inv_frequencies(dim, SCOUT_THETA, SCOUT_ROPE)
    scale = temperature(positions) if use_temperature else None
    slots = torch.randperm(pool, generator=torch.Generator().manual_seed(dim))[:tokens]
    slots[1] = -1
    row = qkv.shape[1]
    cache_numel = pool * kv_heads * dim
    q_buffer, q_out = guarded(tokens * q_heads * dim, torch.bfloat16, 4096.0)
    k_buffer, k_cache = guarded(cache_numel, torch.bfloat16, 4096.0)
    v_buffer, v_cache = guarded(cache_numel, torch.bfloat16, 4096.0)
    k_cache.copy_(bf16_randn(cache_numel, seed=1))
    v_cache.copy_(bf16_randn(cache_numel, seed=2))
    k_cache, v_cache = k_cache.view(pool, kv_heads, dim), v_cache.view(pool, kv_heads, dim)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    code = lib.rope(
        q_out.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        row,
        row,
        row,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        positions.data_ptr(),
        inv_freq.data_ptr() if rope else None,
        None if scale is None else scale.data_ptr(),
        tokens,
        q_heads,
        kv_heads,
        dim,
        rope,
        qk_norm,
        EPS,
        None,
    )
    assert code == 0, lib.last_error()
    ref_q, ref_k = rope_reference(q, k, positions, inv_freq if rope else None, qk_norm, scale)
    written = slots >= 0
    assert_bf16_close(q_out.view(tokens, q_heads, dim), ref_q, "q")
    assert_bf16_close(k_cache[slots[written]], ref_k[written], "k in the cache")
    assert torch.equal(v_cache[slots[written]], v[written])
    others = torch.ones(pool, dtype=torch.bool)
    others[slots[written]] = False
    assert torch.equal(k_cache[others], k_before[others]), "k written at a slot not given"
    assert torch.equal(v_cache[others], v_before[others]), "v written at a slot not given"
    assert_guard_intact(q_buffer, q_out.numel(), 4096.0, "q_out")
    assert_guard_intact(k_buffer, cache_numel, 4096.0, "k_cache")
    assert_guard_intact(v_buffer, cache_numel, 4096.0, "v_cache")


@pytest.mark.parametrize("inter", [100, 1000, 8192])
def test_silu_mul_matches_swiglu(lib, inter):
    """F.silu(gate) * up within FUSED_ULPS, on the two halves of a fused gate_up output (rows
    2 * inter apart) and on separate tensors; gates include 0, +-88 and +-100 (exp overflows)."""
    tokens = 4
    gate_up = bf16_randn(tokens, 2 * inter, seed=inter, scale=3.0)
    gate_up[0, :6] = torch.tensor([0.0, 88.0, -88.0, 100.0, -100.0, -0.0])
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    ref = F.silu(gate) * up
    for what, g, u in (("fused gate_up", gate, up), ("separate", gate.clone(), up.clone())):
        out_buffer, out = guarded(tokens * inter, torch.bfloat16, 4096.0)
        args = (g.data_ptr(), u.data_ptr(), g.stride(0), u.stride(0), tokens, inter, None)
        assert lib.silu_mul(out.data_ptr(), *args) == 0, lib.last_error()
        assert_bf16_close(out.view(tokens, inter), ref, f"{what}, intermediate {inter}")
        assert_guard_intact(out_buffer, out.numel(), 4096.0, "out")


def test_fused_ops_refuse_bad_arguments(lib):
    """Each bad argument: nonzero, and pyllama4_last_error() names it (pointers are never
    dereferenced: the checks come before any launch)."""
    p = 16
    norm = [32, p, p, p, 2, 64, EPS, None]  # out, residual, x, weight, ...
    for changes, message in [
        ({2: None}, "a pointer argument is null"),
        ({5: 0}, "num_tokens and hidden must be positive"),
        ({1: 32}, "out must not be residual"),
    ]:
        args = [*norm]
        for index, value in changes.items():
            args[index] = value
        assert lib.add_rms_norm(*args) != 0, message
        assert message in lib.last_error()
    rope = [p] * 4 + [5 * 128, 128, 128] + [p] * 6 + [2, 4, 1, 128, 1, 1, EPS, None]
    for changes, message in [
        ({8: None}, "a pointer argument is null"),
        ({11: None}, "use_rope needs positions and inv_freq"),
        ({15: 0}, "num_tokens and the head counts must be positive"),
        ({16: 127}, "head_dim 127 must be even, 2 to 256"),
        ({16: 258, 4: 9999, 5: 999, 6: 999}, "head_dim 258 must be even"),
        ({5: 127}, "a row stride is shorter than its heads"),
    ]:
        args = [*rope]
        for index, value in changes.items():
            args[index] = value
        assert lib.rope(*args) != 0, message
        assert message in lib.last_error()
    assert lib.silu_mul(p, p, p, 100, 99, 2, 100, None) != 0
    assert "a row stride is shorter than intermediate" in lib.last_error()
    assert lib.silu_mul(p, p, p, 100, 100, 2, 0, None) != 0
    assert "num_tokens and intermediate must be positive" in lib.last_error()


def test_the_model_through_the_emulated_fused_ops_is_the_torch_path(lib, monkeypatch):
    """pyllama4.kernels.fused's own wrappers, on this library (CPU tensors, null stream), wired
    into a tiny bf16 Llama 4 (RoPE + QK-norm layers, a NoPE layer with temperature tuning,
    chunk-local attention, dense and MoE feed-forwards): decode logits over a few steps, and a
    prefill's final hidden states and the residual streams captured entering layers 0 and 2
    (forward_with_aux), are those of the torch path, bit for bit."""
    from transformers import Llama4ForCausalLM as HFLlama4
    from transformers import Llama4TextConfig

    from pyllama4.config import TextConfig
    from pyllama4.model.llama4 import Llama4ForCausalLM
    from pyllama4.runner import ModelRunner
    from pyllama4.speculative.train.capture import prefill_capture

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        **TINY_TEXT,
        vocab_size=128,
        interleave_moe_layer_step=2,
        attention_chunk_size=16,
        floor_scale=4,
        max_position_embeddings=256,
    )
    model = Llama4ForCausalLM(TextConfig.from_dict(cfg.to_dict()))
    model.load_state_dict(HFLlama4(cfg).state_dict(), strict=False)
    model = model.to(torch.bfloat16).eval()

    def outputs() -> list[torch.Tensor]:
        runner = ModelRunner(model, context_len=128, kv_tokens=1024, page_size=16)
        sched = runner.new_scheduler()
        for i in range(3):
            sched.add_request(i, np.arange(5 + 13 * i, dtype=np.int32) % 100, max_new_tokens=6)
        logits = []
        while sched.has_work():
            plan = sched.schedule()
            logits.append(runner.forward(plan))
            sched.commit(np.full(plan.num_samples, 7, dtype=np.int32))
        [(aux, hidden)] = prefill_capture(runner, [list(range(3, 40))], (0, 2))
        return [torch.cat(logits), aux, hidden]

    calls = {"add_rms_norm": 0, "rope": 0, "silu_mul": 0}

    def counted(name: str, fn: Any) -> Any:
        def call(*args: Any) -> int:
            calls[name] += 1
            return fn(*args)

        return call

    launchers = tuple(counted(n, getattr(lib, n)) for n in calls)
    monkeypatch.setattr(fused, "_functions", lambda: launchers)
    monkeypatch.setattr(fused, "_stream", lambda tensor: None)
    monkeypatch.setattr(fused, "usable", lambda *ts: all(t.dtype == torch.bfloat16 for t in ts))
    with_fused = outputs()
    assert all(calls.values()), calls
    monkeypatch.setattr(fused, "usable", lambda *ts: False)
    without = outputs()
    for name, a, b in zip(("logits", "aux", "hidden"), with_fused, without, strict=True):
        assert torch.equal(a, b), f"{name}: {(a.float() - b.float()).abs().max():.3g}"
