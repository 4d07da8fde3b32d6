#!/usr/bin/env bash
# The GPU checks of pyllama4 in one run, for a machine with one GPU and torch, CMake and the
# GPU compiler (nvcc or hipcc) installed: builds the core and the kernel library for this
# GPU, runs tests/gpu (kernels, fused ops, decode graphs, the memory meter: each against the
# torch reference), then prints the kernel timings (bench/kernel_timings.py) and a model step at
# Scout's real shapes, eager and with decode graphs (bench/model_step.py). Logs go to $OUT
# (default ./gpu-results); the summary is the end of the output.
#
# Run from the repository root: bash bench/gpu_check.sh [--layers N]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
BUILD=${BUILD:-/tmp/pyllama4-build}
python3 - <<'PY' | tee "$OUT/device.txt"
import torch
print(torch.__version__, torch.version.cuda or torch.version.hip, torch.cuda.get_device_name())
PY
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPYLLAMA4_GPU=auto \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >"$OUT/build.log" 2>&1 &&
  cmake --build "$BUILD" -j"$(nproc)" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp "$BUILD"/_core*.so pyllama4/ && cp "$BUILD/hip/libpyllama4_kernels.so" pyllama4/
python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests.log" | tail -20
python3 bench/kernel_timings.py 2>&1 | tee "$OUT/kernels.log" | tail -40
for graphs in 0 64; do
  python3 bench/model_step.py --model scout --batch 1,16,64 --cuda-graph-max-bs "$graphs" "$@" \
    2>"$OUT/model_step_graphs$graphs.err" | tee "$OUT/model_step_graphs$graphs.md"
done
