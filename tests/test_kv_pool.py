"""KVPool: reference-counted KV pages. Deterministic checks plus a state machine against a dict."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pyllama4 import KVPool


def test_fresh_pool_and_properties():
    pool = KVPool(4, 8)
    assert (pool.num_pages, pool.page_size, pool.num_free, pool.num_used) == (4, 8, 4, 0)
    assert KVPool(3).page_size == 16  # the default page size
    assert pool.alloc(0) == []
    assert pool.alloc(3) == [0, 1, 2]  # a fresh pool hands out pages in order
    assert (pool.num_free, pool.num_used) == (1, 3)
    assert [pool.ref_count(p) for p in range(4)] == [1, 1, 1, 0]
    assert pool.check() == ""


def test_alloc_returns_none_when_short_and_takes_nothing():
    pool = KVPool(4, 2)
    pages = pool.alloc(3)
    assert pool.alloc(2) is None
    assert pool.num_free == 1 and pool.ref_count(3) == 0
    assert pool.alloc(1) == [3]
    assert pool.alloc(1) is None
    assert pool.alloc(0) == []
    for p in pages + [3]:
        pool.unref(p)
    assert pool.num_free == 4 and pool.alloc(5) is None and pool.num_free == 4
    with pytest.raises(ValueError):
        pool.alloc(-1)
    assert pool.check() == ""


def test_refs_keep_pages_live_and_freed_pages_are_reused_first():
    pool = KVPool(4, 2)
    a, b, _ = pool.alloc(3)
    pool.ref(a)
    pool.ref(a)
    assert pool.ref_count(a) == 3
    pool.unref(a)
    pool.unref(a)
    assert pool.ref_count(a) == 1 and pool.num_free == 1
    pool.unref(b)  # its last reference: free again
    assert pool.ref_count(b) == 0 and pool.num_free == 2
    pool.unref(a)
    assert pool.alloc(1) == [a]  # the free list is a stack: the most recently freed page first
    assert pool.alloc(1) == [b]
    assert pool.check() == ""


def test_misuse_raises_and_changes_nothing():
    pool = KVPool(3, 2)
    (page,) = pool.alloc(1)
    pool.unref(page)
    with pytest.raises(RuntimeError):
        pool.unref(page)  # already free
    with pytest.raises(RuntimeError):
        pool.ref(page)  # free pages have no holder to share with
    for bad in (-1, 3, 1000):
        with pytest.raises(IndexError):
            pool.ref(bad)
        with pytest.raises(IndexError):
            pool.unref(bad)
        with pytest.raises(IndexError):
            pool.ref_count(bad)
    assert pool.num_free == 3 and pool.check() == ""
    assert all(pool.ref_count(p) == 0 for p in range(3))


def test_constructor_validates():
    with pytest.raises(ValueError):
        KVPool(-1, 2)
    with pytest.raises(ValueError):
        KVPool(4, 0)
    with pytest.raises(ValueError):
        KVPool(4, -16)
    empty = KVPool(0, 2)
    assert empty.num_free == 0 and empty.alloc(0) == [] and empty.alloc(1) is None
    assert empty.check() == ""


class PoolMachine(RuleBasedStateMachine):
    """Random alloc/ref/unref against a dict of reference counts."""

    NUM_PAGES = 8

    def __init__(self):
        super().__init__()
        self.pool = KVPool(self.NUM_PAGES, 4)
        self.refs = dict.fromkeys(range(self.NUM_PAGES), 0)

    def live(self):
        return [p for p, r in self.refs.items() if r > 0]

    @rule(n=st.integers(0, 10))
    def alloc(self, n):
        free_before = [p for p, r in self.refs.items() if r == 0]
        got = self.pool.alloc(n)
        if n > len(free_before):
            assert got is None
            return
        assert got is not None and len(got) == n and len(set(got)) == n
        assert set(got) <= set(free_before)
        for p in got:
            self.refs[p] = 1

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def ref(self, data):
        page = data.draw(st.sampled_from(self.live()))
        self.pool.ref(page)
        self.refs[page] += 1

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def unref(self, data):
        page = data.draw(st.sampled_from(self.live()))
        self.pool.unref(page)
        self.refs[page] -= 1

    @rule(page=st.integers(-2, 10))
    def misuse(self, page):
        if not 0 <= page < self.NUM_PAGES:
            with pytest.raises(IndexError):
                self.pool.ref(page)
        elif self.refs[page] == 0:
            with pytest.raises(RuntimeError):
                self.pool.unref(page)

    @invariant()
    def matches_the_model(self):
        assert self.pool.check() == ""
        free = sum(r == 0 for r in self.refs.values())
        assert (self.pool.num_free, self.pool.num_used) == (free, self.NUM_PAGES - free)
        assert [self.pool.ref_count(p) for p in range(self.NUM_PAGES)] == [
            self.refs[p] for p in range(self.NUM_PAGES)
        ]


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
