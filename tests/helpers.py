"""Test-only helpers over the engine's parts, kept off the serving path.

- `greedy_generate`: offline greedy decoding of a batch of prompts on a ModelRunner.
- `processed_logits`: the logits a Sampler takes each row's token from.
- `chain_tree`: a DraftTree that is a single chain per request.

Test modules import it as `helpers` (pyproject.toml puts tests/ on pytest's pythonpath).
"""

from __future__ import annotations

import numpy as np
import torch

from pyllama4._core import Scheduler
from pyllama4.runner import ModelRunner
from pyllama4.sampler import Sampler, SampleRequest
from pyllama4.speculative.tree import DraftTree


def greedy_generate(
    runner: ModelRunner,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...] = (),
    scheduler: Scheduler | None = None,
) -> list[list[int]]:
    """Offline greedy decoding of a batch of prompts, planned by `scheduler` (default: a new one
    of the runner's, so callers may reuse the runner)."""
    sched = scheduler or runner.new_scheduler()
    outputs: dict[int, list[int]] = {}
    base = 1 << 40  # request ids of this call
    for i, prompt in enumerate(prompts):
        sched.add_request(
            base + i,
            np.asarray(prompt, dtype=np.int32),
            max_new_tokens=max_new_tokens,
            stop_token_ids=list(stop_token_ids),
        )
        outputs[base + i] = []
    while sched.has_work():
        plan = sched.schedule()
        tokens = runner.forward(plan).argmax(-1).to(torch.int32).cpu().numpy()
        ids = plan.request_ids[plan.sample_requests]
        for rid, token in zip(ids.tolist(), tokens.tolist(), strict=True):
            outputs[rid].append(token)
        sched.commit(tokens)
    return [outputs[base + i] for i in range(len(prompts))]


def processed_logits(
    sampler: Sampler, logits: torch.Tensor, requests: list[SampleRequest]
) -> torch.Tensor:
    """The logits each row's token is taken from (greedy rows: the argmax of theirs; sampled
    rows: after temperature and top_k/top_p/min_p, dropped tokens -inf), from the sampler's own
    stages."""
    plan = sampler._plan(logits, requests)
    x, _ = sampler._penalized(logits, requests, plan)
    x = x.clone()
    if plan.sampled.size:
        x[sampler._tensor(plan.sampled)] = sampler._warped(x, plan, owned=False)
    return x


def chain_tree(root_tokens: torch.Tensor, drafts: torch.Tensor) -> DraftTree:
    """The chain root -> drafts[:, 0] -> ... -> drafts[:, K-1]: K + 1 nodes; [B], [B, K]."""
    bsz, k = drafts.shape
    index = torch.arange(k + 1, device=drafts.device)
    return DraftTree(
        tokens=torch.cat([root_tokens.unsqueeze(1), drafts], dim=1),
        parents=(index - 1).expand(bsz, -1).clone(),
        depths=index.expand(bsz, -1).clone(),
        ancestors=(index.unsqueeze(1) >= index).expand(bsz, -1, -1).clone(),
    )
