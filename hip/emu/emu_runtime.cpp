// emu_runtime.cpp: the scheduler of the CPU emulation (see emu_runtime.h). Compiled with the
// kernels and the same flags (-I hip/emu -I hip, so "portable.h" is hip/portable.h over the
// vendor shims and PYLLAMA4_WARP is the build's warp width).
//
// A launch runs its blocks one after another on the calling thread. A block's threads are
// fibers, each on its own mmap'ed stack with a guard page below it. The scheduler resumes the
// runnable fibers in threadIdx order, round after round; a fiber runs until it waits at a
// barrier (block: __syncthreads; warp: a shuffle) or returns. The last thread to arrive at a
// barrier releases the others and goes on. A round in which no fiber can run while some have
// not returned is a deadlock: reported, and the block and launch are abandoned (the waiting
// fibers are never resumed; their stacks are reused).
// Context switches: a few instructions of assembly on x86-64 (the callee-saved registers and
// the stack pointer); ucontext elsewhere, under a CET shadow stack (which the assembly's return
// into a fresh stack would violate; glibc's swapcontext handles it) or with
// -DPYLLAMA4_EMU_UCONTEXT. ucontext is several times slower (a system call per switch).
#include "emu_runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <vector>

#include "portable.h"

#if defined(__x86_64__) && !defined(PYLLAMA4_EMU_UCONTEXT)
#define PYLLAMA4_EMU_ASM 1
#include <sys/syscall.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

#if defined(PYLLAMA4_EMU_ASM)
// pyllama4_emu_swap(save, load): pushes the callee-saved registers (System V x86-64), stores the
// stack pointer to *save, loads `load` as the stack pointer, pops that context's registers and
// returns into it. A new fiber's stack is laid out as if it had called this function.
extern "C" __attribute__((visibility("hidden"))) void pyllama4_emu_swap(void** save, void* load);
asm(R"(
  .pushsection .text
  .p2align 4
  .globl pyllama4_emu_swap
  .hidden pyllama4_emu_swap
  .type pyllama4_emu_swap, @function
pyllama4_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pyllama4_emu_swap, .-pyllama4_emu_swap
  .popsection
)");
#endif

namespace pyllama4_emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;  // per thread; the kernels use a few KiB
constexpr unsigned kMaxThreads = 1024;

struct Context {
  ucontext_t uc;
  void* sp = nullptr;  // the assembly's saved stack pointer
};

// Whether the assembly switch is used: x86-64 without a CET shadow stack (Linux 6.6+ reports
// it through arch_prctl(ARCH_SHSTK_STATUS); older kernels fail the call: none).
bool use_asm() {
#if defined(PYLLAMA4_EMU_ASM)
  static const bool yes = [] {
    unsigned long features = 0;
    constexpr int kArchShstkStatus = 0x5005;
    const long failed = syscall(SYS_arch_prctl, kArchShstkStatus, &features);
    return failed != 0 || (features & 1ul) == 0;
  }();
  return yes;
#else
  return false;
#endif
}

void swap_to(Context& save, Context& load) {
#if defined(PYLLAMA4_EMU_ASM)
  if (use_asm()) return pyllama4_emu_swap(&save.sp, load.sp);
#endif
  swapcontext(&save.uc, &load.uc);
}

enum class Wait { kNone, kBlock, kWarp };

struct Fiber {
  Context context;
  uint3 index;
  unsigned linear = 0;
  Wait wait = Wait::kNone;
  bool done = false;
  uint64_t shuffles = 0;  // shuffles this lane has made (their parity picks the buffer)
};

struct Barrier {
  unsigned expected = 0;  // threads (of the block or the warp) that have not returned
  unsigned arrived = 0;
  std::vector<unsigned> waiters;
};

struct Stack {
  unsigned char* base = nullptr;  // the guard page; the stack is above it
  std::size_t bytes = 0;
};

// The state of the launch in progress (one at a time: launch_mutex).
struct State {
  std::vector<Fiber> fibers;
  std::vector<Stack> stacks;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> exchange[2];
  Context scheduler;
  unsigned threads = 0;  // of the block: fibers[0, threads) are its threads
  unsigned current = 0;
  unsigned live = 0;
  void (*body)(const void*) = nullptr;
  const void* data = nullptr;
};

