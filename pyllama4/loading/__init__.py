"""Building models from checkpoints: the top of the model stack, above pyllama4.model.

- `load`: `load_model` (a Llama 4 text model, bf16 or FP8, maybe tensor-parallel) and
  `load_vision_tower`.
- `weights`: the safetensors checkpoint reader `load_weights`, in three steps: `weight_targets`
  (the module's parameters), `weight_plan` (all checks, from the headers) and `weight_copy`.
- `checkpoint`: a checkpoint's files, config.json and tensor names, and `CheckpointError`.
- `fp8_checkpoint`: pre-quantized FP8 checkpoints (their schemes, the FP8 modules they need).
- `quantize`: online FP8 quantization of a loaded model (`quantize_model`).
- `eagle3`: EAGLE3 draft checkpoints (`load_eagle3`, `save_eagle3`).
"""
