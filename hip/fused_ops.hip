// Fused small ops of a decode step: residual add + RMSNorm, RoPE + QK-norm + temperature + the
// KV cache write of one attention layer, and the SwiGLU activation silu(gate) * up.
//
// Each must give, bit for bit up to the fp32 rounding noted, what the torch reference gives in
// bf16 (pyllama4.layers.norm.RMSNorm / l2_norm, pyllama4.layers.rope.apply_rope,
// pyllama4.model.llama4.Attention.forward, pyllama4.layers.ffn.SwiGLU.partial): every
// intermediate the reference rounds to bf16 is rounded here too, at the same point. What may
// differ is fp32 arithmetic the reference leaves unspecified: the order of the sum of squares of
// a norm (torch sums in another order), and cosf / sinf / expf of the device's math library
// against the host's. Either can move a result across a bf16 rounding boundary: 1 bf16 ulp,
// rarely.
//
// add_rms_norm: one block per token (two passes over its row; the second re-reads what the same
// thread wrote or read in the first, so out may alias x). rope_qk_norm_kv_write: one warp per
// (token, head row): q heads, then k heads, then v heads; a lane holds head-dim pairs (2i, 2i+1)
// for i = lane, lane + warp, ...; q goes to q_out, k and v to their cache slot. silu_mul: one
// thread per element (a block column strides on past 65535 blocks of a row).
#include <cmath>

#include "errors.h"
#include "portable.h"
#include "pyllama4_kernels.h"

// The complex multiply of RoPE rounds each product before the sum, as torch does: no FMA
// contraction. hipcc (clang) obeys this pragma; nvcc is told with __fmul_rn (mul_rn below); g++
// (the CPU emulation, -std=c++17) never contracts.
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace {

constexpr int kNormThreads = 512;  // most threads of an add_rms_norm block
constexpr int kRopeWarps = 4;      // head rows per rope block
constexpr int kMaxHeadDim = 256;
constexpr int kPairs = kMaxHeadDim / 2 / PYLLAMA4_WARP;  // head-dim pairs a lane holds at most
constexpr int kSiluThreads = 256;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(PYLLAMA4_CUDA) && !defined(PYLLAMA4_EMU)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// fp32 -> bf16 -> fp32: the value a bf16 tensor holds after the reference rounds it.
__device__ __forceinline__ float round_bf16(float value) {
  return bf16_to_float(float_to_bf16(value));
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int mask = PYLLAMA4_WARP / 2; mask > 0; mask /= 2) value += lane_xor(value, mask);
  return value;
}

// The sum of `value` over the block (every thread gets it); blockDim.x a multiple of the warp.
__device__ float block_sum(float value) {
  __shared__ float partial[kNormThreads / PYLLAMA4_WARP];
  __shared__ float total;
  const int warp = threadIdx.x / PYLLAMA4_WARP;
  const int lane = threadIdx.x % PYLLAMA4_WARP;
  value = warp_sum(value);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / PYLLAMA4_WARP;
    value = warp_sum(lane < warps ? partial[lane] : 0.f);
    if (lane == 0) total = value;
  }
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kNormThreads)
    add_rms_norm_kernel(uint16_t* out, uint16_t* residual, const uint16_t* x,
                        const uint16_t* __restrict__ weight, int hidden, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * hidden;
  float squares = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float s = bf16_to_float(x[base + i]);
    if (residual != nullptr) {
      const uint16_t sum = float_to_bf16(bf16_to_float(residual[base + i]) + s);
      residual[base + i] = sum;
      s = bf16_to_float(sum);
    }
    squares += s * s;
  }
  const float rstd = 1.f / sqrtf(block_sum(squares) / hidden + eps);  // torch: sum / n, 1/sqrt
  const uint16_t* normed = residual != nullptr ? residual : x;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float value = round_bf16(bf16_to_float(normed[base + i]) * rstd);
    out[base + i] = float_to_bf16(value * bf16_to_float(weight[i]));
  }
}

