"""Random paged KV caches for the GPU kernel tests and bench/kernel_timings.py: the query tokens of
a batch of requests (one each for decode, several for prefill / extend) over their pages, laid
out through block tables as the core lays them out (global: column = page index; chunk-local:
column = page index % table width, only the current chunk's pages), with pages drawn at random
so that neighbouring keys never share a page."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DecodeCase:
    q: torch.Tensor  # [T, Hq, D] bf16
    k_cache: torch.Tensor  # [slots, Hkv, D] bf16
    v_cache: torch.Tensor
    table: torch.Tensor  # [B, width] int64
    rows: torch.Tensor  # [B] int64 (row b for request b)
    positions: torch.Tensor  # [T] int64: each query token's position
    query_start: np.ndarray  # [B + 1] int32: request b's tokens are [query_start[b], [b + 1])
    seq_lens: np.ndarray  # [B] int32: each request's length after this step
    page_size: int
    chunk: int | None
    keys: int  # key rows one step reads: sum over requests of visible keys

    @property
    def kv_bytes(self) -> int:
        """K and V bytes the step must read."""
        return 2 * self.keys * self.k_cache.shape[1] * self.k_cache.shape[2] * 2


def decode_case(
    contexts: list[int],
    *,
    queries: list[int] | None = None,
    q_heads: int = 40,
    kv_heads: int = 8,
    head_dim: int = 128,
    page_size: int = 16,
    chunk: int | None = None,
    seed: int = 0,
    device: str = "cuda",
) -> DecodeCase:
    """Request b has contexts[b] tokens after the step, the last queries[b] of them (default 1)
    being this step's query tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    queries = queries or [1] * len(contexts)
    pages_of = []
    for n in contexts:
        first = 0 if chunk is None else (n - 1) // chunk * chunk // page_size
        pages_of.append((first, -(-n // page_size)))
    width = max(last for _, last in pages_of)
    if chunk is not None:
        width = chunk // page_size + 1
    total = sum(last - first for first, last in pages_of)
    order = torch.randperm(total, generator=g)
    table = torch.zeros(len(contexts), width, dtype=torch.int64)
    at = 0
    for r, (first, last) in enumerate(pages_of):
        for i in range(first, last):
            table[r, i if chunk is None else i % width] = order[at]
            at += 1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    keys = sum(n - (0 if chunk is None else (n - 1) // chunk * chunk) for n in contexts)
    positions = [p for n, k in zip(contexts, queries, strict=True) for p in range(n - k, n)]
    return DecodeCase(
        q=randn(len(positions), q_heads, head_dim).to(device),
        k_cache=randn(total * page_size, kv_heads, head_dim).to(device),
        v_cache=randn(total * page_size, kv_heads, head_dim).to(device),
        table=table.to(device),
        rows=torch.arange(len(contexts), device=device),
        positions=torch.tensor(positions, device=device),
        query_start=np.concatenate([[0], np.cumsum(queries)]).astype(np.int32),
        seq_lens=np.asarray(contexts, dtype=np.int32),
        page_size=page_size,
        chunk=chunk,
        keys=keys,
    )


def reference(case: DecodeCase, scale: float) -> torch.Tensor:
    """fp32 attention of each query token over its visible keys, read through the table."""
    out = []
    hq, hkv = case.q.shape[1], case.k_cache.shape[1]
    request = np.repeat(np.arange(len(case.seq_lens)), np.diff(case.query_start))
    for t in range(case.q.shape[0]):
        b = int(request[t])
        p = int(case.positions[t])
        start = 0 if case.chunk is None else p // case.chunk * case.chunk
        j = torch.arange(start, p + 1, device=case.q.device)
        col = j // case.page_size
        if case.chunk is not None:
            col = col % case.table.shape[1]
        slots = case.table[case.rows[b], col] * case.page_size + j % case.page_size
        k = case.k_cache[slots].float().repeat_interleave(hq // hkv, dim=1)  # [K, Hq, D]
        v = case.v_cache[slots].float().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,khd->hk", case.q[t].float(), k) * scale
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
    return torch.stack(out)
