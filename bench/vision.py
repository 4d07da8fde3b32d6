"""Cost of images on this machine: tiling, and the vision tower per tile (tiny and real size).

- Tiling: process_image on photos of common sizes (decode excluded), ms per image.
- Tiny tower (the test checkpoint's shapes: 56x56 tiles, hidden 32, 2 layers): ms per tile.
- Real tower (Llama 4 Scout/Maverick: 336x336 tiles, hidden 1408, 34 layers, 16 heads, MLP 5632,
  adapter 5632->4096->4096, projector 4096->5120): random weights with 1 and 3 encoder layers,
  timed; per layer = (t3 - t1) / 2, the rest = t1 - per layer; projected to 34 layers. The FLOPs
  per tile are counted from the shapes, so the CPU's achieved rate is printed beside the time.

Run: python bench/vision.py [--dtype float32|bfloat16] (docs/benchmarks.md records the figures).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from pyllama4.config import VisionConfig
from pyllama4.loading.load import DTYPES
from pyllama4.model.vision import VisionTower
from pyllama4.multimodal.image_processor import ImageProcessorConfig, process_image

REAL = {
    "vision_config": {
        "image_size": 336,
        "patch_size": 14,
        "hidden_size": 1408,
        "num_hidden_layers": 34,
        "num_attention_heads": 16,
        "intermediate_size": 5632,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 4096,
        "projector_output_dim": 4096,
        "vision_output_dim": 4096,
        "rope_theta": 10000,
    },
    "text_config": {"hidden_size": 5120},
}
TINY = {
    "vision_config": {
        "image_size": 56,
        "patch_size": 14,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 64,
        "projector_output_dim": 64,
        "vision_output_dim": 64,
    },
    "text_config": {"hidden_size": 64},
}


def tower(config: VisionConfig, dtype: torch.dtype) -> VisionTower:
    torch.manual_seed(0)
    with torch.device("meta"):
        module = VisionTower(config)
    module = module.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.eval()


def seconds_per_call(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def flops_per_tile(c: VisionConfig) -> tuple[float, float]:
    """(per encoder layer, everything else) multiply-adds x 2, per tile."""
    s = c.grid_size**2 + 1  # positions, CLS included
    h, m = c.hidden_size, c.intermediate_size
    layer = 2 * s * (4 * h * h + 2 * h * m) + 2 * 2 * s * s * h  # projections, MLP, attention
    t = c.tokens_per_tile
    patch = 2 * c.grid_size**2 * (c.num_channels * c.patch_size**2) * h
    adapter = 2 * t * (m * c.projector_input_dim + c.projector_input_dim * c.projector_output_dim)
    projector = 2 * t * c.vision_output_dim * c.text_hidden_size
    return layer, patch + adapter + projector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, {args.dtype}"
    )

    processor = ImageProcessorConfig.from_dicts(REAL, None)
    print("\ntiling (336x336 tiles, up to 16 + global), ms per image:")
    for w, h in ((640, 480), (1024, 768), (1920, 1080), (4000, 3000)):
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        tiled = process_image(image, processor)
        ms = 1e3 * seconds_per_call(lambda image=image: process_image(image, processor), 5)
        print(f"  {w}x{h}: {tiled.num_tiles} tiles, {ms:.1f} ms")

    tiny = VisionConfig.from_dict(TINY)
    small = tower(tiny, dtype)
    print(f"\ntiny tower ({tiny.image_size}x{tiny.image_size} tiles), ms per tile:")
    for n in (1, 4, 17):
        pixels = torch.randn(n, 3, tiny.image_size, tiny.image_size)
        s = seconds_per_call(lambda pixels=pixels: small.encode(pixels), 20)
        print(f"  batch of {n:2d} tiles: {1e3 * s / n:.3f} ms per tile")

    real = VisionConfig.from_dict(REAL)
    layer_flops, other_flops = flops_per_tile(real)
    total_flops = real.num_hidden_layers * layer_flops + other_flops
    print(
        f"\nreal tower ({real.num_hidden_layers} layers): {total_flops / 1e9:.0f} GFLOP per tile "
        f"({layer_flops / 1e9:.1f} per layer, {other_flops / 1e9:.1f} outside the layers)"
    )
    pixels = torch.randn(1, 3, real.image_size, real.image_size)
    timed = {}
    for layers in (1, 3):
        module = tower(replace(real, num_hidden_layers=layers), dtype)
        timed[layers] = seconds_per_call(lambda module=module: module.encode(pixels), args.repeat)
        del module
    per_layer = (timed[3] - timed[1]) / 2
    rest = timed[1] - per_layer
    projected = rest + real.num_hidden_layers * per_layer
    print(f"  measured: 1 layer {timed[1]:.3f} s, 3 layers {timed[3]:.3f} s per tile")
    print(
        f"  per layer {1e3 * per_layer:.0f} ms ({layer_flops / per_layer / 1e9:.0f} GFLOP/s), "
        f"outside the layers {1e3 * rest:.0f} ms"
    )
    print(
        f"  projected, {real.num_hidden_layers} layers: {projected:.2f} s per tile on this CPU; "
        f"a 17-tile image {17 * projected:.0f} s"
    )


if __name__ == "__main__":
    main()
