"""The torch attention (pyllama4.layers.attention) on the CPU: its batched-matmul path for short
queries and its SDPA path for long ones, over whole gathered pages, against the fp32 reference
of tests/gpu/paged_cases.py (each query over its visible keys, read through the block table).

Tolerances: fp32 max abs difference <= 1e-5; bf16 <= 2e-2 (as the GPU kernel's tests).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gpu.paged_cases import DecodeCase, decode_case, reference

from pyllama4.batch import StepBatch
from pyllama4.layers import attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def step(
    case: DecodeCase, dtype: torch.dtype, num_decodes: int
) -> tuple[StepBatch, SimpleNamespace]:
    """The case's requests as one step (its KV already written) and its cache in dtype: the
    first num_decodes requests the decode group, the rest the prefill group."""
    tokens = int(case.query_start[-1])
    batch = StepBatch(
        token_ids=torch.zeros(tokens, dtype=torch.int64),
        positions=case.positions,
        global_slots=torch.zeros(tokens, dtype=torch.int64),
        local_slots=torch.zeros(tokens, dtype=torch.int64),
        rows=case.rows,
        sample_indices=torch.arange(tokens),
        query_start=case.query_start,
        context_lens=(case.seq_lens - np.diff(case.query_start)).astype(np.int32),
        seq_lens=case.seq_lens,
        num_decodes=num_decodes,
    )
    cache = SimpleNamespace(
        k=[case.k_cache.to(dtype)],
        v=[case.v_cache.to(dtype)],
        local_layers=(case.chunk is not None,),
        chunk_size=case.chunk,
        page_size=case.page_size,
        global_table=case.table,
        local_table=case.table,
        local_table_width=case.table.shape[1],
    )
    return batch, cache


def attend(case: DecodeCase, dtype: torch.dtype, num_decodes: int) -> torch.Tensor:
    batch, cache = step(case, dtype, num_decodes)
    meta = attention.prepare(batch, cache, local=case.chunk is not None)
    q, k_cache, v_cache = case.q.to(dtype), cache.k[0], cache.v[0]
    k = torch.zeros(q.shape[0], k_cache.shape[1], k_cache.shape[2], dtype=dtype)
    scale = q.shape[-1] ** -0.5
    return attention.paged_attention(
        q, k, k, k_cache, v_cache, batch.global_slots, meta, scale, kv_written=True
    )


def assert_close(case: DecodeCase, dtype: torch.dtype, num_decodes: int) -> None:
    got = attend(case, dtype, num_decodes).float()
    err = (got - reference(case, case.q.shape[-1] ** -0.5)).abs().max().item()
    assert err <= TOL[dtype], f"max error {err:.3g}"


@pytest.fixture(params=["matmul", "sdpa"])
def path(request, monkeypatch):
    """Every group through the batched matmuls, or every group through SDPA."""
    matmul = request.param == "matmul"
    monkeypatch.setattr(attention, "MATMUL_MAX_QUERIES", 1 << 30 if matmul else 0)
    monkeypatch.setattr(attention, "MATMUL_MIN_REQUESTS", 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("q_heads", "kv_heads"), [(4, 4), (8, 2), (8, 1)], ids=["group1", "group4", "group8"]
)
@pytest.mark.parametrize("chunk", [None, 32], ids=["global", "chunk-local"])
def test_decodes_with_ragged_lengths(path, dtype, q_heads, kv_heads, chunk):
    """One query per request over 1 to 129 keys, pages of 8; chunk-local with chunks of 32:
    positions 32 and 64 open a new chunk (they see only themselves), 40 sees 32..40."""
    case = decode_case(
        [1, 9, 33, 41, 65, 130],
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=32,
        page_size=8,
        chunk=chunk,
        seed=kv_heads,
        device="cpu",
    )
    assert_close(case, dtype, num_decodes=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [None, 16], ids=["global", "chunk-local"])
def test_short_queries_with_padded_rows_and_prefill(path, dtype, chunk):
    """Decodes of 1, 3 and 2 queries (padded to 3: rows that attend to nothing real), then
    two prefill chunks of 5 and 20 tokens; chunk-local with chunks of 16: the 3-query decode
    (positions 15..17) and the 20-token chunk (positions 10..29) cross a chunk boundary."""
    case = decode_case(
        [7, 18, 40, 52, 30],
        queries=[1, 3, 2, 5, 20],
        q_heads=8,
        kv_heads=2,
        head_dim=64,
        page_size=4,
        chunk=chunk,
        seed=5,
        device="cpu",
    )
    assert_close(case, dtype, num_decodes=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_rule_picks_matmuls_for_batched_decodes_and_sdpa_otherwise(dtype):
    """Two one-query decodes: the matmuls (bias in the pool's dtype); a lone decode and a
    prefill chunk of more queries: SDPA (a bool mask)."""
    case = decode_case([9, 20, 60], queries=[1, 1, 2], device="cpu")
    batch, cache = step(case, dtype, num_decodes=2)
    decodes, prefill = attention.prepare(batch, cache, local=False).groups
    assert decodes.bias is not None and decodes.mask is None
    assert decodes.bias.dtype == dtype
    assert prefill.mask is not None and prefill.bias is None
    batch, cache = step(decode_case([9], device="cpu"), dtype, num_decodes=1)
    (lone,) = attention.prepare(batch, cache, local=False).groups
    assert lone.mask is not None and lone.bias is None
