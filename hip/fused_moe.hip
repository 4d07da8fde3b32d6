// Fused MoE for Llama 4 (top-k routing with sigmoid scores on the expert INPUT, SwiGLU experts):
// the routing of a batch, and the routed experts of a small batch (decode) in bf16 or fp8 weights.
//
// The reference this must equal is pyllama4.layers.ffn.MoE (torch), computed in fp32:
//   top-k of the router logits per token; score = bf16(sigmoid_fp32(logit));
//   x_scaled = bf16(x * score); h = silu(x_scaled @ G_e) * (x_scaled @ U_e); y = h @ D_e;
//   out = bf16(shared_out + sum over the token's k experts of y).
// The shared expert is not computed here: torch computes it (dense, vendor BLAS) before, and its
// output comes in as shared_out (overlapping the two is the runtime's job).
//
// Routing (pyllama4_moe_route), one block: a warp per token takes the top-k of its logits (warp
// argmax, k rounds; ties to the lower expert index), writes each pair's expert and fp32 score
// (pair p = (token p / k, rank p % k)), counts the pairs per expert in shared memory, scans the
// counts into offsets, and places the pairs stably by expert (sorted_pairs is
// torch.argsort(expert of each pair, stable=True)). It also writes the work list the expert
// kernels run over: one item per (expert, group of up to kGroup = 8 of its pairs).
//
// Experts (pyllama4_moe_experts), four launches on the stream (six with W8A8, below):
//   1. zero the fp32 accumulators of the workspace;
//   2. gate_up GEMV: per work item, gu[q] += x_scaled[q] @ [G_e | U_e] over a slice of the
//      input rows (split-K: fp32 atomics into gu [pairs, 2I], q = the pair's sorted position);
//   3. down GEMV: its input rows are staged as h = silu(gu_gate) * gu_up (the SwiGLU is fused
//      into the staging, gu being complete once kernel 2 is done); acc[token] += h @ D_e over a
//      slice of rows (fp32 atomics into acc [T, H]: the un-permute and the sum over k fused);
//   4. out = bf16(shared_out + acc).
// fp32 atomics make the sum order (not the result's accuracy) vary between runs.
//
// The GEMV, for input-major W [K, N] (the checkpoint layout, no re-layout: gate_up_proj
// [E, H, 2I] gate then up, down_proj [E, I, H]): a block of kThreads threads takes one work item,
// one tile of kTileCols output columns and one slice of input rows. Each thread owns kCols
// adjacent columns and walks down the rows, so a row of the tile is one coalesced read across the
// block (16 bytes a thread in bf16, 8 in fp8), kUnroll rows loaded before any is used. The item's
// tokens (up to 8) are staged in shared memory per chunk of kChunkRows rows and their partial
// sums stay in registers, so the expert's weights are read once per step for all its tokens.
// Kernels are compiled for 1, 2, 4 or 8 tokens at most (the launcher picks from num_tokens) and
// each block branches once to the loop for its item's token count.
//
// fp8 weights: raw bytes decoded in registers (decode_fp8x4, from the formats' definitions) and
// multiplied by per-output-column fp32 scales after the sum over rows (exact: the scale is
// constant along a column). Format 1 is e4m3fn (NVIDIA, MI355), 2 is e4m3fnuz (MI300).
//
// W8A8 (quantize_input, pyllama4.quant.fp8.Fp8Experts' default): each GEMV's input row is
// quantized per pair into the weights' format, as the reference does per expert row:
//   gate_up input: xs = bf16(x * score); down input: a = bf16(bf16(up) * bf16(silu(bf16(gate))))
//   (the reference rounds the gate_up output to bf16 and computes the SwiGLU in bf16);
//   scale = clamp(max |row|, 1e-12, ub) / fmax, row_q = fp8(clamp(row / scale)) (fp8_encode.h);
// and the GEMV multiplies row_q * scale (exact in fp32: 4 significant bits times a float) by the
// weights. One extra launch per GEMV (input_scale_kernel, a block per pair) computes the scales
// into the workspace; the staging quantizes. Sums stay fp32 (order differs from the reference's
// exact sum), so a value next to an fp8 rounding boundary may round the other way.
#include <cmath>

#include "errors.h"
#include "fp8_encode.h"
#include "portable.h"
#include "pyllama4_kernels.h"

#if defined(PYLLAMA4_HIP)
#include <hip/hip_fp16.h>
#else
#include <cuda_fp16.h>
#endif

