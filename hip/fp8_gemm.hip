// FP8 linear layers for decode: y = (x_q . W_q^T) * x_scale[t] * w_scale[o] in bf16,
// for a few tokens (T <= kMaxTokens) against fp8 weights in nn.Linear layout [out, in].
//
// The reference this must equal is pyllama4.quant.fp8 (_scaled_mm, quantize_activation):
//   amax_t = clamp(max |x[t]|, 1e-12, ub) (no upper clamp without ub), x_scale[t] = amax_t / fmax
//   (fmax 448 for e4m3fn, 240 for e4m3fnuz), x_q = fp8(clamp(x / x_scale, -fmax, fmax)) rounded
//   to nearest even, y = bf16(fp32(sum_k x_q * W_q) * x_scale[t] * w_scale[o]); weight-only
//   (quantize_input = 0) takes x_q = x (bf16), x_scale = 1. The dot products of fp8 (or bf16) by
//   fp8 values are exact in fp32; only their fp32 summation order differs from the reference's
//   exact sum.
//
// Two launches on the stream:
//   1. quantize_kernel (quantize_input only), one block per token: block amax of |x| (fp32),
//      x_scale as the reference, then each value divided (IEEE division), clamped and encoded
//      (encode_fp8, round-to-nearest-even, saturating); bytes [T, K] and scales [T] go to the
//      workspace (layout: scales at 0, bytes at kAlign).
//   2. gemv_kernel: a block of kWarps warps; warp w owns kRows adjacent output rows. Its lanes
//      walk along `in` 16 bytes (16 fp8 weights) at a time per row, so a warp's read of a row is
//      one coalesced 16 * warp-width-byte segment; the kRows rows' weights are loaded before any
//      is used. The TP tokens' activations for those 16 columns (16 fp8 bytes, or 32 bf16
//      bytes) are read from global memory (L1/L2: they are T * K bytes, shared by all warps) and
//      reused for the kRows rows. Sums stay fp32 in registers per (token, row) and are reduced
//      across the warp with lane shuffles at the end; lanes then write the bf16 outputs.
//      Kernels are compiled for 1, 2, 4, 8 and 16 tokens (the launcher picks the smallest >= T).
//
// fp8 decoding is fused_moe.hip's rule (read as the fp16 s | e << 10 | m << 7, exact, equal to
// the fp8 value times 2^(bias - 15)); the power-of-two factor is undone once after the sum
// (exact barring fp32 overflow, impossible at these magnitudes). NaN weight bytes are not
// detected (quantized weights are never NaN: quantize_weight refuses NaN, fn_to_fnuz refuses the
// NaN bytes); NaN / inf activations follow fmaxf, not torch's amax (unspecified there).
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

using pyllama4_fp8::encode_fp8;
using pyllama4_fp8::Fp8Format;
using pyllama4_fp8::kE4m3fn;
using pyllama4_fp8::kE4m3fnuz;

constexpr int kMaxTokens = 16;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * PYLLAMA4_WARP;
constexpr int kRows = 2;  // output rows per warp
constexpr int kQuantThreads = 256;
constexpr int64_t kAlign = 256;
constexpr float kEps = pyllama4_fp8::kActivationEps;

int64_t round_up(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

int64_t workspace_bytes(int num_tokens, int in_features) {
  return kAlign + round_up(static_cast<int64_t>(num_tokens) * in_features);
}

// ---- fp8 encode / decode --------------------------------------------------------------------

__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu)));
}

// Four fp8 bytes of `word` (lowest first) -> their values times 2^(bias - 15) (both formats: the
// bias only changes the factor). fused_moe.hip's decode_fp8x4 without the NaN tracking.
__device__ __forceinline__ void decode4(uint32_t word, float* w) {
  const uint32_t even = ((word & 0x007f007fu) << 7) | ((word & 0x00800080u) << 8);
  const uint32_t odd = ((word >> 1) & 0x3f803f80u) | (word & 0x80008000u);
  w[0] = half_bits_to_float(even);
  w[1] = half_bits_to_float(odd);
  w[2] = half_bits_to_float(even >> 16);
  w[3] = half_bits_to_float(odd >> 16);
}

