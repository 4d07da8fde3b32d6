"""Property-based tests of the radix prefix cache against a page-level trie written in Python.

The oracle (`Model`) keeps one entry per cached page-prefix (extra_key, tokens[: (i + 1) * P]) with
its global page, its local page (or None), its last access tick and its lock count, and implements
the semantics promised by cpp/radix_cache.h page by page, with no nodes at all:

* a logical clock ticks once per insert and once per match_prefix whose length is > 0;
* match_prefix returns the longest usable prefix (local pages must cover the chunk of its end);
* insert keeps already-cached pages, fills missing local pages, adopts new ones;
* evict frees unlocked leaf page-prefixes, least recently used first (deeper first on ties);
* evict_local drops local pages of unlocked page-prefixes in the same order.

The state machine drives the C++ RadixCache and the oracle with the same operations and, after
every step, compares counters, pool reference counts (which pages the tree holds) and the match
length of every cached leaf, and runs both structures' own check().
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pyllama4 import KVPool, RadixCache

TOKENS = st.integers(0, 2)  # a tiny alphabet: prefixes are shared and nodes split often
EXTRA_KEYS = st.integers(0, 1)

Key = tuple[int, tuple[int, ...]]  # (extra_key, tokens of a whole number of pages)


@dataclass
class Entry:
    glob: int
    local: int | None
    tick: int
    locks: int = 0


class Model:
    """The page-level oracle: a dict from page-prefix to Entry (closed under prefixes)."""

    def __init__(self, page_size: int, chunk_size: int):
        self.P = page_size
        self.C = chunk_size
        self.pages: dict[Key, Entry] = {}
        self.clock = 0
        self.stats = dict.fromkeys(
            (
                "lookups",
                "lookup_tokens",
                "hit_tokens",
                "inserted_tokens",
                "evicted_global_pages",
                "evicted_local_pages",
            ),
            0,
        )

    # -- helpers ---------------------------------------------------------------------------------
    def key(self, extra_key: int, tokens, i: int) -> Key:
        return (extra_key, tuple(tokens[: (i + 1) * self.P]))

    def page_index(self, key: Key) -> int:
        return len(key[1]) // self.P - 1

    def chunk_first_page(self, position: int) -> int:
        if self.C == 0:
            return 0
        return position // self.C * (self.C // self.P)

    def present_pages(self, extra_key: int, tokens) -> int:
        m = 0
        while m < len(tokens) // self.P and self.key(extra_key, tokens, m) in self.pages:
            m += 1
        return m

    def usable_pages(self, extra_key: int, tokens) -> int:
        m = self.present_pages(extra_key, tokens)
        if self.C == 0 or m == 0:
            return m
        for i in range(self.chunk_first_page(m * self.P), m):
            if self.pages[self.key(extra_key, tokens, i)].local is None:
                return i
        return m

    def leaves(self) -> list[Key]:
        parents = {(ek, toks[: -self.P]) for ek, toks in self.pages}
        return [k for k in self.pages if k not in parents]

    # -- operations ------------------------------------------------------------------------------
    def match(self, extra_key: int, tokens) -> dict:
        length = self.usable_pages(extra_key, tokens)
        entries = [self.pages[self.key(extra_key, tokens, i)] for i in range(length)]
        if length > 0:
            self.clock += 1
            for e in entries:
                e.tick = self.clock
        first = self.chunk_first_page(length * self.P)
        self.stats["lookups"] += 1
        self.stats["lookup_tokens"] += len(tokens) // self.P * self.P
        self.stats["hit_tokens"] += length * self.P
        return {
            "length": length * self.P,
            "global_pages": [e.glob for e in entries],
            "local_pages": [e.local for e in entries[first:]] if self.C else [],
            "local_first_page": first,
        }

    def insert(self, extra_key: int, tokens, global_pages, local_pages) -> int:
        self.clock += 1
        present = self.present_pages(extra_key, tokens)
        for i in range(len(tokens) // self.P):
            local = None
            if self.C and local_pages is not None and local_pages[i] >= 0:
                local = local_pages[i]
            k = self.key(extra_key, tokens, i)
            e = self.pages.get(k)
            if e is None:
                self.pages[k] = Entry(global_pages[i], local, self.clock)
                self.stats["inserted_tokens"] += self.P
            else:
                if e.local is None and local is not None:
                    e.local = local
                e.tick = self.clock
        return present * self.P

    def lock(self, extra_key: int, tokens, delta: int) -> None:
        for i in range(len(tokens) // self.P):
            e = self.pages[self.key(extra_key, tokens, i)]
            e.locks += delta
            assert e.locks >= 0

    def lru(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.pages[k].tick, -self.page_index(k)))

    def evict(self, n: int) -> int:
        freed = 0
        while freed < n:
            candidates = [k for k in self.leaves() if self.pages[k].locks == 0]
            if not candidates:
                break
            victim = self.pages.pop(self.lru(candidates))
            self.stats["evicted_global_pages"] += 1
            self.stats["evicted_local_pages"] += victim.local is not None
            freed += 1
        return freed

    def evict_local(self, n: int) -> int:
        freed = 0
        while freed < n:
            candidates = [k for k, e in self.pages.items() if e.locks == 0 and e.local is not None]
            if not candidates:
                break
            self.pages[self.lru(candidates)].local = None
            self.stats["evicted_local_pages"] += 1
            freed += 1
        return freed


class RadixMachine(RuleBasedStateMachine):
    """Drives the C++ RadixCache and the Model in lockstep. Subclasses pick the configuration."""

    PAGE = 2
    CHUNK = 4
    GLOBAL_PAGES = 40
    LOCAL_PAGES = 24
    MAX_PAGES = 6  # pages per key

    def __init__(self):
        super().__init__()
        self.gpool = KVPool(self.GLOBAL_PAGES, self.PAGE)
        self.lpool = KVPool(self.LOCAL_PAGES, self.PAGE) if self.CHUNK else None
        self.cache = RadixCache(self.gpool, self.lpool, self.CHUNK)
        self.model = Model(self.PAGE, self.CHUNK)
        self.keys: list[tuple[int, list[int]]] = []  # inserted keys, to derive related ones
        self.locks: list[tuple[int, int, tuple[int, ...]]] = []  # (node id, extra key, path)

    # -- key generation --------------------------------------------------------------------------
    def draw_key(self, data, inserting: bool = False) -> tuple[int, list[int]]:
        """Mostly a key related to an inserted one (cut, then extended), else a fresh one.

        Draws are arranged so that hypothesis' preferred small values mean "related", "same extra
        key" and "cut near the end": matches then hit often.
        """
        max_tokens = self.MAX_PAGES * self.PAGE + self.PAGE - 1
        # Bases: the cached leaves (so that matches hit), else keys inserted earlier.
        bases = sorted(self.model.leaves()) or self.keys
        if bases and data.draw(st.integers(0, 3), label="fresh") < 3:
            extra_key, base = data.draw(st.sampled_from(bases), label="base")
            base = list(base)
            if data.draw(st.integers(0, 3), label="other extra key") == 3:
                extra_key ^= 1
            cut = len(base) - data.draw(st.integers(0, len(base)), label="cut from the end")
            tail = data.draw(st.lists(TOKENS, max_size=max_tokens - cut), label="tail")
            tokens = base[:cut] + tail
        else:
            extra_key = data.draw(EXTRA_KEYS, label="extra_key")
            tokens = data.draw(st.lists(TOKENS, min_size=1, max_size=max_tokens), label="tokens")
        if inserting:
            self.keys.append((extra_key, tokens))
        return extra_key, tokens

    # -- eviction helpers (shared by rules) ------------------------------------------------------
    def do_evict(self, n: int) -> None:
        locked = any(e.locks for e in self.model.pages.values())
        expected = self.model.evict(n)
        assert self.cache.evict(n) == expected
        if expected:
            event("evict freed pages" + (" with some locked" if locked else ""))
        if expected < n and locked:
            event("evict stopped by locks")

    def do_evict_local(self, n: int) -> None:
        expected = self.model.evict_local(n)
        assert self.cache.evict_local(n) == expected
        if expected:
            event("evict_local freed pages")

    # -- rules -----------------------------------------------------------------------------------
    @initialize(data=st.data(), n=st.integers(1, 4))
    def seed(self, data, n):
        """Starts every run with a few keys, so that all runs have something to match and evict."""
        for _ in range(n):
            self.insert(data)

    @rule(data=st.data())
    def insert(self, data):
        extra_key, tokens = self.draw_key(data, inserting=True)
        n = len(tokens) // self.PAGE
        tokens = tokens[: n * self.PAGE]
        # Make room as a caller would (this may evict part of the key itself, so measure after).
        if self.gpool.num_free < n:
            self.do_evict(n - self.gpool.num_free)
            if self.gpool.num_free < n:
                return  # too much is locked; nothing to do
        # `reuse`: like a request that matched the prefix first, pass the tree's own pages (holding
        # a reference on each) for the cached part; otherwise pass fresh duplicates.
        reuse = data.draw(st.booleans(), label="reuse")
        present = self.model.present_pages(extra_key, tokens) if reuse else 0
        entries = [self.model.pages[self.model.key(extra_key, tokens, i)] for i in range(present)]
        global_pages = [e.glob for e in entries]
        for p in global_pages:
            self.gpool.ref(p)
        global_pages += self.gpool.alloc(n - present)

        local_pages = None
        if self.CHUNK:
            # Mostly present, so that matches are often usable; absent ones make gaps.
            want = data.draw(
                st.lists(st.integers(0, 3), min_size=n, max_size=n).map(
                    lambda w: [x < 3 for x in w]
                ),
                label="local",
            )
            local_pages = []
            for i in range(n):
                if i < present and entries[i].local is not None:
                    self.lpool.ref(entries[i].local)
                    local_pages.append(entries[i].local)
                elif want[i] and self.lpool.num_free > 0:
                    local_pages += self.lpool.alloc(1)
                else:
                    local_pages.append(-1)
            if all(p < 0 for p in local_pages) and data.draw(st.booleans(), label="none"):
                local_pages = None

        as_numpy = data.draw(st.booleans(), label="numpy")
        arr = (lambda x: np.asarray(x, dtype=np.int32)) if as_numpy else list
        got = self.cache.insert(
            arr(tokens),
            arr(global_pages),
            None if local_pages is None else arr(local_pages),
            extra_key,
        )
        gaps = [
            i
            for i in range(self.model.present_pages(extra_key, tokens))
            if local_pages is not None
            and local_pages[i] >= 0
            and self.model.pages[self.model.key(extra_key, tokens, i)].local is None
        ]
        assert got == self.model.insert(extra_key, tokens, global_pages, local_pages)
        if got:
            event("insert with a cached prefix")
        if gaps:
            event("insert filled a local gap")
        # The caller drops its own references: duplicates return to the free lists.
        for p in global_pages:
            self.gpool.unref(p)
        for p in local_pages or []:
            if p >= 0:
                self.lpool.unref(p)

    @rule(data=st.data(), lock=st.booleans())
    def match_prefix(self, data, lock):
        extra_key, tokens = self.draw_key(data)
        got = self.cache.match_prefix(tokens, extra_key)
        expected = self.model.match(extra_key, tokens)
        node = got.pop("node")
        assert got == expected
        if got["length"] < self.model.present_pages(extra_key, tokens) * self.PAGE:
            event("match shortened by a missing local page")
        if got["length"]:
            event("match hit")
        length = got["length"] // self.PAGE
        path = tuple(tokens[: length * self.PAGE])
        if length == 0:
            assert node == 0  # the root
        else:
            assert node != 0
        # A locked node is never evicted, trimmed or re-numbered: the same path, the same node.
        for held, held_key, held_path in self.locks:
            if (held_key, held_path) == (extra_key, path):
                assert node == held
            else:
                assert node != held
        if lock and length > 0:
            self.cache.lock(node)
            self.model.lock(extra_key, path, +1)
            self.locks.append((node, extra_key, path))

    @rule(data=st.data())
    def unlock(self, data):
        if not self.locks:
            return
        i = data.draw(st.integers(0, len(self.locks) - 1), label="which lock")
        node, extra_key, path = self.locks.pop(i)
        self.cache.unlock(node)
        self.model.lock(extra_key, path, -1)

    @rule(n=st.integers(0, 12))
    def evict(self, n):
        self.do_evict(n)

    @rule(n=st.integers(0, 8))
    def evict_local(self, n):
        self.do_evict_local(n)  # a no-op returning 0 without a local pool

    @rule(data=st.data())
    def peek_prefix(self, data):
        extra_key, tokens = self.draw_key(data)
        assert self.cache.peek_prefix(tokens, extra_key) == (
            self.model.usable_pages(extra_key, tokens) * self.PAGE
        )

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def structures_are_consistent(self):
        assert self.cache.check() == ""
        assert self.gpool.check() == ""
        if self.lpool is not None:
            assert self.lpool.check() == ""

    @invariant()
    def counters_match_the_model(self):
        entries = self.model.pages.values()
        cached_g = len(entries)
        cached_l = sum(e.local is not None for e in entries)
        evictable_g = sum(e.locks == 0 for e in entries)
        evictable_l = sum(e.locks == 0 and e.local is not None for e in entries)
        c = self.cache
        assert (c.cached_global_pages, c.cached_local_pages) == (cached_g, cached_l)
        assert (c.evictable_global_pages, c.evictable_local_pages) == (evictable_g, evictable_l)
        assert c.protected_global_pages == cached_g - evictable_g
        assert c.protected_local_pages == cached_l - evictable_l
        assert 0 <= c.num_nodes <= cached_g
        stats = c.stats()
        assert {k: getattr(stats, k) for k in self.model.stats} == self.model.stats

    @invariant()
    def pools_hold_exactly_the_cached_pages(self):
        # The test holds no pages between steps, so the tree is the only holder.
        entries = self.model.pages.values()
        glob = {e.glob for e in entries}
        assert len(glob) == len(entries)
        assert self.gpool.num_free == self.GLOBAL_PAGES - len(glob)
        for p in range(self.GLOBAL_PAGES):
            assert self.gpool.ref_count(p) == (p in glob), p
        if self.lpool is not None:
            local = {e.local for e in entries if e.local is not None}
            assert self.lpool.num_free == self.LOCAL_PAGES - len(local)
            for p in range(self.LOCAL_PAGES):
                assert self.lpool.ref_count(p) == (p in local), p

    @invariant()
    def every_leaf_and_lock_peeks_like_the_model(self):
        for extra_key, tokens in self.model.leaves():
            usable = self.model.usable_pages(extra_key, tokens)
            assert self.cache.peek_prefix(list(tokens), extra_key) == usable * self.PAGE
        # A locked path keeps all its pages, so it stays fully usable.
        for _, extra_key, path in self.locks:
            assert self.cache.peek_prefix(list(path), extra_key) == len(path)


SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None)


class RadixNoLocalPool(RadixMachine):
    PAGE, CHUNK = 2, 0


class RadixChunk4(RadixMachine):
    PAGE, CHUNK = 2, 4


class RadixChunk8(RadixMachine):
    PAGE, CHUNK = 2, 8


class RadixPage4Chunk8(RadixMachine):
    PAGE, CHUNK, MAX_PAGES, GLOBAL_PAGES, LOCAL_PAGES = 4, 8, 4, 24, 12


class RadixSmallPools(RadixMachine):
    """Tight pools: inserts evict and local pages run out, so eviction runs under pressure."""

    PAGE, CHUNK, GLOBAL_PAGES, LOCAL_PAGES = 2, 4, 12, 6


TestRadixNoLocalPool = RadixNoLocalPool.TestCase
TestRadixNoLocalPool.settings = SETTINGS
TestRadixChunk4 = RadixChunk4.TestCase
TestRadixChunk4.settings = SETTINGS
TestRadixChunk8 = RadixChunk8.TestCase
TestRadixChunk8.settings = SETTINGS
TestRadixPage4Chunk8 = RadixPage4Chunk8.TestCase
TestRadixPage4Chunk8.settings = SETTINGS
TestRadixSmallPools = RadixSmallPools.TestCase
TestRadixSmallPools.settings = SETTINGS


# ---------------------------------------------------------------------------------------------
# Deterministic tests
# ---------------------------------------------------------------------------------------------


def make(page=2, chunk=0, global_pages=32, local_pages=16):
    gpool = KVPool(global_pages, page)
    lpool = KVPool(local_pages, page) if chunk else None
    return gpool, lpool, RadixCache(gpool, lpool, chunk)


def put(cache, gpool, tokens, extra_key=0, lpool=None, local=None):
    """Inserts tokens with fresh pages like a request would; returns (result, global, local)."""
    n = len(tokens) // cache.page_size
    glob = gpool.alloc(n)
    assert glob is not None
    loc = None
    if local is not None:  # local: one bool per page
        loc = [lpool.alloc(1)[0] if want else -1 for want in local]
    got = cache.insert(tokens, glob, loc, extra_key)
    for p in glob:
        gpool.unref(p)
    for p in loc or []:
        if p >= 0:
            lpool.unref(p)
    return got, glob, loc


def checked(*objects):
    for o in objects:
        if o is not None:
            assert o.check() == ""


def test_split_in_the_middle_of_a_node():
    gpool, _, cache = make()
    _, glob, _ = put(cache, gpool, [1, 1, 2, 2, 3, 3, 4, 4])
    assert cache.num_nodes == 1
    r = cache.match_prefix([1, 1, 2, 2, 9, 9], 0)
    assert r["length"] == 4 and r["global_pages"] == glob[:2] and r["local_pages"] == []
    assert cache.num_nodes == 2  # [1 1 2 2] + [3 3 4 4]
    checked(cache, gpool)
    # The lower half keeps its pages and still matches in full.
    assert cache.match_prefix([1, 1, 2, 2, 3, 3, 4, 4], 0)["global_pages"] == glob
    # A key that diverges inside the lower node splits it again.
    assert put(cache, gpool, [1, 1, 2, 2, 3, 3, 7, 7])[0] == 6
    assert cache.num_nodes == 4
    assert cache.cached_global_pages == 5
    checked(cache, gpool)
    assert cache.match_prefix([1, 1, 2, 2, 3, 3, 4, 4], 0)["global_pages"] == glob


def test_match_node_ids_are_stable_for_locked_nodes():
    gpool, _, cache = make()
    put(cache, gpool, [1, 1, 2, 2, 3, 3])
    node = cache.match_prefix([1, 1, 2, 2, 3, 3], 0)["node"]
    cache.lock(node)
    # Splitting above the locked node keeps its id: it still ends at the same place.
    upper = cache.match_prefix([1, 1], 0)["node"]
    assert upper not in (0, node)
    assert cache.match_prefix([1, 1, 2, 2, 3, 3], 0)["node"] == node
    assert cache.protected_global_pages == 3
    cache.unlock(node)
    assert cache.protected_global_pages == 0
    with pytest.raises(RuntimeError):
        cache.unlock(node)
    with pytest.raises(KeyError):
        cache.lock(12345)
    checked(cache, gpool)


def test_extra_keys_isolate_equal_tokens():
    gpool, _, cache = make()
    tokens = [1, 2, 3, 4]
    assert put(cache, gpool, tokens, extra_key=0)[0] == 0
    assert cache.match_prefix(tokens, 1)["length"] == 0
    assert cache.peek_prefix(tokens, 7) == 0
    assert cache.peek_prefix(tokens, 0) == 4
    # The same tokens under another key are new: nothing already present, new pages adopted.
    assert put(cache, gpool, tokens, extra_key=1)[0] == 0
    assert cache.cached_global_pages == 4
    a = cache.match_prefix(tokens, 0)
    b = cache.match_prefix(tokens, 1)
    assert a["length"] == b["length"] == 4
    assert set(a["global_pages"]).isdisjoint(b["global_pages"])
    assert a["node"] != b["node"]
    checked(cache, gpool)


def test_insert_returns_the_length_already_present():
    gpool, _, cache = make(page=2)
    assert put(cache, gpool, [1, 2, 3, 4])[0] == 0
    assert put(cache, gpool, [1, 2, 3, 4])[0] == 4
    assert put(cache, gpool, [1, 2, 3, 4, 5, 6])[0] == 4
    assert put(cache, gpool, [1, 2, 9, 9, 5, 6])[0] == 2
    assert put(cache, gpool, [1, 2])[0] == 2
    assert put(cache, gpool, [])[0] == 0
    # Duplicates went back to the free list: the tree holds one page per distinct page-prefix.
    assert cache.cached_global_pages == gpool.num_used == 5
    checked(cache, gpool)


def test_insert_rejects_bad_shapes_without_changing_anything():
    gpool, lpool, cache = make(page=2, chunk=4)
    glob = gpool.alloc(2)
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], glob[:1], None, 0)  # not whole pages
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3, 4], glob[:1], None, 0)  # one global page short
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3, 4], glob, [-1], 0)  # one local page short
    assert cache.cached_global_pages == 0 and cache.num_nodes == 0
    checked(cache, gpool, lpool)


def test_insert_of_a_bad_page_id_raises_and_leaves_the_tree_intact():
    gpool, lpool, cache = make(page=2, chunk=4, global_pages=8, local_pages=8)
    put(cache, gpool, [1, 2], lpool=lpool, local=[True])  # global page 0, local page 0
    before = (cache.cached_global_pages, cache.cached_local_pages, gpool.num_free, lpool.num_free)
    tokens = [1, 2, 3, 4, 5, 6]
    glob = gpool.alloc(3)  # pages 1, 2, 3: page 7 stays free
    loc = lpool.alloc(1)
    bad_calls = [
        (IndexError, [glob[0], glob[1], 99], None),  # out of range
        (RuntimeError, [glob[0], glob[1], 7], None),  # a free page
        (IndexError, glob, [loc[0], -1, 50]),  # local page out of range
        (RuntimeError, glob, [-1, loc[0], 7]),  # local page free
    ]
    for error, g, lp in bad_calls:
        with pytest.raises(error):
            cache.insert(tokens, g, lp, 0)
        assert cache.check() == ""
        assert cache.cached_global_pages == 1 and cache.cached_local_pages == 1
        assert all(gpool.ref_count(p) == 1 for p in glob) and lpool.ref_count(loc[0]) == 1
    for p in glob:
        gpool.unref(p)
    lpool.unref(loc[0])
    assert (cache.cached_global_pages, cache.cached_local_pages) == before[:2]
    assert (gpool.num_free, lpool.num_free) == before[2:]
    assert cache.peek_prefix(tokens, 0) == 2
    checked(cache, gpool, lpool)


def test_missing_local_page_shortens_the_match_to_the_chunk_boundary():
    # P = 2, C = 4: pages 0-1 form chunk 0, pages 2-3 chunk 1.
    gpool, lpool, cache = make(page=2, chunk=4)
    tokens = [1, 1, 2, 2, 3, 3]  # 3 pages; the end (6) lies in chunk 1, which starts at page 2
    _, glob, loc = put(cache, gpool, tokens, lpool=lpool, local=[True, True, False])
    r = cache.match_prefix(tokens, 0)
    # Page 2 has no local KV: the usable prefix falls back to the chunk boundary (4 tokens), where
    # no local pages are needed at all.
    assert r["length"] == 4 and r["global_pages"] == glob[:2]
    assert r["local_first_page"] == 2 and r["local_pages"] == []
    assert cache.peek_prefix(tokens, 0) == 4
    # Filling the gap through a second insert makes the whole key usable.
    assert put(cache, gpool, tokens, lpool=lpool, local=[False, False, True])[0] == 6
    r = cache.match_prefix(tokens, 0)
    assert r["length"] == 6 and r["local_first_page"] == 2 and len(r["local_pages"]) == 1
    assert cache.cached_local_pages == 3
    # Earlier chunks never need local pages: without any, the match still reaches the boundary.
    assert cache.evict_local(3) == 3
    assert cache.match_prefix(tokens, 0)["length"] == 4
    checked(cache, gpool, lpool)


def test_missing_local_page_inside_a_chunk_shortens_the_match_to_it():
    gpool, lpool, cache = make(page=2, chunk=8)  # 4 pages per chunk
    tokens = [1, 1, 2, 2, 3, 3]
    _, glob, loc = put(cache, gpool, tokens, lpool=lpool, local=[True, False, True])
    r = cache.match_prefix(tokens, 0)
    assert r["length"] == 2 and r["global_pages"] == glob[:1]
    assert r["local_first_page"] == 0 and r["local_pages"] == loc[:1]
    # A match that ends on a chunk boundary needs no local pages.
    gpool, lpool, cache = make(page=2, chunk=4)
    put(cache, gpool, [1, 1, 2, 2], lpool=lpool, local=[False, False])
    r = cache.match_prefix([1, 1, 2, 2, 3], 0)
    assert r["length"] == 4 and r["local_first_page"] == 2 and r["local_pages"] == []
    r = cache.match_prefix([1, 1], 0)
    assert r["length"] == 0 and r["node"] == 0  # page 0 has no local KV


def test_eviction_is_lru_and_tail_first():
    gpool, _, cache = make(page=2)
    _, a, _ = put(cache, gpool, [1, 1, 2, 2, 3, 3])
    _, b, _ = put(cache, gpool, [4, 4, 5, 5])
    cache.match_prefix([1, 1, 2, 2, 3, 3], 0)  # A is now the most recently used
    assert cache.evict(1) == 1
    assert gpool.ref_count(b[1]) == 0 and gpool.ref_count(b[0]) == 1  # B trimmed from its end
    assert cache.peek_prefix([4, 4, 5, 5], 0) == 2
    assert cache.evict(2) == 2  # the rest of B, then the tail of A
    assert gpool.ref_count(b[0]) == 0 and gpool.ref_count(a[2]) == 0
    assert cache.peek_prefix([1, 1, 2, 2, 3, 3], 0) == 4
    assert cache.evict(100) == 2
    assert cache.cached_global_pages == 0 and cache.num_nodes == 0
    assert gpool.num_free == gpool.num_pages
    checked(cache, gpool)


def test_locked_pages_are_never_evicted():
    gpool, lpool, cache = make(page=2, chunk=4)
    _, a, la = put(cache, gpool, [1, 1, 2, 2, 3, 3], lpool=lpool, local=[True] * 3)
    _, b, lb = put(cache, gpool, [1, 1, 2, 2, 4, 4], lpool=lpool, local=[True] * 3)
    node = cache.match_prefix([1, 1, 2, 2, 3, 3], 0)["node"]
    cache.lock(node)
    assert cache.protected_global_pages == 3 and cache.protected_local_pages == 3
    assert cache.evictable_global_pages == 1 and cache.evictable_local_pages == 1
    assert cache.evict_local(10) == 1 and cache.evict(10) == 1
    assert cache.cached_global_pages == 3 and cache.cached_local_pages == 3
    assert all(gpool.ref_count(p) == 1 for p in a) and all(lpool.ref_count(p) == 1 for p in la)
    assert gpool.ref_count(b[2]) == 0 and lpool.ref_count(lb[2]) == 0
    checked(cache, gpool, lpool)
    cache.unlock(node)
    assert cache.evict(10) == 3 and cache.cached_local_pages == 0
    assert gpool.num_free == gpool.num_pages and lpool.num_free == lpool.num_pages
    checked(cache, gpool, lpool)


def test_evict_local_keeps_global_pages():
    gpool, lpool, cache = make(page=2, chunk=4)
    tokens = [1, 1, 2, 2, 3, 3]
    put(cache, gpool, tokens, lpool=lpool, local=[True] * 3)
    assert cache.peek_prefix(tokens, 0) == 6
    assert cache.evict_local(1) == 1  # the deepest local page goes first
    assert cache.cached_global_pages == 3 and cache.cached_local_pages == 2
    assert cache.peek_prefix(tokens, 0) == 4
    assert cache.evict_local(5) == 2 and cache.evict_local(1) == 0
    assert cache.peek_prefix(tokens, 0) == 4  # [0, 4) is a whole chunk: no local pages needed
    assert cache.peek_prefix(tokens[:2], 0) == 0
    checked(cache, gpool, lpool)


def test_constructor_validates_its_pools():
    g2 = KVPool(4, 2)
    with pytest.raises(ValueError):
        RadixCache(g2, None, 4)  # chunk-local layers need a local pool
    with pytest.raises(ValueError):
        RadixCache(g2, KVPool(4, 2), 0)  # and a local pool needs them
    with pytest.raises(ValueError):
        RadixCache(g2, KVPool(4, 4), 4)  # page sizes differ
    with pytest.raises(ValueError):
        RadixCache(g2, KVPool(4, 2), 3)  # not a multiple of the page size
    cache = RadixCache(g2, KVPool(4, 2), 4)
    assert (cache.page_size, cache.chunk_size) == (2, 4)
