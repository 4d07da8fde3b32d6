// hip/hip_runtime.h for the CPU emulation (see ../emu_runtime.h): the HIP runtime names that
// hip/portable.h's HIP branch and the kernels use. Never on the GPU build's include path.
// portable.h's HIP branch takes a 64-lane wavefront unless __HIP_DEVICE_COMPILE__ is defined
// without __GFX9__ (a device pass for RDNA); the emulated build defines neither: warp 64.
#pragma once

#include "../emu_runtime.h"

#pragma GCC visibility push(hidden)

struct ihipStream_t;
using hipStream_t = ihipStream_t*;

enum hipError_t : int {
  hipSuccess = 0,
  hipErrorInvalidConfiguration = 9,
  hipErrorLaunchFailure = 719,
};

inline hipError_t hipGetLastError() {
  switch (pyllama4_emu::take_error()) {
    case pyllama4_emu::kSuccess:
      return hipSuccess;
    case pyllama4_emu::kInvalidConfiguration:
      return hipErrorInvalidConfiguration;
    default:
      return hipErrorLaunchFailure;
  }
}

inline const char* hipGetErrorString(hipError_t error) {
  return error == hipSuccess ? "no error" : pyllama4_emu::error_string();
}

constexpr int warpSize = 64;

template <typename T>
T __shfl_xor(T value, int lane_mask, int width = 64) {
  return pyllama4_emu::shuffle_xor(value, lane_mask, width, "__shfl_xor");
}

// The hardware fp32 atomic add (no CAS loop): here a plain add, as every atomic.
inline float unsafeAtomicAdd(float* address, float value) { return atomicAdd(address, value); }
inline double unsafeAtomicAdd(double* address, double value) { return atomicAdd(address, value); }

#pragma GCC visibility pop
