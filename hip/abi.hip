// abi.hip: the library-wide part of the C ABI (pyllama4_kernels.h): its version and the
// per-thread error message, and the error helpers of errors.h that every launcher uses.
//
// Invariant: pyllama4_last_error() returns the message of the last failed call on the calling
// thread, or "" when none failed; the pointer stays valid until that thread's next failure.
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "errors.h"
#include "portable.h"
#include "pyllama4_kernels.h"

namespace {
// The ABI version: bump it (and pyllama4.kernels.ABI_VERSION) on any change of a signature or
// of a launcher's contract.
constexpr int32_t kAbiVersion = 3;

thread_local char last_error[512] = "";
}  // namespace

extern "C" int32_t pyllama4_abi_version(void) { return kAbiVersion; }

extern "C" const char* pyllama4_last_error(void) { return last_error; }

// Which runtime the library was built for, "hip" or "cuda": the loader refuses a library that
// does not match torch's (an AMD build on an NVIDIA machine loads, but every launch would fail).
// Not yet in pyllama4_kernels.h; declared here until it is.
extern "C" const char* pyllama4_platform(void);
extern "C" const char* pyllama4_platform(void) {
#if defined(PYLLAMA4_HIP)
  return "hip";
#else
  return "cuda";
#endif
}

int pyllama4_fail(const char* message) {
  std::snprintf(last_error, sizeof(last_error), "%s", message != nullptr ? message : "error");
  return 1;
}

int pyllama4_failf(const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::vsnprintf(last_error, sizeof(last_error), format, args);
  va_end(args);
  return 1;
}

int pyllama4_check_launch() {
  const gpuError_t error = gpuGetLastError();
  if (error == gpuSuccess) return 0;
  return pyllama4_failf("kernel launch failed: %s", gpuGetErrorString(error));
}