namespace {

constexpr int kMaxTopK = 8;
constexpr int kMaxExperts = 1024;
constexpr int kMaxPairs = 4096;
constexpr int kRouteThreads = 256;
constexpr int kGroup = 8;  // pairs of one expert per work item (the most tokens a block keeps)
constexpr int kThreads = 128;
constexpr int kCols = 8;
constexpr int kTileCols = kThreads * kCols;
constexpr int kChunkRows = 256;
constexpr int kMaxDim = 1 << 20;  // H and I: kChunkRows rows of 2I bf16 columns stay < 2^31 bytes
constexpr int64_t kAlign = 256;

enum : int { kBf16 = 0, kE4m3fn = 1, kE4m3fnuz = 2 };
enum : int { kGateUp = 0, kDown = 1 };

struct WorkItem {
  int32_t expert, begin, count, unused;  // pairs sorted_pairs[begin, begin + count) of expert
};

// The workspace: [num_work int32, padding to 16 bytes][max_work WorkItem] | gu fp32 [pairs, 2I]
// | acc fp32 [T, H] | input scales fp32 [2, pairs] (W8A8: gate_up's, then down's, per sorted
// pair), each part starting at a multiple of kAlign bytes.
struct Layout {
  int32_t max_work;
  int64_t gate_up, acc, scales, route_end, total;
};

int64_t round_up(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

Layout layout(int num_tokens, int top_k, int num_experts, int hidden, int intermediate) {
  const int64_t pairs = static_cast<int64_t>(num_tokens) * top_k;
  Layout l{};
  l.max_work = static_cast<int32_t>((num_experts < pairs ? num_experts : pairs) +
                                    (pairs + kGroup - 1) / kGroup);
  l.route_end = round_up(16 + static_cast<int64_t>(l.max_work) * sizeof(WorkItem));
  l.gate_up = l.route_end;
  l.acc = l.gate_up + round_up(pairs * 2 * intermediate * sizeof(float));
  l.scales = l.acc + round_up(static_cast<int64_t>(num_tokens) * hidden * sizeof(float));
  l.total = l.scales + round_up(2 * pairs * static_cast<int64_t>(sizeof(float)));
  return l;
}

// ---- Routing ------------------------------------------------------------------------------

__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const uint16_t* __restrict__ logits, int num_tokens, int num_experts, int top_k,
                 int32_t* __restrict__ topk_ids, float* __restrict__ topk_scores,
                 int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                 int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ num_work,
                 WorkItem* __restrict__ work) {
  __shared__ int32_t s_expert[kMaxPairs];
  __shared__ int32_t s_count[kMaxExperts];
  __shared__ int32_t s_offset[kMaxExperts];
  __shared__ int32_t s_first_work[kMaxExperts];
  __shared__ int32_t s_scan[2][kRouteThreads];
  const int tid = threadIdx.x;
  const int lane = tid % PYLLAMA4_WARP;
  for (int e = tid; e < num_experts; e += kRouteThreads) s_count[e] = 0;
  __syncthreads();

  // Top-k, a warp per token. NaN logits rank as -inf; ties go to the lower expert index.
  for (int t = tid / PYLLAMA4_WARP; t < num_tokens; t += kRouteThreads / PYLLAMA4_WARP) {
    const uint16_t* row = logits + static_cast<int64_t>(t) * num_experts;
    int chosen[kMaxTopK];
#pragma unroll
    for (int i = 0; i < kMaxTopK; ++i) {
      chosen[i] = -1;
      if (i < top_k) {
        float best = -INFINITY;
        int best_e = num_experts;
        for (int e = lane; e < num_experts; e += PYLLAMA4_WARP) {
          float v = bf16_to_float(row[e]);
          v = v != v ? -INFINITY : v;
          bool taken = false;
#pragma unroll
          for (int j = 0; j < kMaxTopK; ++j) taken = taken || (j < i && chosen[j] == e);
          if (!taken && (v > best || (v == best && e < best_e))) best = v, best_e = e;
        }
#pragma unroll
        for (int mask = PYLLAMA4_WARP / 2; mask > 0; mask /= 2) {
          const float other = lane_xor(best, mask);
          const int other_e = lane_xor(best_e, mask);
          if (other > best || (other == best && other_e < best_e)) best = other, best_e = other_e;
        }
        chosen[i] = best_e;
        if (lane == 0) {
          const int pair = t * top_k + i;
          topk_ids[pair] = best_e;
          // As torch's sigmoid: 1 / (1 + exp(-x)) in fp32 (precise expf and division).
          topk_scores[pair] = 1.f / (1.f + expf(-bf16_to_float(row[best_e])));
          s_expert[pair] = best_e;
          atomicAdd(&s_count[best_e], 1);
        }
      }
    }
  }
  __syncthreads();

  // Exclusive scans over the experts of the pair counts (offsets) and of the work items per
  // expert (ceil(count / kGroup)): each thread sums a run of experts, the block scans the runs.
  const int per = (num_experts + kRouteThreads - 1) / kRouteThreads;
  const int lo = tid * per < num_experts ? tid * per : num_experts;
  const int hi = lo + per < num_experts ? lo + per : num_experts;
  int run_pairs = 0, run_work = 0;
  for (int e = lo; e < hi; ++e) {
    run_pairs += s_count[e];
    run_work += (s_count[e] + kGroup - 1) / kGroup;
  }
  s_scan[0][tid] = run_pairs;
  s_scan[1][tid] = run_work;
  __syncthreads();
  for (int d = 1; d < kRouteThreads; d *= 2) {
    const int add_pairs = tid >= d ? s_scan[0][tid - d] : 0;
    const int add_work = tid >= d ? s_scan[1][tid - d] : 0;
    __syncthreads();
    s_scan[0][tid] += add_pairs;
    s_scan[1][tid] += add_work;
    __syncthreads();
  }
  int next_pair = s_scan[0][tid] - run_pairs, next_work = s_scan[1][tid] - run_work;
  for (int e = lo; e < hi; ++e) {
    s_offset[e] = next_pair;
    s_first_work[e] = next_work;
    next_pair += s_count[e];
    next_work += (s_count[e] + kGroup - 1) / kGroup;
  }
  if (tid == kRouteThreads - 1) {
    offsets[num_experts] = s_scan[0][tid];
    *num_work = s_scan[1][tid];
  }
  __syncthreads();

  // A thread per expert: its counts, offsets and work items, and its pairs in pair order.
  for (int e = tid; e < num_experts; e += kRouteThreads) {
    const int n = s_count[e];
    const int first = s_offset[e];
    counts[e] = n;
    offsets[e] = first;
    for (int g = 0; g * kGroup < n; ++g) {
      const int left = n - g * kGroup;
      work[s_first_work[e] + g] = WorkItem{e, first + g * kGroup, left < kGroup ? left : kGroup, 0};
    }
    for (int p = 0, r = first; r < first + n; ++p)
      if (s_expert[p] == e) sorted_pairs[r++] = p;
  }
}

// ---- Weight formats -------------------------------------------------------------------------

__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu)));
}

