"""Llama 4 text model (Scout- and Maverick-style) computing on the paged KV cache.

Invariant: parameter names and shapes are exactly those of transformers' Llama4ForCausalLM, and
for any batch of requests the logits equal transformers' for the same tokens (fp32: <= 1e-4;
tests/test_llama4_model.py). Per layer: pre-norm attention (RoPE + optional QK-norm on RoPE
layers, temperature tuning on NoPE layers, chunk-local or full causal attention, GQA), then a
dense SwiGLU or MoE feed-forward.

On a GPU with the kernel library, bf16 (pyllama4.kernels.fused): RoPE, QK-norm, temperature and
the KV cache write run as one kernel per layer, and each residual add runs fused with the norm
that follows it; the layers then pass the residual stream as (residual, the block output still
to add). The bf16 roundings are the same as on the torch path.

Tensor parallelism (`tp`, pyllama4.distributed; Megatron style, activations replicated between
blocks): attention splits its query heads and KV heads (pyllama4.distributed.attention_heads;
KV heads replicated when tp.size > KV heads), q/k/v column-parallel, o_proj row-parallel, then one
all_reduce; the feed-forward blocks split their intermediate dim (pyllama4.layers.ffn); the
embedding and lm_head split the vocabulary (rows [v0, v1) per rank): embeddings all_reduced,
logits all_gathered, so every rank sees the full hidden states and logits [N, vocab]. Norms and
routers are replicated. Parameter names stay transformers' at any size, only shapes shrink;
`weight_shards` says which part of each checkpoint tensor a rank holds. With tp.size == 1 the
module is exactly the one above.
"""

from __future__ import annotations

import torch
from torch import nn

