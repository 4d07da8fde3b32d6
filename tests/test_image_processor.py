"""pyllama4.multimodal.image_processor against transformers' Llama4ImageProcessor reference cases
(tests/data/llama4_images), its config parsing, RGB conversion and prompt layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyllama4.multimodal.image_processor import (
    ImageProcessorConfig,
    ImageTokens,
    TiledImage,
    image_prompt_ids,
    process_image,
)

DATA = Path(__file__).parent / "data" / "llama4_images"
CASES = json.loads((DATA / "cases.json").read_text())["cases"]
# The released Scout/Maverick settings, as config.json + preprocessor_config.json give them.
REAL_VISION = {"image_size": 336, "patch_size": 14, "pixel_shuffle_ratio": 0.5}
REAL_PREPROCESSOR = {
    "size": {"height": 336, "width": 336},
    "max_patches": 16,
    "resample": 2,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "resize_to_max_canvas": False,
}
TOKENS = ImageTokens(
    start=200080, end=200081, image=200090, patch=200092, tile_x=200084, tile_y=200085
)
TOKEN_IDS = {
    "<|image_start|>": TOKENS.start,
    "<|image_end|>": TOKENS.end,
    "<|image|>": TOKENS.image,
    "<|patch|>": TOKENS.patch,
    "<|tile_x_separator|>": TOKENS.tile_x,
    "<|tile_y_separator|>": TOKENS.tile_y,
}
# Max abs error allowed against transformers' pixel values. We match them bit for bit on an AVX2
# CPU; 1e-2 leaves room for a one-level (2/255) difference of another CPU's uint8 resize kernel,
# while a wrong canvas, resize, tile order, padding or normalization is off by far more.
PIXEL_TOLERANCE = 1e-2


def _load_make_image():
    spec = importlib.util.spec_from_file_location("llama4_make_image", DATA / "make_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_image


make_image = _load_make_image()


def _case_id(case: dict) -> str:
    return f"{case['width']}x{case['height']}"


def _tiny(**preprocessor) -> ImageProcessorConfig:
    """A 56-pixel tile of 14-pixel patches: 4 tokens per tile."""
    vision = {"image_size": 56, "patch_size": 14, "pixel_shuffle_ratio": 0.5}
    return ImageProcessorConfig.from_dicts({"vision_config": vision}, preprocessor or None)


def _canvas(tiled: TiledImage) -> torch.Tensor:
    """[3, H, W]: the canvas tiles put back together (the global tile left out)."""
    grid_h, grid_w = tiled.grid
    tile = tiled.pixel_values.shape[-1]
    tiles = tiled.pixel_values[: grid_h * grid_w].view(grid_h, grid_w, 3, tile, tile)
    return tiles.permute(2, 0, 3, 1, 4).reshape(3, grid_h * tile, grid_w * tile)


@pytest.fixture(scope="module")
def real_config() -> ImageProcessorConfig:
    return ImageProcessorConfig.from_dicts({"vision_config": REAL_VISION}, REAL_PREPROCESSOR)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(DATA / "hf_reference.npz") as npz:
        return dict(npz)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_transformers(case: dict, real_config, reference) -> None:
    key = _case_id(case)
    tiled = process_image(make_image(case["width"], case["height"]), real_config)
    pixels = tiled.pixel_values
    assert tiled.grid == tuple(case["aspect_ratio_tiles_hw"])
    assert tiled.num_tiles == case["num_tiles_including_global"]
    assert list(pixels.shape) == case["pixel_values_shape"]
    assert pixels.dtype == torch.float32 and pixels.is_contiguous()
    sampled = pixels[..., 3::7, 3::7].numpy()
    assert np.abs(sampled - reference[f"{key}_sampled"]).max() <= PIXEL_TOLERANCE
    means = pixels.double().mean(dim=(2, 3)).numpy()
    assert np.abs(means - reference[f"{key}_tile_channel_mean"]).max() <= PIXEL_TOLERANCE
    assert case["full_pixels_stored"] == (f"{key}_full" in reference)
    if case["full_pixels_stored"]:
        full = reference[f"{key}_full"].astype(np.float32)
        assert np.abs(pixels.numpy() - full).max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prompt_layout_matches_transformers(case: dict, real_config) -> None:
    expected = [
        TOKEN_IDS[text] for text, run in case["prompt_expansion_run_length"] for _ in range(run)
    ]
    grid = tuple(case["aspect_ratio_tiles_hw"])
    assert real_config.tokens_per_tile == 144
    assert image_prompt_ids(grid, real_config.tokens_per_tile, TOKENS) == expected
    assert len(expected) == case["prompt_expansion_num_tokens"]


@pytest.mark.parametrize(
    ("width", "height", "grid", "resized_width"),
    [
        # transformers computes these resized sizes in float32, not exactly (float64 gives 1296
        # and 383): floor(2212 * float32(1344 / 2133)), floor(607 * float32(2688 / 4249)).
        (2133, 2212, (4, 4), 1295),
        (607, 4249, (8, 2), 384),
    ],
)
def test_resized_size_follows_transformers_arithmetic(
    width: int, height: int, grid: tuple[int, int], resized_width: int, real_config
) -> None:
    tiled = process_image(Image.new("RGB", (width, height), "white"), real_config)
    assert tiled.grid == grid
    white_columns = (_canvas(tiled)[:, 0, :] == 1.0).all(dim=0)
    assert int(white_columns.sum()) == resized_width
    assert bool(white_columns[:resized_width].all())


def test_tiny_config_from_dicts() -> None:
    config = _tiny()
    assert (config.tile_size, config.patch_size, config.pixel_shuffle_ratio) == (56, 14, 0.5)
    assert (config.max_tiles, config.rescale_factor) == (16, 1 / 255)
    assert config.mean == config.std == (0.5, 0.5, 0.5)
    assert config.tokens_per_tile == 4
    custom = _tiny(
        size={"height": 56, "width": 56},
        max_patches=6,
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.4, 0.5, 0.6],
        rescale_factor=0.5,
        resample=2,
    )
    assert custom.max_tiles == 6
    assert custom.mean == (0.1, 0.2, 0.3) and custom.std == (0.4, 0.5, 0.6)
    assert custom.rescale_factor == 0.5
    # A 2-tile image: the normalization uses the configured per-channel mean and std.
    tiled = process_image(Image.new("RGB", (112, 56), (0, 2, 4)), custom)
    assert tiled.grid == (1, 2) and tiled.num_tiles == 3
    expected = torch.tensor([(0.0 - 0.1) / 0.4, (1.0 - 0.2) / 0.5, (2.0 - 0.3) / 0.6])
    assert torch.allclose(tiled.pixel_values[:, :, 0, 0], expected.expand(3, 3), atol=1e-2)


def test_from_checkpoint_and_max_tiles_override(tmp_path: Path) -> None:
    vision = {"image_size": 56, "patch_size": 14, "pixel_shuffle_ratio": 0.5}
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": vision}))
    assert ImageProcessorConfig.from_checkpoint(tmp_path) == _tiny()
    preprocessor = {"size": {"height": 56, "width": 56}, "max_patches": 9, "rescale_factor": 0.5}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    config = ImageProcessorConfig.from_checkpoint(str(tmp_path))
    assert (config.tile_size, config.max_tiles, config.rescale_factor) == (56, 9, 0.5)
    image = Image.new("RGB", (1000, 1000), "gray")
    assert process_image(image, config).grid == (3, 3)
    overridden = ImageProcessorConfig.from_checkpoint(tmp_path, max_tiles=4)
    assert overridden.max_tiles == 4
    tiled = process_image(image, overridden)
    assert tiled.grid == (2, 2)
    assert tiled.pixel_values.shape == (5, 3, 56, 56)
    assert process_image(
        image, ImageProcessorConfig.from_checkpoint(tmp_path, max_tiles=1)
    ).grid == (1, 1)


@pytest.mark.parametrize(
    ("config", "preprocessor", "message"),
    [
        ({}, None, "not a multimodal checkpoint"),
        ({"vision_config": {"image_size": 50, "patch_size": 14}}, None, "multiple"),
        ({"vision_config": {"image_size": 56}}, {"resize_to_max_canvas": True}, "resize_to_max"),
        ({"vision_config": {"image_size": 56}}, {"resample": 3}, "resample"),
        ({"vision_config": {"image_size": 56}}, {"do_convert_rgb": False}, "do_convert_rgb"),
        ({"vision_config": {"image_size": 56}}, {"size": {"height": 56, "width": 28}}, "square"),
        ({"vision_config": {"image_size": 56}}, {"size": {"height": 28, "width": 28}}, "differs"),
        ({"vision_config": {"image_size": 56}}, {"image_std": [0.5, 0.5]}, "image_std"),
        ({"vision_config": {"image_size": 56}}, {"image_std": [0.5, 0, 0.5]}, "zero"),
    ],
)
def test_config_errors(config: dict, preprocessor: dict | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageProcessorConfig.from_dicts(config, preprocessor)


def test_checkpoint_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {}}))
    with pytest.raises(ValueError, match="not a multimodal checkpoint"):
        ImageProcessorConfig.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 56}}))
    with pytest.raises(ValueError, match="at least 1"):
        ImageProcessorConfig.from_checkpoint(tmp_path, max_tiles=0)


def test_empty_image_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty image"):
        process_image(Image.new("RGB", (0, 0)), _tiny())


def _rgb_of(image: Image.Image) -> np.ndarray:
    """[56, 56, 3] uint8 the processor saw (a 56x56 image is one tile, not resized)."""
    pixels = process_image(image, _tiny()).pixel_values
    assert pixels.shape == (1, 3, 56, 56)
    return np.rint((pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (56, 56), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    rgb = _rgb_of(rgba)
    assert (rgb[0, 0] == 255).all()
    assert rgb[0, 1].tolist() == [0, 0, 255]
    assert np.abs(rgb[0, 2].astype(int) - 127).max() <= 1  # half black over white

    la = Image.new("LA", (56, 56), (40, 0))
    la.putpixel((1, 0), (40, 255))
    rgb = _rgb_of(la)
    assert (rgb[0, 0] == 255).all() and rgb[0, 1].tolist() == [40, 40, 40]

    palette = Image.new("P", (56, 56), 1)
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putpixel((1, 0), 0)
    palette.info["transparency"] = 1
    rgb = _rgb_of(palette)
    assert (rgb[0, 0] == 255).all() and rgb[0, 1].tolist() == [10, 20, 30]


def test_other_modes_become_rgb() -> None:
    gray = Image.new("L", (56, 56), 77)
    assert (_rgb_of(gray) == 77).all()
    cmyk = Image.new("CMYK", (56, 56), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    rgb = _rgb_of(cmyk)
    assert (rgb[0, 0] == 255).all() and rgb[0, 1].tolist() == [0, 255, 255]
    palette = Image.new("P", (56, 56), 0)
    palette.putpalette([10, 20, 30])
    assert (_rgb_of(palette) == [10, 20, 30]).all()


def test_prompt_ids_small_grids() -> None:
    t = TOKENS
    patches = [t.patch] * 2
    assert image_prompt_ids((1, 1), 2, t) == [t.start, t.image, *patches, t.end]
    tiles = [*patches, t.tile_x, *patches, t.tile_y]
    assert image_prompt_ids((1, 2), 2, t) == [t.start, *tiles, t.image, *patches, t.end]
    column = [*patches, t.tile_y] * 2
    assert image_prompt_ids((2, 1), 2, t) == [t.start, *column, t.image, *patches, t.end]