// Four fp8 values (the bytes of `word`, lowest first) in FORMAT, times 2^(bias - 15), into w,
// and the NaN bytes of `word` (bit 7 of each byte that is a NaN) OR-ed into nan_bytes.
// The formats, as defined (sign s = bit 7, exponent e = bits 6..3, mantissa m = bits 2..0):
//   e4m3fn:   bias 7; e = 0: (-1)^s * m/8 * 2^-6 (zeros, subnormals); else (-1)^s * (1 + m/8) *
//             2^(e - 7); no infinities; 0x7f and 0xff are NaN.
//   e4m3fnuz: bias 8; e = 0: (-1)^s * m/8 * 2^-7; else (-1)^s * (1 + m/8) * 2^(e - 8); no
//             infinities; 0x80 (where negative zero would be) is the only NaN.
// Both are read as the fp16 with the same sign, e in the low bits of fp16's 5-bit exponent
// (bias 15) and m in the top of its mantissa: fp16 = s | e << 10 | m << 7, whose value is the
// fp8 value times 2^(bias - 15) for every e including 0 (fp16 subnormals are m/8 * 2^-14, and
// fp16 -> fp32 conversion is exact). The caller multiplies by 2^(15 - bias) (kUnscale, folded
// into the column scale) and turns the columns of NaN bytes into NaN; NaN bytes decode to
// finite values here (0x7f: 1.875 * 2^(15 - 15)) or -0 (0x80), never inf, so nothing
// overflows on the way. pyllama4.fp8.decode is this rule in torch (tests/test_fp8_formats.py).
template <int FORMAT>
__device__ __forceinline__ void decode_fp8x4(uint32_t word, float* w, uint32_t& nan_bytes) {
  // Bytes 0 and 2 into the two halves of `even`, bytes 1 and 3 into `odd`.
  const uint32_t even = ((word & 0x007f007fu) << 7) | ((word & 0x00800080u) << 8);
  const uint32_t odd = ((word >> 1) & 0x3f803f80u) | (word & 0x80008000u);
  w[0] = half_bits_to_float(even);
  w[1] = half_bits_to_float(odd);
  w[2] = half_bits_to_float(even >> 16);
  w[3] = half_bits_to_float(odd >> 16);
  // Per byte, without carries between bytes (a byte's low 7 bits plus 0x01 or 0x7f stay < 0x100).
  const uint32_t low7 = word & 0x7f7f7f7fu;
  if (FORMAT == kE4m3fn) {
    nan_bytes |= (low7 + 0x01010101u) & 0x80808080u;  // low 7 bits all ones
  } else {
    nan_bytes |= word & ~(low7 + 0x7f7f7f7fu) & 0x80808080u;  // sign set, low 7 bits zero
  }
}

