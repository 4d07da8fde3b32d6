# pyllama4 for AMD MI300 (gfx942): the ROCm PyTorch image with pyllama4 built on it, its HIP
# kernels included, and pyllama4-serve as the entrypoint (listening on 0.0.0.0:30000).
#
#   docker build -t pyllama4:rocm .
#   docker run --device=/dev/kfd --device=/dev/dri --group-add video --ipc=host \
#     --security-opt seccomp=unconfined -p 30000:30000 -e HF_TOKEN \
#     -v ~/.cache/huggingface:/root/.cache/huggingface pyllama4:rocm \
#     --model-path meta-llama/Llama-4-Scout-17B-16E-Instruct --tp 8 --context-length 1000000
#
# BASE_IMAGE: any ROCm PyTorch image whose hipcc knows gfx942 (ROCm 6.0 or newer), e.g. the one
# your SGLang deployment already runs (lmsysorg/sglang:...-rocm...-mi30x).
ARG BASE_IMAGE=rocm/pytorch:rocm6.4.1_ubuntu24.04_py3.12_pytorch_release_2.7.1
FROM ${BASE_IMAGE}

ENV HIP_PLATFORM=amd \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/pyllama4
COPY pyproject.toml CMakeLists.txt README.md ./
COPY cpp cpp
COPY hip hip
COPY pyllama4 pyllama4
COPY server server
# torch comes with the image: pyllama4 does not depend on it, so pip keeps the ROCm build.
# The router extra: --dp N runs sglang-router in front of the replicas.
RUN pip install ".[router]" \
      --config-settings=cmake.define.PYLLAMA4_GPU=hip \
      --config-settings=cmake.define.PYLLAMA4_HIP_ARCHS=gfx942 \
 && python -c "import pyllama4._core, torch; print('pyllama4 on torch', torch.__version__)"

WORKDIR /
EXPOSE 30000
ENTRYPOINT ["pyllama4-serve", "--host", "0.0.0.0", "--port", "30000"]
