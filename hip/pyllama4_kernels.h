// pyllama4_kernels.h: the C ABI of libpyllama4_kernels (hip/), called from Python with ctypes.
//
// Every launcher takes raw device pointers, sizes and a stream (hipStream_t / cudaStream_t as
// void*), enqueues its kernels on that stream and returns at once: 0 on success, else a nonzero
// code with pyllama4_last_error() describing it (bad arguments are refused before any launch).
// The library does not link against torch; it works with ROCm and CUDA builds of torch alike
// and inside graph capture (no allocation, no synchronisation).
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

// The ABI version: Python refuses a library whose version differs from what it was written for.
int32_t pyllama4_abi_version(void);
// The message of the last failed call on this thread ("" if none).
const char* pyllama4_last_error(void);
// "hip" or "cuda": the runtime the library was built for (the loader refuses a mismatch).
const char* pyllama4_platform(void);

// Attention of T query tokens over the paged KV cache of one layer (bf16 in and out, fp32
// accumulation). Query token t (head h, GQA: kv head h / (num_q_heads / num_kv_heads)) attends to
// its request's keys at positions [start_t, positions[t]], start_t = 0 when chunk_size == 0 and
// floor(positions[t] / chunk_size) * chunk_size otherwise. Key position j of token t lives at
// slot page * page_size + j % page_size of k_cache / v_cache ([slots, num_kv_heads, head_dim]),
// page = block_table[token_rows[t] * table_width + col], col = j / page_size, or
// (j / page_size) % table_width when chunk_size != 0 (the chunk-local ring table).
// Split-K: keys are cut into num_splits ranges of split_len positions from start_t; partial
// results go to workspace (num_tokens * num_q_heads * num_splits * (head_dim + 2) floats) and a
// second kernel combines them into out. head_dim must be a multiple of the warp width (32 or 64
// lanes) and at most 256; num_q_heads / num_kv_heads at most 8.
int pyllama4_paged_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                             const int64_t* block_table, int32_t table_width,
                             const int64_t* token_rows, const int64_t* positions,
                             int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                             int32_t head_dim, int32_t page_size, int32_t chunk_size, float scale,
                             float* workspace, int32_t num_splits, int32_t split_len,
                             void* stream);
}
