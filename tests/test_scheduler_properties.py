"""Property-based tests of the batch scheduler against a small pure-Python model of its semantics.

A `Harness` drives a `pyllama4.Scheduler` the way the engine does (schedule, run the model,
commit) and plays the model runner itself:

* Sampling is a deterministic function of (extra_key, all tokens so far), so the full output of
  every request follows from its prompt alone. Whatever the scheduler does (chunked prefill,
  prefix reuse, retraction and recompute, speculative slots), the tokens it reports must be that
  sequence, ending for the right reason.
* The KV tensors are simulated as one dict per pool: slot -> identity of the token whose KV the
  slot holds, where the identity of position j is (extra_key, j, hash of tokens[0..j]). Every step
  writes the identities of the positions it schedules into the plan's slots, then checks every key
  each scheduled query attends to (all earlier positions on global layers, the current attention
  chunk on chunk-local layers) through the plan's block tables. A page handed to two owners, a
  cached page with the wrong content, a stale block table or a skipped position shows up as a
  wrong identity.
* Liveness: every accepted request ends (commit's Finished or abort), and at the end nothing is
  held by requests.

`SchedulerMachine` runs random add / step / abort / flush sequences through the harness with tiny
pools (so retraction is frequent) and checks `Scheduler.check()` after every operation.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pyllama4 import Scheduler

settings.register_profile(
    "scheduler",
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "scheduler-long",
    max_examples=2000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# SCHEDULER_PROFILE=scheduler-long runs a much longer search (minutes) without editing this file.
PROFILE = settings.get_profile(os.environ.get("SCHEDULER_PROFILE", "scheduler"))

VOCAB = 5  # sampled tokens are 0..VOCAB-1
STOP_SETS = [(), (), (0,), (3,), (1, 4)]  # () twice: more requests run to their length
# Prompts are one of these prefixes plus a short random tail over the same small alphabet, so that
# requests share prefixes (with each other and with earlier outputs) and the radix cache gets hits.
PREFIXES = [
    (),
    (1, 2),
    (1, 2, 3, 1, 2),
    (1, 2, 3, 1, 2, 2, 4, 1, 3),
    (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2),
    (1, 2, 3, 1, 2, 2, 4, 1, 3, 3, 3, 0, 1, 4, 2),
]
MAX_DRAIN_STEPS = 10_000
# init_new_token_ratio: 0 admits eagerly, so decodes run out of pages and retraction is common.
RATIOS = [0.0, 0.0, 0.3, 0.7, 1.0]
# One request for the state machine: (prefix, tail, max_new_tokens, stop ids, extra key, reserve).
REQUEST = st.tuples(
    st.sampled_from(PREFIXES).map(list),
    st.lists(st.integers(0, VOCAB - 1), max_size=8),
    st.integers(1, 16),
    st.sampled_from(STOP_SETS),
    st.sampled_from([0, 1]),
    st.integers(0, 3),
)


# ---- the model -----------------------------------------------------------------------------------


def sample(extra_key: int, tokens) -> int:
    """The "model": the next token is a stable hash of (extra_key, every token so far)."""
    data = struct.pack("<Q", extra_key) + np.asarray(tokens, dtype=np.int32).tobytes()
    return zlib.crc32(data) % VOCAB


def expected_output(prompt, extra_key, max_new_tokens, stop_ids, context_len):
    """The whole output a request must produce, and its finish reason."""
    tokens = list(prompt)
    limit = min(max_new_tokens, context_len - len(prompt))
    out = []
    while True:
        t = sample(extra_key, tokens)
        tokens.append(t)
        out.append(t)
        if t in stop_ids:
            return out, "stop"
        if len(out) >= limit:
            return out, "length"


def chain(prev: int, token: int) -> int:
    """Running hash of a token prefix (int tuples hash deterministically in CPython)."""
    return hash((prev, token))


def identities(extra_key: int, tokens, start_hash: int = 0, start_pos: int = 0):
    """KV identity of each position: (extra_key, position, hash of the tokens up to it)."""
    out, h = [], start_hash
    for k, t in enumerate(tokens):
        h = chain(h, t)
        out.append((extra_key, start_pos + k, h))
    return out


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Req:
    rid: int
    prompt: list
    extra_key: int
    max_new: int  # as given
    stop_ids: tuple
    reserve: int
    expected: list  # full expected output
    reason: str
    tokens: list = field(default_factory=list)  # prompt + output so far
    ids: list = field(default_factory=list)  # KV identity of each position of tokens
    running: bool = False
    computed: int = 0  # tokens whose KV the scheduler considers computed
    retractions: int = 0

    def append(self, token: int) -> None:
        prev = self.ids[-1][2] if self.ids else 0
        self.ids.append((self.extra_key, len(self.tokens), chain(prev, token)))
        self.tokens.append(token)

    @property
    def output(self):
        return self.tokens[len(self.prompt) :]


class Harness:
    """A Scheduler plus the oracle. Every public method checks everything it can afterwards."""

    def __init__(self, *, spec: bool = False, **config):
        self.sched = Scheduler(**config)
        self.P = config.get("page_size", 16)
        self.C = config.get("chunk_size", 0)
        self.ctx = config.get("context_len", 8192)
        self.global_pages = config["global_pages"]
        self.local_pages = config.get("local_pages", 0)
        self.max_running = config.get("max_running", 256)
        self.max_step_tokens = config.get("max_step_tokens", 8192)
        self.cache_on = config.get("enable_prefix_cache", True)
        self.spec = spec  # commit with counts (speculative decoding)
        self.kv = {"g": {}, "l": {}}  # pool -> slot -> identity
        self.reqs: dict[int, Req] = {}  # outstanding requests
        self.finished: dict[int, tuple] = {}  # rid -> (output, reason)
        self.used_ids: set[int] = set()
        self.next_id = 0
        self.steps = 0
        self.num_retractions = 0
        self.num_admissions = 0
        self.cached_hits = 0
        self.max_local_pages_seen = 0
        self.accepted_drafts = 0  # drafts accepted by speculative commits (count - 1, summed)
        self.spec_decodes = 0  # decodes scheduled with speculative slots
        self.rng = random.Random(0)
        # The model runner's block tables, kept only through the writes each plan carries.
        # -1: never written (a read of it fails the KV oracle below).
        assert self.sched.global_table_width == ceil_div(self.ctx, self.P)
        assert self.sched.local_table_width == (
            self.C // self.P + ceil_div(self.max_step_tokens, self.P) if self.C else 0
        )
        self.gtab = np.full((self.max_running, self.sched.global_table_width), -1, np.int64)
        self.ltab = np.full((self.max_running, max(1, self.sched.local_table_width)), -1, np.int64)

    # ---- operations ----------------------------------------------------------------------------

    def add(self, prompt, max_new, stop_ids=(), extra_key=0, reserve=0, rid=None):
        """Adds a request; returns its id, or None when the scheduler (correctly) refused it."""
        s = self.sched
        if rid is None:
            rid = self.next_id
            self.next_id += 1
        prompt = list(prompt)
        n = len(prompt)
        error = None
        if rid in self.reqs:
            error = "already in use"
        elif n == 0:
            error = "empty"
        elif n >= self.ctx:
            error = "context length"
        elif max_new < 1:
            error = "max_new_tokens"
        elif ceil_div(n + min(max_new, self.ctx - n) + reserve, self.P) > self.global_pages:
            error = "pages"
        elif reserve + 1 > self.max_step_tokens:
            error = "step token budget"
        elif self.C and self.C // self.P + ceil_div(1 + reserve, self.P) > self.local_pages:
            error = "chunk-local pool"
        before = s.stats()
        args = (rid, np.array(prompt, dtype=np.int32), max_new, list(stop_ids), extra_key, reserve)
        if error is not None:
            with pytest.raises(ValueError, match=error):
                s.add_request(*args)
            after = s.stats()
            assert after.num_waiting == before.num_waiting
            assert after.num_running == before.num_running
            return None
        s.add_request(*args)
        expected, reason = expected_output(prompt, extra_key, max_new, stop_ids, self.ctx)
        r = Req(rid, prompt, extra_key, max_new, tuple(stop_ids), reserve, expected, reason)
        for t in prompt:
            r.append(t)
        self.reqs[rid] = r
        self.used_ids.add(rid)
        assert s.has_request(rid)
        assert s.stats().num_waiting == before.num_waiting + 1
        info = s.request_info(rid)
        assert not info.running and info.num_tokens == n and info.num_computed == 0
        return rid

    def abort(self, rid) -> bool:
        s = self.sched
        live = rid in self.reqs
        assert s.abort(rid) is live, f"abort({rid}) disagrees with liveness {live}"
        if live:
            del self.reqs[rid]
        assert not s.has_request(rid)
        assert s.abort(rid) is False, "a second abort must find nothing"
        return live

    def flush(self) -> int:
        s = self.sched
        before = s.stats()
        freed = s.flush_cache()
        after = s.stats()
        # Only unlocked tree pages are evictable, and nobody else holds them: each one is freed.
        assert freed == before.global_evictable
        assert after.global_evictable == 0 and after.local_evictable == 0
        assert after.global_free == before.global_free + freed
        assert after.global_cached == before.global_cached - freed
        # Dropping a global page drops its local page too, so every unlocked local page goes.
        assert after.local_free == before.local_free + before.local_evictable
        assert after.local_cached == before.local_cached - before.local_evictable
        self.check_state()
        return freed

    def step(self, abort_in_flight=()):
        """schedule + (simulated forward pass) + commit. Returns the plan's request ids."""
        s = self.sched
        P, C = self.P, self.C
        had_work = s.has_work()
        assert had_work == bool(self.reqs)
        decodes_before = {
            rid for rid, r in self.reqs.items() if r.running and r.computed == len(r.tokens) - 1
        }
        plan = s.schedule()
        self.steps += 1
        R, T = plan.num_requests, plan.num_tokens
        if not had_work:
            assert R == 0 and not s.plan_in_flight
            return []
        assert R > 0, "schedule() returned an empty plan although requests are waiting/running"
        assert s.plan_in_flight
        with pytest.raises(RuntimeError):
            s.schedule()  # exactly one plan in flight

        rids = plan.request_ids.tolist()
        qs = plan.query_start.tolist()
        ctxs = plan.context_lens.tolist()
        seqs = plan.seq_lens.tolist()
        tok = plan.token_ids.tolist()
        pos = plan.positions.tolist()
        gslots = plan.global_slots.tolist()
        lslots = plan.local_slots.tolist()
        rows = plan.rows.tolist()
        lw = self.sched.local_table_width
        gidx, gval = plan.global_table_index, plan.global_table_values
        lidx, lval = plan.local_table_index, plan.local_table_values
        assert gidx.shape == gval.shape and lidx.shape == lval.shape
        assert ((0 <= gval) & (gval < self.global_pages)).all()
        assert ((0 <= lval) & (lval < max(1, self.local_pages))).all()
        for idx, val in ((gidx, gval), (lidx, lval)):  # repeated entries must agree
            first = {}
            for k, v in zip(idx.tolist(), val.tolist(), strict=True):
                assert first.setdefault(k, v) == v, f"table entry {k} written twice differently"
        self.gtab.reshape(-1)[gidx] = gval
        if C:
            self.ltab.reshape(-1)[lidx] = lval
        else:
            assert lidx.size == 0 and lw == 0
        nd = plan.num_decodes
        assert len(set(rids)) == R, "a request appears twice in one plan"
        assert len(qs) == R + 1 and qs[0] == 0 and qs[-1] == T
        assert len(ctxs) == len(seqs) == len(rows) == R
        assert len(set(rows)) == R and all(0 <= row < self.max_running for row in rows)
        assert len(pos) == len(gslots) == len(lslots) == T
        assert 0 <= nd <= R

        # ---- retractions and admissions, seen through request_info ----------------------------
        retracted_now = 0
        admitted = []
        infos = {rid: s.request_info(rid) for rid in self.reqs}
        for rid, r in self.reqs.items():
            info = infos[rid]
            assert info.num_retractions >= r.retractions
            if info.num_retractions > r.retractions:
                assert r.running, "a waiting request was retracted"
                retracted_now += info.num_retractions - r.retractions
                r.retractions = info.num_retractions
                r.running, r.computed = False, 0
                decodes_before.discard(rid)
        assert retracted_now == plan.num_retracted
        self.num_retractions += retracted_now
        in_plan = set(rids)
        survivors = [r for r in self.reqs.values() if r.running]  # running before and after
        for rid, r in self.reqs.items():
            if r.running and rid not in in_plan:
                assert rid not in decodes_before, f"decode of request {rid} was starved"
                assert infos[rid].running

        # ---- per-request structure -------------------------------------------------------------
        decode_tokens = prefill_tokens = 0
        sampling = []
        known_of = []
        for i, rid in enumerate(rids):
            assert rid in self.reqs, f"plan schedules request {rid}, which is not live"
            r = self.reqs[rid]
            n = len(r.tokens)
            ctx, seq = ctxs[i], seqs[i]
            q = seq - ctx
            assert q == qs[i + 1] - qs[i] and q >= 1
            if not r.running:
                # (Re)admitted in this step, starting from its cached prefix.
                info = infos[rid]
                assert info.running
                cached = info.cached_tokens
                assert ctx == cached, "a new admission must start right after its cached prefix"
                assert cached % P == 0, "cached prefixes are whole pages"
                assert cached <= (n - 1) // P * P, "the last known token is always recomputed"
                if not self.cache_on:
                    assert cached == 0
                r.running, r.computed = True, cached
                admitted.append(rid)
                self.num_admissions += 1
                self.cached_hits += cached > 0
            assert ctx == r.computed, f"request {rid} resumes at {ctx}, not at {r.computed}"
            assert pos[qs[i] : qs[i + 1]] == list(range(ctx, seq))
            if i < nd:
                assert ctx == n - 1, "a decode has exactly one pending token"
                assert q == 1 + min(r.reserve, self.ctx - n), "decode gets 1 + reserve slots"
                decode_tokens += q
            else:
                assert seq <= n, "prefill chunks have no speculative slots"
                assert rid not in decodes_before
                prefill_tokens += q
            known = min(seq, n) - ctx
            assert known >= 1
            known_of.append(known)
            if seq >= n:
                sampling.append(i)
            for k in range(q):
                t = qs[i] + k
                want = r.tokens[ctx + k] if k < known else r.tokens[-1]
                assert tok[t] == want, f"token id at position {ctx + k} of request {rid}"
            # Slots agree with the block tables the runner holds after this plan's writes.
            grow, lrow = self.gtab[rows[i]], self.ltab[rows[i]]
            for t in range(qs[i], qs[i + 1]):
                p = pos[t]
                assert gslots[t] == grow[p // P] * P + p % P
                if C:
                    assert lslots[t] == lrow[p // P % lw] * P + p % P
            if not C:
                assert lslots[qs[i] : qs[i + 1]] == [-1] * q
        assert decodes_before <= set(rids[:nd])
        assert prefill_tokens <= max(0, self.max_step_tokens - decode_tokens), "token budget"
        assert plan.sample_requests.tolist() == sampling
        assert plan.sample_indices.tolist() == [qs[i] + known_of[i] - 1 for i in sampling]
        if plan.num_retracted and survivors:
            # Only the last resort (a lone request blocked by local pages that the cache pins)
            # retracts every running request and admits again in the same step.
            assert not admitted, "a step that retracted must not admit"
        st_ = s.stats()
        assert st_.num_running == sum(r.running for r in self.reqs.values())
        assert st_.num_running <= self.max_running

        # ---- choose what the sampler returns: counts and (for speculation) drafts -------------
        counts = {}
        drafts = {}  # rid -> tokens the runner committed (the first count-1 were drafts)
        for i in sampling:
            r = self.reqs[rids[i]]
            slots = seqs[i] - ctxs[i] - known_of[i]
            k = self.rng.randint(1, 1 + slots) if self.spec else 1
            counts[i] = k
            self.accepted_drafts += k - 1
            self.spec_decodes += slots > 0
            cur = list(r.tokens)
            out = []
            for _ in range(k):
                t = sample(r.extra_key, cur)
                cur.append(t)
                out.append(t)
            drafts[i] = out

        # ---- simulated forward pass: (a) writes --------------------------------------------------
        written = set()
        expect = {}  # (plan index, position) -> identity a key must have this step
        for i, rid in enumerate(rids):
            r = self.reqs[rid]
            n = len(r.tokens)
            spec_ids = []
            if i in counts and seqs[i] > n:
                k = counts[i]
                good = identities(r.extra_key, drafts[i][: k - 1], r.ids[-1][2], n)
                bad = [("garbage", rid, p, self.steps) for p in range(n + k - 1, seqs[i])]
                spec_ids = good + bad
            for t in range(qs[i], qs[i + 1]):
                p = pos[t]
                ident = r.ids[p] if p < n else spec_ids[p - n]
                expect[i, p] = ident
                g = ("g", gslots[t])
                assert g not in written, f"global slot {gslots[t]} written twice in one step"
                written.add(g)
                self.kv["g"][gslots[t]] = ident
                if C:
                    lo = ("l", lslots[t])
                    assert lo not in written, f"local slot {lslots[t]} written twice in one step"
                    written.add(lo)
                    self.kv["l"][lslots[t]] = ident

        # ---- (b) reads: every key any scheduled query attends to --------------------------------
        for i, rid in enumerate(rids):
            r = self.reqs[rid]
            n = len(r.tokens)
            ctx, seq = ctxs[i], seqs[i]

            def want(j, i=i, r=r, n=n):
                return r.ids[j] if j < n else expect[i, j]

            kvg = self.kv["g"]
            grow, lrow = self.gtab[rows[i]], self.ltab[rows[i]]
            for j in range(seq):  # union of [0, p] over the scheduled positions p
                slot = int(grow[j // P]) * P + j % P
                got = kvg.get(slot)
                assert got == want(j), (
                    f"request {rid} (extra_key {r.extra_key}) reads global KV of position {j} "
                    f"from slot {slot}: {got} != {want(j)}"
                )
            if C:
                kvl = self.kv["l"]
                for j in range(ctx // C * C, seq):  # union of [floor(p/C)*C, p]
                    slot = int(lrow[j // P % lw]) * P + j % P
                    got = kvl.get(slot)
                    assert got == want(j), (
                        f"request {rid} reads local KV of position {j} from slot {slot}: "
                        f"{got} != {want(j)}"
                    )

        # ---- aborts while the plan is in flight --------------------------------------------------
        aborted = set()
        for rid in abort_in_flight:
            live = rid in self.reqs
            assert s.abort(rid) is live
            if live:
                aborted.add(rid)
                if rid in in_plan:
                    assert s.abort(rid) is False, "aborting twice in flight"
                del self.reqs[rid]

        # ---- commit ------------------------------------------------------------------------------
        commit_tokens = []
        for i in sampling:
            commit_tokens.extend(drafts[i])
        toks = np.array(commit_tokens, dtype=np.int32)
        if self.spec:
            finished = s.commit(toks, np.array([counts[i] for i in sampling], dtype=np.int32))
        else:
            finished = s.commit(toks)
        assert not s.plan_in_flight
        reported = {}
        for f in finished:
            assert f.request_id not in reported, "a request finished twice"
            reported[f.request_id] = f
        for rid in aborted:
            assert rid not in reported, "an aborted request was reported as finished"
            assert not s.has_request(rid)

        ends = set()
        for i, rid in enumerate(rids):
            if rid in aborted:
                continue
            r = self.reqs[rid]
            k = counts.get(i, 0)
            r.computed = ctxs[i] + known_of[i] + max(0, k - 1)
            for t in drafts.get(i, []):
                if len(r.output) == len(r.expected):
                    break
                r.append(t)
            r.computed = min(r.computed, len(r.tokens))
            assert r.output == r.expected[: len(r.output)]
            if len(r.output) == len(r.expected):
                ends.add(rid)
        assert set(reported) == ends, "Finished must list exactly the requests that ended"
        for rid in ends:
            r = self.reqs.pop(rid)
            f = reported[rid]
            assert f.reason == r.reason
            assert f.num_output_tokens == len(r.expected)
            assert not s.has_request(rid)
            self.finished[rid] = (r.output, f.reason)
        for rid, r in self.reqs.items():
            if rid in in_plan:
                assert s.request_tokens(rid) == r.tokens
        self.check_state()
        return rids

    # ---- global checks -------------------------------------------------------------------------

    def check_state(self):
        s = self.sched
        assert s.check() == ""
        st_ = s.stats()
        running = [r for r in self.reqs.values() if r.running]
        assert st_.num_running == len(running)
        assert st_.num_waiting == len(self.reqs) - len(running)
        assert s.has_work() == bool(self.reqs)
        for rid, r in self.reqs.items():
            info = s.request_info(rid)
            assert info.running == r.running
            assert info.num_tokens == len(r.tokens)
            assert info.num_output_tokens == len(r.output)
            assert info.num_computed == (r.computed if r.running else 0)
            if r.running and self.C:
                # O(chunk) local memory per request outside a step.
                limit = ceil_div(self.C, self.P) + 1 + ceil_div(r.reserve, self.P)
                assert info.local_pages <= limit
                self.max_local_pages_seen = max(self.max_local_pages_seen, info.local_pages)
            if r.running:
                assert info.global_pages >= ceil_div(r.computed, self.P)
        if self.C:
            assert st_.local_free + st_.local_cached <= st_.local_total
        assert st_.global_free + st_.global_cached <= st_.global_total

    def drain(self, max_steps=MAX_DRAIN_STEPS):
        """Steps until no work is left; every request must end."""
        for _ in range(max_steps):
            if not self.sched.has_work():
                break
            self.step()
        else:
            raise AssertionError(f"requests still unfinished after {max_steps} steps: {self.reqs}")
        assert not self.reqs, "requests were lost"
        s = self.sched
        st_ = s.stats()
        assert st_.num_running == 0 and st_.num_waiting == 0
        # Nothing is held by requests any more: every page is free or cached.
        assert st_.global_free + st_.global_cached == st_.global_total
        assert st_.local_free + st_.local_cached == st_.local_total
        assert st_.global_evictable == st_.global_cached
        assert st_.local_evictable == st_.local_cached
        s.flush_cache()
        st_ = s.stats()
        assert st_.global_free == st_.global_total and st_.global_cached == 0
        assert st_.local_free == st_.local_total and st_.local_cached == 0
        assert s.check() == ""


# ---- the state machine ---------------------------------------------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / abort / flush sequences against the harness; check() after each."""

    PAGE_SIZES = (2,)
    CHUNK_SIZE = 0  # tokens; 0: no chunk-local layers
    POLICY = "fcfs"
    PREFIX_CACHE = True
    SPEC = False  # requests may reserve speculative slots; commits carry counts

    def __init__(self):
        super().__init__()
        self.h: Harness | None = None

    @initialize(data=st.data(), batch=st.lists(REQUEST, min_size=1, max_size=4))
    def setup(self, data, batch):
        P = data.draw(st.sampled_from(self.PAGE_SIZES), label="page_size")
        C = self.CHUNK_SIZE
        config = dict(
            page_size=P,
            chunk_size=C,
            global_pages=data.draw(st.integers(16, 40), label="global tokens") // P,
            local_pages=data.draw(st.integers(C // P + 1, C // P + 3), label="local_pages")
            if C
            else 0,
            context_len=data.draw(st.sampled_from([24, 32, 40]), label="context_len"),
            max_running=data.draw(st.sampled_from([1, 2, 3, 4, 8]), label="max_running"),
            max_step_tokens=data.draw(st.sampled_from([3, 5, 8, 13, 64]), label="budget"),
            policy=self.POLICY,
            enable_prefix_cache=self.PREFIX_CACHE,
            init_new_token_ratio=data.draw(st.sampled_from(RATIOS), label="ratio"),
            new_token_ratio_decay_steps=data.draw(st.sampled_from([600, 4]), label="decay"),
        )
        self.h = Harness(spec=self.SPEC, **config)
        self.h.rng = random.Random(data.draw(st.integers(0, 2**16), label="seed"))
        self.add(batch)

    @rule(batch=st.lists(REQUEST, min_size=1, max_size=4))
    def add(self, batch):
        for prefix, tail, max_new, stop_ids, extra_key, reserve in batch:
            self.h.add(prefix + tail, max_new, stop_ids, extra_key, reserve if self.SPEC else 0)

    @precondition(lambda self: self.h is not None and self.h.reqs)
    @rule(data=st.data())
    def add_duplicate(self, data):
        rid = data.draw(st.sampled_from(sorted(self.h.reqs)))
        assert self.h.add([1, 2, 3], 4, rid=rid) is None

    @rule()
    def step(self):
        self.h.step()

    @rule(n=st.integers(2, 12))
    def steps(self, n):
        for _ in range(n):
            self.h.step()

    @precondition(lambda self: self.h is not None and self.h.reqs)
    @rule(data=st.data())
    def step_with_abort_in_flight(self, data):
        # Abort some requests between schedule() and commit(): live ones in the plan, others not.
        ids = sorted(self.h.reqs)
        chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=2, unique=True))
        self.h.step(abort_in_flight=chosen)

    @precondition(lambda self: self.h is not None and self.h.used_ids)
    @rule(data=st.data())
    def abort(self, data):
        # Live, finished, aborted or never-used ids: abort() must say which.
        candidates = sorted(self.h.used_ids) + [self.h.next_id, -1]
        self.h.abort(data.draw(st.sampled_from(candidates)))

    @rule()
    def flush_cache(self):
        self.h.flush()

    @invariant()
    def self_check(self):
        if self.h is not None:
            assert self.h.sched.check() == ""

    def teardown(self):
        if self.h is not None and not self.h.sched.plan_in_flight:  # (in flight: a step failed)
            h = self.h
            h.drain()
            # What the example exercised (hypothesis --hypothesis-show-statistics lists these).
            event(f"retractions: {min(h.num_retractions, 3)}{'+' if h.num_retractions > 3 else ''}")
            event(f"admissions with a cache hit: {min(h.cached_hits, 3)}")
            event(f"requests finished: {min(len(h.finished), 5)}")
            event(f"steps: {h.steps // 20 * 20}+")
            for rid, (output, reason) in self.h.finished.items():
                assert reason in ("stop", "length"), rid
                assert output


def machine_test(name, **attrs):
    machine = type(name, (SchedulerMachine,), attrs)
    case = machine.TestCase
    case.settings = PROFILE
    return case


TestChunkLocalFcfs = machine_test("ChunkLocalFcfs", PAGE_SIZES=(2, 4), CHUNK_SIZE=8)
TestChunkLocalLpm = machine_test("ChunkLocalLpm", PAGE_SIZES=(2, 4), CHUNK_SIZE=8, POLICY="lpm")
TestChunkLocalNoCache = machine_test(
    "ChunkLocalNoCache", PAGE_SIZES=(1, 2), CHUNK_SIZE=4, POLICY="lpm", PREFIX_CACHE=False
)
TestChunkLocalSpec = machine_test("ChunkLocalSpec", PAGE_SIZES=(2, 4), CHUNK_SIZE=8, SPEC=True)
TestGlobalOnlyLpm = machine_test("GlobalOnlyLpm", PAGE_SIZES=(2, 4), POLICY="lpm")
TestGlobalOnlyNoCache = machine_test("GlobalOnlyNoCache", PAGE_SIZES=(1, 4), PREFIX_CACHE=False)
TestGlobalOnlySpec = machine_test("GlobalOnlySpec", PAGE_SIZES=(2, 3), POLICY="lpm", SPEC=True)


# ---- deterministic scenarios -------------------------------------------------------------------


def test_chunk_local_memory_is_o_chunk():
    """A long generation crosses many chunk boundaries: local pages stay O(chunk), global O(n)."""
    P, C = 4, 16
    bound = ceil_div(C, P) + 1
    h = Harness(page_size=P, chunk_size=C, global_pages=110, local_pages=bound + 6, context_len=400)
    prompt = [1, 2, 3, 4, 0, 1, 2, 3, 4, 0]
    rid = h.add(prompt, 300)
    s = h.sched
    crossings = set()
    global_pages = []
    while s.has_work():
        h.step()
        st_ = s.stats()
        assert st_.local_total - st_.local_free <= bound, "the local pool holds more than a chunk"
        if not s.has_request(rid):
            break
        info = s.request_info(rid)
        n = info.num_computed
        assert info.local_pages <= bound
        assert info.global_pages in (ceil_div(n, P), ceil_div(n, P) + 1)
        global_pages.append(info.global_pages)
        crossings.add(n // C)
    output, reason = h.finished[rid]
    assert reason == "length" and len(output) == 300
    assert len(crossings) >= 15  # 310 tokens: chunk boundaries 16, 32, ..., 304
    assert global_pages[-1] >= 300 // P  # the global pages grew with the sequence
    assert h.max_local_pages_seen <= bound
    h.drain()


@pytest.mark.parametrize("chunk_size", [0, 8])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_speculative_slots_keep_outputs_and_kv(chunk_size, prefix_cache):
    """reserve=3: decodes get 1 + 3 positions; commits accept 1..4 tokens; outputs never change."""
    P = 2
    h = Harness(
        spec=True,
        page_size=P,
        chunk_size=chunk_size,
        local_pages=chunk_size // P + 2 + 2 if chunk_size else 0,
        global_pages=24,
        context_len=48,
        max_step_tokens=7,
        enable_prefix_cache=prefix_cache,
        init_new_token_ratio=0.0,
    )
    h.rng = random.Random(1234)
    for k in range(6):
        h.add(list(PREFIXES[k % len(PREFIXES)]) + [k % VOCAB, 1], 20, (), k % 2, reserve=3)
    h.drain()
    assert len(h.finished) == 6
    assert h.spec_decodes > 10 and h.accepted_drafts > 10
    assert h.num_retractions > 0  # the pool is tight: slots of retracted requests are dropped too


@settings(PROFILE, max_examples=25)
@given(
    reserve=st.integers(1, 3),
    chunk_size=st.sampled_from([0, 4, 8]),
    seed=st.integers(0, 2**16),
    prompts=st.lists(
        st.tuples(st.sampled_from(PREFIXES).map(list), st.lists(st.integers(0, 4), max_size=6)),
        min_size=1,
        max_size=5,
    ),
)
def test_speculative_slots_property(reserve, chunk_size, seed, prompts):
    h = Harness(
        spec=True,
        page_size=2,
        chunk_size=chunk_size,
        local_pages=chunk_size // 2 + 2 + 1 if chunk_size else 0,
        global_pages=24,
        context_len=40,
        max_step_tokens=6,
        init_new_token_ratio=0.0,
    )
    h.rng = random.Random(seed)
    for k, (prefix, tail) in enumerate(prompts):
        h.add(prefix + tail or [1], 12, (), k % 2, reserve=reserve)
    h.drain()
