"""StepPlan arrays are zero-copy views that stay valid and unchanged for whoever holds them."""

import numpy as np
import torch

from pyllama4 import Scheduler

ARRAYS = [
    "request_ids",
    "query_start",
    "context_lens",
    "seq_lens",
    "token_ids",
    "positions",
    "global_slots",
    "local_slots",
    "rows",
    "global_table_index",
    "global_table_values",
    "local_table_index",
    "local_table_values",
    "sample_indices",
    "sample_requests",
]


def make_scheduler() -> Scheduler:
    sched = Scheduler(64, page_size=4, local_pages=16, chunk_size=8, context_len=256)
    sched.add_request(1, np.arange(1, 11, dtype=np.int32), max_new_tokens=8)
    sched.add_request(2, np.arange(5, 12, dtype=np.int32), max_new_tokens=8)
    return sched


def test_arrays_are_views_of_the_plan_memory():
    sched = make_scheduler()
    plan = sched.schedule()
    for name in ARRAYS:
        first, second = getattr(plan, name), getattr(plan, name)
        assert first.ctypes.data == second.ctypes.data, name  # both view one buffer: no copy
        if first.size:
            assert torch.from_numpy(first).data_ptr() == first.ctypes.data, name
    # Writes through a view are visible to every other view (what speculative decoding needs to
    # fill draft tokens in place).
    plan.token_ids[0] = 4242
    assert plan.token_ids[0] == 4242


def test_held_plan_survives_later_steps_unchanged():
    sched = make_scheduler()
    first = sched.schedule()
    snapshot = {name: getattr(first, name).copy() for name in ARRAYS}
    kept_view = first.positions  # a view kept after the plan object itself is dropped
    sched.commit(np.ones(first.num_samples, dtype=np.int32))
    for _ in range(5):
        plan = sched.schedule()
        sched.commit(np.ones(plan.num_samples, dtype=np.int32))
    for name, values in snapshot.items():
        np.testing.assert_array_equal(getattr(first, name), values, err_msg=name)
    del first
    np.testing.assert_array_equal(kept_view, snapshot["positions"])


def test_plan_shapes_are_consistent():
    sched = make_scheduler()
    plan = sched.schedule()
    r, t = plan.num_requests, plan.num_tokens
    assert len(plan) == r == 2
    assert plan.query_start.shape == (r + 1,) and plan.query_start[-1] == t
    for name in ("token_ids", "positions", "global_slots", "local_slots"):
        assert getattr(plan, name).shape == (t,) and getattr(plan, name).dtype == np.int32
    assert plan.request_ids.dtype == np.int64
    np.testing.assert_array_equal(plan.seq_lens - plan.context_lens, np.diff(plan.query_start))
    assert plan.rows.shape == (r,) and sorted(plan.rows.tolist()) == [0, 1]
    assert plan.global_table_index.dtype == plan.local_table_index.dtype == np.int64
    assert plan.global_table_index.shape == plan.global_table_values.shape
    assert plan.local_table_index.shape == plan.local_table_values.shape
