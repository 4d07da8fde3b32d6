"""What a request must satisfy before it is queued: checks that raise ValueError with the reason,
so that a request that can never run is refused at submit() and nothing of it is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pyllama4.multimodal.inputs import ImagePrompt
from pyllama4.multimodal.support import ImageSupport
from pyllama4.sampling_params import SamplingParams


def prompt_ids(
    prompt: str | Sequence[int] | ImagePrompt,
    tokenize: Callable[[str | Sequence[int]], list[int]],
    vocab_size: int,
    images: ImageSupport | None,
) -> tuple[list[int], np.ndarray]:
    """The prompt's token ids and its radix-cache key (image positions keyed by content)."""
    if isinstance(prompt, ImagePrompt):
        if images is None:
            raise ValueError("this engine takes no images (enable_multimodal is off)")
        ids, key_ids = prompt.token_ids, prompt.key_ids
    else:
        ids = tokenize(prompt)
        key_ids = np.asarray(ids, dtype=np.int32)
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids, key_ids


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """The token ids the sampling parameters name are in the vocabulary."""
    for name, ids in (
        ("logit_bias", params.logit_bias),
        ("stop_token_ids", params.stop_token_ids),
    ):
        if any(t >= vocab_size for t in ids):
            raise ValueError(f"{name}: token ids must be below the vocabulary size {vocab_size}")


def check_prompt_logprobs(params: SamplingParams, prompt_len: int, speculative: bool) -> None:
    """Prompt logprobs start inside the prompt, and are not computed by speculative steps."""
    if params.prompt_logprobs is None:
        return
    if speculative:
        raise ValueError("prompt_logprobs: not supported with speculative decoding (EAGLE3)")
    if params.prompt_logprobs_start >= prompt_len:
        raise ValueError(
            f"prompt_logprobs_start: {params.prompt_logprobs_start} is not below the prompt "
            f"length {prompt_len}"
        )
