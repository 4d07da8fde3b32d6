"""Random paged KV caches for the GPU kernel tests and bench/kernels.py: decode queries of a
batch of requests over their pages, laid out through block tables as the core lays them out
(global: column = page index; chunk-local: column = page index % table width, only the current
chunk's pages), with pages drawn at random so that neighbouring keys never share a page."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeCase:
    q: torch.Tensor  # [B, Hq, D] bf16
    k_cache: torch.Tensor  # [slots, Hkv, D] bf16
    v_cache: torch.Tensor
    table: torch.Tensor  # [B, width] int64
    rows: torch.Tensor  # [B] int64 (row b for request b)
    positions: torch.Tensor  # [B] int64: the decode token's position (context - 1)
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
    q_heads: int = 40,
    kv_heads: int = 8,
    head_dim: int = 128,
    page_size: int = 16,
    chunk: int | None = None,
    seed: int = 0,
    device: str = "cuda",
) -> DecodeCase:
    g = torch.Generator(device="cpu").manual_seed(seed)
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
    return DecodeCase(
        q=randn(len(contexts), q_heads, head_dim).to(device),
        k_cache=randn(total * page_size, kv_heads, head_dim).to(device),
        v_cache=randn(total * page_size, kv_heads, head_dim).to(device),
        table=table.to(device),
        rows=torch.arange(len(contexts), device=device),
        positions=torch.tensor([n - 1 for n in contexts], device=device),
        page_size=page_size,
        chunk=chunk,
        keys=keys,
    )


def reference(case: DecodeCase, scale: float) -> torch.Tensor:
    """fp32 attention of each decode token over its visible keys, read through the table."""
    out = []
    hq, hkv = case.q.shape[1], case.k_cache.shape[1]
    for b in range(case.q.shape[0]):
        p = int(case.positions[b])
        start = 0 if case.chunk is None else p // case.chunk * case.chunk
        j = torch.arange(start, p + 1, device=case.q.device)
        col = j // case.page_size
        if case.chunk is not None:
            col = col % case.table.shape[1]
        slots = case.table[case.rows[b], col] * case.page_size + j % case.page_size
        k = case.k_cache[slots].float().repeat_interleave(hq // hkv, dim=1)  # [K, Hq, D]
        v = case.v_cache[slots].float().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,khd->hk", case.q[b].float(), k) * scale
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
    return torch.stack(out)
