"""EAGLE3 speculative decoding in the engine: outputs are exactly the target's.

Tiny random Scout-like target (chunk-local attention with chunk 8, so drafts and accepted runs
cross chunk boundaries; page size 4) with the demo tokenizer, fp32 on the CPU, and a random
EAGLE3 draft (SGLang's layout, draft vocabulary 512 mapped into the target's by d2t).

- The real draft (chain topk 1 and trees topk 2 / 4): 16 prompts in one batch give the greedy
  tokens of the engine without speculation, with the radix cache on (prompts sharing prefixes),
  chunked prefill and a pool small enough to retract; KV accounting is clean afterwards.
- A random draft is almost never right, so acceptance is exercised by an oracle: a worker whose
  drafts are the target's own continuation, cut wrong after a varying number of tokens, as a
  chain and as trees where the right token is a later sibling (so accepted KV must move from
  node slots to position slots). Same identity, accept length well above 1.
- Sampling (temperature > 0) with speculation runs and ends every request; its exactness is
  tests/test_spec_verify.py's chi-square test of the acceptance rule.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pyllama4 import Engine, SamplingParams
from pyllama4.config import TextConfig
from pyllama4.loading.eagle3 import save_eagle3
from pyllama4.model.eagle3 import Eagle3Config, Eagle3Draft
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner
from pyllama4.speculative.eagle import EagleWorker, SpecConfig, draft_kv_bytes_per_token
from pyllama4.speculative.tree import DraftTree
from tiny_models import tiny_engine_model

VOCAB = 49152
DRAFT_VOCAB = 512
CONTEXT = 192
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def target_weights():
    hf = tiny_engine_model(VOCAB, peaked=False)
    return TextConfig.from_dict(hf.config.to_dict()), hf.state_dict()


def draft_config(num_layers: int) -> Eagle3Config:
    return Eagle3Config.from_dict(
        {
            "architectures": ["LlamaForCausalLMEagle3"],
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 1024,
            "vocab_size": VOCAB,
            "draft_vocab_size": DRAFT_VOCAB,
        },
        num_layers,
    )


@pytest.fixture(scope="module")
def draft(target_weights) -> Eagle3Draft:
    config, _ = target_weights
    torch.manual_seed(1)
    model = Eagle3Draft(draft_config(config.num_hidden_layers))
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    with torch.no_grad():
        hot = torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values
        model.d2t.copy_(hot - torch.arange(DRAFT_VOCAB))
        model.t2d.zero_()
        model.t2d[hot] = True
    return model.eval()


def make_engine(target_weights, tokenizer, draft=None, spec=None, worker=EagleWorker, **opts):
    config, state = target_weights
    model = Llama4ForCausalLM(config)
    model.load_state_dict(state, strict=False)
    options = {"kv_tokens": 4096, "page_size": 4, "max_step_tokens": 256, **opts}
    if draft is not None:
        options["extra_global_bytes_per_token"] = draft_kv_bytes_per_token(draft, torch.float32)
    runner = ModelRunner(model.eval(), context_len=CONTEXT, **options)
    scheduler = runner.new_scheduler()
    spec_worker = None if draft is None else worker(runner, draft, spec)
    if spec_worker is not None:
        spec_worker.scheduler = scheduler  # what the spies below read sequences from
    return Engine(runner, tokenizer, scheduler=scheduler, speculative=spec_worker)


def prompts(count: int, seed: int) -> list[list[int]]:
    """count prompts, pairs of which share a prefix of 13-30 tokens (radix hits mid-chunk)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(100, VOCAB, (n,), generator=g).tolist()
        if i % 2 and out:
            ids = out[-1][: int(torch.randint(13, 31, (1,), generator=g))] + ids
        out.append(ids)
    return out


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_nothing_held(engine: Engine) -> None:
    s = engine.scheduler.stats()
    assert s.num_running == s.num_waiting == 0
    assert s.global_total - s.global_free == s.global_cached, "requests still hold global pages"
    assert s.local_total - s.local_free == s.local_cached, "requests still hold local pages"
    assert engine.scheduler.check() == ""


@pytest.fixture(scope="module")
def batch_and_reference(target_weights, tokenizer):
    batch = prompts(16, seed=3)
    engine = make_engine(target_weights, tokenizer)
    return batch, tokens_of(engine.generate(batch, GREEDY))


