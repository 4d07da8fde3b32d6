"""pyllama4.Engine with image prompts: chunked prefill, batching, retraction and the prefix cache
change timing only, never tokens; each image is encoded once; the cache never confuses images.

The tiny random multimodal checkpoint of tests/conftest.py (4 tokens per 56x56 tile), fp32 CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from pyllama4 import Engine, SamplingParams
from pyllama4.loading.load import load_model
from pyllama4.multimodal.image_processor import TiledImage
from pyllama4.multimodal.inputs import ImageInput, ImagePrompt
from pyllama4.multimodal.support import ImageSupport
from pyllama4.runner import ModelRunner

IMAGE = 200090
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(tiny_mm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_mm_dir)
    support = ImageSupport.load(tiny_mm_dir, tokenizer, dtype=torch.float32, device="cpu")
    model = load_model(tiny_mm_dir, dtype=torch.float32, progress=False)
    return model, tokenizer, support


def make_engine(parts, enable_prefix_cache: bool = True, **runner) -> Engine:
    model, tokenizer, support = parts
    options = {"kv_tokens": 4096, "page_size": 8, "max_step_tokens": 256, **runner}
    runner = ModelRunner(model, context_len=512, **options)
    scheduler = runner.new_scheduler(enable_prefix_cache=enable_prefix_cache)
    return Engine(runner, tokenizer, scheduler=scheduler, images=support)


def image(grid: tuple[int, int], seed: int) -> ImageInput:
    tiles = grid[0] * grid[1] + (grid != (1, 1))
    g = torch.Generator().manual_seed(seed)
    return ImageInput.from_tiles(TiledImage(torch.randn(tiles, 3, 56, 56, generator=g), grid))


def prompt(engine: Engine, text_ids: list[int], images: list[ImageInput]) -> ImagePrompt:
    return engine.image_prompt(text_ids, images)


def batch(engine: Engine) -> list[ImagePrompt]:
    return [
        prompt(engine, [200000, 11, IMAGE, 12, 13], [image((2, 2), 1)]),
        prompt(engine, [200000, 14, IMAGE, 15, IMAGE, 16], [image((1, 1), 2), image((3, 1), 3)]),
        prompt(engine, [200000, 17, 18, 19, 20, 21, 22], []),
        prompt(engine, [200000] + list(range(30, 60)) + [IMAGE, 7], [image((1, 2), 4)]),
    ]


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_nothing_held(engine: Engine) -> None:
    s = engine.scheduler.stats()
    assert s.num_running == s.num_waiting == 0
    assert s.global_total - s.global_free == s.global_cached
    assert engine.scheduler.check() == ""


def test_batched_equals_alone_and_each_image_is_encoded_once(parts):
    engine = make_engine(parts)
    prompts = batch(engine)
    together = tokens_of(engine.generate(prompts, GREEDY))
    assert engine.stats().images_encoded == 4
    alone = [tokens_of(make_engine(parts).generate([p], GREEDY))[0] for p in prompts]
    assert together == alone
    assert_nothing_held(engine)


@pytest.mark.parametrize("budget", [3, 8, 21])
def test_chunked_prefill_through_images_changes_nothing(parts, budget):
    ref = tokens_of(make_engine(parts).generate(batch(make_engine(parts)), GREEDY))
    engine = make_engine(parts, max_step_tokens=budget)
    assert tokens_of(engine.generate(batch(engine), GREEDY)) == ref
    assert engine.stats().images_encoded == 4  # never re-encoded for a later chunk
    assert_nothing_held(engine)


def test_retraction_re_encodes_and_keeps_every_token(parts):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    prompts = batch(make_engine(parts)) * 3
    ref = tokens_of(make_engine(parts).generate(prompts, params))
    small = make_engine(parts, kv_tokens=160, max_step_tokens=32)
    assert tokens_of(small.generate(prompts, params)) == ref
    assert small.stats().num_retractions > 0
    assert_nothing_held(small)


def test_the_prefix_cache_reuses_an_image_and_never_confuses_two(parts):
    engine = make_engine(parts)
    text = [200000, 11, 12, IMAGE, 13, 14, 15]
    first = prompt(engine, text, [image((2, 2), 5)])
    patches = first.positions[0]
    out1 = engine.generate([first], GREEDY)[0]
    assert engine.stats().images_encoded == 1

    again = engine.generate([prompt(engine, text, [image((2, 2), 5)])], GREEDY)[0]
    assert again.cached_tokens > patches[-1], "the same image again must hit the cache"
    assert engine.stats().images_encoded == 1  # the cache covered it: no encoding
    assert again.outputs[0].token_ids == out1.outputs[0].token_ids

    other = prompt(engine, text, [image((2, 2), 6)])
    out3 = engine.generate([other], GREEDY)[0]
    assert out3.cached_tokens <= patches[0], "a different image must not hit its tokens"
    assert engine.stats().images_encoded == 2
    fresh = make_engine(parts, enable_prefix_cache=False).generate([other], GREEDY)[0]
    assert out3.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert_nothing_held(engine)


def test_n_completions_share_the_prompt_images(parts):
    engine = make_engine(parts)
    p = prompt(engine, [200000, 11, IMAGE, 12], [image((2, 1), 7)])
    params = SamplingParams(n=3, temperature=0.0, max_tokens=6, ignore_eos=True)
    out = engine.generate([p], params)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert out.outputs[0].token_ids == tokens_of(make_engine(parts).generate([p], GREEDY))[0][:6]
    assert_nothing_held(engine)


def test_a_text_only_engine_refuses_images(parts):
    model, tokenizer, _ = parts
    engine = Engine(ModelRunner(model, context_len=512, kv_tokens=1024, page_size=8), tokenizer)
    with pytest.raises(ValueError, match="enable_multimodal"):
        engine.image_prompt([1, IMAGE], [image((1, 1), 8)])


def test_pil_images_are_tiled_by_the_engine(parts):
    from PIL import Image

    engine = make_engine(parts)
    p = engine.image_prompt([200000, 11, IMAGE, 12], [Image.new("RGB", (112, 56), (9, 99, 199))])
    assert p.images[0].grid == (1, 2)
    assert p.token_ids.count(200092) == 3 * 4  # two tiles and the global one
    assert len(engine.generate([p], GREEDY)[0].outputs[0].token_ids) == 8
