"""Image + text prompts through our model equal transformers' Llama4ForConditionalGeneration.

A tiny random multimodal checkpoint saved by transformers (tests/conftest.py: text hidden 64,
4 layers, chunk 16; vision tiles of 56x56 giving 4 `<|patch|>` tokens each), fp32 on the CPU.
Our side: the text model on the paged KV cache, our vision tower, features merged at the image
positions the prompt expansion gives. Tolerance: logits within 1e-4 (fp32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pyllama4.loading.load import load_model
from pyllama4.multimodal.features import ImageFeed, PromptFeatures
from pyllama4.multimodal.image_processor import TiledImage
from pyllama4.multimodal.inputs import ImageInput, ImagePrompt
from pyllama4.multimodal.support import ImageSupport
from pyllama4.runner import ModelRunner

TOL = 1e-4
IMAGE = 200090
PATCH = 200092


@pytest.fixture(scope="module")
def support(tiny_mm_dir) -> ImageSupport:
    tokenizer = AutoTokenizer.from_pretrained(tiny_mm_dir)
    return ImageSupport.load(tiny_mm_dir, tokenizer, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def hf_model(tiny_mm_dir):
    from transformers import Llama4ForConditionalGeneration
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    # transformers 5.24's forward reads a field its output class lacks.
    MoeCausalLMOutputWithPast.image_outputs = None
    return Llama4ForConditionalGeneration.from_pretrained(tiny_mm_dir, dtype=torch.float32).eval()


def random_image(grid: tuple[int, int], seed: int) -> ImageInput:
    tiles = grid[0] * grid[1] + (grid != (1, 1))
    g = torch.Generator().manual_seed(seed)
    return ImageInput.from_tiles(TiledImage(torch.randn(tiles, 3, 56, 56, generator=g), grid))


def hf_logits(hf_model, prompt: ImagePrompt) -> torch.Tensor:
    pixels = torch.cat([image.pixel_values for image in prompt.images])
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([prompt.token_ids]), pixel_values=pixels)
    return out.logits[0]


def our_logits(
    tiny_mm_dir, support: ImageSupport, prompt: ImagePrompt, max_step_tokens: int
) -> tuple[torch.Tensor, int]:
    """Logits of every prompt position, prefilled in steps of at most max_step_tokens; and
    how many images the vision tower encoded."""
    model = load_model(tiny_mm_dir, dtype=torch.float32, progress=False)
    runner = ModelRunner(
        model, context_len=1024, kv_tokens=2048, page_size=8, max_step_tokens=max_step_tokens
    )
    sched = runner.new_scheduler()
    sched.add_request(1, prompt.key_ids, max_new_tokens=1)
    features = PromptFeatures(prompt)
    rows, encoded = [], 0
    while sched.has_work():
        plan = sched.schedule()
        feed = ImageFeed()
        start = int(plan.context_lens[0])
        feed.add(features, start, int(plan.seq_lens[0]), int(plan.query_start[0]) - start)
        embeds = feed.gather(support.tower, torch.device("cpu")) if feed else None
        encoded += feed.encoded
        _, hidden = runner.forward_with_hidden(plan, embeds)
        rows.append(model.logits(hidden))
        sched.commit(np.zeros(plan.num_samples, dtype=np.int32))
    return torch.cat(rows), encoded


def test_one_image_prompt_matches_transformers(tiny_mm_dir, support, hf_model):
    prompt = support.expand([200000, 1780, 314, IMAGE, 451, 47, 200008], [random_image((1, 1), 1)])
    assert prompt.token_ids.count(PATCH) == 4
    ours, encoded = our_logits(tiny_mm_dir, support, prompt, max_step_tokens=256)
    ref = hf_logits(hf_model, prompt)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL
    assert encoded == 1


@pytest.mark.parametrize("max_step_tokens", [256, 8, 5])
def test_two_images_match_transformers_whole_or_in_chunks(
    tiny_mm_dir, support, hf_model, max_step_tokens
):
    """A 2x2-tile image (5 tiles, 20 patch tokens) and a 1x3 one (4 tiles): chunked prefill
    splits their patch runs across steps; each image is still encoded exactly once."""
    images = [random_image((2, 2), 2), random_image((1, 3), 3)]
    ids = [200000, 200005, 1780, 200006, IMAGE, 314, 451, IMAGE, 47, 200008]
    prompt = support.expand(ids, images)
    assert prompt.token_ids.count(PATCH) == 4 * (5 + 4)
    ours, encoded = our_logits(tiny_mm_dir, support, prompt, max_step_tokens)
    ref = hf_logits(hf_model, prompt)
    assert (ours - ref).abs().max().item() <= TOL
    assert encoded == 2


def test_images_change_the_logits(tiny_mm_dir, support):
    """The features are used at all: another image at the same place changes what follows."""
    ids = [200000, 1780, IMAGE, 451, 47]
    a, _ = our_logits(tiny_mm_dir, support, support.expand(ids, [random_image((1, 1), 4)]), 64)
    b, _ = our_logits(tiny_mm_dir, support, support.expand(ids, [random_image((1, 1), 5)]), 64)
    # [bos, 1780, <|image_start|>, <|image|>] come before the image's patches: equal there.
    assert (a[:4] - b[:4]).abs().max().item() <= TOL
    assert (a[-1] - b[-1]).abs().max().item() > 1e-3


def test_placeholders_must_pair_with_images(support):
    with pytest.raises(ValueError, match="2 image placeholder.*for 1 image"):
        support.expand([1, IMAGE, 2, IMAGE], [random_image((1, 1), 6)])
    with pytest.raises(ValueError, match="0 image placeholder.*for 1 image"):
        support.expand([1, 2], [random_image((1, 1), 6)])


def test_cache_keys_depend_on_the_image_content_only(support):
    ids = [1, 2, IMAGE, 3]
    one = support.expand(ids, [random_image((1, 2), 7)])
    same = support.expand(ids, [random_image((1, 2), 7)])
    other = support.expand(ids, [random_image((1, 2), 8)])
    where = one.positions[0]
    assert np.array_equal(one.key_ids, same.key_ids)
    assert np.array_equal(one.token_ids, other.token_ids)  # the same tokens to the model
    assert not np.any(one.key_ids[where] == other.key_ids[where])
    text = np.setdiff1d(np.arange(len(one.token_ids)), where)
    assert np.array_equal(one.key_ids[text], np.asarray(one.token_ids)[text])
    assert (one.key_ids[where] >= 1 << 30).all()
