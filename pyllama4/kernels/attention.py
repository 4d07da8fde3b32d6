"""GPU paged attention (hip/paged_attention.hip) behind the torch reference's interface.

Invariant: `paged_attention_gpu` gives, for each query token, what
pyllama4.layers.attention.paged_attention gives (within bf16 rounding; tests/gpu): attention over
its own request's keys up to its position — from its chunk's start on chunk-local layers —
read through the block table. It enqueues on the current stream and never synchronises.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyllama4.kernels import check, library
from pyllama4.kernels import workspace as scratch

_c = ctypes
_ARGTYPES = (
    [_c.c_void_p] * 5  # out, q, k_cache, v_cache, block_table
    + [_c.c_int32, _c.c_void_p, _c.c_void_p]  # table_width, token_rows, positions
    + [_c.c_int32] * 6  # tokens, q heads, kv heads, head_dim, page_size, chunk_size
    + [_c.c_float, _c.c_void_p, _c.c_int32, _c.c_int32, _c.c_void_p]
)
_SPLIT_MIN = 256  # fewest key positions per split: below that a split's overhead dominates


def launcher(lib: ctypes.CDLL) -> Any:
    """lib's pyllama4_paged_attention, its C signature declared."""
    fn = lib.pyllama4_paged_attention
    if fn.argtypes is None:
        fn.argtypes, fn.restype = _ARGTYPES, _c.c_int
    return fn


def _launcher() -> Any | None:
    lib = library()
    return None if lib is None else launcher(lib)


def usable(k_cache: torch.Tensor) -> bool:
    """The kernel runs this cache: a bf16 GPU tensor and a loaded kernel library."""
    return k_cache.is_cuda and k_cache.dtype == torch.bfloat16 and _launcher() is not None


@dataclass(frozen=True)
class KernelTokens:
    """Query tokens [first, first + count) of a step as the kernel reads them."""

    first: int
    count: int
    token_rows: torch.Tensor  # [count] int64 block table row of each token's request
    positions: torch.Tensor  # [count] int64
    num_splits: int
    split_len: int


def kernel_tokens(
    rows: torch.Tensor,
    query_start: np.ndarray,
    seq_lens: np.ndarray,
    positions: torch.Tensor,
    chunk: int | None,
    requests: tuple[int, int],
    num_kv_heads: int,
) -> KernelTokens:
    """Metadata for the query tokens of requests [lo, hi) (decodes with their speculative
    tokens, or prefill / extend chunks: each token attends causally from its own position)."""
    lo, hi = requests
    qlens = np.diff(query_start[lo : hi + 1]).astype(np.int64)
    first, last = int(query_start[lo]), int(query_start[hi])
    seq = seq_lens[lo:hi].astype(np.int64)
    # The most keys any token sees: its request's last token, from its first token's chunk.
    keys = seq if chunk is None else seq - (seq - qlens) // chunk * chunk
    device = rows.device
    count = last - first
    token_rows = torch.repeat_interleave(  # output_size: no device sync for the length
        rows[lo:hi], torch.from_numpy(qlens).to(device), output_size=count
    )
    num_splits, split_len = split_plan(int(keys.max()), count * num_kv_heads, device)
    return KernelTokens(first, count, token_rows, positions[first:last], num_splits, split_len)


def graph_tokens(
    rows: torch.Tensor, positions: torch.Tensor, max_keys: int, num_kv_heads: int
) -> KernelTokens:
    """Metadata for a decode graph's tokens (one per row, rows [B] and positions [B] device
    tensors): a split count fixed for B and max_keys, each token splitting its own keys evenly
    (split_len 0), so nothing depends on the host values of the step the graph replays."""
    count = int(rows.shape[0])
    num_splits, _ = split_plan(max_keys, count * num_kv_heads, rows.device)
    return KernelTokens(0, count, rows, positions, num_splits, 0)


def split_plan(max_keys: int, blocks: int, device: torch.device) -> tuple[int, int]:
    """Splits of the key range: enough blocks to fill the GPU twice, none under _SPLIT_MIN."""
    units = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(-(-2 * units // max(blocks, 1)), -(-max_keys // _SPLIT_MIN)))
    return splits, -(-max_keys // splits)


def paged_attention_gpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    tokens: KernelTokens,
    page_size: int,
    chunk: int | None,
    scale: float,
) -> torch.Tensor:
    """q [count, Hq, D] bf16 -> [count, Hq, D]; the caches hold this step's keys already."""
    fn = _launcher()
    assert fn is not None, "paged_attention_gpu called without the kernel library"
    count, heads, dim = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    need = count * heads * tokens.num_splits * (dim + 2)
    workspace = scratch("paged_attention", q.device, need, torch.float32)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    check(
        fn(
            out.data_ptr(),
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            table.data_ptr(),
            table.shape[1],
            tokens.token_rows.data_ptr(),
            tokens.positions.data_ptr(),
            count,
            heads,
            k_cache.shape[1],
            dim,
            page_size,
            chunk or 0,
            scale,
            workspace.data_ptr(),
            tokens.num_splits,
            tokens.split_len,
            stream,
        )
    )
    return out
