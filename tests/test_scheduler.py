"""Unit tests of pyllama4.Scheduler: argument checking, the plan/commit protocol, aborts, finish
reasons, prefix reuse, retraction and the admission policies."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from pyllama4 import Scheduler

VOCAB = 7


def arr(tokens) -> np.ndarray:
    return np.asarray(list(tokens), dtype=np.int32)


def sample(extra_key: int, tokens) -> int:
    """A deterministic stand-in for the model: the next token depends on every token so far."""
    data = struct.pack("<Q", extra_key) + arr(tokens).tobytes()
    return zlib.crc32(data) % VOCAB


def expected_output(prompt, max_new, stop_ids=(), extra_key=0, context_len=8192):
    tokens, out = list(prompt), []
    while True:
        t = sample(extra_key, tokens)
        tokens.append(t)
        out.append(t)
        if t in stop_ids:
            return out, "stop"
        if len(out) >= min(max_new, context_len - len(prompt)):
            return out, "length"


def idle(sched: Scheduler) -> None:
    """Nothing is held by requests: every page is free or cached, and the books balance."""
    st = sched.stats()
    assert st.num_running == 0 and st.num_waiting == 0
    assert st.global_free + st.global_cached == st.global_total
    assert st.local_free + st.local_cached == st.local_total
    assert sched.check() == ""


def run(sched: Scheduler, requests: dict, max_steps: int = 5000):
    """Adds `requests` (rid -> (prompt, max_new, stop_ids, extra_key)) and steps until all end,
    sampling with `sample`. Returns rid -> (output, reason) and the ids in admission order."""
    prompts, outputs, reasons, admitted = {}, {}, {}, []
    for rid, (prompt, max_new, stop_ids, extra_key) in requests.items():
        sched.add_request(rid, arr(prompt), max_new, list(stop_ids), extra_key)
        prompts[rid] = list(prompt)
        outputs[rid] = []
    for _ in range(max_steps):
        if not sched.has_work():
            break
        plan = sched.schedule()
        assert plan.num_requests > 0
        rids = plan.request_ids.tolist()
        for rid in rids:
            if rid not in admitted:
                admitted.append(rid)
        tokens = []
        for i in plan.sample_requests.tolist():
            rid = rids[i]
            tokens.append(sample(requests[rid][3], prompts[rid] + outputs[rid]))
        for i, t in zip(plan.sample_requests.tolist(), tokens, strict=True):
            outputs[rids[i]].append(t)
        for f in sched.commit(arr(tokens)):
            reasons[f.request_id] = f.reason
            assert f.num_output_tokens == len(outputs[f.request_id])
        assert sched.check() == ""
    assert not sched.has_work()
    assert set(reasons) == set(requests)
    return {rid: (outputs[rid], reasons[rid]) for rid in requests}, admitted


def step(sched: Scheduler, token: int = 1):
    """One step that samples `token` for every sampling request; returns (plan, finished)."""
    plan = sched.schedule()
    return plan, sched.commit(np.full(plan.num_samples, token, dtype=np.int32))


# ---- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(page_size=0), "page_size"),
        (dict(page_size=-4), "page_size"),
        (dict(page_size=4, chunk_size=6, local_pages=8), "multiple of page_size"),
        (dict(page_size=4, chunk_size=-4, local_pages=8), "chunk_size"),
        (dict(page_size=4, chunk_size=8, local_pages=2), "local_pages must hold"),
        (dict(page_size=4, chunk_size=8, local_pages=0), "local_pages must hold"),
        (dict(page_size=4, local_pages=4), "local_pages must be 0"),
        (dict(context_len=1), "context_len"),
        (dict(max_running=0), "max_running"),
        (dict(max_step_tokens=0), "max_step_tokens"),
        (dict(policy="lifo"), "unknown schedule policy"),
        (dict(init_new_token_ratio=-0.1), "non-negative"),
        (dict(init_new_token_ratio=1.5), "must be <= 1"),
        (dict(min_new_token_ratio_factor=2.0), "must be <= 1"),
        (dict(new_token_ratio_decay_steps=0), "non-negative"),
    ],
)
def test_constructor_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(16, **kwargs)


def test_constructor_rejects_empty_global_pool():
    with pytest.raises(ValueError, match="global_pages"):
        Scheduler(0, page_size=4)


def test_smallest_valid_local_pool_is_accepted():
    sched = Scheduler(16, page_size=4, chunk_size=8, local_pages=3)
    assert sched.chunk_size == 8 and sched.page_size == 4
    assert sched.local_pool.num_pages == 3 and sched.global_pool.num_pages == 16
    assert Scheduler(16, page_size=4).local_pool is None


# ---- add_request -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, max_new, kwargs, message",
    [
        ([], 4, {}, "the prompt is empty"),
        (range(1, 33), 4, {}, "the prompt has 32 tokens; the context length is 32"),
        (range(1, 40), 4, {}, "the prompt has 39 tokens"),
        ([1, 2, 3], 0, {}, "max_new_tokens must be >= 1"),
        ([1, 2, 3], -5, {}, "max_new_tokens must be >= 1"),
        ([1, 2, 3], 4, dict(reserve=-1), "reserve must be >= 0"),
        ([1, -2, 3], 4, {}, "token ids must be >= 0"),
        # 20 prompt + min(30, 32 - 20) = 32 tokens = 8 pages of 4 > 6 pages.
        (range(1, 21), 30, {}, "needs 8 KV pages of 4 tokens; the pool holds 6"),
        # The reserve counts: 20 + 4 + 1 = 25 tokens = 7 pages.
        (range(1, 21), 4, dict(reserve=1), "needs 7 KV pages"),
    ],
)
def test_add_request_rejects_requests_that_can_never_run(prompt, max_new, kwargs, message):
    sched = Scheduler(6, page_size=4, context_len=32)
    with pytest.raises(ValueError, match=message):
        sched.add_request(7, arr(prompt), max_new, **kwargs)
    assert not sched.has_request(7) and not sched.has_work()
    # The same id is still free afterwards.
    sched.add_request(7, arr([1, 2, 3]), 2)
    assert sched.has_request(7)


def test_add_request_counts_max_new_tokens_capped_by_the_context():
    sched = Scheduler(6, page_size=4, context_len=24)
    sched.add_request(1, arr(range(1, 21)), 4)  # 24 tokens = 6 pages: exactly the pool
    sched.add_request(2, arr(range(1, 21)), 1000)  # capped to 24 - 20 = 4 new tokens
    with pytest.raises(ValueError, match="needs 7 KV pages"):
        sched.add_request(3, arr(range(1, 21)), 1000, reserve=1)  # 20 + 4 + 1 slot = 25 tokens
    outputs, _ = run(Scheduler(6, page_size=4, context_len=24), {2: (range(1, 21), 1000, (), 0)})
    assert len(outputs[2][0]) == 4 and outputs[2][1] == "length"


def test_duplicate_id_is_rejected_and_keeps_the_first_request():
    sched = Scheduler(16, page_size=4)
    sched.add_request(3, arr([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="request id 3 is already in use"):
        sched.add_request(3, arr([4, 5]), 9)
    assert sched.request_tokens(3) == [1, 2, 3]
    assert sched.stats().num_waiting == 1


def test_chunk_local_pool_too_small_for_the_reserve():
    sched = Scheduler(64, page_size=4, chunk_size=8, local_pages=3)
    sched.add_request(1, arr([1, 2, 3]), 4, reserve=3)  # 8/4 + ceil(4/4) = 3 pages: fits
    with pytest.raises(ValueError, match="reserve 4 does not fit the chunk-local pool"):
        sched.add_request(2, arr([1, 2, 3]), 4, reserve=4)


def test_unknown_request_ids():
    sched = Scheduler(16, page_size=4)
    assert sched.abort(99) is False
    with pytest.raises(KeyError):
        sched.request_info(99)
    with pytest.raises(KeyError):
        sched.request_tokens(99)


# ---- the plan / commit protocol ----------------------------------------------------------------


def test_schedule_twice_without_commit_raises():
    sched = Scheduler(16, page_size=4)
    sched.add_request(1, arr([1, 2, 3]), 4)
    plan = sched.schedule()
    assert plan.num_requests == 1 and sched.plan_in_flight
    with pytest.raises(RuntimeError, match="not committed"):
        sched.schedule()
    sched.commit(arr([5]))
    assert not sched.plan_in_flight
    sched.schedule()  # fine again


def test_empty_schedule_when_idle():
    sched = Scheduler(16, page_size=4)
    plan = sched.schedule()
    assert plan.num_requests == 0 and plan.num_tokens == 0 and not sched.plan_in_flight
    assert sched.commit(arr([])) == []
    with pytest.raises(RuntimeError, match="no plan in flight"):
        sched.commit(arr([1]))


def test_commit_with_wrong_token_count_leaves_state_intact():
    sched = Scheduler(16, page_size=4)
    sched.add_request(1, arr([1, 2, 3]), 4)
    sched.add_request(2, arr([4, 5]), 4)
    plan = sched.schedule()
    assert plan.num_samples == 2
    infos = {rid: sched.request_info(rid) for rid in (1, 2)}
    free = sched.stats().global_free
    for bad in ([], [1], [1, 2, 3]):
        with pytest.raises(ValueError, match="expected 2 tokens"):
            sched.commit(arr(bad))
        assert sched.plan_in_flight
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        sched.commit(arr([1, -1]))
    with pytest.raises(ValueError, match="counts"):
        sched.commit(arr([1, 2]), counts=arr([1]))
    with pytest.raises(ValueError, match="out of range"):
        sched.commit(arr([1, 2, 3]), counts=arr([2, 1]))  # no speculative slots: count must be 1
    for rid in (1, 2):
        info = sched.request_info(rid)
        assert info.num_computed == infos[rid].num_computed == 0
        assert info.num_tokens == infos[rid].num_tokens
    assert sched.stats().global_free == free
    assert sched.check() == ""
    assert sched.commit(arr([6, 6])) == []
    assert sched.request_tokens(1) == [1, 2, 3, 6] and sched.request_tokens(2) == [4, 5, 6]
    assert sched.request_info(1).num_computed == 3


def test_speculative_counts_must_match_the_slots():
    sched = Scheduler(32, page_size=4)
    sched.add_request(1, arr([1, 2, 3]), 20, reserve=2)
    step(sched)  # prefill: one sample, count must be 1
    plan = sched.schedule()
    assert plan.num_decodes == 1 and plan.num_tokens == 3  # 1 + reserve positions
    assert plan.positions.tolist() == [3, 4, 5]
    assert plan.token_ids.tolist() == [1, 1, 1]  # the last known token as placeholder
    with pytest.raises(ValueError, match="out of range"):
        sched.commit(arr([1, 1, 1, 1]), counts=arr([4]))
    with pytest.raises(ValueError, match="out of range"):
        sched.commit(arr([]), counts=arr([0]))
    with pytest.raises(ValueError, match="do not add up"):
        sched.commit(arr([1, 1]), counts=arr([3]))
    sched.commit(arr([4, 5, 6]), counts=arr([3]))
    assert sched.request_tokens(1) == [1, 2, 3, 1, 4, 5, 6]
    # Two drafts accepted: KV exists for everything but the newest token.
    assert sched.request_info(1).num_computed == 6


# ---- aborts ----------------------------------------------------------------------------------


def test_abort_waiting_request():
    sched = Scheduler(16, page_size=4, max_running=1)
    sched.add_request(1, arr([1, 2, 3]), 4)
    sched.add_request(2, arr([1, 2, 3]), 4)
    step(sched)
    assert sched.stats().num_waiting == 1
    assert sched.abort(2) is True
    assert not sched.has_request(2) and sched.stats().num_waiting == 0
    assert sched.abort(2) is False
    assert sched.check() == ""


def test_abort_running_request_releases_its_pages():
    sched = Scheduler(16, page_size=4, enable_prefix_cache=False)
    sched.add_request(1, arr(range(1, 11)), 8)
    step(sched)
    step(sched)
    st = sched.stats()
    assert st.num_running == 1 and st.global_free < st.global_total
    assert sched.abort(1) is True
    assert not sched.has_request(1) and not sched.has_work()
    assert sched.stats().global_free == sched.stats().global_total
    assert sched.abort(1) is False
    idle(sched)


def test_abort_running_request_caches_its_prefix():
    sched = Scheduler(16, page_size=4)
    sched.add_request(1, arr(range(1, 11)), 8)
    step(sched)
    step(sched)  # 11 tokens computed: 2 whole pages
    assert sched.abort(1) is True
    idle(sched)
    assert sched.stats().global_cached == 2
    sched.add_request(2, arr(range(1, 11)), 1)
    plan = sched.schedule()
    assert plan.context_lens.tolist() == [8]
    assert sched.request_info(2).cached_tokens == 8


def test_abort_in_flight_request_is_released_at_commit():
    sched = Scheduler(16, page_size=4, enable_prefix_cache=False)
    sched.add_request(1, arr(range(1, 11)), 8)
    sched.add_request(2, arr(range(1, 6)), 8)
    step(sched)
    plan = sched.schedule()
    assert plan.request_ids.tolist() == [1, 2] and plan.num_samples == 2
    assert sched.abort(1) is True
    assert sched.abort(1) is False  # already going
    assert sched.plan_in_flight
    # The plan is unchanged and commit still takes one token per sample; it skips request 1.
    finished = sched.commit(arr([3, 3]))
    assert finished == []
    assert not sched.has_request(1)
    assert sched.request_tokens(2) == [1, 2, 3, 4, 5, 1, 3]
    assert sched.stats().num_running == 1
    assert sched.check() == ""
    info = sched.request_info(2)
    assert sched.stats().global_free == 16 - info.global_pages  # request 1's pages are free
    assert sched.abort(2) is True
    idle(sched)


def test_abort_every_request_in_flight():
    sched = Scheduler(16, page_size=4)
    sched.add_request(1, arr(range(1, 11)), 8)
    sched.schedule()
    assert sched.abort(1) is True
    assert sched.has_work()  # until the commit
    assert sched.commit(arr([2])) == []
    assert not sched.has_work()
    idle(sched)


# ---- finishing ---------------------------------------------------------------------------------


def test_finish_on_stop_token():
    sched = Scheduler(16, page_size=4)
    sched.add_request(1, arr([1, 2, 3]), 10, stop_token_ids=[5, 9])
    _, finished = step(sched, token=2)
    assert finished == []
    _, finished = step(sched, token=9)
    assert [(f.request_id, f.reason, f.num_output_tokens) for f in finished] == [(1, "stop", 2)]
    assert not sched.has_request(1)
    idle(sched)


def test_finish_on_max_new_tokens():
    sched = Scheduler(16, page_size=4)
    sched.add_request(1, arr([1, 2, 3]), 3, stop_token_ids=[5])
    outputs = []
    for _ in range(3):
        _, finished = step(sched, token=2)
        outputs.append(finished)
    assert outputs[:2] == [[], []]
    assert [(f.request_id, f.reason, f.num_output_tokens) for f in outputs[2]] == [(1, "length", 3)]
    idle(sched)


def test_stop_token_wins_over_length_on_the_last_token():
    sched = Scheduler(16, page_size=4)
    sched.add_request(1, arr([1, 2, 3]), 1, stop_token_ids=[5])
    _, finished = step(sched, token=5)
    assert [(f.reason, f.num_output_tokens) for f in finished] == [("stop", 1)]


def test_finish_on_context_length():
    sched = Scheduler(16, page_size=4, context_len=12)
    sched.add_request(1, arr(range(1, 10)), 100)  # 9 prompt tokens: room for 3
    finished = []
    for _ in range(10):
        _, finished = step(sched, token=2)
        if finished:
            break
    assert [(f.reason, f.num_output_tokens) for f in finished] == [("length", 3)]
    idle(sched)


def test_one_token_prompt_and_one_token_output():
    sched = Scheduler(4, page_size=4)
    outputs, _ = run(sched, {1: ([3], 1, (), 0)})
    assert outputs[1] == expected_output([3], 1)


# ---- plans -------------------------------------------------------------------------------------


def test_prefill_is_chunked_by_the_token_budget_and_decodes_come_first():
    sched = Scheduler(32, page_size=4, max_step_tokens=5)
    sched.add_request(1, arr([1, 2]), 8)
    sched.add_request(2, arr(range(1, 13)), 8)
    plan, _ = step(sched)
    # Request 1's whole prompt (2 tokens), then 3 tokens of request 2 (budget 5).
    assert plan.request_ids.tolist() == [1, 2]
    assert plan.seq_lens.tolist() == [2, 3] and plan.num_decodes == 0
    assert plan.sample_requests.tolist() == [0]  # request 2's chunk does not end its prompt
    plan, _ = step(sched)
    assert plan.num_decodes == 1 and plan.request_ids.tolist() == [1, 2]
    assert plan.context_lens.tolist() == [2, 3] and plan.seq_lens.tolist() == [3, 7]
    plan, _ = step(sched)
    assert plan.context_lens.tolist() == [3, 7] and plan.seq_lens.tolist() == [4, 11]
    plan, _ = step(sched)
    assert plan.context_lens.tolist() == [4, 11] and plan.seq_lens.tolist() == [5, 12]
    assert plan.sample_requests.tolist() == [0, 1]
    assert plan.sample_indices.tolist() == [0, 1]
    assert sched.check() == ""


def test_decodes_are_scheduled_even_past_the_budget():
    # Two decodes of 1 + 2 speculative slots each need 6 tokens; the budget is 3.
    sched = Scheduler(64, page_size=4, max_step_tokens=3)
    sched.add_request(1, arr([1]), 8, reserve=2)
    sched.add_request(2, arr([2]), 8, reserve=2)
    sched.add_request(3, arr([3]), 8)
    plan, _ = step(sched)
    assert plan.request_ids.tolist() == [1, 2, 3]
    for _ in range(3):
        plan = sched.schedule()
        assert plan.num_decodes == 3 and plan.num_tokens == 7
        sched.commit(arr([1, 1, 1]), counts=arr([1, 1, 1]))


def test_max_running_limits_admissions():
    sched = Scheduler(64, page_size=4, max_running=2)
    for rid in range(4):
        sched.add_request(rid, arr([1, 2, 3]), 4)
    plan, _ = step(sched)
    assert plan.request_ids.tolist() == [0, 1]
    assert sched.stats().num_running == 2 and sched.stats().num_waiting == 2


# ---- prefix cache ------------------------------------------------------------------------------


def finish_one(sched: Scheduler, rid: int, prompt, extra_key: int = 0) -> None:
    sched.add_request(rid, arr(prompt), 1, extra_key=extra_key)
    _, finished = step(sched)
    assert [f.request_id for f in finished] == [rid]


@pytest.mark.parametrize("chunk_size", [0, 8])
def test_prefix_hit_reuses_pages_and_schedules_only_the_tail(chunk_size):
    local = 8 if chunk_size else 0
    sched = Scheduler(32, page_size=4, chunk_size=chunk_size, local_pages=local)
    prompt = [5, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]  # 14 tokens: 3 whole pages
    finish_one(sched, 1, prompt)
    cached_pages = sched.stats().global_cached
    assert cached_pages == 3
    free = sched.stats().global_free
    sched.add_request(2, arr(prompt + [2, 3]), 4)
    plan = sched.schedule()
    info = sched.request_info(2)
    assert info.cached_tokens == 12
    assert plan.context_lens.tolist() == [12] and plan.seq_lens.tolist() == [16]
    assert plan.positions.tolist() == [12, 13, 14, 15]
    assert plan.token_ids.tolist() == (prompt + [2, 3])[12:]
    # The first three pages are the cached ones, and only one new page was taken.
    assert sched.stats().global_free == free - 1
    assert sched.stats().cached_tokens == 12
    sched.commit(arr([1]))
    assert sched.check() == ""


@pytest.mark.parametrize("pages", [1, 2, 3])
def test_last_prompt_token_is_always_recomputed(pages):
    sched = Scheduler(32, page_size=4)
    prompt = list(range(1, 4 * pages + 1))  # exactly `pages` pages
    finish_one(sched, 1, prompt)
    sched.add_request(2, arr(prompt), 3)
    plan = sched.schedule()
    # The match covers prompt[:-1] rounded down to whole pages: one page short.
    assert sched.request_info(2).cached_tokens == 4 * (pages - 1)
    assert plan.context_lens.tolist() == [4 * (pages - 1)]
    assert plan.sample_requests.tolist() == [0]  # the last token is recomputed and sampled from


def test_prompt_one_past_a_page_boundary_hits_every_page():
    sched = Scheduler(32, page_size=4)
    prompt = list(range(1, 14))  # 13 tokens: 3 whole pages + 1
    finish_one(sched, 1, prompt)
    sched.add_request(2, arr(prompt), 3)
    plan = sched.schedule()
    assert sched.request_info(2).cached_tokens == 12
    assert plan.num_tokens == 1


def test_extra_key_isolates_cached_prefixes():
    sched = Scheduler(32, page_size=4)
    prompt = list(range(1, 14))
    finish_one(sched, 1, prompt, extra_key=11)
    sched.add_request(2, arr(prompt), 3, extra_key=12)
    plan, _ = step(sched)
    assert sched.request_info(2).cached_tokens == 0 and plan.context_lens.tolist() == [0]
    sched.add_request(3, arr(prompt), 3, extra_key=11)
    plan = sched.schedule()
    assert sched.request_info(3).cached_tokens == 12


def test_prefix_cache_off_never_hits():
    sched = Scheduler(32, page_size=4, enable_prefix_cache=False)
    prompt = list(range(1, 14))
    finish_one(sched, 1, prompt)
    assert sched.stats().global_cached == 0
    sched.add_request(2, arr(prompt), 3)
    sched.schedule()
    assert sched.request_info(2).cached_tokens == 0


def test_running_prefill_shares_its_prefix_with_later_requests():
    # Request 1 prefills in chunks of 8 tokens; request 2, admitted while request 1 still runs,
    # reuses the pages that request 1 has computed so far.
    sched = Scheduler(64, page_size=4, max_step_tokens=8)
    prompt = list(range(1, 21))
    sched.add_request(1, arr(prompt), 4)
    step(sched)
    step(sched)  # 16 tokens of request 1 computed
    sched.add_request(2, arr(prompt[:18] + [0, 0]), 4)
    plan, _ = step(sched)  # request 1's last 4 tokens, then request 2 in the budget left
    assert plan.request_ids.tolist() == [1, 2]
    assert sched.request_info(2).cached_tokens == 16
    assert plan.context_lens.tolist() == [16, 16]
    assert sched.request_info(1).running and sched.request_info(1).num_output_tokens == 1
    assert sched.check() == ""


def test_flush_cache_frees_everything_unlocked():
    sched = Scheduler(32, page_size=4)
    finish_one(sched, 1, list(range(1, 14)))
    cached = sched.stats().global_cached
    assert cached == 3
    assert sched.flush_cache() == cached
    st = sched.stats()
    assert st.global_cached == 0 and st.global_free == st.global_total
    assert sched.flush_cache() == 0


# ---- retraction ------------------------------------------------------------------------------


def workload():
    shared = [3, 1, 4, 1, 5, 9, 2, 6]
    return {
        rid: (shared[: rid % 5 + 2] + [rid % VOCAB, (rid * 3) % VOCAB], 14, (), rid % 2)
        for rid in range(8)
    }


@pytest.mark.parametrize("chunk_size", [0, 8])
@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_retraction_keeps_outputs_identical(chunk_size, policy):
    def make(pages):
        local = chunk_size // 2 + 2 if chunk_size else 0
        return Scheduler(
            pages,
            page_size=2,
            chunk_size=chunk_size,
            local_pages=local * (1 if pages < 100 else 20),
            context_len=64,
            max_step_tokens=6,
            policy=policy,
            init_new_token_ratio=0.0,  # admit eagerly, so decodes run out of pages
        )

    tight = make(14)
    big = make(400)
    tight_out, _ = run(tight, workload())
    big_out, _ = run(big, workload())
    assert tight.stats().num_retractions > 0
    assert big.stats().num_retractions == 0
    assert tight_out == big_out
    for rid, (prompt, max_new, stops, key) in workload().items():
        assert tight_out[rid] == expected_output(prompt, max_new, stops, key)
    idle(tight)
    idle(big)


def test_retraction_picks_the_request_with_fewest_outputs():
    sched = Scheduler(6, page_size=2, init_new_token_ratio=0.0, enable_prefix_cache=False)
    sched.add_request(1, arr([1, 2, 3]), 9)  # 12 tokens = 6 pages at most
    step(sched)
    step(sched)
    step(sched)  # request 1 has 3 outputs
    sched.add_request(2, arr([4, 5, 6]), 9)
    sched.add_request(3, arr([4, 5]), 9)
    retracted = None
    for _ in range(20):
        plan, _ = step(sched)
        if plan.num_retracted:
            retracted = [rid for rid in (2, 3) if not sched.request_info(rid).running]
            break
    assert retracted, "the pool is too small for all three: something must be retracted"
    # Requests 2 and 3 have fewer outputs than request 1 and as many as each other; the one with
    # the longer prompt goes first.
    assert plan.num_retracted == 1 and retracted == [2]
    assert sched.request_info(1).running and sched.request_info(3).running
    assert sched.request_info(2).num_retractions == 1
    assert sched.request_info(2).num_computed == 0 and sched.stats().num_waiting == 1
    assert sched.check() == ""


# ---- admission policies ----------------------------------------------------------------------


def admission_order(policy: str):
    sched = Scheduler(64, page_size=4, policy=policy, max_running=1)
    long_prefix = list(range(1, 18))  # 4 whole pages + 1 token
    finish_one(sched, 100, long_prefix)
    requests = {
        1: ([9, 9, 9, 9, 9], 1, (), 0),  # no match
        2: (long_prefix + [7, 7], 1, (), 0),  # 16 tokens cached
        3: (long_prefix[:9] + [8, 8], 1, (), 0),  # 8 tokens cached
        4: (long_prefix[:5] + [6], 1, (), 0),  # 4 tokens cached
    }
    _, admitted = run(sched, requests)
    return admitted


def test_fcfs_admits_in_arrival_order():
    assert admission_order("fcfs") == [1, 2, 3, 4]


def test_lpm_admits_longest_cached_prefix_first():
    assert admission_order("lpm") == [2, 3, 4, 1]


def test_lpm_without_prefix_cache_is_fcfs():
    sched = Scheduler(64, page_size=4, policy="lpm", max_running=1, enable_prefix_cache=False)
    prefix = list(range(1, 18))
    _, admitted = run(sched, {1: ([9, 9], 1, (), 0), 2: (prefix, 1, (), 0), 3: (prefix, 1, (), 0)})
    assert admitted == [1, 2, 3]


# ---- chunk-local layers ----------------------------------------------------------------------


def apply_writes(sched: Scheduler, plan, gtab: np.ndarray, ltab: np.ndarray) -> None:
    """What the model runner does before each step: apply the plan's block table writes."""
    gtab.reshape(-1)[plan.global_table_index] = plan.global_table_values
    ltab.reshape(-1)[plan.local_table_index] = plan.local_table_values


