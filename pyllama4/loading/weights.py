"""Load the text (or vision) weights of a Hugging Face Llama 4 checkpoint into a torch module.

The target module must name its parameters like transformers' `Llama4ForCausalLM`:
`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, dense layers'
`model.layers.{i}.feed_forward.{gate,up,down}_proj.weight`, MoE layers'
`model.layers.{i}.feed_forward.router.weight`, `...feed_forward.experts.gate_up_proj` [E, H, 2I]
and `...feed_forward.experts.down_proj` [E, I, H] (input-major, no `.weight` suffix),
`...feed_forward.shared_expert.{gate,up,down}_proj.weight`, `model.norm.weight`, `lm_head.weight`.
Buffers (RoPE frequencies) are not loaded: they are computed, and checkpoints do not store them.

Invariant: every parameter of the module is written exactly once from the checkpoint (from its
shard of the tensor, for a sharded parameter), or the call fails with a `CheckpointError` naming
what is wrong (missing, unexpected, wrongly shaped or repeated tensors, absent shard files,
unsupported dtypes). The whole checkpoint is checked from its headers before the first byte is
copied, so a bad checkpoint leaves the module untouched.

Accepted checkpoints:
- `model.safetensors`, or the shards listed in `model.safetensors.index.json` (like transformers,
  a single `model.safetensors` wins when both exist).
- Text-only names (`model.*`, `lm_head.weight`) and multimodal ones: `language_model.model.*` plus
  `language_model.lm_head.weight` (what transformers 4.x and 5.24 both write for
  `Llama4ForConditionalGeneration`), and the `model.language_model.*` plus `lm_head.weight` style
  that other transformers 5.x multimodal models use. The vision tower and the projector
  (`vision_model.*`, `multi_modal_projector.*`, also under `model.`) are skipped; any other tensor
  the module has no place for is an error.
- Routed experts either fused (`experts.gate_up_proj` [E, H, 2I], `experts.down_proj` [E, I, H])
  or per expert in nn.Linear layout (`experts.{e}.gate_proj.weight` [I, H],
  `experts.{e}.up_proj.weight` [I, H], `experts.{e}.down_proj.weight` [H, I]); the latter are
  transposed into the fused parameters, gate in the first half of the last dim of `gate_up_proj`,
  up in the second half.
- A checkpoint without `lm_head.weight` whose config.json ties the word embeddings: lm_head gets a
  copy of the embeddings. (A module that ties the two itself needs only one of them.)
- FP8 checkpoints (config.json `quantization_config`), into a module built
  for them (`pyllama4.loading.fp8_checkpoint`; the caller names the `quant_method`): float8_e4m3fn
  (`F8_E4M3`) tensors go byte for byte into float8_e4m3fn parameters and nowhere else, and every
  float8 parameter takes only those. Scales are float tensors cast to the fp32 parameter: a Linear's
  `weight_scale` [out] from [out] or [out, 1]; fused experts' `gate_up_scale` [E, 2I] and
  `down_scale` [E, H] from `experts.gate_up_proj_scale` [E, 1, 2I] and
  `experts.down_proj_scale` [E, H, 1] (fbgemm_fp8), or from per-expert
  `experts.{e}.{gate,up,down}_proj.weight_scale` [out] or [out, 1], gate and up concatenated like
  the weights. A float8 tensor for an unquantized parameter, or a float tensor for a float8 one, is
  an error naming it.

Tensor parallelism: a parameter may hold only a `Shard` of its checkpoint tensor (a tensor-parallel
part, unrelated to the checkpoint's shard files; the `shards` argument gives them by parameter name,
pyllama4.model.llama4 says which): the full tensor's indices in a few [start, stop) ranges along one
dim of the module's layout, concatenated in order (dim 0 for column-parallel weights [out, in] and
vocabulary rows, dim 1 for row-parallel ones, the same range of both halves of the last dim of a
fused `gate_up_proj` [E, H, 2I], dim 1 of `down_proj` [E, I, H]). Per-expert checkpoint tensors
shard the same way (gate/up rows, down columns of their [out, in]). Shapes are still checked against
the FULL tensor, and only the shard is read (safetensors `get_slice`), so a rank never holds a whole
sharded tensor. FP8 parameters and scales are never sharded (tensor parallelism with FP8 is not
supported yet).

`rename` maps checkpoint names to the module's (None: not this module's tensor, skipped); the
default, `text_name`, does the above. `vision_name` instead selects the vision tower and the
projector, for `pyllama4.model.vision.VisionTower` (`vision_model.*`, `multi_modal_projector.*`),
and skips the text tensors. Both live in `pyllama4.loading.checkpoint`, with the checkpoint's
files, config.json and `CheckpointError`.

Not supported: a quantization_config or float8 tensors when no `quant_method` is given (the module
has no FP8 parameters), float8 formats other than e4m3fn, integer tensors.

Tensors are read one at a time from memory-mapped files (large ones in row blocks), so the extra
memory is about one tensor (one shard of it); each is cast to the parameter's dtype and copied in
place.

`load_weights` runs three steps: `weight_targets` (the module's parameters), `weight_plan` (every
check, from the headers alone, and the list of copies) and `weight_copy` (reading and copying).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from pyllama4.distributed.parallel import Shard
from pyllama4.loading.checkpoint import (
    check_quant_method,
    read_config,
    resolve,
    text_name,
    ties_embeddings,
)
from pyllama4.loading.weight_copy import execute
from pyllama4.loading.weight_plan import plan_copies
from pyllama4.loading.weight_targets import Targets

__all__ = ["load_weights"]


def load_weights(
    model: torch.nn.Module,
    checkpoint_dir: str | Path,
    *,
    progress: bool = True,
    rename: Callable[[str], str | None] = text_name,
    quant_method: str | None = None,
    shards: Mapping[str, Shard] | None = None,
) -> None:
    """Copy a Llama 4 checkpoint's weights into `model`'s parameters, in place.

    `rename` gives each checkpoint tensor's name in `model`, or None to skip it: `text_name`
    (the default) loads the text model, `vision_name` the vision tower and projector.

    `quant_method`: None for an unquantized checkpoint, else the config.json
    `quantization_config.quant_method` that `model` was built for (its FP8 modules placed as the
    checkpoint's scheme says, `pyllama4.loading.fp8_checkpoint`, which also vets the scheme); a
    checkpoint whose config states another method, or none, is refused.

    `shards`: parameter name -> the `Shard` of the checkpoint tensor it holds (tensor
    parallelism); the others hold the whole tensor. A shard that does not fit its parameter is a
    ValueError.

    Every parameter is written exactly once, cast to its own dtype (float8 ones only from the
    same float8 dtype, unchanged) and kept on its device. Raises `CheckpointError` (a ValueError)
    if the checkpoint and the module do not match; the checks run before anything is copied.
    """
    directory = Path(checkpoint_dir)
    files, weight_map = resolve(directory)
    config = read_config(directory)
    check_quant_method(directory, config, quant_method)
    targets = Targets(model, shards or {})
    copies = plan_copies(
        files,
        weight_map,
        targets,
        rename=rename,
        tie_embeddings=ties_embeddings(config),
        quantized=quant_method is not None,
    )
    execute(copies, files, progress)
