// emu_half.h: __half for the CPU emulation (see emu_runtime.h), behind the cuda_fp16.h and
// hip/hip_fp16.h shims. Only the raw-bits constructor and the exact conversion to float.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#pragma GCC visibility push(hidden)

struct __half {
  unsigned short bits;
};

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

// IEEE binary16 -> binary32, exact: sign, 5-bit exponent (bias 15), 10-bit mantissa.
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&bits, &magnitude, 4);
    bits |= sign;
  } else if (exponent == 0x1fu) {  // infinity or NaN (payload kept)
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

#pragma GCC visibility pop