template <int FORMAT>
struct Weights;

template <>
struct Weights<kBf16> {
  using Raw = uint4;  // 8 bf16 columns
  static constexpr int kBytes = 2;
  static constexpr int kUnroll = 8;
  __device__ static __forceinline__ void decode(const Raw& raw, float (&w)[kCols], uint32_t*) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = __uint_as_float(words[i] << 16);
      w[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

template <int FORMAT>
struct Fp8Weights {
  using Raw = uint2;  // 8 fp8 columns
  static constexpr int kBytes = 1;
  static constexpr int kUnroll = 16;
  static constexpr float kUnscale = FORMAT == kE4m3fn ? 256.f : 128.f;  // 2^(15 - bias)
  __device__ static __forceinline__ void decode(const Raw& raw, float (&w)[kCols],
                                                uint32_t* nan_bytes) {
    decode_fp8x4<FORMAT>(raw.x, w, nan_bytes[0]);
    decode_fp8x4<FORMAT>(raw.y, w + 4, nan_bytes[1]);
  }
};

template <>
struct Weights<kE4m3fn> : Fp8Weights<kE4m3fn> {};
template <>
struct Weights<kE4m3fnuz> : Fp8Weights<kE4m3fnuz> {};

__device__ __forceinline__ float round_bf16(float value) {
  return bf16_to_float(float_to_bf16(value));
}

__device__ __forceinline__ void add_to(float* address, float value) {
#if defined(PYLLAMA4_HIP)
  unsafeAtomicAdd(address, value);  // the hardware fp32 add (the workspace is device memory)
#else
  atomicAdd(address, value);
#endif
}

// ---- The expert GEMVs -----------------------------------------------------------------------

struct GemvArgs {
  const int32_t* num_work;
  const WorkItem* work;
  const int32_t* sorted_pairs;
  const float* scores;       // [T * k] fp32 sigmoid scores
  const uint16_t* x;         // [T, H] bf16
  float* gate_up_acc;        // [pairs, 2I]: kGateUp adds into it, kDown reads it
  float* out_acc;            // [T, H]: kDown adds into it
  const uint8_t* weights;    // [E, K, N] (kGateUp: [E, H, 2I]; kDown: [E, I, H])
  const float* scale;        // [E, N] fp32 (fp8), or null (bf16)
  const float* in_scale;     // [pairs] fp32 per sorted pair (W8A8), or null (weight-only)
  int top_k, hidden, intermediate, split_rows;
};

// Stage inputs before any quantization, as the W8A8 reference computes them in bf16.
__device__ __forceinline__ float gate_up_input(const GemvArgs& a, int token, float score, int r) {
  const float xv = bf16_to_float(a.x[static_cast<int64_t>(token) * a.hidden + r]);
  return round_bf16(xv * score);  // the score scales the expert's input, in bf16
}

__device__ __forceinline__ float down_input_bf16(const GemvArgs& a, int sorted, int r) {
  const float* gu = a.gate_up_acc + static_cast<int64_t>(sorted) * 2 * a.intermediate + r;
  const float gate = round_bf16(gu[0]);
  const float up = round_bf16(gu[a.intermediate]);
  return round_bf16(up * round_bf16(gate / (1.f + expf(-gate))));
}

// The block's inputs for rows [row0, row0 + rows) into s_in[r * TP + j] (token j of the item; 0
// for j >= count). Consecutive threads take consecutive rows of one token (coalesced reads).
// W8A8: each value replaced by the fp8 value times the pair's scale it quantizes to.
template <int STAGE, int FORMAT, int TP>
__device__ __forceinline__ void stage_inputs(const GemvArgs& a, int row0, int rows, int count,
                                             const int* s_token, const int* s_sorted,
                                             const float* s_score, float* s_in) {
  for (int i = threadIdx.x; i < TP * rows; i += kThreads) {
    const int j = i / rows;
    const int r = i - j * rows;
    float v = 0.f;
    if (j < count) {
      if (FORMAT != kBf16 && a.in_scale) {
        v = STAGE == kGateUp ? gate_up_input(a, s_token[j], s_score[j], row0 + r)
                             : down_input_bf16(a, s_sorted[j], row0 + r);
        v = pyllama4_fp8::quantize_fp8<FORMAT>(v, a.in_scale[s_sorted[j]]);
      } else if (STAGE == kGateUp) {
        v = gate_up_input(a, s_token[j], s_score[j], row0 + r);
      } else {
        const float* gu =
            a.gate_up_acc + static_cast<int64_t>(s_sorted[j]) * 2 * a.intermediate + row0 + r;
        const float gate = gu[0];
        v = gate / (1.f + expf(-gate)) * gu[a.intermediate];  // silu(gate) * up, as torch
      }
    }
    s_in[r * TP + j] = v;
  }
}

// One block's work for an item of at most TP tokens: rows [r_begin, r_end) of its tile.
template <int STAGE, int FORMAT, int TP>
__device__ __forceinline__ void expert_slice(const GemvArgs& a, const WorkItem& item, int tile,
                                             int r_begin, int r_end, const int* s_token,
                                             const int* s_sorted, const float* s_score,
                                             float* s_in) {
  using W = Weights<FORMAT>;
  using Raw = typename W::Raw;
  constexpr int kUnroll = W::kUnroll;
  const int K = STAGE == kGateUp ? a.hidden : a.intermediate;
  const int N = STAGE == kGateUp ? 2 * a.intermediate : a.hidden;
  const int col = tile * kTileCols + threadIdx.x * kCols;
  const bool active = col < N;  // N is a multiple of kCols: a thread has all its columns or none
  const int row_bytes = N * W::kBytes;  // < 2^31 / kChunkRows (launcher): offsets in a chunk fit

  float acc[TP][kCols];
#pragma unroll
  for (int j = 0; j < TP; ++j)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[j][c] = 0.f;
  uint32_t nan_bytes[2] = {0u, 0u};
  const uint8_t* base =
      a.weights + static_cast<int64_t>(item.expert) * K * row_bytes + col * W::kBytes;

  for (int row0 = r_begin; row0 < r_end; row0 += kChunkRows) {
    const int rows = r_end - row0 < kChunkRows ? r_end - row0 : kChunkRows;
    __syncthreads();  // the previous chunk's inputs are used up (and the prologue is written)
    stage_inputs<STAGE, FORMAT, TP>(a, row0, rows, item.count, s_token, s_sorted, s_score, s_in);
    __syncthreads();
    if (active) {
      const uint8_t* chunk = base + static_cast<int64_t>(row0) * row_bytes;
      for (int r = 0; r < rows; r += kUnroll) {
        // All kUnroll rows are loaded before any is used (memory-level parallelism); rows past
        // the chunk are predicated off (block-uniform), so the loop stays unrolled.
        Raw raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          raw[u] = Raw{};
          if (r + u < rows) raw[u] = *reinterpret_cast<const Raw*>(chunk + (r + u) * row_bytes);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (r + u < rows) {
            float w[kCols];
            W::decode(raw[u], w, nan_bytes);
            const float* xr = s_in + (r + u) * TP;
#pragma unroll
            for (int j = 0; j < TP; ++j) {
              const float xv = xr[j];
#pragma unroll
              for (int c = 0; c < kCols; ++c) acc[j][c] = fmaf(xv, w[c], acc[j][c]);
            }
          }
        }
      }
    }
  }
  if (!active) return;

  float scale[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    scale[c] = 1.f;
    if constexpr (FORMAT != kBf16) {
      scale[c] = a.scale[static_cast<int64_t>(item.expert) * N + col + c] * W::kUnscale;
      if ((nan_bytes[c / 4] >> (8 * (c % 4) + 7)) & 1u) scale[c] = NAN;  // a NaN weight
    }
  }
#pragma unroll
  for (int j = 0; j < TP; ++j) {
    if (j < item.count) {
      float* dst = STAGE == kGateUp
                       ? a.gate_up_acc + static_cast<int64_t>(s_sorted[j]) * N + col
                       : a.out_acc + static_cast<int64_t>(s_token[j]) * a.hidden + col;
#pragma unroll
      for (int c = 0; c < kCols; ++c) add_to(dst + c, acc[j][c] * scale[c]);
    }
  }
}

// Grid: x = work item (items of one expert are adjacent, so blocks that share weights run
// together), y = row split * tiles + column tile. TP_MAX >= every item's count (launcher).
// Launch bounds: at least 2 blocks per SM (CUDA; ptxas otherwise caps some instances at 96 or
// 128 registers and spills) or 2 waves per SIMD (HIP; no VGPR limit at these sizes).
template <int STAGE, int FORMAT, int TP_MAX>
__global__ void __launch_bounds__(kThreads, 2) expert_gemv_kernel(const GemvArgs a) {
  if (static_cast<int>(blockIdx.x) >= *a.num_work) return;
  WorkItem item = a.work[blockIdx.x];
  item.count = item.count < TP_MAX ? item.count : TP_MAX;  // never more (launcher's invariant)
  const int K = STAGE == kGateUp ? a.hidden : a.intermediate;
  const int N = STAGE == kGateUp ? 2 * a.intermediate : a.hidden;
  const int tiles = (N + kTileCols - 1) / kTileCols;
  const int tile = blockIdx.y % tiles;
  const int r_begin = static_cast<int>(blockIdx.y / tiles) * a.split_rows;
  const int r_end = r_begin + a.split_rows < K ? r_begin + a.split_rows : K;
  if (r_begin >= r_end) return;  // (the launcher makes no empty slices)

  __shared__ int s_token[TP_MAX];   // token of the item's pair j
  __shared__ int s_sorted[TP_MAX];  // sorted position of pair j (its row of gate_up_acc)
  __shared__ float s_score[TP_MAX]; // bf16-rounded score of pair j
  __shared__ __align__(16) float s_in[kChunkRows * TP_MAX];
  if (static_cast<int>(threadIdx.x) < item.count) {
    const int q = item.begin + threadIdx.x;
    const int pair = a.sorted_pairs[q];
    s_token[threadIdx.x] = pair / a.top_k;
    s_sorted[threadIdx.x] = q;
    s_score[threadIdx.x] = round_bf16(a.scores[pair]);
  }
  // One branch per block to the loop for the item's token count (no FMAs on padding tokens).
  if constexpr (TP_MAX >= 8) {
    if (item.count > 4) {
      expert_slice<STAGE, FORMAT, 8>(a, item, tile, r_begin, r_end, s_token, s_sorted, s_score,
                                     s_in);
      return;
    }
  }
  if constexpr (TP_MAX >= 4) {
    if (item.count > 2) {
      expert_slice<STAGE, FORMAT, 4>(a, item, tile, r_begin, r_end, s_token, s_sorted, s_score,
                                     s_in);
      return;
    }
  }
  if constexpr (TP_MAX >= 2) {
    if (item.count > 1) {
      expert_slice<STAGE, FORMAT, 2>(a, item, tile, r_begin, r_end, s_token, s_sorted, s_score,
                                     s_in);
      return;
    }
  }
  expert_slice<STAGE, FORMAT, 1>(a, item, tile, r_begin, r_end, s_token, s_sorted, s_score, s_in);
}

// W8A8: one block per sorted pair q: in_scale[q] = clamp(max |input row|, 1e-12, ub) / fmax
// (ub <= 0: no upper clamp), the row as stage_inputs computes it before quantizing.
template <int STAGE, int FORMAT>
__global__ void __launch_bounds__(kThreads) input_scale_kernel(const GemvArgs a, int pairs,
                                                               float ub, float* in_scale) {
  __shared__ float s_max[kThreads];
  const int q = blockIdx.x;
  if (q >= pairs) return;
  const int pair = a.sorted_pairs[q];
  const float score = round_bf16(a.scores[pair]);
  const int K = STAGE == kGateUp ? a.hidden : a.intermediate;
  float amax = 0.f;
  for (int r = threadIdx.x; r < K; r += kThreads) {
    const float v = STAGE == kGateUp ? gate_up_input(a, pair / a.top_k, score, r)
                                     : down_input_bf16(a, q, r);
    amax = fmaxf(amax, fabsf(v));
  }
  s_max[threadIdx.x] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int t = 1; t < kThreads; ++t) amax = fmaxf(amax, s_max[t]);
    amax = fmaxf(amax, pyllama4_fp8::kActivationEps);
    if (ub > 0.f) amax = fminf(amax, ub);
    in_scale[q] = amax / pyllama4_fp8::Fp8Format<FORMAT>::kMax;  // IEEE division, as torch
  }
}