__device__ __forceinline__ void decode16(const uint4& raw, float (&w)[16]) {
  decode4(raw.x, w);
  decode4(raw.y, w + 4);
  decode4(raw.z, w + 8);
  decode4(raw.w, w + 12);
}

__device__ __forceinline__ void bf16x16(const uint4& lo, const uint4& hi, float (&v)[16]) {
  const uint32_t words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[2 * i] = __uint_as_float(words[i] << 16);
    v[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// ---- 1. Per-token activation quantization ---------------------------------------------------

template <int FORMAT>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_kernel(const uint16_t* __restrict__ x, int in_features, float ub,
                    uint8_t* __restrict__ x_q, float* __restrict__ x_scale) {
  using F = Fp8Format<FORMAT>;
  __shared__ float s_partial[kQuantThreads / PYLLAMA4_WARP];
  const int t = blockIdx.x;
  const int lane = threadIdx.x % PYLLAMA4_WARP;
  const uint4* row = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(t) * in_features);
  const int vectors = in_features / 8;  // 8 bf16 per uint4

  float amax = 0.f;
  for (int i = threadIdx.x; i < vectors; i += kQuantThreads) {
    const uint4 raw = row[i];
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      amax = fmaxf(amax, fabsf(__uint_as_float(words[j] << 16)));
      amax = fmaxf(amax, fabsf(__uint_as_float(words[j] & 0xffff0000u)));
    }
  }
#pragma unroll
  for (int mask = PYLLAMA4_WARP / 2; mask > 0; mask /= 2) amax = fmaxf(amax, lane_xor(amax, mask));
  if (lane == 0) s_partial[threadIdx.x / PYLLAMA4_WARP] = amax;
  __syncthreads();
  amax = s_partial[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / PYLLAMA4_WARP; ++w) amax = fmaxf(amax, s_partial[w]);
  amax = fmaxf(amax, kEps);
  if (ub > 0.f) amax = fminf(amax, ub);
  const float scale = amax / F::kMax;  // IEEE division, as torch
  if (threadIdx.x == 0) x_scale[t] = scale;

  uint2* out = reinterpret_cast<uint2*>(x_q + static_cast<int64_t>(t) * in_features);
  for (int i = threadIdx.x; i < vectors; i += kQuantThreads) {
    const uint4 raw = row[i];
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float lo = fminf(fmaxf(__uint_as_float(words[j] << 16) / scale, -F::kMax), F::kMax);
      const float hi =
          fminf(fmaxf(__uint_as_float(words[j] & 0xffff0000u) / scale, -F::kMax), F::kMax);
      const uint32_t pair = encode_fp8<FORMAT>(lo) | (encode_fp8<FORMAT>(hi) << 8);
      packed[j / 2] |= pair << (16 * (j % 2));
    }
    out[i] = make_uint2(packed[0], packed[1]);
  }
}

// ---- 2. The GEMV ----------------------------------------------------------------------------

struct GemvArgs {
  uint16_t* y;               // [T, out] bf16
  const uint16_t* x;         // [T, in] bf16 (weight-only)
  const uint8_t* x_q;        // [T, in] fp8 (quantize_input)
  const float* x_scale;      // [T]
  const uint8_t* weight;     // [out, in] fp8
  const float* weight_scale; // [out]
  int num_tokens, in_features, out_features;
};

