// Paged attention for Llama 4 (decode, and any query token with its causal / chunk-local range):
// split-K (flash-decoding) over the keys, GQA-aware, bf16 KV, fp32 accumulation.
//
// Kernel 1 (grid: splits x tokens x kv heads): one block takes one query token, one kv head and
// one range of split_len key positions. It holds the token's `group` query heads (the GQA group
// that shares the kv head) in registers, so each key and value row is read from memory once for
// all of them. Its warps stride over the keys of the range; lanes split head_dim (ELEMS values
// each, head_dim = ELEMS * warp width), so a key row is one coalesced read per warp. Each warp
// keeps an online softmax (running max m, sum l, accumulator) per query head; the block merges
// its warps in shared memory and writes the split's (acc, m, l) to the workspace.
// Kernel 2 (grid: tokens x q heads): merges the splits, out = sum_s w_s acc_s / sum_s w_s l_s
// with w_s = exp(m_s - max m), and writes bf16. Empty ranges carry m = -inf and weigh nothing.
//
// The reference this must equal is pyllama4.layers.attention.paged_attention (torch).
#include <cmath>

#include "errors.h"
#include "portable.h"
#include "pyllama4_kernels.h"

namespace {

constexpr int kWarps = 4;      // warps per block in kernel 1
constexpr int kUnroll = 4;     // keys a warp loads before it uses them
constexpr int kMaxGroup = 8;   // query heads per kv head (Scout and Maverick: 5)
constexpr int kMaxHeadDim = 256;

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int mask = PYLLAMA4_WARP / 2; mask > 0; mask /= 2) value += lane_xor(value, mask);
  return value;
}

template <int ELEMS>
__device__ __forceinline__ void load_row(const uint16_t* row, float (&out)[ELEMS]) {
#pragma unroll
  for (int e = 0; e < ELEMS; ++e) out[e] = bf16_to_float(row[e]);
}

template <int ELEMS>
__global__ void __launch_bounds__(kWarps * PYLLAMA4_WARP)
    attention_split_kernel(float* __restrict__ workspace, const uint16_t* __restrict__ q,
                           const uint16_t* __restrict__ k_cache,
                           const uint16_t* __restrict__ v_cache,
                           const int64_t* __restrict__ block_table, int table_width,
                           const int64_t* __restrict__ token_rows,
                           const int64_t* __restrict__ positions, int num_q_heads,
                           int num_kv_heads, int page_size, int chunk_size, float scale,
                           int num_splits, int split_len) {
  constexpr int kHeadDim = ELEMS * PYLLAMA4_WARP;
  const int split = blockIdx.x;
  const int token = blockIdx.y;
  const int kv_head = blockIdx.z;
  const int group = num_q_heads / num_kv_heads;
  const int warp = threadIdx.x / PYLLAMA4_WARP;
  const int lane = threadIdx.x % PYLLAMA4_WARP;

  const int64_t position = positions[token];
  const int64_t start = chunk_size > 0 ? position / chunk_size * chunk_size : 0;
  // split_len 0: this token's keys [start, position] split evenly over num_splits (a captured
  // graph fixes num_splits but not the context lengths it will see).
  const int64_t span = split_len > 0 ? split_len : (position - start + num_splits) / num_splits;
  const int64_t begin = start + static_cast<int64_t>(split) * span;
  const int64_t end = position + 1 < begin + span ? position + 1 : begin + span;
  const int64_t* table = block_table + token_rows[token] * table_width;

  float qv[kMaxGroup][ELEMS];
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][ELEMS];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) acc[g][e] = 0.f, qv[g][e] = 0.f;
    if (g < group) {
      const uint16_t* row =
          q + (static_cast<int64_t>(token) * num_q_heads + kv_head * group + g) * kHeadDim;
      load_row<ELEMS>(row + lane * ELEMS, qv[g]);
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) qv[g][e] *= scale;
    }
  }

  // Each warp takes kUnroll consecutive keys per iteration and issues all their loads before
  // using any, so several rows per warp are in flight (decode is bound by memory latency).
  for (int64_t j0 = begin + warp * kUnroll; j0 < end; j0 += kWarps * kUnroll) {
    float k[kUnroll][ELEMS], v[kUnroll][ELEMS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u;
      if (j < end) {
        const int64_t page_index = j / page_size;
        const int64_t col = chunk_size > 0 ? page_index % table_width : page_index;
        const int64_t slot = table[col] * page_size + j % page_size;
        const int64_t offset = (slot * num_kv_heads + kv_head) * kHeadDim + lane * ELEMS;
        load_row<ELEMS>(k_cache + offset, k[u]);
        load_row<ELEMS>(v_cache + offset, v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // Unrolled with warp-uniform predicates (no break), so qv, m, l, acc stay in registers.
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group && j0 + u < end) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < ELEMS; ++e) dot += qv[g][e] * k[u][e];
          dot = warp_sum(dot);
          const float m_new = fmaxf(m[g], dot);
          const float correction = __expf(m[g] - m_new);  // m = -inf at first: 0
          const float p = __expf(dot - m_new);
          l[g] = l[g] * correction + p;
#pragma unroll
          for (int e = 0; e < ELEMS; ++e) acc[g][e] = acc[g][e] * correction + p * v[u][e];
          m[g] = m_new;
        }
      }
    }
  }

  // Merge the warps: each writes its (m, l, acc) per head, then threads merge (head, dim) pairs.
  __shared__ float s_m[kWarps][kMaxGroup];
  __shared__ float s_l[kWarps][kMaxGroup];
  __shared__ float s_acc[kWarps][kMaxGroup][kMaxHeadDim];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      if (lane == 0) s_m[warp][g] = m[g], s_l[warp][g] = l[g];
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) s_acc[warp][g][lane * ELEMS + e] = acc[g][e];
    }
  }
  __syncthreads();
  const int64_t stride = kHeadDim + 2;
  for (int i = threadIdx.x; i < group * kHeadDim; i += blockDim.x) {
    const int g = i / kHeadDim;
    const int d = i % kHeadDim;
    float top = -INFINITY;
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, s_m[w][g]);
    float sum = 0.f, value = 0.f;
    if (top != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float weight = s_m[w][g] == -INFINITY ? 0.f : __expf(s_m[w][g] - top);
        sum += weight * s_l[w][g];
        value += weight * s_acc[w][g][d];
      }
    }
    const int64_t head = static_cast<int64_t>(token) * num_q_heads + kv_head * group + g;
    float* out = workspace + (head * num_splits + split) * stride;
    out[d] = value;
    if (d == 0) out[kHeadDim] = top, out[kHeadDim + 1] = sum;
  }
}

