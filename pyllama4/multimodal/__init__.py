"""Multimodal input: image preprocessing and prompt expansion for Llama 4."""