def test_chunk_local_block_tables_cover_the_current_chunk():
    sched = Scheduler(64, page_size=4, chunk_size=8, local_pages=6, max_step_tokens=64)
    assert sched.local_table_width == 8 // 4 + 64 // 4
    gtab = np.full((sched.max_running, sched.global_table_width), -1)
    ltab = np.full((sched.max_running, sched.local_table_width), -1)
    sched.add_request(1, arr(range(1, 21)), 4)  # 20 tokens: chunks [0, 8), [8, 16), [16, 20)
    plan = sched.schedule()
    apply_writes(sched, plan, gtab, ltab)
    row = plan.rows[0]
    # A prefill that spans chunks needs local pages for all of them during the step ...
    assert sorted(plan.local_table_index.tolist()) == [row * 18 + i for i in range(5)]
    assert plan.local_slots.tolist() == [ltab[row, p // 4] * 4 + p % 4 for p in range(20)]
    assert plan.global_slots.tolist() == [gtab[row, p // 4] * 4 + p % 4 for p in range(20)]
    sched.commit(arr([1]))
    # ... and keeps only the current chunk's afterwards.
    info = sched.request_info(1)
    assert info.num_computed == 20 and info.local_pages == 1 and info.global_pages == 5
    plan = sched.schedule()
    apply_writes(sched, plan, gtab, ltab)
    # Position 20 starts page 5: the only new entry in each table.
    assert plan.global_table_index.tolist() == [row * sched.global_table_width + 5]
    assert plan.local_table_index.tolist() == [row * 18 + 5]
    assert plan.local_slots.tolist() == [ltab[row, 5] * 4]
    assert plan.global_slots.tolist() == [gtab[row, 5] * 4]


def test_decode_steps_write_one_table_entry_per_new_page():
    sched = Scheduler(256, page_size=4, context_len=1024)
    sched.add_request(1, arr(range(1, 10)), 40)  # pages 0..2 hold the prompt
    plan = sched.schedule()
    assert sorted(plan.global_table_index.tolist()) == [0, 1, 2]
    sched.commit(arr([1]))
    written = []
    for _ in range(20):  # positions 9..28: pages 3..7 start at 12, 16, 20, 24, 28
        plan = sched.schedule()
        written += plan.global_table_index.tolist()
        sched.commit(arr([1]))
    assert written == [3, 4, 5, 6, 7]


def test_reserve_fits_the_smallest_local_pool_add_request_accepts():
    # add_request accepts reserve 1 with chunk 8 / page 2 when local_pages >= 4 + ceil(2 / 2) = 5;
    # admission must then reserve no more than that, or the request never runs.
    sched = Scheduler(64, page_size=2, chunk_size=8, local_pages=5, context_len=64)
    sched.add_request(1, arr(range(1, 21)), 6, reserve=1)
    finished = []
    for _ in range(40):
        plan = sched.schedule()
        assert plan.num_requests == 1
        counts = arr([1] * plan.num_samples)
        finished = sched.commit(arr([2] * plan.num_samples), counts=counts)
        assert sched.check() == ""
        if finished:
            break
    assert [(f.reason, f.num_output_tokens) for f in finished] == [("length", 6)]
    idle(sched)


def test_long_prefill_does_not_pin_local_pages_of_chunks_it_left():
    # A 100-token prompt prefilled 6 tokens a step through chunks of 16 with the smallest local
    # pool: the cache must not keep the local pages of earlier chunks locked for it.
    sched = Scheduler(
        64, page_size=4, chunk_size=16, local_pages=5, context_len=200, max_step_tokens=6
    )
    prompt = [t % 7 + 1 for t in range(100)]
    outputs, _ = run(sched, {1: (prompt, 3, (), 0)})
    assert outputs[1] == expected_output(prompt, 3)
    idle(sched)


def test_request_blocked_by_local_pages_cached_for_an_earlier_chunk():
    # Request 1 leaves pages [0, 8) with their local KV in the cache. Request 2 has the same prompt:
    # its match ends at the chunk boundary 8 and locks them, so the local pool (5 pages) cannot
    # also hold the chunk it computes next unless the cache gives those local pages up.
    sched = Scheduler(
        6,
        page_size=2,
        chunk_size=8,
        local_pages=5,
        context_len=20,
        max_running=1,
        max_step_tokens=3,
    )
    prompt = [1, 2, 3, 1, 2, 2, 4, 1, 3]
    outputs, _ = run(sched, {1: (prompt, 1, (), 0), 2: (prompt, 2, (), 0)})
    assert outputs[1] == expected_output(prompt, 1)
    assert outputs[2] == expected_output(prompt, 2)
    idle(sched)