template <int STAGE>
void launch_input_scales(int format, int pairs, float ub, float* in_scale, gpuStream_t stream,
                         const GemvArgs& a) {
  if (format == kE4m3fn)
    input_scale_kernel<STAGE, kE4m3fn><<<pairs, kThreads, 0, stream>>>(a, pairs, ub, in_scale);
  else
    input_scale_kernel<STAGE, kE4m3fnuz><<<pairs, kThreads, 0, stream>>>(a, pairs, ub, in_scale);
}

__global__ void zero_kernel(float4* __restrict__ data, int64_t count) {
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    data[i] = zero;
}

__global__ void finalize_kernel(uint16_t* out, const uint16_t* shared_out,
                                const float* __restrict__ acc, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = float_to_bf16(bf16_to_float(shared_out[i]) + acc[i]);
}

template <int STAGE, int FORMAT>
void launch_gemv(int tp_max, dim3 grid, gpuStream_t stream, const GemvArgs& a) {
  switch (tp_max) {
    case 1:
      expert_gemv_kernel<STAGE, FORMAT, 1><<<grid, kThreads, 0, stream>>>(a);
      break;
    case 2:
      expert_gemv_kernel<STAGE, FORMAT, 2><<<grid, kThreads, 0, stream>>>(a);
      break;
    case 4:
      expert_gemv_kernel<STAGE, FORMAT, 4><<<grid, kThreads, 0, stream>>>(a);
      break;
    default:
      expert_gemv_kernel<STAGE, FORMAT, 8><<<grid, kThreads, 0, stream>>>(a);
      break;
  }
}