template <int FORMAT, bool QUANT, int TP>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvArgs a) {
  using F = Fp8Format<FORMAT>;
  const int lane = threadIdx.x % PYLLAMA4_WARP;
  const int warp = threadIdx.x / PYLLAMA4_WARP;
  const int row0 = (static_cast<int>(blockIdx.x) * kWarps + warp) * kRows;
  if (row0 >= a.out_features) return;  // whole warp: no shuffles follow for it
  const int64_t K = a.in_features;

  const uint8_t* wrow[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int o = row0 + r < a.out_features ? row0 + r : a.out_features - 1;  // read, not stored
    wrow[r] = a.weight + o * K;
  }

  float acc[TP][kRows];
#pragma unroll
  for (int t = 0; t < TP; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[t][r] = 0.f;

  for (int64_t k = static_cast<int64_t>(lane) * 16; k < K; k += PYLLAMA4_WARP * 16) {
    uint4 raw[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) raw[r] = *reinterpret_cast<const uint4*>(wrow[r] + k);
    float w[kRows][16];
#pragma unroll
    for (int r = 0; r < kRows; ++r) decode16(raw[r], w[r]);
#pragma unroll
    for (int t = 0; t < TP; ++t) {
      if (t < a.num_tokens) {
        float xv[16];
        if constexpr (QUANT) {
          decode16(*reinterpret_cast<const uint4*>(a.x_q + t * K + k), xv);
        } else {
          const uint4* xp = reinterpret_cast<const uint4*>(a.x + t * K + k);
          bf16x16(xp[0], xp[1], xv);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float sum = acc[t][r];
#pragma unroll
          for (int i = 0; i < 16; ++i) sum = fmaf(xv[i], w[r][i], sum);
          acc[t][r] = sum;
        }
      }
    }
  }

  // Butterfly reduction: every lane ends with every (token, row) sum.
#pragma unroll
  for (int t = 0; t < TP; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int mask = PYLLAMA4_WARP / 2; mask > 0; mask /= 2)
        acc[t][r] += lane_xor(acc[t][r], mask);

  // Undo the decoding's power of two (x's too when quantized): exact.
  constexpr float kUnscale = QUANT ? F::kUnscale * F::kUnscale : F::kUnscale;
#pragma unroll
  for (int t = 0; t < TP; ++t) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int o = row0 + r;
      if ((t * kRows + r) % PYLLAMA4_WARP == lane && t < a.num_tokens && o < a.out_features) {
        float v = acc[t][r] * kUnscale;  // = fp32(sum x_q * W_q), up to summation order
        if constexpr (QUANT) v = v * a.x_scale[t];
        v = v * a.weight_scale[o];
        a.y[static_cast<int64_t>(t) * a.out_features + o] = float_to_bf16(v);
      }
    }
  }
}

template <int FORMAT, bool QUANT>
void launch_gemv(int tp, unsigned blocks, gpuStream_t stream, const GemvArgs& a) {
  switch (tp) {
    case 1:
      gemv_kernel<FORMAT, QUANT, 1><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case 2:
      gemv_kernel<FORMAT, QUANT, 2><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case 4:
      gemv_kernel<FORMAT, QUANT, 4><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case 8:
      gemv_kernel<FORMAT, QUANT, 8><<<blocks, kThreads, 0, stream>>>(a);
      break;
    default:
      gemv_kernel<FORMAT, QUANT, 16><<<blocks, kThreads, 0, stream>>>(a);
      break;
  }
}

template <int FORMAT>
void launch_format(bool quant, int tp, unsigned blocks, gpuStream_t stream, const GemvArgs& a) {
  if (quant)
    launch_gemv<FORMAT, true>(tp, blocks, stream, a);
  else
    launch_gemv<FORMAT, false>(tp, blocks, stream, a);
}

int check_common(const char* name, int32_t weight_format, int32_t num_tokens,
                 int32_t in_features, int max_tokens) {
  if (weight_format != kE4m3fn && weight_format != kE4m3fnuz)
    return pyllama4_failf("%s: weight_format must be 1 (e4m3fn) or 2 (e4m3fnuz), got %d", name,
                          weight_format);
  if (num_tokens < 1 || num_tokens > max_tokens)
    return pyllama4_failf("%s: num_tokens must be in [1, %d], got %d", name, max_tokens,
                          num_tokens);
  if (in_features < 16 || in_features % 16 != 0)
    return pyllama4_failf("%s: in_features must be a positive multiple of 16, got %d", name,
                          in_features);
  return 0;
}

}  // namespace

extern "C" int64_t pyllama4_fp8_linear_workspace_bytes(int32_t num_tokens, int32_t in_features) {
  if (num_tokens < 1 || in_features < 1) return 0;
  return workspace_bytes(num_tokens, in_features);
}

