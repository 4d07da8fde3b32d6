"""EAGLE3 speculative decoding inside one engine step: draft, verify, catch up.

Invariants:
- Output equals the target's alone: every token a request commits is the target's own (greedy:
  its argmax; sampled: accept_sampling's exact rejection rule over the sampler's processed
  distribution), whatever the draft proposed. The draft only decides how many come per step.
- The draft's KV lives in its own pool indexed by the target's GLOBAL slots, so the core's
  pages, prefix cache, retraction and chunk rules cover it unchanged: draft KV at position i is
  (token i+1, target state at i), written by the catch-up of the step that computed position i
  (every request of every step, speculative or not). A prefix hit reuses it like the target's.
- Drafting never writes the pools: draft tokens' keys and values stay in step-local tensors.
- Tree verification writes the target's KV at the slots of node order; the accepted path's
  entries are then moved to the slots of their real positions, so after commit the cache holds
  exactly what decoding the accepted tokens one by one would have written.
- Per block-table row, the draft state (pre-norm and normed output at the last position the
  catch-up computed) is what the next step's drafting starts from; rows are stable while a
  request runs and a re-admitted request rebuilds it during its prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pyllama4.batch import StepBatch
from pyllama4.layers import attention
from pyllama4.model.eagle3 import Eagle3Draft
from pyllama4.runner import ModelRunner
from pyllama4.sampler import SampleOutput, Sampler, SampleRequest
from pyllama4.sampling_params import SamplingParams
from pyllama4.speculative.tree import DraftTree, check_config, draft_tree
from pyllama4.speculative.verify import Acceptance, accept_greedy, accept_sampling


@dataclass(frozen=True)
class SpecConfig:
    """SGLang's --speculative-num-steps / --speculative-eagle-topk / -num-draft-tokens."""

    num_steps: int = 3
    topk: int = 1
    num_draft_tokens: int = 4

    def validate(self, draft_vocab: int) -> None:
        check_config(self.num_steps, self.topk, self.num_draft_tokens, draft_vocab)

    @property
    def reserve(self) -> int:
        """Speculative slots per decode beyond the last known token."""
        return self.num_draft_tokens - 1


def eligible(params: SamplingParams, has_grammar: bool) -> bool:
    """Requests that speculate: those whose processed distribution does not depend on the tokens
    before it in the same step (no penalties, logit_bias, min_tokens, grammar) and that ask for no
    logprobs or seeded reproducibility. The others decode one token per step alongside."""
    return (
        not has_grammar
        and params.logprobs is None
        and not params.logit_bias
        and params.repetition_penalty == 1.0
        and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0
        and params.min_tokens == 0
        and (params.temperature == 0.0 or params.seed is None)
    )


@dataclass
class SpecStats:
    verify_steps: int = 0  # (request, step) pairs that verified a draft
    accepted_tokens: int = 0  # tokens those steps committed (accepted drafts + bonus)

    @property
    def accept_length(self) -> float:
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


@dataclass
class SpecResult:
    """One step's outcome for the engine: counts[s] tokens per sample row, concatenated."""

    tokens: np.ndarray  # int32 [sum(counts)]
    counts: np.ndarray  # int32 [S]
    sampled: SampleOutput  # the sampler's output for every sample row (logprobs of non-spec rows)
    verified: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [S]


class _DraftPool:
    """The draft layer's KV as attention.prepare sees a cache: one global-pool layer."""

    def __init__(self, runner: ModelRunner, draft: Eagle3Draft, dtype: torch.dtype):
        cache = runner.cache
        c = draft.config
        slots = runner.memory.global_pages * cache.page_size
        shape = (slots, c.num_key_value_heads, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=runner.device)]
        self.v = [torch.zeros(shape, dtype=dtype, device=runner.device)]
        self.local_layers = (False,)
        self.chunk_size = None
        self.page_size = cache.page_size
        self.global_table = cache.global_table
        self.local_table = cache.local_table
        self.local_table_width = cache.local_table_width


def draft_kv_bytes_per_token(draft: Eagle3Draft, dtype: torch.dtype) -> int:
    c = draft.config
    return 2 * c.num_key_value_heads * c.head_dim * dtype.itemsize


