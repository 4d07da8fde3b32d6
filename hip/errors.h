// errors.h: how the launchers of libpyllama4_kernels report failures (internal to hip/).
//
// A launcher returns 0 on success; on failure it returns the nonzero code of one of these
// helpers, which first store a message for pyllama4_last_error(). The message is per thread
// (thread_local) and stays until the next failure on that thread; success does not clear it.
#pragma once

// Internal: not exported from the shared library (only the extern "C" ABI is).
#define PYLLAMA4_INTERNAL __attribute__((visibility("hidden")))

// Stores `message` (truncated to the buffer) as this thread's last error; returns 1.
PYLLAMA4_INTERNAL int pyllama4_fail(const char* message);

// printf-style pyllama4_fail, for argument checks that name the offending value; returns 1.
PYLLAMA4_INTERNAL int pyllama4_failf(const char* format, ...)
    __attribute__((format(printf, 1, 2)));

// After enqueuing kernels: reads (and so resets) the runtime's last error with gpuGetLastError();
// 0 when it is gpuSuccess, else fails with "kernel launch failed: <gpuGetErrorString>", 1.
PYLLAMA4_INTERNAL int pyllama4_check_launch();
