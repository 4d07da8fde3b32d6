// FP8 (e4m3) rounding shared by the kernels that quantize activations (fp8_gemm.hip,
// fused_moe.hip). The reference is pyllama4.quant.fp8 (_cast: clamp to +-fmax, then torch's
// float8 cast, round to nearest even).
//
//   encode_fp8<FORMAT>(v): fp32 -> fp8 byte, round to nearest even; |v| must be <= the format's
//     max (the caller clamps). e4m3fn: -0 and negative values rounding to 0 keep the sign (0x80),
//     NaN -> 0x7f | sign; e4m3fnuz: zeros are 0x00 (0x80 is its NaN), NaN -> 0x80. As torch.
//   fp8_value<FORMAT>(byte): the byte's value in fp32, exactly (NaN bytes give NaN).
//   quantize_fp8<FORMAT>(v, scale): fp8_value(encode_fp8(clamp(v / scale))) * scale, the value a
//     per-row quantized activation stands for (IEEE division, as torch).
#pragma once

#include <cmath>
#include <cstdint>

#include "portable.h"

namespace pyllama4_fp8 {

enum : int { kE4m3fn = 1, kE4m3fnuz = 2 };

constexpr float kActivationEps = 1e-12f;  // pyllama4.quant.fp8.ACTIVATION_EPS

template <int FORMAT>
struct Fp8Format {
  static constexpr int kBias = FORMAT == kE4m3fn ? 7 : 8;
  static constexpr float kMax = FORMAT == kE4m3fn ? 448.f : 240.f;
  static constexpr float kUnscale = FORMAT == kE4m3fn ? 256.f : 128.f;  // 2^(15 - bias)
};

template <int FORMAT>
__device__ __forceinline__ uint32_t encode_fp8(float v) {
  using F = Fp8Format<FORMAT>;
  const uint32_t bits = __float_as_uint(v);
  const uint32_t sign = (bits >> 24) & 0x80u;
  if (v != v) return FORMAT == kE4m3fn ? (sign | 0x7fu) : 0x80u;
  const float a = fabsf(v);
  uint32_t mag;
  constexpr float kMinNormal = FORMAT == kE4m3fn ? 0x1p-6f : 0x1p-7f;
  constexpr float kInvStep = FORMAT == kE4m3fn ? 0x1p9f : 0x1p10f;  // 1 / subnormal spacing
  if (a < kMinNormal) {
    // Subnormal range: a multiple of the spacing, rint rounds half to even (exact scaling); 8
    // steps is the smallest normal, encoded 0x08 (e = 1, m = 0) as well.
    mag = static_cast<uint32_t>(rintf(a * kInvStep));
  } else {
    // Round the fp32 mantissa to 3 bits, half to even; a carry moves into the exponent.
    const uint32_t abits = bits & 0x7fffffffu;
    const uint32_t rounded = abits + 0x7ffffu + ((abits >> 20) & 1u);
    mag = (rounded >> 20) - ((127u - F::kBias) << 3);
  }
  if (FORMAT == kE4m3fnuz && mag == 0) return 0u;
  return sign | mag;
}

template <int FORMAT>
__device__ __forceinline__ float fp8_value(uint32_t byte) {
  const uint32_t e = (byte >> 3) & 0xfu, m = byte & 7u;
  const bool negative = (byte & 0x80u) != 0;
  if (FORMAT == kE4m3fn ? (byte & 0x7fu) == 0x7fu : byte == 0x80u) return NAN;
  constexpr int kBias = Fp8Format<FORMAT>::kBias;
  const float magnitude = e == 0 ? ldexpf(static_cast<float>(m), 1 - kBias - 3)
                                 : ldexpf(static_cast<float>(8u + m), static_cast<int>(e) - kBias - 3);
  return negative ? -magnitude : magnitude;
}

template <int FORMAT>
__device__ __forceinline__ float quantize_fp8(float v, float scale) {
  constexpr float kMax = Fp8Format<FORMAT>::kMax;
  const float q = fminf(fmaxf(v / scale, -kMax), kMax);
  return fp8_value<FORMAT>(encode_fp8<FORMAT>(q)) * scale;
}

}  // namespace pyllama4_fp8
