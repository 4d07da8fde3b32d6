// emu_selftest.hip: kernels that check the CPU emulation itself (tests/test_kernels_emulated.py),
// written as hip/'s kernels are (portable.h's lane_xor, __syncthreads, __shared__, atomics and
// the triple-chevron launch), compiled only into the emulated libraries.
#include "errors.h"
#include "portable.h"

namespace {

// out[b] = the sum of the block's global thread ids, by warp shuffles then shared memory;
// out[gridDim.x] += the same, by atomics (the sum over the grid).
__global__ void block_sums_kernel(int* out) {
  __shared__ int s_warp[1024];
  const int t = threadIdx.x;
  const int lane = t % PYLLAMA4_WARP;
  const int warp = t / PYLLAMA4_WARP;
  int v = static_cast<int>(blockIdx.x * blockDim.x) + t;
  for (int mask = PYLLAMA4_WARP / 2; mask > 0; mask /= 2) v += lane_xor(v, mask);
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  if (t == 0) {
    int total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / PYLLAMA4_WARP; ++w) total += s_warp[w];
    out[blockIdx.x] = total;
  }
  if (lane == 0) atomicAdd(out + gridDim.x, v);
}

// Lane 0 of each warp returns; lane 1 then shuffles with it.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x % PYLLAMA4_WARP == 0) return;
  out[threadIdx.x] = lane_xor(static_cast<int>(threadIdx.x), 1);
}

// Thread 0 waits at __syncthreads while the rest of its warp waits at a shuffle: a hang.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
    return;
  }
  out[threadIdx.x] = lane_xor(static_cast<int>(threadIdx.x), 1);
}

}  // namespace

// which: 0 block sums, 1 a shuffle with an exited lane, 2 a divergent barrier; blocks x threads.
// Returns pyllama4_check_launch()'s code (the message in pyllama4_last_error()).
extern "C" int pyllama4_emu_selftest(int which, int* out, int blocks, int threads) {
  if (which == 0) block_sums_kernel<<<blocks, threads, 0, nullptr>>>(out);
  if (which == 1) exited_lane_kernel<<<blocks, threads, 0, nullptr>>>(out);
  if (which == 2) divergent_barrier_kernel<<<blocks, threads, 0, nullptr>>>(out);
  return pyllama4_check_launch();
}
