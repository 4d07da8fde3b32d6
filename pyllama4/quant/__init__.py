"""Weight quantization: FP8 (e4m3) weights with per-channel scales (`pyllama4.quant.fp8`)."""
