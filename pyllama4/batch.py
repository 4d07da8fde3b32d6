"""One step's model inputs as tensors, built from the core's StepPlan without copying on the host.

Invariant: every tensor here describes the same R requests and T tokens as the plan it came from
(decodes first, then prefill chunks); index tensors are int64 (what torch indexing wants).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from pyllama4._core import StepPlan


@dataclass(frozen=True)
class StepBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    global_slots: torch.Tensor  # [T] int64: page * page_size + offset in the global pool
    local_slots: torch.Tensor  # [T] int64: same in the local pool (-1 without one)
    rows: torch.Tensor  # [R] int64: block table row of each request
    sample_indices: torch.Tensor  # [S] int64: flat token index whose logits are sampled
    # Host copies (numpy, zero-copy views of the plan): the attention metadata is built from them.
    query_start: np.ndarray  # [R + 1]
    context_lens: np.ndarray  # [R]
    seq_lens: np.ndarray  # [R]
    num_decodes: int
    # Image features (multimodal prompts): the embeddings of tokens `embed_index` [K] are
    # replaced by `embeds` [K, hidden]; their token ids are radix-key ids, never embedded.
    embed_index: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    # Speculative verification with draft trees (pyllama4.speculative): the decode requests'
    # query tokens are tree nodes. tree_ancestors [D, Q, Q] bool (node j is node i or an
    # ancestor of i; padded past each request's query length) replaces the causal rule among
    # them, and positions hold each node's real position (context_len + depth), while slots stay
    # in node order. None: decodes are chains (causal).
    tree_ancestors: np.ndarray | None = None
    # Decode graphs (pyllama4.graphs): every token is a one-token decode and the attention
    # metadata comes from the device tensors alone (rows, positions), never the host arrays,
    # which then only give the shape. max_keys: the most keys any of its tokens may see.
    static_max_keys: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def from_plan(
        cls,
        plan: StepPlan,
        device: torch.device | str = "cpu",
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> StepBatch:
        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device=device, dtype=torch.int64, non_blocking=True)

        return cls(
            token_ids=dev(plan.token_ids),
            positions=dev(plan.positions),
            global_slots=dev(plan.global_slots),
            local_slots=dev(plan.local_slots),
            rows=dev(plan.rows),
            sample_indices=dev(plan.sample_indices),
            query_start=plan.query_start,
            context_lens=plan.context_lens,
            seq_lens=plan.seq_lens,
            num_decodes=plan.num_decodes,
            embed_index=None if embeds is None else embeds[0],
            embeds=None if embeds is None else embeds[1],
        )

    def with_tree(
        self, token_ids: torch.Tensor, positions: torch.Tensor, tree_ancestors: np.ndarray | None
    ) -> StepBatch:
        """This batch with other tokens at other positions in the same slots (draft tree nodes
        in the decodes' speculative slots) and, for trees, their ancestor masks."""
        return replace(
            self, token_ids=token_ids, positions=positions, tree_ancestors=tree_ancestors
        )

    def regrouped(
        self,
        index: torch.Tensor,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        query_start: np.ndarray,
        seq_lens: np.ndarray,
    ) -> StepBatch:
        """The same requests (rows, context lengths) over this batch's tokens `index` [T'],
        grouped per request by query_start [R + 1], with other token ids and positions: the
        slots are those of the tokens picked, and no image features or tree masks apply."""
        return replace(
            self,
            token_ids=token_ids,
            positions=positions,
            global_slots=self.global_slots[index],
            local_slots=self.local_slots[index],
            query_start=query_start,
            seq_lens=seq_lens,
            embed_index=None,
            embeds=None,
            tree_ancestors=None,
            static_max_keys=None,
        )