class EagleWorker:
    def __init__(self, runner: ModelRunner, draft: Eagle3Draft, config: SpecConfig):
        config.validate(draft.config.draft_vocab_size)
        self.runner = runner
        self.draft = draft
        self.config = config
        model = runner.model
        dtype = next(model.parameters()).dtype
        draft.set_embedding(model.model.embed_tokens)
        self.capture = tuple(draft.config.aux_layers)
        self.pool = _DraftPool(runner, draft, dtype)
        rows, hidden = runner.cache.global_table.shape[0], draft.config.hidden_size
        self.state_prenorm = torch.zeros(rows, hidden, dtype=dtype, device=runner.device)
        self.state_normed = torch.zeros(rows, hidden, dtype=dtype, device=runner.device)
        self.vocab_size = model.config.vocab_size
        self.stats = SpecStats()

    def describe(self) -> str:
        c, d = self.config, self.draft.config
        return (
            f"speculative decoding: EAGLE3, {c.num_steps} steps, topk {c.topk}, "
            f"{c.num_draft_tokens} draft tokens verified per step; draft vocabulary "
            f"{d.draft_vocab_size}, target states from layers {list(d.aux_layers)}"
        )

    # ---- the step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(
        self,
        plan,
        requests: list[SampleRequest],
        sampler: Sampler,
        next_prompt_tokens: np.ndarray,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SpecResult:
        """Runs plan with speculation. next_prompt_tokens [R]: for a prefill chunk that does not
        end its prompt, the prompt token after it (else anything)."""
        runner, device = self.runner, self.runner.device
        runner.cache.apply_writes(plan)
        qs = plan.query_start.astype(np.int64)
        ctx = plan.context_lens.astype(np.int64)
        qlen = plan.seq_lens.astype(np.int64) - ctx
        num_decodes = plan.num_decodes
        spec = np.flatnonzero(qlen[:num_decodes] > 1)  # decodes with speculative slots
        batch = StepBatch.from_plan(plan, device, embeds)
        tree = None
        if spec.size:
            tree = self._draft(plan, spec, qs, ctx, qlen)
            batch = self._tree_batch(batch, tree, spec, qs, ctx, qlen, num_decodes)
        hidden, aux = runner.model.forward_with_aux(batch, runner.cache, self.capture)
        assert aux is not None
        logits = runner.model.logits(hidden[batch.sample_indices])
        sampled = sampler(logits, requests)
        sample_of = np.full(plan.num_requests, -1, dtype=np.int64)
        sample_of[plan.sample_requests] = np.arange(len(requests))
        counts = np.ones(len(requests), dtype=np.int64)
        width = 1 if tree is None else tree.num_nodes
        out = np.full((len(requests), width), -1, dtype=np.int64)
        out[:, 0] = sampled.tokens.cpu().numpy()
        verified = np.zeros(len(requests), dtype=bool)
        path = None
        if tree is not None:
            rows = sample_of[spec]
            acc = self._verify(tree, hidden, qs[spec], [requests[i] for i in rows], sampler)
            path = acc.nodes.cpu().numpy()
            counts[rows] = acc.counts.cpu().numpy()
            accepted = acc.tokens.cpu().numpy()
            out[rows, : accepted.shape[1]] = accepted
            verified[rows] = True
            self.stats.verify_steps += len(rows)
            self.stats.accepted_tokens += int(counts[rows].sum())
            if self.config.topk > 1:
                self._move_accepted_kv(batch, qs[spec], path, counts[rows])
        self._catch_up(plan, batch, aux, out, counts, sample_of, spec, path, next_prompt_tokens)
        flat = out[np.arange(width)[None, :] < counts[:, None]]
        return SpecResult(flat.astype(np.int32), counts.astype(np.int32), sampled, verified)

    # ---- drafting -------------------------------------------------------------------------

    def _draft(self, plan, spec: np.ndarray, qs, ctx, qlen) -> DraftTree:
        """Draft trees for the speculative decodes, truncated to each one's slots (fewer than
        num_draft_tokens near the context length)."""
        tree = self._propose(plan, spec, qs, ctx)
        slots = torch.from_numpy(qlen[spec]).to(self.runner.device)
        node = torch.arange(tree.num_nodes, device=slots.device)
        parents = torch.where(node < slots.unsqueeze(1), tree.parents, -2)  # beyond: no node
        return DraftTree(tree.tokens, parents, tree.depths, tree.ancestors)

    def _propose(self, plan, spec: np.ndarray, qs, ctx) -> DraftTree:
        """The draft model's trees (SGLang's top-k drafting) for the speculative decodes."""
        device = self.runner.device
        draft, c = self.draft, self.config
        rows = torch.from_numpy(plan.rows[spec].astype(np.int64)).to(device)
        root_pos = torch.from_numpy(ctx[spec]).to(device)
        roots = torch.from_numpy(plan.token_ids[qs[spec]].astype(np.int64)).to(device)
        keys, values, valid = self._context_kv(plan.rows[spec], ctx[spec])
        first = torch.log_softmax(draft.logits(self.state_normed[rows]), dim=-1)
        c_hidden = draft.config.hidden_size
        state = {"hidden": self.state_prenorm[rows].unsqueeze(1), "k": [], "v": [], "line": None}

        def step_fn(step: int, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            b, w = tokens.shape
            hidden = state["hidden"].gather(1, parents.unsqueeze(-1).expand(-1, -1, c_hidden))
            line = state["line"]
            line = (
                parents.unsqueeze(-1)
                if line is None
                else torch.cat([line.gather(1, _expand(parents, line)), parents.unsqueeze(-1)], 2)
            )
            if step == 1:
                line = line[:, :, :0]  # step-0 branches hold no keys of their own
            positions = (root_pos + step - 1).repeat_interleave(w)
            own: dict[str, torch.Tensor] = {}

            def attend(q, k, v):
                own["k"], own["v"] = k.view(b, w, *k.shape[1:]), v.view(b, w, *v.shape[1:])
                tree_k = [
                    state["k"][t].gather(1, _expand(line[:, :, t], state["k"][t]))
                    for t in range(line.shape[2])
                ] + [own["k"]]
                tree_v = [
                    state["v"][t].gather(1, _expand(line[:, :, t], state["v"][t]))
                    for t in range(line.shape[2])
                ] + [own["v"]]
                out = _tree_attention(
                    q.view(b, w, *q.shape[1:]),
                    keys,
                    values,
                    valid,
                    torch.stack(tree_k, 2),
                    torch.stack(tree_v, 2),
                    draft.scale,
                )
                return out.reshape(b * w, *q.shape[1:])

            prenorm, normed = draft(
                tokens.reshape(-1), hidden.reshape(b * w, -1), positions, attend
            )
            state["hidden"] = prenorm.view(b, w, -1)
            state["k"].append(own["k"])
            state["v"].append(own["v"])
            state["line"] = line
            return torch.log_softmax(draft.logits(normed), dim=-1).view(b, w, -1)

        return draft_tree(
            first,
            roots,
            step_fn,
            num_steps=c.num_steps,
            topk=c.topk,
            num_draft_tokens=c.num_draft_tokens,
            to_target=draft.to_target,
        )

    def _context_kv(self, rows: np.ndarray, lens: np.ndarray):
        """The draft pool's keys and values of positions [0, lens[b]) of each row, padded:
        ([B, K, kv, D], [B, K, kv, D], valid [B, K])."""
        device, p = self.runner.device, self.pool.page_size
        k_max = max(int(lens.max()), 1)
        pos = np.arange(k_max)
        valid = pos[None, :] < lens[:, None]
        table = self.pool.global_table
        pages = table[
            torch.from_numpy(rows.astype(np.int64)).to(device)[:, None],
            torch.from_numpy(pos // p).to(device)[None, :],
        ]
        slots = pages * p + torch.from_numpy(pos % p).to(device)
        valid_t = torch.from_numpy(valid).to(device)
        slots = torch.where(valid_t, slots, 0).reshape(-1)
        shape = (len(rows), k_max, *self.pool.k[0].shape[1:])
        keys = self.pool.k[0].index_select(0, slots).view(shape)
        values = self.pool.v[0].index_select(0, slots).view(shape)
        return keys, values, valid_t

    # ---- verification ---------------------------------------------------------------------

    def _tree_batch(self, batch: StepBatch, tree: DraftTree, spec, qs, ctx, qlen, num_decodes):
        """The plan's batch with the draft tokens in the speculative slots, their real
        positions and (for trees) the ancestor masks of the decodes."""
        device = self.runner.device
        n = tree.num_nodes
        j = np.arange(n)
        live = j[None, :] < qlen[spec][:, None]
        flat = torch.from_numpy((qs[spec][:, None] + j[None, :])[live]).to(device)
        live_t = torch.from_numpy(live).to(device)
        token_ids = batch.token_ids.clone()
        token_ids[flat] = tree.tokens[live_t]
        positions = batch.positions.clone()
        positions[flat] = (torch.from_numpy(ctx[spec]).to(device)[:, None] + tree.depths)[live_t]
        ancestors = None
        if self.config.topk > 1:
            ancestors = np.zeros((num_decodes, n, n), dtype=bool)
            ancestors[:, 0, 0] = True
            ancestors[spec] = tree.ancestors.cpu().numpy()
        return batch.with_tree(token_ids, positions, ancestors)

    def _verify(
        self,
        tree: DraftTree,
        hidden: torch.Tensor,
        starts: np.ndarray,
        requests: list[SampleRequest],
        sampler: Sampler,
    ) -> Acceptance:
        device = self.runner.device
        b, n = tree.tokens.shape
        flat = torch.from_numpy(starts).to(device)[:, None] + torch.arange(n, device=device)
        flat = flat.clamp(max=hidden.shape[0] - 1)  # truncated nodes read anything; never used
        logits = self.runner.model.logits(hidden[flat.reshape(-1)]).float().view(b, n, -1)
        greedy = np.array([r.params.temperature == 0.0 for r in requests])
        if greedy.all():
            return accept_greedy(tree, logits.argmax(dim=-1))
        parts: list[tuple[np.ndarray, Acceptance]] = []
        for rows in (np.flatnonzero(greedy), np.flatnonzero(~greedy)):
            if rows.size == 0:
                continue
            idx = torch.from_numpy(rows).to(device)
            sub = DraftTree(
                *(t[idx] for t in (tree.tokens, tree.parents, tree.depths, tree.ancestors))
            )
            if greedy[rows[0]]:
                parts.append((rows, accept_greedy(sub, logits[idx].argmax(dim=-1))))
            else:
                probs = sampler.probabilities(
                    logits[idx].reshape(rows.size * n, -1), [requests[i] for i in rows], n
                )
                parts.append((rows, accept_sampling(sub, probs.view(rows.size, n, -1))))
        depth = max(a.nodes.shape[1] for _, a in parts)
        nodes = torch.full((b, depth), -1, dtype=torch.int64, device=device)
        tokens = torch.full((b, depth), -1, dtype=torch.int64, device=device)
        counts = torch.empty(b, dtype=torch.int64, device=device)
        for rows, a in parts:
            idx = torch.from_numpy(rows).to(device)
            nodes[idx, : a.nodes.shape[1]] = a.nodes
            tokens[idx, : a.tokens.shape[1]] = a.tokens
            counts[idx] = a.counts
        return Acceptance(nodes, tokens, counts)

    def _move_accepted_kv(self, batch: StepBatch, starts, path: np.ndarray, counts) -> None:
        """Moves the accepted nodes' target KV from their node slots to their positions' slots
        (node d of the path goes to slot order d); chains never move."""
        depth = np.arange(path.shape[1])[None, :]
        move = (depth < counts[:, None]) & (path != depth) & (path >= 0)
        if not move.any():
            return
        device = self.runner.device
        src = torch.from_numpy((starts[:, None] + path)[move]).to(device)
        dst = torch.from_numpy((starts[:, None] + depth)[move]).to(device)
        cache = self.runner.cache
        for layer, local in enumerate(cache.local_layers):
            slots = batch.local_slots if local else batch.global_slots
            for pool in (cache.k[layer], cache.v[layer]):
                pool.index_copy_(0, slots[dst], pool.index_select(0, slots[src]))

    # ---- catch-up -------------------------------------------------------------------------

    def _catch_up(self, plan, batch, aux, out, counts, sample_of, spec, path, next_prompt):
        """Draft KV for every position the step computed (accepted ones for speculative
        decodes), and the draft state at each request's last one."""
        device = self.runner.device
        qs = plan.query_start.astype(np.int64)
        ctx = plan.context_lens.astype(np.int64)
        qlen = plan.seq_lens.astype(np.int64) - ctx
        num = plan.num_requests
        m = qlen.copy()
        m[: plan.num_decodes] = 1
        has_sample = sample_of >= 0
        m[spec] = counts[sample_of[spec]]
        total = int(m.sum())
        seg = np.repeat(np.arange(num), m)
        start = np.concatenate([[0], np.cumsum(m)])
        within = np.arange(total) - start[seg]
        src = qs[seg] + within  # flat index of each catch-up row's target state
        if spec.size:
            is_spec = np.zeros(num, dtype=bool)
            is_spec[spec] = True
            order = np.full(num, -1)
            order[spec] = np.arange(spec.size)
            rows = is_spec[seg]
            src[rows] = qs[seg[rows]] + path[order[seg[rows]], within[rows]]
        # The token after each row's position: the next one in the step, else what follows.
        plan_tokens = plan.token_ids.astype(np.int64)
        nxt = plan_tokens[np.minimum(qs[seg] + within + 1, len(plan_tokens) - 1)]
        last = within == m[seg] - 1
        after = next_prompt.copy()
        after[has_sample] = out[sample_of[has_sample], 0]
        nxt[last] = after[seg[last]]
        if spec.size:
            nxt[rows] = out[sample_of[seg[rows]], within[rows]]
        nxt = np.where((nxt >= 0) & (nxt < self.vocab_size), nxt, 0)  # image key ids
        dst_flat = torch.from_numpy(qs[seg] + within).to(device)
        cu = batch.regrouped(
            dst_flat,
            token_ids=torch.from_numpy(nxt).to(device),
            positions=torch.from_numpy(ctx[seg] + within).to(device),
            query_start=start.astype(np.int32),
            seq_lens=(ctx + m).astype(np.int32),
        )
        meta = attention.prepare(cu, self.pool, local=False)
        pool = self.pool

        def attend(q, k, v):
            return attention.paged_attention(
                q, k, v, pool.k[0], pool.v[0], cu.global_slots, meta, self.draft.scale
            )

        hidden = self.draft.fuse(aux[torch.from_numpy(src).to(device)])
        prenorm, normed = self.draft(cu.token_ids, hidden, cu.positions, attend)
        ends = torch.from_numpy(start[1:] - 1).to(device)
        self.state_prenorm[batch.rows] = prenorm[ends]
        self.state_normed[batch.rows] = normed[ends]


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """index [B, W] -> a gather index over dim 1 of `like` [B, W', ...]."""
    shape = (*index.shape, *like.shape[2:])
    return index.view(*index.shape, *([1] * (like.dim() - 2))).expand(shape)


def _tree_attention(q, keys, values, valid, tree_k, tree_v, scale: float) -> torch.Tensor:
    """q [B, W, H, D] over context keys [B, K, kv, D] (valid [B, K]) and each row's own path of
    tree keys [B, W, S, kv, D] (all visible) -> [B, W, H, D], in float32."""
    b, w, h, d = q.shape
    group = h // keys.shape[2]
    qf = q.float()
    kc = keys.float().repeat_interleave(group, dim=2)  # [B, K, H, D]
    vc = values.float().repeat_interleave(group, dim=2)
    kt = tree_k.float().repeat_interleave(group, dim=3)  # [B, W, S, H, D]
    vt = tree_v.float().repeat_interleave(group, dim=3)
    s_ctx = torch.einsum("bwhd,bkhd->bwhk", qf, kc) * scale
    s_ctx = s_ctx.masked_fill(~valid[:, None, None, :], float("-inf"))
    s_tree = torch.einsum("bwhd,bwshd->bwhs", qf, kt) * scale
    p = F.softmax(torch.cat([s_ctx, s_tree], dim=-1), dim=-1)
    k = keys.shape[1]
    out = torch.einsum("bwhk,bkhd->bwhd", p[..., :k], vc)
    out = out + torch.einsum("bwhs,bwshd->bwhd", p[..., k:], vt)
    return out.to(q.dtype)
