"""Vision features of the prompts being prefilled, and the rows one step needs.

Invariants:
- An image is encoded only when a step first computes one of its positions (a prefix-cache hit
  that covers it needs no encoding), once for however many chunks its prefill takes; the
  features are kept until the owner drops them (when the prompt is prefilled) and re-encoded
  only if the prompt must be computed again (retraction).
- `ImageFeed.rows` maps every image position a step computes to its feature row: the step's
  embeddings at `index` are replaced by `embeds` (in the same order).
- Tiles of all images a step needs are encoded together, in batches of at most
  `max_tiles_per_batch`; tiles are independent, so batching never changes features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pyllama4.model.vision import VisionTower
from pyllama4.multimodal.inputs import ImagePrompt


class PromptFeatures:
    """The images of one prompt and their features (None until encoded, or after a drop)."""

    def __init__(self, prompt: ImagePrompt):
        self.prompt = prompt
        self.features: list[torch.Tensor | None] = [None] * len(prompt.images)

    def drop(self) -> None:
        self.features = [None] * len(self.prompt.images)


@dataclass
class ImageFeed:
    """What one step needs: (prompt, image, feature rows) and the flat token index of each row."""

    parts: list[tuple[PromptFeatures, int, np.ndarray]] = field(default_factory=list)
    index: list[np.ndarray] = field(default_factory=list)
    encoded: int = 0  # images gather() had to encode

    def add(self, owner: PromptFeatures, start: int, end: int, flat_offset: int) -> None:
        """The step computes prompt positions [start, end) of `owner` at flat token index
        flat_offset + position."""
        for i, where in enumerate(owner.prompt.positions):
            lo, hi = np.searchsorted(where, (start, end))
            if lo < hi:
                self.parts.append((owner, i, np.arange(lo, hi)))
                self.index.append(where[lo:hi] + flat_offset)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def gather(
        self, tower: VisionTower, device: torch.device, max_tiles_per_batch: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """On the model thread: encodes what is missing, returns (index [K], embeds [K, H])."""
        missing = {(id(o), i): (o, i) for o, i, _ in self.parts if o.features[i] is None}
        encode(tower, list(missing.values()), device, max_tiles_per_batch)
        self.encoded = len(missing)
        embeds = [o.features[i][torch.from_numpy(rows).to(device)] for o, i, rows in self.parts]
        index = torch.from_numpy(np.concatenate(self.index)).to(device)
        return index, torch.cat(embeds)


def encode(
    tower: VisionTower,
    images: list[tuple[PromptFeatures, int]],
    device: torch.device,
    max_tiles_per_batch: int,
) -> None:
    """Encodes the given (prompt, image) pairs, their tiles batched together."""
    if not images:
        return
    pixels = torch.cat([o.prompt.images[i].pixel_values for o, i in images])
    out = [
        tower.encode(pixels[s : s + max_tiles_per_batch].to(device))
        for s in range(0, pixels.shape[0], max_tiles_per_batch)
    ]
    rows = torch.cat(out).flatten(0, 1)  # [total tiles * tokens_per_tile, H]
    at = 0
    for owner, i in images:
        n = len(owner.prompt.positions[i])
        owner.features[i] = rows[at : at + n]
        at += n
