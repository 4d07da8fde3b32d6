"""The EAGLE3 draft model in SGLang's published layout (`LlamaForCausalLMEagle3`).

Invariant: `Eagle3Draft` computes exactly SGLang's one-layer draft: `fc` fuses the target's three
auxiliary hidden states; the midlayer normalises the token embeddings and the hidden state
separately (HF LlamaRMSNorm rounding), attends with q/k/v projections of their concatenation,
RoPE in HF Llama's rotate-half layout (never Llama 4's interleaved pairs) with optional llama3
scaling, and adds a SwiGLU MLP; `norm` then `lm_head` give logits over the draft vocabulary, and
`d2t` maps draft ids to target ids. Its parameters and buffers carry exactly the published tensor
names; the embedding table is the target's, shared and never part of the draft's state_dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from pyllama4.config import RopeScaling
from pyllama4.layers.norm import RMSNorm
from pyllama4.layers.rope import inv_frequencies

ARCHITECTURE = "LlamaForCausalLMEagle3"
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_SCALING_KEYS = [f.name for f in fields(RopeScaling)]
LLAMA_ROPE_THETA = 10000.0  # transformers' LlamaConfig default, for drafts whose config omits it


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3", factor, ...} or None
    max_position_embeddings: int
    vocab_size: int  # target vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    aux_layers: tuple[int, ...]  # target layers whose INPUT stream is captured (len 3)

    @classmethod
    def from_dict(cls, d: dict, target_num_layers: int) -> Eagle3Config:
        """Parses a draft config.json; ValueError naming the bad or missing key."""
        if not any("eagle3" in str(a).lower() for a in d.get("architectures") or []):
            raise ValueError(f"architectures {d.get('architectures')} names no Eagle3 draft")
        if _num(d, "num_hidden_layers", int, 1) != 1:
            raise ValueError(f"num_hidden_layers {d['num_hidden_layers']}: EAGLE3 drafts have 1")
        hidden, heads, vocab = (
            _num(d, k, int) for k in ("hidden_size", "num_attention_heads", "vocab_size")
        )
        mlp = "intermediate_size"
        if d.get("model_type") == "llama4_text" and "intermediate_size_mlp" in d:
            mlp = "intermediate_size_mlp"
        n = target_num_layers
        ids = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = (2, n // 2, n - 3) if ids is None else tuple(i + 1 for i in _ints(ids))
        if len(aux) != 3 or not all(0 <= a < n for a in aux):
            raise ValueError(
                f"eagle_config eagle_aux_hidden_state_layer_ids {ids}: need 3 ids whose next "
                f"layer is one of the target's {n} layers (captures the input of {list(aux)})"
            )
        max_positions = _num(d, "max_position_embeddings", int)
        theta, scaling = _rope(d, max_positions)
        return cls(
            hidden_size=hidden,
            intermediate_size=_num(d, mlp, int),
            num_attention_heads=heads,
            num_key_value_heads=_num(d, "num_key_value_heads", int, heads),
            head_dim=_num(d, "head_dim", int, hidden // heads),
            rms_norm_eps=_num(d, "rms_norm_eps", float),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            vocab_size=vocab,
            draft_vocab_size=_num(d, "draft_vocab_size", int, vocab),
            target_hidden_size=_num(d, "target_hidden_size", int, hidden),
            aux_layers=aux,
        )

    def to_dict(self) -> dict:
        """The published config.json layout."""
        fields_ = {k: v for k, v in asdict(self).items() if k != "aux_layers"}
        ids = [a - 1 for a in self.aux_layers]
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            **fields_,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids},
        }


def _num(d: dict, key: str, kind: type[int] | type[float], default: float | None = None) -> Any:
    """d[key] as a positive `kind` (default when absent or null); ValueError naming the key."""
    value = d.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config lacks {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise ValueError(
            f"config {key}: {value!r} is not {'an integer' if kind is int else 'a number'}"
        )
    if value <= 0:
        raise ValueError(f"config {key}: {value} is not positive")
    return kind(value)


def _ints(values: object) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ValueError(f"eagle_config eagle_aux_hidden_state_layer_ids {values!r}: not integers")
    return values


def _rope(d: dict, max_positions: int) -> tuple[float, dict | None]:
    """rope_theta, and llama3 scaling or None, from 4.x `rope_theta` + `rope_scaling` or 5.x
    `rope_parameters`; no rope_theta at all is LlamaConfig's default, as transformers (and so
    SGLang) reads such a draft config."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    theta = d.get("rope_theta", params.get("rope_theta"))
    theta = _num({"rope_theta": theta}, "rope_theta", float, LLAMA_ROPE_THETA)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"config rope_scaling: rope_type {rope_type!r} (supported: llama3)")
    scaling = {"original_max_position_embeddings": max_positions, **scaling}
    values = {k: _num(scaling, k, float) for k in _SCALING_KEYS}
    values["original_max_position_embeddings"] = int(values["original_max_position_embeddings"])
    return theta, {"rope_type": "llama3", **values}


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Midlayer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        H, D = c.hidden_size, c.head_dim
        q_rows, kv_rows = c.num_attention_heads * D, c.num_key_value_heads * D
        self.input_layernorm = RMSNorm(H, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, c.rms_norm_eps)
        self.self_attn = nn.ModuleDict(
            {
                "q_proj": nn.Linear(2 * H, q_rows, bias=False),
                "k_proj": nn.Linear(2 * H, kv_rows, bias=False),
                "v_proj": nn.Linear(2 * H, kv_rows, bias=False),
                "o_proj": nn.Linear(q_rows, H, bias=False),
            }
        )
        self.post_attention_layernorm = RMSNorm(H, c.rms_norm_eps)
        self.mlp = _SwiGLU(H, c.intermediate_size)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama RoPE on x [N, heads, D] (first half / second half pairs), in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class Eagle3Draft(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(len(c.aux_layers) * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = _Midlayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        scaling = c.rope_scaling and RopeScaling(**{k: c.rope_scaling[k] for k in _SCALING_KEYS})
        # float32 and not a buffer: Module.to(dtype) must never round the frequencies.
        self.inv_freq = inv_frequencies(c.head_dim, c.rope_theta, scaling)
        self.embed_tokens: nn.Embedding | None = None

    def set_embedding(self, embedding: nn.Embedding) -> None:
        """Shares the target's table: bypasses Module.__setattr__ so it is no submodule."""
        object.__setattr__(self, "embed_tokens", embedding)

    @property
    def scale(self) -> float:
        return self.config.head_dim**-0.5

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """[N, 3 * target_hidden] captured target states -> [N, hidden]."""
        return self.fc(aux)

    def forward(
        self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prenorm, normed) [N, H]; `attend(q, k, v)` attends over the caller's KV cache."""
        if self.embed_tokens is None:
            raise RuntimeError("Eagle3Draft.set_embedding was not called")
        c, m, n = self.config, self.midlayer, token_ids.shape[0]
        x = torch.cat([m.input_layernorm(self.embed_tokens(token_ids)), m.hidden_norm(hidden)], -1)
        q = m.self_attn["q_proj"](x).view(n, c.num_attention_heads, c.head_dim)
        k = m.self_attn["k_proj"](x).view(n, c.num_key_value_heads, c.head_dim)
        v = m.self_attn["v_proj"](x).view(n, c.num_key_value_heads, c.head_dim)
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        cos, sin = angles.cos(), angles.sin()
        out = attend(_rotate_half(q, cos, sin), _rotate_half(k, cos, sin), v)
        h = m.self_attn["o_proj"](out.reshape(n, -1)) + hidden
        prenorm = m.mlp(m.post_attention_layernorm(h)) + h
        return prenorm, self.norm(prenorm)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, draft_vocab_size] float32."""
        return self.lm_head(normed).float()

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]
