// portable.h: the few GPU names pyllama4's kernels use, for HIP (hipcc: AMD) and CUDA (nvcc).
//
// The kernels are written in HIP C++ with triple-chevron launches, which both compilers accept.
// This header supplies what differs: the runtime's stream and error types, lane shuffles, and the
// wavefront / warp width as a compile-time constant (64 on CDNA gfx9, 32 on NVIDIA).
// bf16 values are handled as raw uint16_t bits (see bf16.h-style helpers below), so neither
// vendor's bfloat16 header is needed.
#pragma once

#include <cstdint>

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#include <hip/hip_runtime.h>
#define PYLLAMA4_HIP 1
using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#if defined(__GFX9__) || !defined(__HIP_DEVICE_COMPILE__)
// CDNA (gfx90a, gfx94x) runs 64-lane wavefronts, and host code compiles the same constant: the
// kernels target CDNA (gfx9) only; RDNA's 32-lane waves would disagree with the host's 64.
#define PYLLAMA4_WARP 64
#else
#define PYLLAMA4_WARP 32
#endif
template <typename T>
__device__ __forceinline__ T lane_xor(T value, int mask) {
  return __shfl_xor(value, mask, PYLLAMA4_WARP);
}
#else
#include <cuda_runtime.h>
#define PYLLAMA4_CUDA 1
using gpuStream_t = cudaStream_t;
using gpuError_t = cudaError_t;
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define PYLLAMA4_WARP 32
template <typename T>
__device__ __forceinline__ T lane_xor(T value, int mask) {
  return __shfl_xor_sync(0xffffffffu, value, mask, PYLLAMA4_WARP);
}
#endif

// bf16 <-> fp32 on raw bits: bf16 is the top half of an IEEE fp32; rounding is to nearest even.
__device__ __forceinline__ float bf16_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ uint16_t float_to_bf16(float value) {
  uint32_t bits = __float_as_uint(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
