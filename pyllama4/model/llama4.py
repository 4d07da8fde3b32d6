"""Llama 4 text model (Scout- and Maverick-style) computing on the paged KV cache.

Invariant: parameter names and shapes are exactly those of transformers' Llama4ForCausalLM, and
for any batch of requests the logits equal transformers' for the same tokens (fp32: <= 1e-4;
tests/test_llama4_model.py). Per layer: pre-norm attention (RoPE + optional QK-norm on RoPE
layers, temperature tuning on NoPE layers, chunk-local or full causal attention, GQA), then a
dense SwiGLU or MoE feed-forward.
"""

from __future__ import annotations

import torch
from torch import nn

from pyllama4.batch import StepBatch
from pyllama4.config import TextConfig
from pyllama4.kv_cache import PagedKVCache
from pyllama4.layers import attention
from pyllama4.layers.ffn import MoE, SwiGLU
from pyllama4.layers.norm import RMSNorm, l2_norm
from pyllama4.layers.rope import apply_rope, inv_frequencies, rotation


class StepContext:
    """What every layer of one step shares: rotations, temperature scales, attention metadata."""

    def __init__(
        self, config: TextConfig, inv_freq: torch.Tensor, batch: StepBatch, cache: PagedKVCache
    ):
        self.batch = batch
        self.cache = cache
        self.rotation = rotation(batch.positions, inv_freq)
        # Temperature tuning of NoPE layers: 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale)).
        pos = batch.positions.float()
        self.temperature = (
            torch.log1p(torch.floor((pos + 1.0) / config.floor_scale)) * config.attn_scale + 1.0
        )[:, None, None]
        self.meta = {
            local: attention.prepare(batch, cache, local) for local in set(cache.local_layers)
        }


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.use_rope = config.use_rope[layer]
        self.qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, ctx.rotation), apply_rope(k, ctx.rotation)
        if self.qk_norm:
            q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
        if self.temperature_tuning:
            q = (q * ctx.temperature).to(q.dtype)
        local = ctx.cache.local_layers[self.layer]
        slots = ctx.batch.local_slots if local else ctx.batch.global_slots
        out = attention.paged_attention(
            q,
            k,
            v,
            ctx.cache.k[self.layer],
            ctx.cache.v[self.layer],
            slots,
            ctx.meta[local],
            self.scale,
        )
        return self.o_proj(out.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        h = config.hidden_size
        if config.moe[layer]:
            self.feed_forward: nn.Module = MoE(
                h, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
            )
        else:
            self.feed_forward = SwiGLU(h, config.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # float32 always, and not a buffer: Module.to(dtype) must never round the frequencies.
        self.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        """Runs one step: writes the KV of its tokens, returns final-normed hidden states [T, H]."""
        return self.forward_with_aux(batch, cache, ())[0]

    @torch.inference_mode()
    def forward_with_aux(
        self, batch: StepBatch, cache: PagedKVCache, capture: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As forward, plus the residual stream ENTERING each layer in `capture` (what an EAGLE3
        draft fuses; SGLang's capture point), concatenated in that order: [T, len * H], or None
        when capture is empty."""
        if self.inv_freq.device != batch.positions.device:
            self.inv_freq = self.inv_freq.to(batch.positions.device)
        ctx = StepContext(self.config, self.inv_freq, batch, cache)
        x = self.embed(batch)
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            if i in capture:
                captured[i] = x
            x = layer(x, ctx)
        missing = [i for i in capture if i not in captured]
        if missing:
            raise ValueError(f"capture layers {missing} outside 0..{len(self.model.layers) - 1}")
        aux = [captured[i] for i in capture]
        return self.model.norm(x), torch.cat(aux, dim=-1) if aux else None

    def embed(self, batch: StepBatch) -> torch.Tensor:
        """Token embeddings, with image features in place at the batch's image positions."""
        if batch.embeds is None:
            return self.model.embed_tokens(batch.token_ids)
        ids = batch.token_ids.index_fill(0, batch.embed_index, 0)
        x = self.model.embed_tokens(ids)
        return x.index_copy(0, batch.embed_index, batch.embeds.to(x.dtype))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, vocab] in the model dtype (as transformers returns them)."""
        return self.lm_head(hidden)
