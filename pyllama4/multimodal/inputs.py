"""Image inputs of a prompt: tiled pixels with a content hash, and where their features go.

Invariants:
- `ImageInput.content_hash` is a digest of exactly the pixels and tile grid the vision tower sees:
  equal hashes mean equal features.
- `expand_prompt` replaces the i-th `<|image|>` placeholder of the prompt with image i's token
  layout; row j of image i's features (tiles in pixel_values order, 144 rows per tile on the
  real model) belongs at prompt position `positions[i][j]`.
- `ImagePrompt.key_ids` is the prompt with every image's feature positions replaced by ids
  derived from that image's hash, all >= KEY_ID_BASE (above any vocabulary). The radix cache is
  keyed by them: two different images never share KV, the same image at the same place does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pyllama4.multimodal.image_processor import (
    ImageProcessorConfig,
    ImageTokens,
    TiledImage,
    image_prompt_ids,
    process_image,
)

KEY_ID_BASE = 1 << 30  # radix-key ids of image positions lie in [KEY_ID_BASE, 2 * KEY_ID_BASE)


@dataclass(frozen=True, eq=False)
class ImageInput:
    pixel_values: torch.Tensor  # [num_tiles, 3, T, T] float32: row-major tiles, then the global
    grid: tuple[int, int]  # (h_tiles, w_tiles) of the canvas
    content_hash: bytes

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    @classmethod
    def from_image(cls, image: Image.Image, config: ImageProcessorConfig) -> ImageInput:
        """Tiles and normalizes a decoded image (CPU work: run it off the event loop)."""
        return cls.from_tiles(process_image(image, config))

    @classmethod
    def from_tiles(cls, tiled: TiledImage) -> ImageInput:
        pixels = tiled.pixel_values.contiguous()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.asarray([*tiled.grid, *pixels.shape], dtype=np.int64).tobytes())
        digest.update(pixels.numpy().tobytes())
        return cls(pixels, tiled.grid, digest.digest())


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """A prompt with its images expanded: what Engine.submit takes for image + text input."""

    token_ids: list[int]  # the model's tokens, images expanded
    key_ids: np.ndarray  # [len(token_ids)] int32: the radix-cache key (see the module invariant)
    images: tuple[ImageInput, ...]
    positions: tuple[np.ndarray, ...]  # per image: int64 prompt positions of its feature rows


def expand_prompt(
    ids: Sequence[int],
    images: Sequence[ImageInput],
    tokens: ImageTokens,
    tokens_per_tile: int,
) -> ImagePrompt:
    """Expands one `<|image|>` placeholder per image, in order. ValueError if the counts differ."""
    ids = np.asarray(ids, dtype=np.int64)
    slots = np.flatnonzero(ids == tokens.image)
    if len(slots) != len(images):
        raise ValueError(
            f"the prompt has {len(slots)} image placeholder(s) for {len(images)} image(s): "
            "put one <|image|> where each image goes"
        )
    pieces: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    start = length = 0
    for slot, image in zip(slots.tolist(), images, strict=True):
        pieces.append(ids[start:slot])
        length += slot - start
        layout = np.asarray(image_prompt_ids(image.grid, tokens_per_tile, tokens), dtype=np.int64)
        rows = np.flatnonzero(layout == tokens.patch)
        if len(rows) != image.num_tiles * tokens_per_tile:
            raise ValueError(
                f"an image of {image.num_tiles} tiles on a {image.grid} grid has "
                f"{len(rows)} patch tokens, expected {image.num_tiles * tokens_per_tile}"
            )
        positions.append(rows + length)
        pieces.append(layout)
        length += len(layout)
        start = slot + 1
    pieces.append(ids[start:])
    token_ids = np.concatenate(pieces) if pieces else ids
    key_ids = token_ids.astype(np.int32)
    for image, where in zip(images, positions, strict=True):
        key_ids[where] = image_key_ids(image.content_hash, len(where))
    return ImagePrompt(token_ids.tolist(), key_ids, tuple(images), tuple(positions))


def image_key_ids(content_hash: bytes, count: int) -> np.ndarray:
    """`count` radix-key ids for an image's feature positions, a pure function of its hash."""
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(content_hash, "little")))
    return (KEY_ID_BASE + rng.integers(0, KEY_ID_BASE, size=count)).astype(np.int32)
