// cuda_fp16.h for the CPU emulation (see emu_runtime.h): the fp16 names the kernels use, with
// the conversion done exactly in software (zeros, subnormals, infinities and NaNs included).
#pragma once

#include "emu_half.h"