SPECS = {
    "chain": SpecConfig(num_steps=3, topk=1, num_draft_tokens=4),
    "tree2": SpecConfig(num_steps=3, topk=2, num_draft_tokens=6),
    "tree4": SpecConfig(num_steps=2, topk=4, num_draft_tokens=8),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_the_real_draft_changes_no_token(
    target_weights, tokenizer, draft, batch_and_reference, name
):
    batch, ref = batch_and_reference
    engine = make_engine(target_weights, tokenizer, draft, SPECS[name])
    assert tokens_of(engine.generate(batch, GREEDY)) == ref
    stats = engine.speculative.stats
    assert stats.verify_steps > 0 and stats.accept_length >= 1.0
    assert engine.stats().cache_hit_rate > 0
    assert_nothing_held(engine)


def test_chunked_prefill_and_retraction_change_no_token(target_weights, tokenizer, draft):
    batch = prompts(12, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = tokens_of(make_engine(target_weights, tokenizer).generate(batch, params))
    engine = make_engine(
        target_weights, tokenizer, draft, SPECS["tree2"], kv_tokens=CONTEXT, max_step_tokens=24
    )
    assert tokens_of(engine.generate(batch, params)) == ref
    assert engine.stats().num_retractions > 0
    assert_nothing_held(engine)


class OracleWorker(EagleWorker):
    """Drafts the target's own continuation (from a reference run), wrong after a number of
    tokens that cycles with the position; as a chain, or as a tree in which every level has a
    wrong sibling first and the right token second (so accepted nodes sit off their positions)."""

    references: list[list[int]] = []

    def _propose(self, plan, spec, qs, ctx) -> DraftTree:
        n = self.config.num_draft_tokens
        chain = self.config.topk == 1
        tokens = np.zeros((len(spec), n), dtype=np.int64)
        for b, r in enumerate(spec):
            seq = self.scheduler.request_tokens(int(plan.request_ids[r]))
            full = next(f for f in self.references if f[: len(seq)] == list(seq))
            depth = (n - 1) if chain else (n - 1) // 2
            future = full[len(seq) : len(seq) + depth] + [0] * depth
            right = len(seq) % (depth + 2)  # drafts after this many are wrong
            guess = [t if i < right else (t + 1) % VOCAB for i, t in enumerate(future[:depth])]
            tokens[b, 0] = seq[-1]
            if chain:
                tokens[b, 1:] = guess
            else:
                for d, t in enumerate(guess):
                    tokens[b, 1 + 2 * d], tokens[b, 2 + 2 * d] = (t + 7) % VOCAB, t
        if chain:
            parents = np.arange(n) - 1
        else:  # node 2d+1 (wrong) and 2d+2 (right) are children of the right node above
            parents = np.array([-1] + [max(0, 2 * (i // 2)) for i in range(n - 1)])
        depths = np.zeros(n, dtype=np.int64)
        for i in range(1, n):
            depths[i] = depths[parents[i]] + 1
        ancestors = np.eye(n, dtype=bool)
        for i in range(1, n):
            ancestors[i] |= ancestors[parents[i]]
        device = self.runner.device
        b = len(spec)

        def batched(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.broadcast_to(a, (b, *a.shape)).copy()).to(device)

        return DraftTree(
            torch.from_numpy(tokens).to(device),
            batched(parents),
            batched(depths),
            batched(ancestors),
        )


@pytest.mark.parametrize(
    "spec",
    [SpecConfig(3, 1, 4), SpecConfig(3, 2, 7), SpecConfig(4, 2, 9)],
    ids=["chain", "tree-depth3", "tree-depth4"],
)
def test_accepted_drafts_give_exactly_the_target_tokens(
    target_weights, tokenizer, draft, batch_and_reference, spec
):
    batch, ref = batch_and_reference
    OracleWorker.references = [p + r for p, r in zip(batch, ref, strict=True)]
    engine = make_engine(
        target_weights, tokenizer, draft, spec, worker=OracleWorker, max_step_tokens=24
    )
    assert tokens_of(engine.generate(batch, GREEDY)) == ref
    assert engine.speculative.stats.accept_length > 1.8
    assert_nothing_held(engine)


def test_sampling_with_speculation_ends_every_request(target_weights, tokenizer, draft):
    engine = make_engine(target_weights, tokenizer, draft, SPECS["tree2"])
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True)
    outputs = engine.generate(prompts(8, seed=5), params)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
    assert engine.speculative.stats.verify_steps > 0
    assert_nothing_held(engine)


def test_requests_that_cannot_speculate_decode_alongside(
    target_weights, tokenizer, draft, batch_and_reference
):
    """Penalties and logprobs make a request decode one token a step (no reserve), in the same
    batches as speculating ones; both give the target's tokens."""
    batch, ref = batch_and_reference
    engine = make_engine(target_weights, tokenizer, draft, SPECS["chain"])
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    params = [GREEDY if i % 2 else plain for i in range(len(batch))]
    outputs = engine.generate(batch, params)
    assert tokens_of(outputs) == ref
    assert all(len(o.outputs[0].logprobs) == 20 for o in outputs[::2])
    assert_nothing_held(engine)


def test_from_checkpoint_loads_a_draft(tmp_path, demo_dir, draft):
    """A draft saved in SGLang's layout serves through Engine.from_checkpoint; the memory plan
    counts its KV in the global pool's bytes per token."""
    target = TextConfig.from_dict(json.loads((demo_dir / "config.json").read_text()))
    config = dataclasses.replace(
        draft_config(target.num_hidden_layers),
        hidden_size=target.hidden_size,
        target_hidden_size=target.hidden_size,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    model = Eagle3Draft(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    model.d2t.copy_(draft.d2t)
    model.t2d.copy_(draft.t2d)
    save_eagle3(model, tmp_path / "draft")
    plain = Engine.from_checkpoint(demo_dir, dtype=torch.float32, kv_tokens=512, progress=False)
    engine = Engine.from_checkpoint(
        demo_dir,
        dtype=torch.float32,
        kv_tokens=512,
        progress=False,
        speculative_draft=tmp_path / "draft",
        speculative=SpecConfig(2, 1, 3),
    )
    extra = 2 * 3 * 64 * 4
    assert (
        engine.runner.memory.global_bytes_per_token
        == plain.runner.memory.global_bytes_per_token + extra
    )
    params = SamplingParams(temperature=0.0, max_tokens=8)
    text = ["What is the capital of France?"]
    assert tokens_of(engine.generate(text, params)) == tokens_of(plain.generate(text, params))


class RecordingWorker(EagleWorker):
    """Records each request's known tokens and the chain the real draft proposed for it."""

    records: list[tuple[list[int], list[int]]] = []

    def _propose(self, plan, spec, qs, ctx) -> DraftTree:
        tree = super()._propose(plan, spec, qs, ctx)
        for b, r in enumerate(spec):
            seq = list(self.scheduler.request_tokens(int(plan.request_ids[r])))
            self.records.append((seq, tree.tokens[b, 1:].tolist()))
        return tree


def test_drafting_equals_the_draft_run_densely(target_weights, tokenizer, draft):
    """The draft's chain from the engine (catch-up KV written chunk by chunk in the paged pool,
    drafting keys kept step-local) equals the draft run densely over the whole history: inputs
    (token i+1, fused target state at i) for known positions, then its own pre-norm output for
    each drafted one, causal attention over all of them."""
    from oracles import dense_causal_attend

    from pyllama4.speculative.train.capture import prefill_capture

    RecordingWorker.records = []
    engine = make_engine(
        target_weights, tokenizer, draft, SPECS["chain"], worker=RecordingWorker, max_step_tokens=8
    )
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.generate([prompts(1, seed=9)[0] + list(range(300, 320))], params)
    assert len(RecordingWorker.records) >= 3
    config, state = target_weights
    target = Llama4ForCausalLM(config)
    target.load_state_dict(state, strict=False)
    runner = ModelRunner(target.eval(), context_len=CONTEXT, kv_tokens=1024, page_size=4)
    attend = dense_causal_attend(draft.scale)
    for seq, proposed in RecordingWorker.records[:4]:
        n = len(seq) - 1  # the root (last known token) sits at position n, not computed yet
        aux = prefill_capture(runner, [seq[:n]], draft.config.aux_layers)[0][0]
        tokens, hidden = seq[1:], draft.fuse(aux)
        chain = []
        with torch.no_grad():
            for _ in range(len(proposed)):
                positions = torch.arange(len(tokens))
                prenorm, normed = draft(torch.tensor(tokens), hidden, positions, attend)
                nxt = int(draft.to_target(draft.logits(normed[-1:]).argmax(-1)))
                chain.append(nxt)
                tokens, hidden = tokens + [nxt], torch.cat([hidden, prenorm[-1:]])
        assert chain == proposed