__global__ void __launch_bounds__(kRopeWarps * PYLLAMA4_WARP)
    rope_qk_norm_kv_write_kernel(uint16_t* q_out, const uint16_t* q,
                                 const uint16_t* __restrict__ k,
                                 const uint16_t* __restrict__ v, int64_t q_stride,
                                 int64_t k_stride, int64_t v_stride,
                                 uint16_t* __restrict__ k_cache, uint16_t* __restrict__ v_cache,
                                 const int64_t* __restrict__ slots,
                                 const int64_t* __restrict__ positions,
                                 const float* __restrict__ inv_freq,
                                 const float* __restrict__ q_scale, int num_q_heads,
                                 int num_kv_heads, int head_dim, int use_rope, int qk_norm,
                                 float eps) {
  const int64_t token = blockIdx.x;
  const int row = blockIdx.y * kRopeWarps + threadIdx.x / PYLLAMA4_WARP;
  const int lane = threadIdx.x % PYLLAMA4_WARP;
  if (row >= num_q_heads + 2 * num_kv_heads) return;  // the whole warp: no shuffle waits on it
  const bool is_q = row < num_q_heads;
  const bool is_k = !is_q && row < num_q_heads + num_kv_heads;
  const int64_t slot = slots[token];
  if (!is_q && slot < 0) return;  // a token without a cache slot writes no k or v
  const uint16_t* src;
  uint16_t* dst;
  if (is_q) {
    src = q + token * q_stride + static_cast<int64_t>(row) * head_dim;
    dst = q_out + (token * num_q_heads + row) * head_dim;
  } else {
    const int head = is_k ? row - num_q_heads : row - num_q_heads - num_kv_heads;
    src = (is_k ? k + token * k_stride : v + token * v_stride) +
          static_cast<int64_t>(head) * head_dim;
    dst = (is_k ? k_cache : v_cache) + (slot * num_kv_heads + head) * head_dim;
  }

  const int half = head_dim / 2;
  if (!is_q && !is_k) {  // v: its bits copied
    for (int i = lane; i < head_dim; i += PYLLAMA4_WARP) dst[i] = src[i];
    return;
  }
  float x0[kPairs], x1[kPairs];
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int p = lane + j * PYLLAMA4_WARP;
    x0[j] = p < half ? bf16_to_float(src[2 * p]) : 0.f;
    x1[j] = p < half ? bf16_to_float(src[2 * p + 1]) : 0.f;
  }
  if (use_rope) {
    // apply_rope: (x0 + j x1) * exp(j * angle), angle = float(position) * inv_freq[p] in fp32.
    const float position = static_cast<float>(positions[token]);
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int p = lane + j * PYLLAMA4_WARP;
      if (p < half) {
        const float angle = position * inv_freq[p];
        const float c = cosf(angle), s = sinf(angle);
        const float r0 = mul_rn(x0[j], c) - mul_rn(x1[j], s);
        const float r1 = mul_rn(x0[j], s) + mul_rn(x1[j], c);
        x0[j] = round_bf16(r0), x1[j] = round_bf16(r1);
      }
    }
  }
  if (qk_norm) {  // l2_norm: x / sqrt(mean(x^2) + eps) in fp32, rounded
    float squares = 0.f;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) squares += x0[j] * x0[j] + x1[j] * x1[j];
    const float rstd = 1.f / sqrtf(warp_sum(squares) / head_dim + eps);
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      x0[j] = round_bf16(x0[j] * rstd);
      x1[j] = round_bf16(x1[j] * rstd);
    }
  }
  if (is_q && q_scale != nullptr) {  // temperature tuning: bf16(q * scale) in fp32
    const float scale = q_scale[token];
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      x0[j] = round_bf16(x0[j] * scale);
      x1[j] = round_bf16(x1[j] * scale);
    }
  }
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int p = lane + j * PYLLAMA4_WARP;
    if (p < half) dst[2 * p] = float_to_bf16(x0[j]), dst[2 * p + 1] = float_to_bf16(x1[j]);
  }
}

__global__ void __launch_bounds__(kSiluThreads)
    silu_mul_kernel(uint16_t* __restrict__ out, const uint16_t* __restrict__ gate,
                    const uint16_t* __restrict__ up, int64_t gate_stride, int64_t up_stride,
                    int intermediate) {
  const int64_t token = blockIdx.x;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < intermediate;
       i += gridDim.y * blockDim.x) {
    const float g = bf16_to_float(gate[token * gate_stride + i]);
    const float silu = round_bf16(g / (1.f + expf(-g)));  // F.silu in bf16
    const float u = bf16_to_float(up[token * up_stride + i]);
    out[token * intermediate + i] = float_to_bf16(silu * u);
  }
}

}  // namespace

