// cuda_runtime.h for the CPU emulation (see emu_runtime.h): the CUDA runtime names that
// hip/portable.h's CUDA branch and the kernels use. Never on the GPU build's include path.
#pragma once

#include "emu_runtime.h"

#pragma GCC visibility push(hidden)

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorLaunchFailure = 4,
  cudaErrorInvalidConfiguration = 9,
};

inline cudaError_t cudaGetLastError() {
  switch (pyllama4_emu::take_error()) {
    case pyllama4_emu::kSuccess:
      return cudaSuccess;
    case pyllama4_emu::kInvalidConfiguration:
      return cudaErrorInvalidConfiguration;
    default:
      return cudaErrorLaunchFailure;
  }
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : pyllama4_emu::error_string();
}

constexpr int warpSize = 32;

// All lanes of the warp must take part (the emulation models full masks only).
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu) width = -1;  // reported by exchange_xor as out of range
  return pyllama4_emu::shuffle_xor(value, lane_mask, width, "__shfl_xor_sync");
}

#pragma GCC visibility pop
