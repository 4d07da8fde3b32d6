"""Llama 4 image preprocessing (tiling, normalization) and the prompt layout of one image.

Invariant: `process_image` gives what transformers' `Llama4ImageProcessor` gives for the same
settings: the same canvas and tile grid (its float32 best-fit arithmetic included), the same
resized size (its mixed float32/float64 arithmetic included), the same uint8 antialiased bilinear
resize (torch's, which torchvision calls), black bottom/right padding, row-major tiles and then a
global tile when there is more than one, and the same values: rescaled and normalized in bfloat16,
returned as float32. `image_prompt_ids` is its processor's expansion of one `<|image|>`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, transformers' `resample` for Llama 4
# Llama4VisionConfig's defaults, for keys a config.json's vision_config may omit.
_VISION_DEFAULTS: dict[str, Any] = {"image_size": 448, "patch_size": 14, "pixel_shuffle_ratio": 0.5}


@dataclass(frozen=True)
class ImageTokens:
    """Token ids of the image specials."""

    start: int  # <|image_start|>
    end: int  # <|image_end|>
    image: int  # <|image|>: precedes the global (or only) tile's patches
    patch: int  # <|patch|>: one per vision feature row
    tile_x: int  # <|tile_x_separator|>
    tile_y: int  # <|tile_y_separator|>


@dataclass(frozen=True)
class ImageProcessorConfig:
    tile_size: int  # tile side, pixels
    patch_size: int
    pixel_shuffle_ratio: float
    max_tiles: int  # most tiles of the canvas (the global tile not counted)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float

    def __post_init__(self) -> None:
        if self.tile_size <= 0 or self.patch_size <= 0 or self.tile_size % self.patch_size:
            raise ValueError(
                f"image tile size {self.tile_size} is not a positive multiple of the vision "
                f"patch size {self.patch_size}"
            )
        if self.max_tiles < 1:
            raise ValueError(f"max image tiles {self.max_tiles} (must be at least 1)")
        if 0 in self.std:
            raise ValueError(f"image std {self.std} has a zero")

    @property
    def tokens_per_tile(self) -> int:
        """(tile_size / patch_size)^2 * pixel_shuffle_ratio^2, computed as transformers does."""
        return (self.tile_size // self.patch_size) ** 2 // round(1 / self.pixel_shuffle_ratio**2)

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: str | Path, *, max_tiles: int | None = None
    ) -> ImageProcessorConfig:
        """Reads config.json and, when present, preprocessor_config.json; `max_tiles` overrides
        the file's max_patches."""
        directory = Path(checkpoint_dir)
        config = json.loads((directory / "config.json").read_text())
        preprocessor_path = directory / "preprocessor_config.json"
        preprocessor = (
            json.loads(preprocessor_path.read_text()) if preprocessor_path.is_file() else None
        )
        return cls.from_dicts(config, preprocessor, max_tiles=max_tiles)

    @classmethod
    def from_dicts(
        cls, config: dict, preprocessor: dict | None, *, max_tiles: int | None = None
    ) -> ImageProcessorConfig:
        """`config` is config.json, `preprocessor` preprocessor_config.json (None: defaults).
        ValueError for a text-only config or settings this module does not implement."""
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError("config.json has no vision_config: not a multimodal checkpoint")
        vision = {**_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
        pre = preprocessor or {}
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if pre.get(flag) is False:
                raise ValueError(f"preprocessor_config.json: {flag} false is not supported")
        if pre.get("resize_to_max_canvas"):
            raise ValueError("preprocessor_config.json: resize_to_max_canvas true is not supported")
        if pre.get("resample", _BILINEAR) != _BILINEAR:
            raise ValueError(
                f"preprocessor_config.json: resample {pre['resample']!r} is not supported "
                f"(only {_BILINEAR}, bilinear)"
            )
        tile = _square(vision["image_size"], "config.json: vision_config.image_size")
        if "size" in pre:
            size = pre["size"]
            if not isinstance(size, dict) or "height" not in size or "width" not in size:
                raise ValueError(f"preprocessor_config.json: size {size!r} (need height, width)")
            pre_tile = _square([size["height"], size["width"]], "preprocessor_config.json: size")
            if pre_tile != tile:
                raise ValueError(
                    f"preprocessor_config.json: tile size {pre_tile} differs from config.json's "
                    f"vision_config.image_size {tile}"
                )
        return cls(
            tile_size=tile,
            patch_size=int(vision["patch_size"]),
            pixel_shuffle_ratio=float(vision["pixel_shuffle_ratio"]),
            max_tiles=int(pre.get("max_patches", 16)) if max_tiles is None else max_tiles,
            mean=_triple(pre.get("image_mean", 0.5), "image_mean"),
            std=_triple(pre.get("image_std", 0.5), "image_std"),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        )


def _square(value: Any, what: str) -> int:
    """An int side, or a [height, width] pair of equal ints."""
    sides = value if isinstance(value, list | tuple) else [value]
    if len(sides) not in (1, 2) or len(set(sides)) != 1 or not isinstance(sides[0], int):
        raise ValueError(f"{what} {value!r} (a square tile size is required)")
    return sides[0]


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, int | float) else list(value)
    if len(values) != 3:
        raise ValueError(f"preprocessor_config.json: {key} {value!r} (one value per RGB channel)")
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class TiledImage:
    pixel_values: torch.Tensor  # [num_tiles (incl. global), 3, T, T] float32, contiguous
    grid: tuple[int, int]  # (h_tiles, w_tiles) of the canvas

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