extern "C" int pyllama4_fp8_quantize_per_token(void* x_q, float* x_scale, const void* x,
                                               int32_t weight_format, int32_t num_tokens,
                                               int32_t in_features, float activation_scale_ub,
                                               void* stream) {
  if (!x_q || !x_scale || !x) return pyllama4_fail("fp8_quantize_per_token: a pointer is null");
  if (int code = check_common("fp8_quantize_per_token", weight_format, num_tokens, in_features,
                              1 << 30))
    return code;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(x_q) % 8 != 0)
    return pyllama4_fail("fp8_quantize_per_token: x must be 16-byte aligned, x_q 8-byte");
  auto s = static_cast<gpuStream_t>(stream);
  const auto* xin = static_cast<const uint16_t*>(x);
  auto* q = static_cast<uint8_t*>(x_q);
  if (weight_format == kE4m3fn)
    quantize_kernel<kE4m3fn>
        <<<num_tokens, kQuantThreads, 0, s>>>(xin, in_features, activation_scale_ub, q, x_scale);
  else
    quantize_kernel<kE4m3fnuz>
        <<<num_tokens, kQuantThreads, 0, s>>>(xin, in_features, activation_scale_ub, q, x_scale);
  return pyllama4_check_launch();
}

extern "C" int pyllama4_fp8_linear(void* y, const void* x, const void* weight,
                                   const float* weight_scale, int32_t weight_format,
                                   int32_t num_tokens, int32_t in_features,
                                   int32_t out_features, float activation_scale_ub,
                                   int32_t quantize_input, void* workspace,
                                   int64_t workspace_bytes_, void* stream) {
  if (!y || !x || !weight || !weight_scale)
    return pyllama4_fail("fp8_linear: a pointer argument is null");
  if (int code = check_common("fp8_linear", weight_format, num_tokens, in_features, kMaxTokens))
    return code;
  if (out_features < 1)
    return pyllama4_failf("fp8_linear: out_features must be positive, got %d", out_features);
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(weight) % 16 != 0)
    return pyllama4_fail("fp8_linear: x and weight must be 16-byte aligned");
  if (quantize_input) {
    if (!workspace || reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
      return pyllama4_fail("fp8_linear: quantize_input needs a 16-byte aligned workspace");
    const int64_t need = workspace_bytes(num_tokens, in_features);
    if (workspace_bytes_ < need)
      return pyllama4_failf("fp8_linear: workspace of %lld bytes, needs %lld",
                            static_cast<long long>(workspace_bytes_),
                            static_cast<long long>(need));
  }
  auto s = static_cast<gpuStream_t>(stream);
  GemvArgs a{};
  a.y = static_cast<uint16_t*>(y);
  a.x = static_cast<const uint16_t*>(x);
  a.weight = static_cast<const uint8_t*>(weight);
  a.weight_scale = weight_scale;
  a.num_tokens = num_tokens;
  a.in_features = in_features;
  a.out_features = out_features;
  if (quantize_input) {
    auto* bytes = static_cast<uint8_t*>(workspace);
    a.x_scale = reinterpret_cast<const float*>(bytes);
    a.x_q = bytes + kAlign;
    if (int code = pyllama4_fp8_quantize_per_token(bytes + kAlign, reinterpret_cast<float*>(bytes),
                                                   x, weight_format, num_tokens, in_features,
                                                   activation_scale_ub, stream))
      return code;
  }
  const int tp = num_tokens <= 1 ? 1 : num_tokens <= 2 ? 2 : num_tokens <= 4 ? 4
               : num_tokens <= 8 ? 8 : 16;
  const int rows_per_block = kWarps * kRows;
  const unsigned blocks = static_cast<unsigned>((out_features + rows_per_block - 1) / rows_per_block);
  if (weight_format == kE4m3fn)
    launch_format<kE4m3fn>(quantize_input != 0, tp, blocks, s, a);
  else
    launch_format<kE4m3fnuz>(quantize_input != 0, tp, blocks, s, a);
  return pyllama4_check_launch();
}
