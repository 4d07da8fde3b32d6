// hip/hip_fp16.h for the CPU emulation (see ../emu_runtime.h): the fp16 names the kernels use,
// converted exactly in software.
#pragma once

#include "../emu_half.h"