template <int STAGE>
void launch_stage(int format, int tp_max, dim3 grid, gpuStream_t stream, const GemvArgs& a) {
  switch (format) {
    case kBf16:
      launch_gemv<STAGE, kBf16>(tp_max, grid, stream, a);
      break;
    case kE4m3fn:
      launch_gemv<STAGE, kE4m3fn>(tp_max, grid, stream, a);
      break;
    default:
      launch_gemv<STAGE, kE4m3fnuz>(tp_max, grid, stream, a);
      break;
  }
}

unsigned blocks_for(int64_t count, int threads) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > 4096 ? 4096 : blocks);
}

// Shared argument checks of both launchers (name: the launcher, for the message).
int check_routing_sizes(const char* name, int32_t num_tokens, int32_t num_experts,
                        int32_t top_k) {
  if (num_tokens < 1 || num_experts < 1 || num_experts > kMaxExperts)
    return pyllama4_failf("%s: need num_tokens >= 1 and 1 <= num_experts <= %d (got %d, %d)",
                          name, kMaxExperts, num_tokens, num_experts);
  if (top_k < 1 || top_k > kMaxTopK || top_k > num_experts)
    return pyllama4_failf("%s: top_k must be in [1, min(8, num_experts)], got %d", name, top_k);
  if (static_cast<int64_t>(num_tokens) * top_k > kMaxPairs)
    return pyllama4_failf("%s: num_tokens * top_k must be <= %d, got %lld", name, kMaxPairs,
                          static_cast<long long>(num_tokens) * top_k);
  return 0;
}

}  // namespace