State state;
std::mutex launch_mutex;
int pending_error = kSuccess;
char error_text[512] = "no error";

void fail(int code, const char* format, ...) __attribute__((format(printf, 2, 3)));
void fail(int code, const char* format, ...) {
  if (pending_error != kSuccess) return;  // the first error is kept
  pending_error = code;
  std::va_list args;
  va_start(args, format);
  std::vsnprintf(error_text, sizeof(error_text), format, args);
  va_end(args);
}

Stack& stack_for(unsigned t) {
  static const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  while (state.stacks.size() <= t) {
    Stack s;
    s.bytes = page + kStackBytes;
    void* p = mmap(nullptr, s.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return state.stacks.emplace_back();  // base null: reported by the caller
    mprotect(p, page, PROT_NONE);  // an overflow faults instead of corrupting memory
    s.base = static_cast<unsigned char*>(p);
    state.stacks.push_back(s);
  }
  return state.stacks[t];
}

unsigned warp_of(unsigned linear) { return linear / PYLLAMA4_WARP; }

Fiber& current() { return state.fibers[state.current]; }

void yield() { swap_to(current().context, state.scheduler); }

// Releases b's waiters once every thread that has not returned has arrived.
void release_if_complete(Barrier& b) {
  if (b.arrived == 0 || b.arrived < b.expected) return;
  b.arrived = 0;
  for (unsigned t : b.waiters) state.fibers[t].wait = Wait::kNone;
  b.waiters.clear();
}

void arrive(Barrier& b, Wait kind) {
  ++b.arrived;
  if (b.arrived >= b.expected) {
    release_if_complete(b);
    return;  // the last to arrive goes on
  }
  Fiber& f = current();
  f.wait = kind;
  b.waiters.push_back(f.linear);
  yield();
}

void fiber_main() {
  Fiber& f = current();
  state.body(state.data);
  f.done = true;
  --state.live;
  --state.block.expected;
  --state.warps[warp_of(f.linear)].expected;
  release_if_complete(state.block);
  release_if_complete(state.warps[warp_of(f.linear)]);
  yield();  // never resumed
  __builtin_unreachable();
}

bool start_fiber(Fiber& f, Stack& s) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  if (use_asm()) {
    // From the top: a null return address for fiber_main (which never returns), fiber_main's
    // address (where pyllama4_emu_swap returns to), six zero registers. At fiber_main's entry
    // the stack pointer is 8 mod 16, as after a call.
    auto top = reinterpret_cast<uintptr_t>(s.base + s.bytes) & ~static_cast<uintptr_t>(15);
    auto* slots = reinterpret_cast<void**>(top) - 8;
    for (int i = 0; i < 6; ++i) slots[i] = nullptr;
    slots[6] = reinterpret_cast<void*>(&fiber_main);
    slots[7] = nullptr;
    f.context.sp = slots;
    return true;
  }
  if (getcontext(&f.context.uc) != 0) return false;
  f.context.uc.uc_stack.ss_sp = s.base + page;
  f.context.uc.uc_stack.ss_size = s.bytes - page;
  f.context.uc.uc_link = nullptr;
  makecontext(&f.context.uc, fiber_main, 0);
  return true;
}