from pyllama4.batch import StepBatch
from pyllama4.config import TextConfig
from pyllama4.distributed.parallel import SINGLE, Shard, TensorParallel, attention_heads
from pyllama4.kernels import fused
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
        self.inv_freq = inv_freq
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
    def __init__(self, config: TextConfig, layer: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.layer = layer
        self.tp = tp
        self.all_heads = config.num_attention_heads
        self.all_kv_heads = config.num_key_value_heads
        # This rank's query and KV heads, [start, stop) each.
        self.q_range, self.kv_range = attention_heads(self.all_heads, self.all_kv_heads, tp)
        self.heads = self.q_range[1] - self.q_range[0]
        self.kv_heads = self.kv_range[1] - self.kv_range[0]
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
        local = ctx.cache.local_layers[self.layer]
        slots = ctx.batch.local_slots if local else ctx.batch.global_slots
        k_cache, v_cache = ctx.cache.k[self.layer], ctx.cache.v[self.layer]
        kv_written = fused.usable(q, k, v, k_cache, v_cache)
        if kv_written:  # one kernel: the steps below, then k and v into the cache
            q = fused.rope_qk_norm_kv_write(
                q,
                k,
                v,
                k_cache,
                v_cache,
                slots,
                ctx.batch.positions,
                ctx.inv_freq if self.use_rope else None,
                self.qk_norm,
                self.eps,
                ctx.temperature.view(-1) if self.temperature_tuning else None,
            )
        else:
            if self.use_rope:
                q, k = apply_rope(q, ctx.rotation), apply_rope(k, ctx.rotation)
            if self.qk_norm:
                q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
            if self.temperature_tuning:
                q = (q * ctx.temperature).to(q.dtype)
        out = attention.paged_attention(
            q, k, v, k_cache, v_cache, slots, ctx.meta[local], self.scale, kv_written=kv_written
        )
        return self.tp.all_reduce(self.o_proj(out.reshape(t, -1)))

    def shards(self) -> dict[str, Shard]:
        """This rank's parts of the checkpoint's weights, by relative name."""
        d = self.head_dim
        q = Shard(0, ((self.q_range[0] * d, self.q_range[1] * d),), self.all_heads * d)
        kv = Shard(0, ((self.kv_range[0] * d, self.kv_range[1] * d),), self.all_kv_heads * d)
        return {
            "q_proj.weight": q,
            "k_proj.weight": kv,
            "v_proj.weight": kv,
            "o_proj.weight": Shard(1, q.ranges, q.full),
        }


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.self_attn = Attention(config, layer, tp)
        h = config.hidden_size
        if config.moe[layer]:
            self.feed_forward: MoE | SwiGLU = MoE(
                h,
                config.intermediate_size,
                config.num_local_experts,
                config.num_experts_per_tok,
                tp,
            )
        else:
            self.feed_forward = SwiGLU(h, config.intermediate_size_mlp, tp, "intermediate_size_mlp")
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual stream residual + x (residual None: x): returns (the
        feed-forward output, the stream before it), whose sum is the stream after the layer."""
        normed, residual = add_norm(self.input_layernorm, x, residual)
        attn = self.self_attn(normed, ctx)
        normed, residual = add_norm(self.post_attention_layernorm, attn, residual)
        return self.feed_forward(normed), residual


def add_norm(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h), h) for h = residual + x (residual None: h = x). bf16 on a GPU with the kernel
    library: one kernel, which writes h into residual (pyllama4.kernels.fused.add_rms_norm)."""
    if fused.usable(x, norm.weight) and (residual is None or fused.usable(residual)):
        return fused.add_rms_norm(x, residual, norm.weight, norm.eps)
    h = x if residual is None else residual + x
    return norm(h), h


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding of this rank's rows [start, stop) of the vocabulary (`vocab`): a token outside
    them embeds to zeros, and the ranks' embeddings are summed, so every rank gets them all."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE):
        start, stop = tp.split(vocab_size, "vocab_size")
        super().__init__(stop - start, hidden_size)
        self.tp = tp
        self.vocab = (start, stop)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        start, stop = self.vocab
        inside = (ids >= start) & (ids < stop)
        x = super().forward(torch.where(inside, ids - start, 0))
        return self.tp.all_reduce(x.masked_fill(~inside[..., None], 0))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    def __init__(self, config: TextConfig, tp: TensorParallel = SINGLE):
        """ValueError when tp.size does not divide what it must (vocab_size, the intermediate
        sizes, attention heads; KV heads, or they it)."""
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = TextModel(config, tp)
        vocab = self.model.embed_tokens.vocab
        self.lm_head = nn.Linear(config.hidden_size, vocab[1] - vocab[0], bias=False)
        # float32 always, and not a buffer: Module.to(dtype) must never round the frequencies.
        self.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    @property
    def kv_heads(self) -> int:
        """The KV heads of each layer this rank holds (what its paged KV cache stores)."""
        config = self.config
        start, stop = attention_heads(
            config.num_attention_heads, config.num_key_value_heads, self.tp
        )[1]
        return stop - start

    def weight_shards(self) -> dict[str, Shard]:
        """The part of each checkpoint tensor this rank holds, by parameter name (the others, and
        all at tp.size 1, whole): pyllama4.loading.weights.load_weights's `shards`."""
        if self.tp.size == 1:
            return {}
        vocab = Shard(0, (self.model.embed_tokens.vocab,), self.config.vocab_size)
        shards = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
        for i, layer in enumerate(self.model.layers):
            for name, module in (
                ("self_attn", layer.self_attn),
                ("feed_forward", layer.feed_forward),
            ):
                prefix = f"model.layers.{i}.{name}."
                shards.update((prefix + k, v) for k, v in module.shards().items())
        return shards

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
        x, residual = self.embed(batch), None
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            if i in capture:  # a copy: the fused add_norm updates the residual in place
                captured[i] = x.clone() if residual is None else residual + x
            x, residual = layer(x, residual, ctx)
        missing = [i for i in capture if i not in captured]
        if missing:
            raise ValueError(f"capture layers {missing} outside 0..{len(self.model.layers) - 1}")
        aux = [captured[i] for i in capture]
        return add_norm(self.model.norm, x, residual)[0], torch.cat(aux, dim=-1) if aux else None

    def embed(self, batch: StepBatch) -> torch.Tensor:
        """Token embeddings, with image features in place at the batch's image positions."""
        if batch.embeds is None:
            return self.model.embed_tokens(batch.token_ids)
        ids = batch.token_ids.index_fill(0, batch.embed_index, 0)
        x = self.model.embed_tokens(ids)
        return x.index_copy(0, batch.embed_index, batch.embeds.to(x.dtype))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, vocab] in the model dtype (as transformers returns them); under tensor
        parallelism every rank's vocabulary rows, gathered."""
        return self.tp.all_gather(self.lm_head(hidden), dim=-1)