extern "C" int64_t pyllama4_moe_workspace_bytes(int32_t num_tokens, int32_t top_k,
                                                int32_t num_experts, int32_t hidden,
                                                int32_t intermediate) {
  if (num_tokens < 1 || top_k < 1 || num_experts < 1 || hidden < 0 || intermediate < 0) return 0;
  return layout(num_tokens, top_k, num_experts, hidden, intermediate).total;
}

extern "C" int pyllama4_moe_route(const void* router_logits, int32_t num_tokens,
                                  int32_t num_experts, int32_t top_k, int32_t* topk_ids,
                                  float* topk_scores, int32_t* expert_counts,
                                  int32_t* expert_offsets, int32_t* sorted_pairs,
                                  void* workspace, int64_t workspace_bytes, void* stream) {
  if (!router_logits || !topk_ids || !topk_scores || !expert_counts || !expert_offsets ||
      !sorted_pairs || !workspace)
    return pyllama4_fail("moe_route: a pointer argument is null");
  if (int code = check_routing_sizes("moe_route", num_tokens, num_experts, top_k)) return code;
  const Layout l = layout(num_tokens, top_k, num_experts, 0, 0);
  if (workspace_bytes < l.route_end)
    return pyllama4_failf("moe_route: workspace of %lld bytes, needs %lld",
                          static_cast<long long>(workspace_bytes),
                          static_cast<long long>(l.route_end));
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return pyllama4_fail("moe_route: workspace must be 16-byte aligned");
  auto* bytes = static_cast<uint8_t*>(workspace);
  route_kernel<<<1, kRouteThreads, 0, static_cast<gpuStream_t>(stream)>>>(
      static_cast<const uint16_t*>(router_logits), num_tokens, num_experts, top_k, topk_ids,
      topk_scores, expert_counts, expert_offsets, sorted_pairs,
      reinterpret_cast<int32_t*>(bytes), reinterpret_cast<WorkItem*>(bytes + 16));
  return pyllama4_check_launch();
}