def process_image(image: Image.Image, config: ImageProcessorConfig) -> TiledImage:
    """The tiles of `image`: the canvas's, row-major, then the global tile when there are more."""
    pixels = torch.from_numpy(np.array(_to_rgb(image))).permute(2, 0, 1)  # [3, H, W] uint8
    height, width = pixels.shape[1:]
    if not height or not width:
        raise ValueError(f"empty image ({width}x{height})")
    tile = config.tile_size
    grid_h, grid_w = _best_grid(height, width, tile, config.max_tiles)
    new_h, new_w = _fit_size(height, width, tile, grid_h * tile, grid_w * tile)
    canvas = torch.zeros((3, grid_h * tile, grid_w * tile), dtype=torch.uint8)
    canvas[:, :new_h, :new_w] = _resize(pixels, new_h, new_w)
    tiles = canvas.view(3, grid_h, tile, grid_w, tile).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(grid_h * grid_w, 3, tile, tile)
    if grid_h * grid_w > 1:
        tiles = torch.cat([tiles, _resize(pixels, tile, tile)[None]])
    return TiledImage(_normalize(tiles, config), (grid_h, grid_w))


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: anything with transparency is composited on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@lru_cache(maxsize=8)
def _grids(max_tiles: int) -> np.ndarray:
    """[N, 2] every (h_tiles, w_tiles) with h * w <= max_tiles, in transformers' order
    (find_supported_resolutions: grouped by aspect ratio), which decides exact ties."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for h in range(1, count + 1):
            if count % h == 0:
                by_ratio.setdefault(h / (count // h), []).append((h, count // h))
    return np.array([grid for grids in by_ratio.values() for grid in grids])


def _best_grid(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """transformers' get_best_fit (without resize_to_max_canvas), in its float32: the least
    upscaling if some canvas allows upscaling, else the least downscaling; then the least area."""
    grids = _grids(max_tiles)
    canvas = (grids * tile).astype(np.float32)
    scales = np.minimum(canvas[:, 0] / np.float32(height), canvas[:, 1] / np.float32(width))
    upscaling = scales[scales >= 1]
    chosen = upscaling.min() if upscaling.size else scales.max()
    candidates = np.flatnonzero(scales == chosen)
    best = candidates[np.argmin(grids[candidates].prod(axis=1))]
    return int(grids[best, 0]), int(grids[best, 1])


def _fit_size(height: int, width: int, tile: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
    """The resized size: the image fit, aspect kept, into the canvas but upscaled only up to the
    tile size (transformers' get_max_res_without_distortion on its limited target), in its
    arithmetic: a target side taken from the canvas is an int64 tensor there, which makes that
    side's scale float32 (and a comparison with it); any other side is a Python int (float64)."""
    from_canvas_h, from_canvas_w = canvas_h < max(height, tile), canvas_w < max(width, tile)
    target_h = canvas_h if from_canvas_h else max(height, tile)
    target_w = canvas_w if from_canvas_w else max(width, tile)
    scale_h = np.float32(target_h) / np.float32(height) if from_canvas_h else target_h / height
    scale_w = np.float32(target_w) / np.float32(width) if from_canvas_w else target_w / width
    compare = np.float32 if from_canvas_h or from_canvas_w else float
    if compare(scale_w) < compare(scale_h):
        new_h = min(math.floor(type(scale_w)(height) * scale_w), target_h)
        new_w = target_w
    else:
        new_h = target_h
        new_w = min(math.floor(type(scale_h)(width) * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's resize of a [3, H, W] uint8 image: torch's uint8 antialiased bilinear. Given
    the channels-last view of the decoded image, torch computes the same values, faster."""
    if (height, width) == tuple(pixels.shape[1:]):
        return pixels
    resized = F.interpolate(
        pixels[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0]


@lru_cache(maxsize=8)
def _value_table(
    mean: tuple[float, float, float], std: tuple[float, float, float], rescale_factor: float
) -> np.ndarray:
    """[3, 256] float32: every uint8 value of each channel rescaled and normalized as transformers
    does it, in bfloat16."""
    values = torch.arange(256).to(torch.bfloat16).expand(3, 256)
    mean_bf16 = torch.tensor(mean, dtype=torch.bfloat16)[:, None]
    std_bf16 = torch.tensor(std, dtype=torch.bfloat16)[:, None]
    return ((values * rescale_factor - mean_bf16) / std_bf16).float().numpy()


def _normalize(tiles: torch.Tensor, config: ImageProcessorConfig) -> torch.Tensor:
    """[N, 3, T, T] uint8 -> float32 by table look-up (a third of the time of the arithmetic)."""
    table = _value_table(config.mean, config.std, config.rescale_factor)
    values = tiles.numpy()
    out = np.empty(values.shape, dtype=np.float32)
    for channel in range(3):  # uint8 indices are always in range: mode="clip" skips the check
        np.take(table[channel], values[:, channel], out=out[:, channel], mode="clip")
    return torch.from_numpy(out)


def image_prompt_ids(grid: tuple[int, int], tokens_per_tile: int, tokens: ImageTokens) -> list[int]:
    """The ids replacing one `<|image|>`: start, then (when the grid has more than one tile) each
    tile row's patches, x-separated, each row closed by a y-separator; then `<|image|>`, the
    global (or only) tile's patches and end."""
    grid_h, grid_w = grid
    patches = [tokens.patch] * tokens_per_tile
    ids = [tokens.start]
    if grid_h * grid_w > 1:
        row = patches + ([tokens.tile_x] + patches) * (grid_w - 1) + [tokens.tile_y]
        ids += row * grid_h
    return ids + [tokens.image] + patches + [tokens.end]
