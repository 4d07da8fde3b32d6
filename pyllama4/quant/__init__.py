"""Quantization numerics: FP8 (e4m3) weights with per-channel scales and per-token activations
(`pyllama4.quant.fp8`); no model knowledge."""