__global__ void combine_splits_kernel(uint16_t* __restrict__ out,
                                      const float* __restrict__ workspace, int num_q_heads,
                                      int head_dim, int num_splits) {
  const int64_t head = static_cast<int64_t>(blockIdx.x) * num_q_heads + blockIdx.y;
  const int64_t stride = head_dim + 2;
  const float* parts = workspace + head * num_splits * stride;
  float top = -INFINITY;
  for (int s = 0; s < num_splits; ++s) top = fmaxf(top, parts[s * stride + head_dim]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.f, value = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float m = parts[s * stride + head_dim];
      if (m == -INFINITY) continue;
      const float weight = __expf(m - top);
      sum += weight * parts[s * stride + head_dim + 1];
      value += weight * parts[s * stride + d];
    }
    // Every token sees at least its own key, so some split is non-empty and sum > 0.
    out[head * head_dim + d] = float_to_bf16(value / sum);
  }
}

template <int ELEMS>
void launch_split(dim3 grid, gpuStream_t stream, float* workspace, const void* q,
                  const void* k_cache, const void* v_cache, const int64_t* block_table,
                  int table_width, const int64_t* token_rows, const int64_t* positions,
                  int num_q_heads, int num_kv_heads, int page_size, int chunk_size, float scale,
                  int num_splits, int split_len) {
  attention_split_kernel<ELEMS><<<grid, kWarps * PYLLAMA4_WARP, 0, stream>>>(
      workspace, static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_cache),
      static_cast<const uint16_t*>(v_cache), block_table, table_width, token_rows, positions,
      num_q_heads, num_kv_heads, page_size, chunk_size, scale, num_splits, split_len);
}

}  // namespace

extern "C" int pyllama4_paged_attention(void* out, const void* q, const void* k_cache,
                                        const void* v_cache, const int64_t* block_table,
                                        int32_t table_width, const int64_t* token_rows,
                                        const int64_t* positions, int32_t num_tokens,
                                        int32_t num_q_heads, int32_t num_kv_heads,
                                        int32_t head_dim, int32_t page_size, int32_t chunk_size,
                                        float scale, float* workspace, int32_t num_splits,
                                        int32_t split_len, void* stream) {
  if (!out || !q || !k_cache || !v_cache || !block_table || !token_rows || !positions ||
      !workspace)
    return pyllama4_fail("paged_attention: a pointer argument is null");
  if (num_tokens < 1 || num_kv_heads < 1 || num_q_heads % num_kv_heads != 0)
    return pyllama4_fail("paged_attention: num_q_heads must be a multiple of num_kv_heads");
  if (num_q_heads / num_kv_heads > kMaxGroup)
    return pyllama4_fail("paged_attention: more than 8 query heads per kv head");
  if (head_dim % PYLLAMA4_WARP != 0 || head_dim > kMaxHeadDim)
    return pyllama4_fail("paged_attention: head_dim must be a multiple of the warp width, <= 256");
  if (page_size < 1 || table_width < 1 || chunk_size < 0 || num_splits < 1 || split_len < 0)
    return pyllama4_fail("paged_attention: page_size, table_width and num_splits must be "
                         "positive, chunk_size and split_len >= 0");
  auto s = static_cast<gpuStream_t>(stream);
  const dim3 grid(num_splits, num_tokens, num_kv_heads);
  switch (head_dim / PYLLAMA4_WARP) {
    case 1:
      launch_split<1>(grid, s, workspace, q, k_cache, v_cache, block_table, table_width,
                      token_rows, positions, num_q_heads, num_kv_heads, page_size, chunk_size,
                      scale, num_splits, split_len);
      break;
    case 2:
      launch_split<2>(grid, s, workspace, q, k_cache, v_cache, block_table, table_width,
                      token_rows, positions, num_q_heads, num_kv_heads, page_size, chunk_size,
                      scale, num_splits, split_len);
      break;
    case 4:
      launch_split<4>(grid, s, workspace, q, k_cache, v_cache, block_table, table_width,
                      token_rows, positions, num_q_heads, num_kv_heads, page_size, chunk_size,
                      scale, num_splits, split_len);
      break;
    case 8:
      launch_split<8>(grid, s, workspace, q, k_cache, v_cache, block_table, table_width,
                      token_rows, positions, num_q_heads, num_kv_heads, page_size, chunk_size,
                      scale, num_splits, split_len);
      break;
    default:
      return pyllama4_fail("paged_attention: head_dim / warp width must be 1, 2, 4 or 8");
  }
  const int threads = head_dim < 128 ? head_dim : 128;
  combine_splits_kernel<<<dim3(num_tokens, num_q_heads), threads, 0, s>>>(
      static_cast<uint16_t*>(out), workspace, num_q_heads, head_dim, num_splits);
  return pyllama4_check_launch();
}
