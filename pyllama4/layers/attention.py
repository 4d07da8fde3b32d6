"""Attention over the paged KV cache: the torch reference that any GPU kernel must equal.

Invariant: a query at position p of a request attends to that request's keys at positions
j <= p — all of them on full-attention layers, only those with floor(j / C) == floor(p / C) on
chunk-local layers — read through the block tables, after this step's keys and values have been
written at the plan's slots. Works for any mix of decodes (with speculative slots) and prefill
chunks. Decodes and prefills are padded separately so short queries never pay for long ones;
each group gathers its requests' keys and values as whole pages and attends through SDPA, or,
for batches of one-query decodes (the rule at MATMUL_MAX_QUERIES), through batched matmuls per
KV head with a float32 softmax: the same function of the visible keys either way.
On a GPU with the kernel library (hip/), decode tokens go through the paged attention kernel
(pyllama4.kernels.attention), which must give the same result; prefill chunks keep torch's SDPA
over the gathered keys.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pyllama4.batch import StepBatch
from pyllama4.kernels import attention as gpu
from pyllama4.kv_cache import PagedKVCache


@dataclass(frozen=True)
class _Group:
    """Requests padded to [R, Q] queries and [R, P] whole pages of keys (K = P * page_size keys,
    the first at position first_page * page_size of each request)."""

    shape: tuple[int, int, int]  # (R, Q, K)
    # Unpadded groups (every request has Q queries): their tokens are [span[0], span[1]) in
    # order. Padded ones: index tensors instead, span None.
    span: tuple[int, int] | None
    query_index: torch.Tensor | None  # [R * Q] flat token index of each query (0 where padded)
    valid: torch.Tensor | None  # [V] positions in [R * Q] that are real queries
    tokens: torch.Tensor | None  # [V] their flat token indices
    pages: torch.Tensor  # [R * P] pool page of each key page (the request's first where padded)
    # Exactly one of: SDPA's [R, 1, Q, K] bool mask (True where the query attends to the key),
    # or the batched matmuls' [R, Q, K] additive bias (0 there, -inf elsewhere) in the pool's dtype.
    mask: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(frozen=True)
class _Dense:
    """A decode graph's tokens without the kernel (the CPU): each of the B tokens over every
    key position it could see ([B, K], K = the table's width in keys, or one chunk), masked by
    its position; built from device tensors only, so it can be captured."""

    key_slots: torch.Tensor  # [B * K] pool slot of each key (the row's own page where masked)
    mask: torch.Tensor  # [B, 1, 1, K] bool


@dataclass(frozen=True)
class AttentionMetadata:
    """Per step, shared by all layers of one pool: the groups to attend over, and the decode
    tokens the GPU kernel takes instead (then they are in no group); or, for a decode graph's
    batch, the kernel's tokens or `dense` (without the kernel)."""

    groups: tuple[_Group, ...]
    decode: gpu.KernelTokens | None = None
    table: torch.Tensor | None = None  # the block table the kernel reads
    page_size: int = 0
    chunk: int | None = None
    dense: _Dense | None = None


# Groups of at least MATMUL_MIN_REQUESTS requests of at most MATMUL_MAX_QUERIES queries each
# attend through batched matmuls per KV head (_attend_matmul); others through SDPA's flash kernel.
# Measured with bench/cpu_attention.py (2-core CPU, 1 thread, 8 query / 2 KV heads of 32, 128-512
# keys): one query per request, the matmuls take 0.75x SDPA's time at 2-64 requests in fp32 and
# 0.25-0.6x in bf16 (SDPA's one-query bf16 path is slow), but 1.2-1.25x for a single request;
# from 2 queries on the two are within ~10% up to 4 queries, and SDPA is ~2x faster at 16.
MATMUL_MAX_QUERIES = 1
MATMUL_MIN_REQUESTS = 2


def _mask(
    ctx: np.ndarray,
    seq: np.ndarray,
    start: np.ndarray,
    kpos: np.ndarray,
    q_max: int,
    chunk: int | None,
    tree: np.ndarray | None,
) -> np.ndarray:
    """[R, Q, K] bool: query j of request r (position ctx + j, or its tree depth) sees key kpos
    [R, K]; padded query rows see key 0 only (no NaN)."""
    qj = np.arange(q_max)
    qpos = ctx[:, None] + qj[None, :]
    key_valid = (kpos >= start[:, None]) & (kpos < seq[:, None])
    if tree is None:
        mask = key_valid[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
        kreal = kpos
    else:
        k_max = kpos.shape[1]
        anc = np.zeros((len(ctx), q_max, q_max), dtype=bool)
        anc[:, : tree.shape[1], : tree.shape[2]] = tree[:, :q_max, :q_max]
        depth = anc.sum(axis=2) - 1  # a node's ancestors (itself included) count its depth + 1
        node = kpos - ctx[:, None]  # the query node a key of this step belongs to
        fresh = node >= 0
        ancestor = np.take_along_axis(
            anc,
            np.broadcast_to(node.clip(0, q_max - 1)[:, None, :], (len(ctx), q_max, k_max)),
            axis=2,
        )
        mask = key_valid[:, None, :] & np.where(fresh[:, None, :], ancestor, True)
        qpos = ctx[:, None] + depth
        kreal = np.where(
            fresh, ctx[:, None] + np.take_along_axis(depth, node.clip(0, q_max - 1), axis=1), kpos
        )
    if chunk is not None:
        mask &= kreal[:, None, :] // chunk == qpos[:, :, None] // chunk
    query_valid = qj[None, :] < (seq - ctx)[:, None]
    mask[:, :, 0] |= ~query_valid
    return mask


def _group(
    batch: StepBatch,
    lo: int,
    hi: int,
    table: torch.Tensor,
    page_size: int,
    chunk: int | None,
    table_width: int,
    dtype: torch.dtype,
    tree: np.ndarray | None = None,
) -> _Group:
    """tree: [R, Q', Q'] ancestor masks of the group's query tokens (draft trees, see StepBatch);
    keys written this step then count by tree ancestry and real position, not by slot order."""
    device = table.device
    qs = batch.query_start[lo : hi + 1].astype(np.int64)
    ctx = batch.context_lens[lo:hi].astype(np.int64)
    seq = batch.seq_lens[lo:hi].astype(np.int64)
    qlen = seq - ctx
    # Keys: [0, seq) for full attention; from the chunk of the first query for chunk-local.
    start = np.zeros_like(ctx) if chunk is None else ctx // chunk * chunk
    first, last = start // page_size, (seq - 1) // page_size
    q_max, p_max = int(qlen.max()), int((last - first).max()) + 1
    qj, pj = np.arange(q_max), np.arange(p_max)
    page = first[:, None] + pj[None, :]
    col = page if chunk is None else page % table_width
    col = np.where(page <= last[:, None], col, col[:, :1])
    rows = batch.rows[lo:hi]
    pages = table[rows[:, None], torch.from_numpy(col).to(device)]
    kpos = first[:, None] * page_size + np.arange(p_max * page_size)[None, :]
    visible = _mask(ctx, seq, start, kpos, q_max, chunk, tree)
    query_valid = qj[None, :] < qlen[:, None]
    query_index = np.where(query_valid, qs[:-1, None] + qj[None, :], 0).reshape(-1)
    valid = np.flatnonzero(query_valid)
    padded = len(valid) < len(query_index)
    index = [query_index, valid, query_index[valid]]
    query_index, valid, tokens = (torch.from_numpy(i).to(device) if padded else None for i in index)
    mask = bias = None
    if q_max <= MATMUL_MAX_QUERIES and len(ctx) >= MATMUL_MIN_REQUESTS:
        bias = torch.from_numpy(np.where(visible, np.float32(0), np.float32(-np.inf)))
        bias = bias.to(device, dtype)
    else:
        mask = torch.from_numpy(visible[:, None]).to(device)
    return _Group(
        shape=(len(ctx), q_max, p_max * page_size),
        span=None if padded else (int(qs[0]), int(qs[-1])),
        query_index=query_index,
        valid=valid,
        tokens=tokens,
        pages=pages.reshape(-1),
        mask=mask,
        bias=bias,
    )


def _dense(
    batch: StepBatch, table: torch.Tensor, page_size: int, chunk: int | None, width: int
) -> _Dense:
    """What _Dense holds, from batch.rows and batch.positions alone (width: the local ring
    table's width in pages)."""
    positions = batch.positions[:, None]
    if chunk is None:
        kpos = torch.arange(table.shape[1] * page_size, device=table.device)[None, :]
        col = kpos // page_size
    else:
        kpos = positions // chunk * chunk + torch.arange(chunk, device=table.device)[None, :]
        col = kpos // page_size % width
    visible = kpos <= positions
    pages = table[batch.rows].gather(1, col.expand(len(batch.rows), -1))
    slots = torch.where(visible, pages * page_size + kpos % page_size, pages * page_size)
    return _Dense(slots.reshape(-1), visible[:, None, None, :])


def prepare(batch: StepBatch, cache: PagedKVCache, local: bool) -> AttentionMetadata:
    """Metadata for the global-pool layers (local=False) or the chunk-local ones (local=True)."""
    table = cache.local_table if local else cache.global_table
    chunk = cache.chunk_size if local else None
    num = len(batch.context_lens)
    pool = next((k for k, loc in zip(cache.k, cache.local_layers, strict=True) if loc == local))
    if batch.static_max_keys is not None:  # a decode graph's batch
        if gpu.usable(pool):
            keys = batch.static_max_keys if chunk is None else min(chunk, batch.static_max_keys)
            decode = gpu.graph_tokens(batch.rows, batch.positions, keys, pool.shape[1])
            return AttentionMetadata((), decode, table, cache.page_size, chunk)
        dense = _dense(batch, table, cache.page_size, chunk, cache.local_table_width)
        return AttentionMetadata((), None, table, cache.page_size, chunk, dense)
    decode = None
    if batch.num_decodes and batch.tree_ancestors is None and gpu.usable(pool):
        decode = gpu.kernel_tokens(
            batch.rows,
            batch.query_start,
            batch.seq_lens,
            batch.positions,
            chunk,
            (0, batch.num_decodes),
            pool.shape[1],
        )
    bounds = [
        (0 if decode is None else batch.num_decodes, batch.num_decodes),
        (batch.num_decodes, num),
    ]
    trees = (batch.tree_ancestors, None)
    groups = tuple(
        _group(
            batch, lo, hi, table, cache.page_size, chunk, cache.local_table_width, pool.dtype, tree
        )
        for (lo, hi), tree in zip(bounds, trees, strict=True)
        if hi > lo
    )
    return AttentionMetadata(groups, decode, table, cache.page_size, chunk)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_written: bool = False,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of this step; writes k/v at `slots`, returns [T, Hq, D].
    kv_written: the caller wrote them already (pyllama4.kernels.fused); k/v give shapes only."""
    if not kv_written:
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
    out = torch.empty_like(q)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if meta.decode is not None:
        n = meta.decode.count
        out[:n] = gpu.paged_attention_gpu(
            q[:n], k_cache, v_cache, meta.table, meta.decode, meta.page_size, meta.chunk, scale
        )
    if meta.dense is not None:
        b, nk = meta.dense.mask.shape[0], meta.dense.mask.shape[-1]
        kd = k_cache.index_select(0, meta.dense.key_slots).view(b, nk, hkv, d).transpose(1, 2)
        vd = v_cache.index_select(0, meta.dense.key_slots).view(b, nk, hkv, d).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            q[:, None].transpose(1, 2),
            kd,
            vd,
            attn_mask=meta.dense.mask,
            scale=scale,
            enable_gqa=True,
        )
        out.copy_(od.transpose(1, 2).reshape(b, hq, d))
    for g in meta.groups:
        r, nq, nk = g.shape
        # index_select: several times faster than advanced indexing for row gathers on CPU;
        # whole pages: a page_size-th of the index entries that single slots would take.
        if g.span is None:
            qg = q.index_select(0, g.query_index).view(r, nq, hq, d)
        else:
            qg = q[g.span[0] : g.span[1]].view(r, nq, hq, d)
        kg, vg = _gather_pages(k_cache, v_cache, g.pages, meta.page_size)
        kg, vg = kg.view(r, nk, hkv, d), vg.view(r, nk, hkv, d)
        if g.bias is not None:
            og = _attend_matmul(qg, kg, vg, g.bias, scale)
        else:
            og = F.scaled_dot_product_attention(
                qg.transpose(1, 2),
                kg.transpose(1, 2),
                vg.transpose(1, 2),
                attn_mask=g.mask,
                scale=scale,
                enable_gqa=True,
            ).transpose(1, 2)
        if g.span is None:
            out.index_copy_(0, g.tokens, og.reshape(r * nq, hq, d).index_select(0, g.valid))
        else:
            out[g.span[0] : g.span[1]] = og.reshape(r * nq, hq, d)
    return out


_scratch = threading.local()  # .buffer: this thread's gathered K and V on the CPU


def _gather_pages(
    k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of `pages` [N], each [N, page_size, Hkv, D], valid until the next
    call on this thread. On the CPU they go to one buffer per thread, reused by every layer and
    step (grown by half when outgrown): fresh tensors of megabytes there fault their pages in on
    every call, which costs about as much as the copy."""
    k_pages = k_cache.view(-1, page_size, *k_cache.shape[1:])
    v_pages = v_cache.view(k_pages.shape)
    if k_cache.device.type != "cpu":
        return k_pages.index_select(0, pages), v_pages.index_select(0, pages)
    shape = (2, pages.numel(), *k_pages.shape[1:])
    numel = 2 * pages.numel() * k_pages[0].numel()
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.dtype != k_cache.dtype or buffer.numel() < numel:
        buffer = _scratch.buffer = torch.empty(numel * 3 // 2, dtype=k_cache.dtype)
    kv = buffer[:numel].view(shape)
    torch.index_select(k_pages, 0, pages, out=kv[0])
    torch.index_select(v_pages, 0, pages, out=kv[1])
    return kv[0], kv[1]


def _attend_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of q [R, Q, Hq, D] over k/v [R, K, Hkv, D] with the additive bias [R, Q, K]:
    per KV head, one batched matmul of its Hq / Hkv query heads' rows [R, G * Q, D] with its
    keys (strided views, never copied or repeated per query head), softmax in float32, one
    batched matmul with its values. Returns [R, Q, Hq, D]."""
    r, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    grp = hq // hkv
    qh = q.view(r, nq, hkv, grp, d).permute(2, 0, 3, 1, 4).reshape(hkv, r, grp * nq, d)
    out = q.new_empty(r, hkv, grp * nq, d)
    for h in range(hkv):
        kt = k[:, :, h].transpose(1, 2)  # [R, D, K]
        if nq == 1:
            s = torch.baddbmm(bias, qh[h], kt, alpha=scale)
        else:
            s = torch.bmm(qh[h], kt).mul_(scale)
            s.view(r, grp, nq, nk).add_(bias[:, None])
        p = torch.softmax(s, -1, dtype=torch.float32).to(v.dtype)
        out[:, h] = torch.bmm(p, v[:, :, h])
    return out.view(r, hkv, grp, nq, d).permute(0, 3, 1, 2, 4).reshape(r, nq, hq, d)
