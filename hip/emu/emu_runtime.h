// emu_runtime.h: a CPU emulation of the part of the CUDA / HIP runtime that hip/'s kernels use,
// so that CI, which has no GPU, runs the REAL kernel sources (tests/test_kernels_emulated.py).
//
// How it is used: never by the GPU build (hip/CMakeLists.txt compiles hip/*.hip with -I hip
// only). The emulated build (the test) copies each hip/*.hip with its launches rewritten,
// `kernel<<<grid, block, shmem, stream>>>(args)` -> `::pyllama4_emu::launch(kernel, grid, block,
// shmem, stream)(args)`, and compiles it with g++ and -I hip/emu BEFORE -I hip. There the
// vendor headers are this directory's shims (<cuda_runtime.h>, <cuda_fp16.h>,
// <hip/hip_runtime.h>, <hip/hip_fp16.h>), so the real hip/portable.h is used over them: its CUDA
// branch (warp 32) by default, its HIP branch with -D__HIP_PLATFORM_AMD__ (a host pass: warp
// 64, as on CDNA). emu_runtime.cpp is compiled with them.
//
// What it does: a launch runs synchronously on the calling thread (launches are serialised by a
// mutex). Blocks run one after another (x fastest, then y, z); a block's threads run as
// cooperative fibers, each on its own stack, switching only at __syncthreads and at the lane
// shuffles. __syncthreads is a barrier of the block's threads; a shuffle is a barrier of the
// warp's lanes (PYLLAMA4_WARP consecutive threads) plus an exchange. A thread that returns
// drops out of the block barrier (as exited warps do on the GPUs). __shared__ variables are
// statics (one block runs at a time). Atomics are plain read-modify-writes (one thread runs at
// a time). Reported through cudaGetLastError / hipGetLastError, so a launcher's
// pyllama4_check_launch() fails with the message: an invalid launch configuration (CUDA's
// limits: 1..1024 threads a block, grid y and z <= 65535, no zero dimension), dynamic shared
// memory (not supported), a block that cannot finish (some of its threads wait at a barrier
// that the others never reach: a hang or undefined behaviour on a GPU), a shuffle that reads a
// lane which exited or does not exist, a shuffle width or lane mask out of range.
//
// What it does not model: no concurrency between blocks, warps or lanes (races and missing
// __syncthreads between a write and another thread's read go unseen unless the sequential
// order exposes them), no memory model beyond atomics (which are trivially atomic here), no
// device memory (launchers get host pointers and nothing is bounds-checked), no streams (any
// stream is accepted and ignored; everything is synchronous), barriers are counted, not matched
// by call site (two different __syncthreads() in the two arms of a branch pass), shared memory
// keeps the previous block's values (not poisoned), __expf and friends are the exact libm
// functions (the GPUs' fast approximations differ in the last bits), no limit on static shared
// memory or registers, and timing means nothing.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define PYLLAMA4_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

#pragma GCC visibility push(hidden)

// ---- Vector types, as CUDA / HIP declare them (alignment included) ----------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct __attribute__((aligned(8))) uint2 {
  unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- Built-in variables: the running thread's (set by the scheduler at every switch) ----------
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace pyllama4_emu {

// Error codes of the emulated runtime (the vendor shims map them to their enums).
enum Error : int { kSuccess = 0, kInvalidConfiguration = 1, kLaunchFailure = 2 };

// The pending error (kSuccess if none), cleared by the call; the first error since the last
// call is kept, with its message.
int take_error();
// The message of the last error (kept after take_error), "no error" if none yet.
const char* error_string();
// PYLLAMA4_WARP of this build (emu_runtime.cpp sees portable.h's choice).
int warp_width();

// Runs body(data) as every thread of every block of the grid (see the header comment).
void run(dim3 grid, dim3 block, std::size_t shared_bytes, void (*body)(const void*),
         const void* data);

// The block barrier (__syncthreads).
void sync_block();

// The xor shuffle of 64-bit payloads: this lane's `bits` in, lane (lane ^ mask)'s out, within
// segments of `width` lanes; `what` names the intrinsic for messages.
uint64_t exchange_xor(uint64_t bits, int mask, int width, const char* what);

template <typename T>
T shuffle_xor(T value, int mask, int width, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a 1..8-byte value");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = exchange_xor(bits, mask, width, what);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// `kernel<<<grid, block, shmem, stream>>>(args...)` is rewritten to
// `launch(kernel, grid, block, shmem, stream)(args...)`: the arguments are converted to the
// kernel's parameter types (as a launch does), stored once, and every thread calls the kernel
// with them.
template <typename... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
    using Params = std::tuple<std::decay_t<P>...>;
    struct Call {
      void (*kernel)(P...);
      Params params;
    };
    const Call call{kernel_, Params(std::forward<A>(args)...)};
    run(grid_, block_, shared_bytes_,
        [](const void* data) {
          const Call& c = *static_cast<const Call*>(data);
          std::apply(c.kernel, c.params);
        },
        &call);
  }

 private:
  void (*kernel_)(P...);
  dim3 grid_, block_;
  std::size_t shared_bytes_;
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes = 0,
                    const void* /*stream: ignored, launches are synchronous*/ = nullptr) {
  return Launch<P...>(kernel, grid, block, shared_bytes);
}

}  // namespace pyllama4_emu

// ---- Device functions common to CUDA and HIP --------------------------------------------------
inline void __syncthreads() { pyllama4_emu::sync_block(); }

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int32_t i) { return __uint_as_float(static_cast<uint32_t>(i)); }
inline int32_t __float_as_int(float f) { return static_cast<int32_t>(__float_as_uint(f)); }

// The fast-math intrinsics, exactly (the GPUs' approximations differ in the last bits).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

// Atomics: plain read-modify-writes (only one emulated thread runs at a time).
template <typename T>
inline T pyllama4_emu_atomic_add(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* a, int v) { return pyllama4_emu_atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return pyllama4_emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return pyllama4_emu_atomic_add(a, v);
}
inline float atomicAdd(float* a, float v) { return pyllama4_emu_atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return pyllama4_emu_atomic_add(a, v); }
inline int atomicSub(int* a, int v) { return pyllama4_emu_atomic_add(a, -v); }
inline int atomicMax(int* a, int v) {
  const int old = *a;
  *a = old > v ? old : v;
  return old;
}
inline int atomicMin(int* a, int v) {
  const int old = *a;
  *a = old < v ? old : v;
  return old;
}
inline int atomicExch(int* a, int v) {
  const int old = *a;
  *a = v;
  return old;
}
inline float atomicExch(float* a, float v) {
  const float old = *a;
  *a = v;
  return old;
}
inline int atomicCAS(int* a, int compare, int v) {
  const int old = *a;
  if (old == compare) *a = v;
  return old;
}
inline unsigned atomicCAS(unsigned* a, unsigned compare, unsigned v) {
  const unsigned old = *a;
  if (old == compare) *a = v;
  return old;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long compare,
                                    unsigned long long v) {
  const unsigned long long old = *a;
  if (old == compare) *a = v;
  return old;
}

#pragma GCC visibility pop