extern "C" int pyllama4_moe_experts(void* out, const void* x, const void* shared_out,
                                    const float* topk_scores, const int32_t* sorted_pairs,
                                    const void* gate_up, const float* gate_up_scale,
                                    const void* down, const float* down_scale,
                                    int32_t weight_format, int32_t quantize_input,
                                    float activation_scale_ub, int32_t num_tokens,
                                    int32_t num_experts, int32_t top_k, int32_t hidden,
                                    int32_t intermediate, int32_t gate_up_splits,
                                    int32_t down_splits, void* workspace,
                                    int64_t workspace_bytes, void* stream) {
  if (!out || !x || !shared_out || !topk_scores || !sorted_pairs || !gate_up || !down ||
      !workspace)
    return pyllama4_fail("moe_experts: a pointer argument is null");
  if (int code = check_routing_sizes("moe_experts", num_tokens, num_experts, top_k)) return code;
  if (weight_format < kBf16 || weight_format > kE4m3fnuz)
    return pyllama4_failf("moe_experts: weight_format must be 0 (bf16), 1 (e4m3fn) or 2 "
                          "(e4m3fnuz), got %d", weight_format);
  if (weight_format != kBf16 && (!gate_up_scale || !down_scale))
    return pyllama4_fail("moe_experts: fp8 weights need gate_up_scale and down_scale");
  if (quantize_input != 0 && weight_format == kBf16)
    return pyllama4_fail("moe_experts: quantize_input needs fp8 weights");
  if (hidden < kCols || intermediate < kCols || hidden % kCols != 0 ||
      intermediate % kCols != 0 || hidden > kMaxDim || intermediate > kMaxDim)
    return pyllama4_failf("moe_experts: hidden and intermediate must be positive multiples of "
                          "%d, at most %d, got %d and %d", kCols, kMaxDim, hidden, intermediate);
  const int align = weight_format == kBf16 ? 16 : 8;
  if (reinterpret_cast<uintptr_t>(gate_up) % align != 0 ||
      reinterpret_cast<uintptr_t>(down) % align != 0 ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return pyllama4_failf("moe_experts: weights must be %d-byte aligned, workspace 16-byte",
                          align);
  if (gate_up_splits < 1 || gate_up_splits > hidden || down_splits < 1 ||
      down_splits > intermediate)
    return pyllama4_failf("moe_experts: splits must be in [1, rows]: gate_up_splits %d (rows "
                          "%d), down_splits %d (rows %d)", gate_up_splits, hidden, down_splits,
                          intermediate);
  const Layout l = layout(num_tokens, top_k, num_experts, hidden, intermediate);
  if (workspace_bytes < l.total)
    return pyllama4_failf("moe_experts: workspace of %lld bytes, needs %lld",
                          static_cast<long long>(workspace_bytes),
                          static_cast<long long>(l.total));

  auto s = static_cast<gpuStream_t>(stream);
  auto* bytes = static_cast<uint8_t*>(workspace);
  const int64_t zero_count = (l.total - l.gate_up) / static_cast<int64_t>(sizeof(float4));
  zero_kernel<<<blocks_for(zero_count, 256), 256, 0, s>>>(
      reinterpret_cast<float4*>(bytes + l.gate_up), zero_count);

  // No item holds more pairs than tokens (a token picks distinct experts) nor than kGroup.
  const int tp_max = num_tokens >= 5 ? 8 : num_tokens >= 3 ? 4 : num_tokens;
  GemvArgs a{};
  a.num_work = reinterpret_cast<const int32_t*>(bytes);
  a.work = reinterpret_cast<const WorkItem*>(bytes + 16);
  a.sorted_pairs = sorted_pairs;
  a.scores = topk_scores;
  a.x = static_cast<const uint16_t*>(x);
  a.gate_up_acc = reinterpret_cast<float*>(bytes + l.gate_up);
  a.out_acc = reinterpret_cast<float*>(bytes + l.acc);
  a.top_k = top_k;
  a.hidden = hidden;
  a.intermediate = intermediate;

  const int pairs = num_tokens * top_k;
  float* in_scales = reinterpret_cast<float*>(bytes + l.scales);

  a.weights = static_cast<const uint8_t*>(gate_up);
  a.scale = gate_up_scale;
  if (quantize_input != 0) {
    a.in_scale = in_scales;
    launch_input_scales<kGateUp>(weight_format, pairs, activation_scale_ub, in_scales, s, a);
  }
  a.split_rows = (hidden + gate_up_splits - 1) / gate_up_splits;
  const int gate_up_tiles = (2 * intermediate + kTileCols - 1) / kTileCols;
  const int gate_up_slices = (hidden + a.split_rows - 1) / a.split_rows;
  launch_stage<kGateUp>(weight_format, tp_max,
                        dim3(l.max_work, gate_up_tiles * gate_up_slices), s, a);

  a.weights = static_cast<const uint8_t*>(down);
  a.scale = down_scale;
  if (quantize_input != 0) {
    a.in_scale = in_scales + pairs;
    launch_input_scales<kDown>(weight_format, pairs, activation_scale_ub, in_scales + pairs, s,
                               a);
  }
  a.split_rows = (intermediate + down_splits - 1) / down_splits;
  const int down_tiles = (hidden + kTileCols - 1) / kTileCols;
  const int down_slices = (intermediate + a.split_rows - 1) / a.split_rows;
  launch_stage<kDown>(weight_format, tp_max, dim3(l.max_work, down_tiles * down_slices), s, a);

  const int64_t count = static_cast<int64_t>(num_tokens) * hidden;
  finalize_kernel<<<blocks_for(count, 256), 256, 0, s>>>(
      static_cast<uint16_t*>(out), static_cast<const uint16_t*>(shared_out),
      reinterpret_cast<const float*>(bytes + l.acc), count);
  return pyllama4_check_launch();
}
