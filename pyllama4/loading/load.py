"""Builds a Llama 4 text model, or the vision tower, from a checkpoint directory.

Invariant: the returned model holds exactly the checkpoint's weights in the requested dtype on
the requested device; nothing is initialised randomly first (parameters are created on the meta
device and materialised empty before loading). With quantization="fp8", the modules that
`pyllama4.loading.quantize.fp8_targets` names hold the FP8 quantization of those weights instead
(online, after the cast: `quantize_model`); everything else is as without.

A pre-quantized FP8 checkpoint (config.json `quantization_config`,
`pyllama4.loading.fp8_checkpoint`) is detected and served as it is: the model is built on the meta
device with Fp8Linear / Fp8Experts wherever the checkpoint's scheme quantizes, and its float8
weights and fp32 scales are loaded unchanged (no dequantize-requantize; the other modules in
`dtype`), then converted exactly to e4m3fnuz if fp8_format asks for it. Online quantization of such
a checkpoint is a ValueError: it already is FP8.

On the CPU, a bf16 text model without FP8 weights computes its linears and routed experts with
oneDNN-packed copies of their weights where the CPU has native bf16
(`pyllama4.layers.cpu_linear.prepare_cpu`, last: it packs the final weights; the parameters and
state_dict are unchanged).

Tensor parallelism (`tp`): the text model is built with this rank's shapes and holds exactly this
rank's parts of the checkpoint's tensors (`Llama4ForCausalLM.weight_shards`), read as slices: a
rank never materialises a whole sharded tensor. Not with FP8 yet (a ValueError); the vision tower
is not split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyllama4.config import TextConfig, VisionConfig
from pyllama4.distributed.parallel import SINGLE, TensorParallel
from pyllama4.fp8_format import check_format
from pyllama4.layers.cpu_linear import prepare_cpu
from pyllama4.loading.checkpoint import vision_name
from pyllama4.loading.fp8_checkpoint import convert_to_fnuz, install_fp8_modules, read_fp8_scheme
from pyllama4.loading.quantize import quantize_model
from pyllama4.loading.weights import load_weights
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.model.vision import VisionTower

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZATIONS = ("fp8",)


def load_model(
    checkpoint_dir: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    progress: bool = True,
    quantization: str | None = None,
    fp8_format: str = "e4m3fn",
    tp: TensorParallel = SINGLE,
) -> Llama4ForCausalLM:
    """quantization: None (the checkpoint's weights in `dtype`, its FP8 ones in `fp8_format` if it
    is an FP8 checkpoint) or "fp8" (online FP8 in `fp8_format`, e4m3fn or e4m3fnuz; the other
    modules stay in `dtype`). tp: this rank's tensor-parallel place (ValueError if the model does
    not split over tp.size ranks, or with FP8). Raises CheckpointError
    (UnsupportedCheckpointError for a quantization scheme pyllama4 cannot run) if the checkpoint
    does not fit."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization {quantization!r}: expected None or one of {', '.join(QUANTIZATIONS)}"
        )
    check_format(fp8_format)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    config = TextConfig.from_checkpoint(checkpoint_dir)
    scheme = read_fp8_scheme(checkpoint_dir)
    if scheme is not None and quantization == "fp8":
        raise ValueError(
            f"{checkpoint_dir} is already quantized to FP8 ({scheme.method}): load it without "
            f"quantization='fp8'"
        )
    if tp.size > 1 and (scheme is not None or quantization == "fp8"):
        raise ValueError("tensor parallelism with FP8 is not supported yet")
    with torch.device("meta"):
        model = Llama4ForCausalLM(config, tp).to(dtype)
    if scheme is not None:
        install_fp8_modules(model, scheme)  # after the cast, which would also cast fp8 and scales
    model = model.to_empty(device=device)
    load_weights(
        model,
        checkpoint_dir,
        progress=progress,
        quant_method=None if scheme is None else scheme.method,
        shards=model.weight_shards(),
    )
    if scheme is not None and fp8_format == "e4m3fnuz":
        convert_to_fnuz(model)
    if quantization == "fp8":
        quantize_model(model, fp8_format)
    if scheme is None and quantization is None:
        prepare_cpu(model)  # an FP8 model keeps its other modules exactly as loaded
    return model.eval()


def load_vision_tower(
    checkpoint_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> VisionTower | None:
    """The vision tower and projector of a multimodal checkpoint; None for a text-only one.
    They are never FP8: in an FP8 checkpoint they must be left unquantized (as the published
    recipes do), else CheckpointError."""
    config = VisionConfig.from_checkpoint(checkpoint_dir)
    if config is None:
        return None
    scheme = read_fp8_scheme(checkpoint_dir)
    with torch.device("meta"):
        tower = VisionTower(config)
    tower = tower.to_empty(device=device).to(dtype)
    load_weights(
        tower,
        checkpoint_dir,
        progress=progress,
        rename=vision_name,
        quant_method=None if scheme is None else scheme.method,
    )
    return tower.eval()