// Runs the current block; false when it could not finish (the error is recorded).
bool run_block(unsigned n) {
  if (state.fibers.size() < n) state.fibers.resize(n);
  state.threads = n;
  const unsigned warps = (n + PYLLAMA4_WARP - 1) / PYLLAMA4_WARP;
  state.warps.assign(warps, Barrier{});
  for (unsigned w = 0; w < warps; ++w)
    state.warps[w].expected = n - w * PYLLAMA4_WARP < PYLLAMA4_WARP ? n - w * PYLLAMA4_WARP
                                                                    : PYLLAMA4_WARP;
  state.block = Barrier{};
  state.block.expected = n;
  state.live = n;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = state.fibers[t];
    f.linear = t;
    f.wait = Wait::kNone;
    f.done = false;
    f.shuffles = 0;
    f.index = uint3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
    Stack& s = stack_for(t);
    if (s.base == nullptr || !start_fiber(f, s)) {
      fail(kLaunchFailure, "emulation: cannot make a stack for thread %u", t);
      return false;
    }
  }
  while (state.live > 0) {
    bool ran = false;
    for (unsigned t = 0; t < n; ++t) {
      Fiber& f = state.fibers[t];
      if (f.done || f.wait != Wait::kNone) continue;
      state.current = t;
      threadIdx = f.index;
      swap_to(state.scheduler, f.context);
      ran = true;
    }
    if (!ran) {
      unsigned at_block = 0, at_warp = 0;
      for (unsigned t = 0; t < n; ++t) {
        const Fiber& f = state.fibers[t];
        at_block += !f.done && f.wait == Wait::kBlock;
        at_warp += !f.done && f.wait == Wait::kWarp;
      }
      fail(kLaunchFailure,
           "emulation: block (%u, %u, %u) cannot finish: %u threads wait at __syncthreads and "
           "%u at a warp shuffle that the block's other threads never reach (a GPU would hang "
           "or misbehave)",
           blockIdx.x, blockIdx.y, blockIdx.z, at_block, at_warp);
      return false;
    }
  }
  return true;
}

}  // namespace

int take_error() {
  const int code = pending_error;
  pending_error = kSuccess;
  return code;
}

const char* error_string() { return error_text; }

int warp_width() { return PYLLAMA4_WARP; }

void run(dim3 grid, dim3 block, std::size_t shared_bytes, void (*body)(const void*),
         const void* data) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > kMaxThreads ||
      block.z > 64 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    fail(kInvalidConfiguration,
         "emulation: invalid configuration argument (grid %u x %u x %u, block %u x %u x %u; "
         "CUDA's limits: 1..1024 threads a block, grid y and z <= 65535)",
         grid.x, grid.y, grid.z, block.x, block.y, block.z);
    return;
  }
  if (shared_bytes != 0) {
    fail(kInvalidConfiguration, "emulation: dynamic shared memory (%zu bytes) is not modeled",
         shared_bytes);
    return;
  }
  gridDim = grid;
  blockDim = block;
  state.body = body;
  state.data = data;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        if (!run_block(static_cast<unsigned>(threads))) return;
      }
}

void sync_block() { arrive(state.block, Wait::kBlock); }

uint64_t exchange_xor(uint64_t bits, int mask, int width, const char* what) {
  Fiber& f = current();
  const unsigned lane = f.linear % PYLLAMA4_WARP;
  const unsigned base = f.linear - lane;
  if (width < 1 || width > PYLLAMA4_WARP || (width & (width - 1)) != 0 || mask < 0 ||
      mask >= width) {
    fail(kLaunchFailure,
         "emulation: %s with lane mask %d and width %d (a full-warp mask, a power-of-two width "
         "<= %d and 0 <= lane mask < width are modeled)",
         what, mask, width, PYLLAMA4_WARP);
    return bits;
  }
  const uint64_t number = f.shuffles++;
  std::vector<uint64_t>& buffer = state.exchange[number & 1];
  if (buffer.size() < state.threads) buffer.resize(state.threads);
  buffer[f.linear] = bits;
  // Double buffering: a lane can write this buffer again only after the next shuffle's barrier,
  // which needs every lane of the warp, so all have read this one by then.
  arrive(state.warps[warp_of(f.linear)], Wait::kWarp);
  const unsigned source = base + (lane ^ static_cast<unsigned>(mask));
  if (source >= state.threads || state.fibers[source].shuffles <= number) {
    fail(kLaunchFailure,
         "emulation: %s in block (%u, %u, %u): thread %u reads lane %u of its warp, which %s",
         what, blockIdx.x, blockIdx.y, blockIdx.z, f.linear, source - base,
         source >= state.threads ? "does not exist (partial warp)"
                                       : "returned before this shuffle");
    return bits;
  }
  return buffer[source];
}

}  // namespace pyllama4_emu

// For the test: the warp width of this build (portable.h's choice).
extern "C" int pyllama4_emu_warp_width(void) { return pyllama4_emu::warp_width(); }
