"""Llama 4 vision tower and multimodal projector: image tiles to text-width embeddings.

Invariant: parameter names and shapes are exactly the checkpoint's (`vision_model.*`,
`multi_modal_projector.*`), and `VisionTower.encode` computes what transformers'
`Llama4VisionModel` followed by `Llama4MultiModalProjector` computes (fp32: <= 1e-5;
tests/test_vision_model.py), tile by tile: tiles never interact, so encoding a batch equals
encoding its tiles one at a time. Per tile: 14x14 patches (unfolded in (channel, row, col) order)
through a linear map, a CLS token appended last, learned positions, pre-norm encoder layers with
bidirectional attention and 2D RoPE, CLS dropped, pixel shuffle, the adapter MLP, the projector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyllama4.config import VisionConfig
from pyllama4.layers.rope import apply_rope


def rotation_2d(config: VisionConfig) -> torch.Tensor:
    """[grid^2 + 1, head_dim // 2] complex64 RoPE factors, in transformers' float32 arithmetic.

    Pair k < head_dim // 4 of patch (row, col) turns by (col + 1) * f_k, pair head_dim // 4 + k by
    (row + 1) * f_k, with f_k = theta^(-4k / head_dim); the CLS token (last) is not rotated.
    """
    grid = config.grid_size
    quarter = config.head_dim // 4
    steps = torch.arange(0, 2 * quarter, 2, device="cpu")  # cpu even under a meta device context
    freq = 1.0 / (config.rope_theta ** (steps.float() / (2 * quarter)))
    patch = torch.arange(grid * grid, dtype=torch.int32, device="cpu")
    col = (patch % grid + 1)[:, None] * freq[None, :]
    row = (patch // grid + 1)[:, None] * freq[None, :]
    angles = torch.cat([col, row], dim=-1)
    angles = torch.cat([angles, torch.zeros_like(angles[:1])])  # CLS
    return torch.view_as_complex(torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x [N, S, hidden], rot [S, head_dim // 2] -> [N, S, hidden]."""
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        q = apply_rope(self.q_proj(x).view(shape), rot)
        k = apply_rope(self.k_proj(x).view(shape), rot)
        v = self.v_proj(x).view(shape)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class VisionMLP(nn.Module):
    """fc2(GELU(fc1(x))) with biases: the encoder layers' feed-forward."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rot)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, rot)
        return x


class PatchEmbedding(nn.Module):
    """Non-overlapping patches, each flattened in (channel, row, col) order, mapped linearly."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = nn.Linear(
            config.num_channels * config.patch_size**2, config.hidden_size, bias=False
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, T, T] -> [N, (T / patch)^2, hidden], patches in row-major grid order."""
        patches = F.unfold(pixels, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches.transpose(1, 2))


class AdapterMLP(nn.Module):
    """GELU(fc2(GELU(fc1(x)))), no biases (note the GELU after fc2)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_input_dim, config.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class PixelShuffleAdapter(nn.Module):
    """Merges each n x n block of patches (n = 1 / pixel_shuffle_ratio) into one token, then the
    adapter MLP. Block (i, j) concatenates its patches row by row: x[ni, nj], x[ni, nj + 1], ...,
    x[ni + 1, nj], ...; the tokens are in row-major (i, j) order, as transformers' pixel_shuffle."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.grid = config.grid_size
        self.factor = config.shuffle_factor
        self.mlp = AdapterMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, grid^2, hidden] -> [N, (grid / n)^2, projector_output_dim]."""
        n, blocks = self.factor, self.grid // self.factor
        x = x.reshape(x.shape[0], blocks, n, blocks, n, x.shape[-1]).transpose(2, 3)
        return self.mlp(x.reshape(x.shape[0], blocks * blocks, -1))


class VisionModel(nn.Module):
    """transformers' Llama4VisionModel: pixels to adapted patch features."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        h = config.hidden_size
        self.patch_embedding = PatchEmbedding(config)
        self.class_embedding = nn.Parameter(torch.empty(h))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(config.grid_size**2 + 1, h))
        self.layernorm_pre = nn.LayerNorm(h, eps=config.norm_eps)
        self.layernorm_post = nn.LayerNorm(h, eps=config.norm_eps)
        self.model = VisionEncoder(config)
        self.vision_adapter = PixelShuffleAdapter(config)

    def forward(self, pixels: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """[N, C, T, T] -> [N, tokens_per_tile, projector_output_dim]."""
        x = self.patch_embedding(pixels)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm
        x = self.model(self.layernorm_pre(x), rot)
        return self.vision_adapter(self.layernorm_post(x)[:, :-1])


class MultiModalProjector(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_output_dim, config.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class VisionTower(nn.Module):
    """The vision model and the projector: image tiles to embeddings for `<|patch|>` slots."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config)
        self.multi_modal_projector = MultiModalProjector(config)
        # A plain attribute, not a buffer: module.to(dtype) must not round it.
        self._rot = rotation_2d(config)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, channels, image_size, image_size] -> [N, tokens_per_tile, text_hidden_size].

        Computes in the module's dtype and on its device (the pixels are cast and moved).
        """
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values of shape {list(pixel_values.shape)}: expected [N, "
                f"{', '.join(map(str, expected))}]"
            )
        weight = self.multi_modal_projector.linear_1.weight
        if self._rot.device != weight.device:
            self._rot = self._rot.to(weight.device)
        pixels = pixel_values.to(device=weight.device, dtype=weight.dtype)
        return self.multi_modal_projector(self.vision_model(pixels, self._rot))