extern "C" int pyllama4_add_rms_norm(void* out, void* residual, const void* x, const void* weight,
                                     int32_t num_tokens, int32_t hidden, float eps,
                                     void* stream) {
  if (!out || !x || !weight) return pyllama4_fail("add_rms_norm: a pointer argument is null");
  if (num_tokens < 1 || hidden < 1)
    return pyllama4_fail("add_rms_norm: num_tokens and hidden must be positive");
  if (out == residual) return pyllama4_fail("add_rms_norm: out must not be residual");
  const int warps = (hidden + PYLLAMA4_WARP - 1) / PYLLAMA4_WARP;
  const int threads = warps * PYLLAMA4_WARP < kNormThreads ? warps * PYLLAMA4_WARP : kNormThreads;
  add_rms_norm_kernel<<<num_tokens, threads, 0, static_cast<gpuStream_t>(stream)>>>(
      static_cast<uint16_t*>(out), static_cast<uint16_t*>(residual),
      static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(weight), hidden, eps);
  return pyllama4_check_launch();
}

extern "C" int pyllama4_rope_qk_norm_kv_write(
    void* q_out, const void* q, const void* k, const void* v, int64_t q_row_stride,
    int64_t k_row_stride, int64_t v_row_stride, void* k_cache, void* v_cache,
    const int64_t* slots, const int64_t* positions, const float* inv_freq, const float* q_scale,
    int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t use_rope, int32_t qk_norm, float eps, void* stream) {
  if (!q_out || !q || !k || !v || !k_cache || !v_cache || !slots)
    return pyllama4_fail("rope_qk_norm_kv_write: a pointer argument is null");
  if (use_rope && (!positions || !inv_freq))
    return pyllama4_fail("rope_qk_norm_kv_write: use_rope needs positions and inv_freq");
  if (num_tokens < 1 || num_q_heads < 1 || num_kv_heads < 1)
    return pyllama4_fail("rope_qk_norm_kv_write: num_tokens and the head counts must be positive");
  if (head_dim < 2 || head_dim % 2 != 0 || head_dim > kMaxHeadDim)
    return pyllama4_failf("rope_qk_norm_kv_write: head_dim %d must be even, 2 to %d", head_dim,
                          kMaxHeadDim);
  if (q_row_stride < static_cast<int64_t>(num_q_heads) * head_dim ||
      k_row_stride < static_cast<int64_t>(num_kv_heads) * head_dim ||
      v_row_stride < static_cast<int64_t>(num_kv_heads) * head_dim)
    return pyllama4_fail("rope_qk_norm_kv_write: a row stride is shorter than its heads");
  const int rows = num_q_heads + 2 * num_kv_heads;
  if ((rows + kRopeWarps - 1) / kRopeWarps > kMaxGridY)
    return pyllama4_fail("rope_qk_norm_kv_write: too many heads");
  const dim3 grid(num_tokens, (rows + kRopeWarps - 1) / kRopeWarps);
  rope_qk_norm_kv_write_kernel<<<grid, kRopeWarps * PYLLAMA4_WARP, 0,
                                 static_cast<gpuStream_t>(stream)>>>(
      static_cast<uint16_t*>(q_out), static_cast<const uint16_t*>(q),
      static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), q_row_stride,
      k_row_stride, v_row_stride, static_cast<uint16_t*>(k_cache),
      static_cast<uint16_t*>(v_cache), slots, positions, inv_freq, q_scale, num_q_heads,
      num_kv_heads, head_dim, use_rope, qk_norm, eps);
  return pyllama4_check_launch();
}

extern "C" int pyllama4_silu_mul(void* out, const void* gate, const void* up,
                                 int64_t gate_row_stride, int64_t up_row_stride,
                                 int32_t num_tokens, int32_t intermediate, void* stream) {
  if (!out || !gate || !up) return pyllama4_fail("silu_mul: a pointer argument is null");
  if (num_tokens < 1 || intermediate < 1)
    return pyllama4_fail("silu_mul: num_tokens and intermediate must be positive");
  if (gate_row_stride < intermediate || up_row_stride < intermediate)
    return pyllama4_fail("silu_mul: a row stride is shorter than intermediate");
  const int blocks = (intermediate + kSiluThreads - 1) / kSiluThreads;
  const dim3 grid(num_tokens, blocks < kMaxGridY ? blocks : kMaxGridY);
  silu_mul_kernel<<<grid, kSiluThreads, 0, static_cast<gpuStream_t>(stream)>>>(
      static_cast<uint16_t*>(out), static_cast<const uint16_t*>(gate),
      static_cast<const uint16_t*>(up), gate_row_stride, up_row_stride, intermediate);
  return pyllama4_check_launch();
}
