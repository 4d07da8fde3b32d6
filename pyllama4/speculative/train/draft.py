"""The draft to train: its vocabulary and its initial weights, both taken from the target.

Invariant: the draft vocabulary holds every EOS id and otherwise the most frequent answer tokens
of the training samples (ties broken by frequency in their prompts), as sorted target ids.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict

import torch

from pyllama4.config import TextConfig
from pyllama4.model.eagle3 import Eagle3Config, Eagle3Draft
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.speculative.train.capture import Sample


def answer_tokens(samples: list[Sample]) -> torch.Tensor:
    """The answer token ids of all samples, concatenated."""
    return torch.cat([s.tokens[s.prompt_len :] for s in samples])


def draft_vocabulary(
    samples: list[Sample], vocab_size: int, eos_ids: Collection[int], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft ids: `size` sorted target ids, to_draft [vocab_size]: each target id's draft id,
    -1 outside the draft vocabulary)."""
    prompt_ids = torch.cat([s.tokens[: s.prompt_len] for s in samples])
    freq = torch.bincount(answer_tokens(samples), minlength=vocab_size).double()
    freq += torch.bincount(prompt_ids, minlength=vocab_size) / (len(prompt_ids) + 1)
    freq[list(eos_ids)] = math.inf
    draft_ids = freq.topk(size).indices.sort().values
    to_draft = torch.full((vocab_size,), -1, dtype=torch.long)
    to_draft[draft_ids] = torch.arange(size)
    return draft_ids, to_draft


def new_draft(
    target: TextConfig,
    model: Llama4ForCausalLM,
    draft_ids: torch.Tensor,
    aux_layers: tuple[int, ...],
    intermediate_size: int | None,
) -> Eagle3Draft:
    """A draft shaped like one target layer over the vocabulary draft_ids (sorted target ids),
    sharing the target's embedding; its head starts as the target's (norm and lm_head rows), so
    it learns to predict in the target's final hidden space."""
    config = Eagle3Config(
        hidden_size=target.hidden_size,
        intermediate_size=intermediate_size or target.intermediate_size_mlp,
        num_attention_heads=target.num_attention_heads,
        num_key_value_heads=target.num_key_value_heads,
        head_dim=target.head_dim,
        rms_norm_eps=target.rms_norm_eps,
        rope_theta=target.rope_theta,
        rope_scaling=target.rope_scaling and {"rope_type": "llama3", **asdict(target.rope_scaling)},
        max_position_embeddings=target.max_position_embeddings,
        vocab_size=target.vocab_size,
        draft_vocab_size=len(draft_ids),
        target_hidden_size=target.hidden_size,
        aux_layers=aux_layers,
    )
    draft = Eagle3Draft(config)
    with torch.no_grad():
        draft.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
        draft.t2d[draft_ids] = True
        draft.lm_head.weight.copy_(model.lm_head.weight[draft_ids])
        draft.norm.weight.copy_(model.model.norm.weight)
    draft.set_embedding(model.model.embed_tokens.requires_grad_(False))
    return draft
