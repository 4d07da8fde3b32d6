"""What an engine needs to take images: the vision tower, the tiling settings, the token ids.

Invariant: built only from a multimodal checkpoint whose tokenizer has every image special token
and whose config's `<|patch|>` id (image_token_index) is the tokenizer's; anything else fails at
start with a message naming what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyllama4.config import ConfigError, VisionConfig
from pyllama4.loading.load import load_vision_tower
from pyllama4.model.vision import VisionTower
from pyllama4.multimodal.image_processor import ImageProcessorConfig, ImageTokens
from pyllama4.multimodal.inputs import ImageInput, ImagePrompt, expand_prompt

_TOKENS = {
    "start": "<|image_start|>",
    "end": "<|image_end|>",
    "image": "<|image|>",
    "patch": "<|patch|>",
    "tile_x": "<|tile_x_separator|>",
    "tile_y": "<|tile_y_separator|>",
}


@dataclass(frozen=True)
class ImageSupport:
    tower: VisionTower
    processor: ImageProcessorConfig
    tokens: ImageTokens

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        tokenizer: Any,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        max_tiles: int | None = None,
        progress: bool = True,
    ) -> ImageSupport:
        """Raises ConfigError (a ValueError) for a text-only checkpoint or a tokenizer without
        the image tokens."""
        config = VisionConfig.from_checkpoint(checkpoint_dir)
        if config is None:
            raise ConfigError(
                f"{checkpoint_dir} is a text-only checkpoint (config.json has no vision_config): "
                "it cannot take images"
            )
        tokens = image_tokens(tokenizer)
        if tokens.patch != config.image_token_index:
            raise ConfigError(
                f"the tokenizer's <|patch|> is id {tokens.patch} but config.json's "
                f"image_token_index is {config.image_token_index}"
            )
        processor = ImageProcessorConfig.from_checkpoint(checkpoint_dir, max_tiles=max_tiles)
        if processor.tokens_per_tile != config.tokens_per_tile:
            raise ConfigError(
                f"the image processor gives {processor.tokens_per_tile} tokens per tile, the "
                f"vision tower {config.tokens_per_tile}"
            )
        tower = load_vision_tower(checkpoint_dir, dtype=dtype, device=device, progress=progress)
        assert tower is not None  # config.json has a vision_config
        return cls(tower, processor, tokens)

    def expand(self, ids: Sequence[int], images: Sequence[ImageInput]) -> ImagePrompt:
        return expand_prompt(ids, images, self.tokens, self.processor.tokens_per_tile)

    def describe(self) -> str:
        p = self.processor
        return (
            f"images: up to {p.max_tiles} tiles of {p.tile_size}x{p.tile_size} "
            f"(+ a global tile), {p.tokens_per_tile} tokens per tile"
        )


def image_tokens(tokenizer: Any) -> ImageTokens:
    vocab = tokenizer.get_vocab()
    missing = [text for text in _TOKENS.values() if text not in vocab]
    if missing:
        raise ConfigError(f"the tokenizer has no image token(s) {', '.join(missing)}")
    return ImageTokens(**{field: vocab[text] for field, text in _TOKENS.items()})
