"""pyllama4.cpu_layout: where torch's compute threads go on the CPU, from flags, OMP_NUM_THREADS
and the usable cores; applied on the thread that runs the model."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from pyllama4 import cpu_layout


def test_default_keeps_one_core_for_the_event_loop():
    layout = cpu_layout.plan(environ={}, usable=[0, 1, 2, 3])
    assert (layout.threads, layout.cores) == (3, (1, 2, 3))
    text = layout.describe()
    assert "3 torch compute thread(s)" in text and "cores 1-3" in text and "cores 0 left" in text


def test_one_core_is_not_reserved():
    layout = cpu_layout.plan(environ={}, usable=[5])
    assert (layout.threads, layout.cores) == (1, (5,))


def test_omp_num_threads_is_honoured_and_flags_win():
    from_env = cpu_layout.plan(environ={"OMP_NUM_THREADS": "2"}, usable=range(8))
    assert (from_env.threads, from_env.cores, from_env.source) == (2, (6, 7), "OMP_NUM_THREADS")
    flag = cpu_layout.plan(threads=4, environ={"OMP_NUM_THREADS": "2"}, usable=range(8))
    assert (flag.threads, flag.cores) == (4, (4, 5, 6, 7))


def test_oversubscribed_threads_are_left_unbound():
    layout = cpu_layout.plan(threads=2, environ={}, usable=[0, 1])  # would take the free core
    assert (layout.threads, layout.cores) == (2, None)
    assert "unbound" in layout.describe()


def test_explicit_binding_and_none():
    listed = cpu_layout.plan(bind="0,2-3", environ={}, usable=range(4))
    assert (listed.threads, listed.cores) == (3, (0, 2, 3))
    assert cpu_layout.plan(bind="none", environ={}, usable=range(4)).cores is None
    assert cpu_layout.plan(reserved=0, environ={}, usable=range(4)).cores == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bind": "1-x"}, "not a core list"),
        ({"bind": "7"}, "not usable"),
        ({"reserved": 2}, "cannot reserve"),
        ({"threads": 0}, "at least 1"),
    ],
)
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cpu_layout.plan(environ={}, usable=[0, 1], **kwargs)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_apply_sets_the_calling_threads_torch_threads_and_binding():
    before = os.sched_getaffinity(0)
    core = max(before)
    layout = cpu_layout.plan(threads=1, bind=str(core), environ={})
    seen: dict[str, object] = {}

    def model_thread() -> None:
        layout.apply()
        seen["threads"] = torch.get_num_threads()
        seen["cores"] = os.sched_getaffinity(0)

    t = threading.Thread(target=model_thread)
    t.start()
    t.join()
    assert seen == {"threads": 1, "cores": {core}}
    assert os.sched_getaffinity(0) == before  # only the thread that applied it is bound


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and two usable cores",
)
def test_the_serving_thread_keeps_off_the_compute_cores():
    layout = cpu_layout.plan(environ={})
    assert layout.free and not set(layout.free) & set(layout.cores or ())
    seen: dict[str, object] = {}

    def main_thread() -> None:
        layout.keep_caller_off_compute_cores()
        seen["cores"] = os.sched_getaffinity(0)

    t = threading.Thread(target=main_thread)
    t.start()
    t.join()
    assert seen["cores"] == set(layout.free)
