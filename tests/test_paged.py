"""Tests of the paged allocator: hand-checked cases, then a state machine against a shadow model
(per-block holder counts and a FIFO list for the free queue)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minipaged.alloc import paged as library_paged
from minipaged.alloc.base import Allocation
from minipaged.alloc.paged import PagedAllocator
from minipaged.errors import (
    DoubleFree,
    InvalidHandle,
    InvalidRequest,
    InvalidState,
    OutOfMemory,
)
from minipaged.lessons import under_test

# The code under test: the library's, or a student's file under `minipaged lesson check`.
PagedAllocator = under_test("PagedAllocator", PagedAllocator)


def snapshot(p: PagedAllocator):
    """Everything observable about ``p``: a failed call must leave all of it unchanged."""
    return (
        p.free_queue(),
        [p.refcount(b) for b in range(p.num_blocks)],
        [(a.id, a.offset, a.size, a.requested, a.blocks) for a in p.allocations()],
        p.stats(),
        p.free_extents(),
    )


def raises_unchanged(p: PagedAllocator, exc: type[Exception], fn, *args):
    before = snapshot(p)
    with pytest.raises(exc) as info:
        fn(*args)
    assert snapshot(p) == before
    return info.value


# ----- hand-checked unit tests ---------------------------------------------------------------


def test_fresh_pool():
    p = PagedAllocator(4, 16)
    assert (p.num_blocks, p.block_size, p.total) == (4, 16, 64)
    assert p.free_queue() == [0, 1, 2, 3]
    assert p.num_free_blocks == 4
    assert p.free_extents() == [(0, 64)]
    assert p.largest_free() == 64
    assert p.allocations() == []
    assert all(p.is_free(b) and p.refcount(b) == 0 for b in range(4))


def test_allocate_block_takes_head_and_decref_returns_to_tail():
    p = PagedAllocator(6, 4)
    assert [p.allocate_block() for _ in range(4)] == [0, 1, 2, 3]
    assert p.free_queue() == [4, 5]
    assert p.decref(2) == 0
    assert p.decref(0) == 0
    # least recently freed first: the never-used blocks, then 2, then 0
    assert p.free_queue() == [4, 5, 2, 0]
    assert [p.allocate_block() for _ in range(4)] == [4, 5, 2, 0]
    assert p.num_free_blocks == 0


def test_take_from_middle_of_queue():
    p = PagedAllocator(6, 2)
    p.take(3)
    assert p.free_queue() == [0, 1, 2, 4, 5]
    assert p.refcount(3) == 1 and not p.is_free(3)
    p.take(0)  # head
    p.take(5)  # tail
    assert p.free_queue() == [1, 2, 4]
    raises_unchanged(p, InvalidState, p.take, 3)
    assert p.decref(3) == 0
    assert p.free_queue() == [1, 2, 4, 3]


def test_ref_counts():
    p = PagedAllocator(3, 8)
    b = p.allocate_block()
    assert p.incref(b) == 2
    assert p.incref(b) == 3
    assert p.decref(b) == 2
    assert p.decref(b) == 1
    assert b not in p.free_queue()
    assert p.decref(b) == 0
    assert p.free_queue() == [1, 2, 0]
    raises_unchanged(p, DoubleFree, p.decref, b)
    raises_unchanged(p, InvalidState, p.incref, b)


def test_out_of_blocks():
    p = PagedAllocator(2, 8)
    p.allocate_block()
    p.allocate_block()
    e = raises_unchanged(p, OutOfMemory, p.allocate_block)
    assert (e.requested, e.free, e.fragmented) == (1, 0, False)
    assert "blocks" in str(e)


@pytest.mark.parametrize("bad", [-1, 4, 100, True, 1.0, "1", None])
def test_bad_block_ids(bad):
    p = PagedAllocator(4, 2)
    p.allocate_block()
    for fn in (p.take, p.incref, p.decref, p.refcount, p.is_free):
        e = raises_unchanged(p, InvalidHandle, fn, bad)
        assert repr(bad) in str(e) or str(bad) in str(e)


def test_numpy_block_ids_are_accepted():
    p = PagedAllocator(4, 2)
    p.take(np.int64(2))
    assert p.incref(np.int32(2)) == 2
    assert p.free_queue() == [0, 1, 3]


@pytest.mark.parametrize("seed", range(5))
def test_unchecked_fast_paths_change_the_pool_as_the_checked_calls_do(seed):
    """``_take``, ``_share`` and ``_drop`` (what the block manager calls for ids from its own
    tables) are ``take``, ``incref`` and ``decref`` without the checks: on valid ids they return
    the same counts and leave the same queue. Library internals, so the library's class."""
    rng = np.random.default_rng(seed)
    checked, fast = library_paged.PagedAllocator(8, 2), library_paged.PagedAllocator(8, 2)
    for _ in range(200):
        b = int(rng.integers(8))
        if checked.is_free(b):
            ops = [(checked.take, fast._take)]
        else:
            ops = [(checked.incref, fast._share), (checked.decref, fast._drop)]
        checked_op, fast_op = ops[int(rng.integers(len(ops)))]
        assert checked_op(b) == fast_op(b)
        assert snapshot(fast) == snapshot(checked)
        if checked.num_free_blocks and rng.random() < 0.2:  # keep the queue's order moving
            assert checked.allocate_block() == fast.allocate_block()


def test_alloc_takes_ceil_blocks_from_head():
    p = PagedAllocator(8, 4)
    a = p.alloc(9)  # 3 blocks
    assert a.blocks == (0, 1, 2)
    assert (a.offset, a.size, a.requested, a.waste) == (0, 12, 9, 3)
    b = p.alloc(4)  # exactly one block: no waste
    assert (b.blocks, b.waste) == ((3,), 0)
    p.free(a)
    assert p.free_queue() == [4, 5, 6, 7, 0, 1, 2]
    c = p.alloc(20)  # 5 blocks, not adjacent: paging needs no contiguity
    assert c.blocks == (4, 5, 6, 7, 0)
    assert c.offset == 16
    assert p.allocations() == [b, c]
    s = p.stats()
    assert (s.reserved, s.requested, s.free, s.allocations) == (24, 24, 8, 2)
    assert s.largest_free == 8 and p.free_extents() == [(4, 8)]


def test_internal_fragmentation_below_one_block():
    p = PagedAllocator(64, 16)
    for n in range(1, 200):
        a = p.alloc(n)
        assert 0 <= a.waste <= p.block_size - 1
        p.free(a)


def test_free_keeps_blocks_shared_elsewhere():
    p = PagedAllocator(4, 2)
    a = p.alloc(4)
    assert p.incref(1) == 2
    p.free(a)
    assert p.free_queue() == [2, 3, 0]
    assert p.refcount(1) == 1
    s = p.stats()
    assert (s.reserved, s.free, s.allocations) == (2, 6, 0)


def test_alloc_out_of_memory_is_never_fragmented():
    p = PagedAllocator(4, 4)
    p.alloc(4)
    p.take(2)
    assert p.largest_free() == 8
    assert p.alloc(8).blocks == (1, 3)  # two non-adjacent blocks serve one request
    p.decref(2)
    e = raises_unchanged(p, OutOfMemory, p.alloc, 5)
    assert (e.requested, e.free, e.largest_free, e.fragmented) == (5, 4, 4, False)


@pytest.mark.parametrize("bad", [0, -3, 33, 1.5, True, "4", None])
def test_alloc_invalid_request(bad):
    p = PagedAllocator(4, 8)
    e = raises_unchanged(p, InvalidRequest, p.alloc, bad)
    assert repr(bad) in str(e) or str(bad) in str(e)


def test_double_free_and_foreign_handles():
    p, q = PagedAllocator(4, 2), PagedAllocator(4, 2)
    a = p.alloc(3)
    p.free(a)
    raises_unchanged(p, DoubleFree, p.free, a)
    raises_unchanged(p, InvalidHandle, p.free, q.alloc(1))
    made_up = Allocation(offset=0, size=2, requested=2, blocks=(0,))
    raises_unchanged(p, InvalidHandle, p.free, made_up)
    raises_unchanged(p, InvalidHandle, p.free, "not an allocation")
    raises_unchanged(p, InvalidHandle, p.free, [0])


def test_free_after_blocks_were_freed_directly():
    p = PagedAllocator(4, 2)
    a = p.alloc(4)
    p.decref(1)  # misuse: drops the allocation's own hold on block 1
    e = raises_unchanged(p, DoubleFree, p.free, a)
    assert "block 1" in str(e)


@pytest.mark.parametrize(
    "args", [(-1, 16), (4, 0), (4, -2), (2.0, 16), (4, 1.5), (True, 16), (4, True), ("4", 16)]
)
def test_bad_constructor_args(args):
    with pytest.raises(InvalidRequest) as info:
        PagedAllocator(*args)
    assert any(repr(v) in str(info.value) for v in args)


def test_empty_pool():
    p = PagedAllocator(0, 16)
    assert p.total == 0 and p.free_queue() == [] and p.largest_free() == 0
    raises_unchanged(p, OutOfMemory, p.allocate_block)
    raises_unchanged(p, InvalidRequest, p.alloc, 1)
    raises_unchanged(p, InvalidHandle, p.take, 0)


# ----- state machine -------------------------------------------------------------------------


class PagedMachine(RuleBasedStateMachine):
    """Drives both APIs at once. Shadow model: ``live`` (Allocations), ``bare`` (one entry per
    block-level hold), and ``queue`` (the free queue as a plain FIFO list)."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 5))
    def setup(self, num_blocks, block_size):
        self.p = PagedAllocator(num_blocks, block_size)
        self.n, self.bs = num_blocks, block_size
        self.live: list[Allocation] = []
        self.freed: list[Allocation] = []
        self.bare: list[int] = []
        self.queue = list(range(num_blocks))

    def holders(self, b: int) -> int:
        return sum(b in a.blocks for a in self.live) + self.bare.count(b)

    def fails(self, exc, fn, *args):
        return raises_unchanged(self.p, exc, fn, *args)

    # -- common interface

    @rule(n=st.integers(1, 24))
    def alloc(self, n):
        need = -(-n // self.bs)
        if n > self.n * self.bs:
            self.fails(InvalidRequest, self.p.alloc, n)
        elif need > len(self.queue):
            e = self.fails(OutOfMemory, self.p.alloc, n)
            assert not e.fragmented and e.free == len(self.queue) * self.bs
        else:
            a = self.p.alloc(n)
            assert a.blocks == tuple(self.queue[:need])
            del self.queue[:need]
            assert (a.requested, a.size, a.offset) == (n, need * self.bs, a.blocks[0] * self.bs)
            assert a.waste < self.bs
            self.live.append(a)

    @rule(bad=st.sampled_from([0, -1, "too big", 2.0, True, None]))
    def alloc_invalid(self, bad):
        n = self.n * self.bs + 1 if bad == "too big" else bad
        self.fails(InvalidRequest, self.p.alloc, n)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        a = self.live.pop(i % len(self.live))
        self.p.free(a)
        self.queue += [b for b in a.blocks if self.holders(b) == 0]
        self.freed.append(a)

    @precondition(lambda self: self.freed)
    @rule(i=st.integers(0, 100))
    def double_free(self, i):
        self.fails(DoubleFree, self.p.free, self.freed[i % len(self.freed)])

    @rule(n=st.integers(1, 4), made_up=st.booleans())
    def free_foreign(self, n, made_up):
        if made_up:
            a = Allocation(offset=0, size=self.bs, requested=1, blocks=(0,))
        else:
            a = PagedAllocator(4, self.bs).alloc(n)
        self.fails(InvalidHandle, self.p.free, a)

    # -- block-level API

    @rule()
    def allocate_block(self):
        if not self.queue:
            e = self.fails(OutOfMemory, self.p.allocate_block)
            assert not e.fragmented
        else:
            assert self.p.allocate_block() == self.queue[0]
            self.bare.append(self.queue.pop(0))

    @rule(i=st.integers(0, 100), from_queue=st.booleans())
    def take(self, i, from_queue):
        b = self.queue[i % len(self.queue)] if from_queue and self.queue else i % self.n
        if self.holders(b):
            self.fails(InvalidState, self.p.take, b)
        else:
            self.p.take(b)
            self.queue.remove(b)
            self.bare.append(b)

    @rule(i=st.integers(0, 100))
    def incref(self, i):
        b = i % self.n
        if not self.holders(b):
            self.fails(InvalidState, self.p.incref, b)
        else:
            assert self.p.incref(b) == self.holders(b) + 1
            self.bare.append(b)

    @precondition(lambda self: self.bare)
    @rule(i=st.integers(0, 100))
    def decref(self, i):
        b = self.bare.pop(i % len(self.bare))
        left = self.holders(b)
        assert self.p.decref(b) == left
        if left == 0:
            self.queue.append(b)

    @precondition(lambda self: self.queue)
    @rule(i=st.integers(0, 100))
    def decref_free(self, i):
        self.fails(DoubleFree, self.p.decref, self.queue[i % len(self.queue)])

    @rule(
        op=st.sampled_from(["take", "incref", "decref", "refcount", "is_free"]),
        past_end=st.booleans(),
        k=st.integers(0, 3),
    )
    def bad_block_id(self, op, past_end, k):
        b = self.n + k if past_end else -1 - k
        self.fails(InvalidHandle, getattr(self.p, op), b)

    # -- invariants

    @invariant()
    def ref_counts_match_holders(self):
        for b in range(self.n):
            h = self.holders(b)
            assert self.p.refcount(b) == h
            assert self.p.is_free(b) == (h == 0)

    @invariant()
    def queue_matches_fifo_model(self):
        q = self.p.free_queue()
        assert q == self.queue
        assert len(set(q)) == len(q)
        assert set(q) == {b for b in range(self.n) if self.holders(b) == 0}
        assert self.p.num_free_blocks == len(q)

    @invariant()
    def allocations_match_model(self):
        got = self.p.allocations()
        assert sorted(map(id, got)) == sorted(map(id, self.live))
        assert [a.offset for a in got] == sorted(a.offset for a in got)
        used = [b for a in got for b in a.blocks]
        assert len(used) == len(set(used))  # live allocations never share a block
        assert not set(used) & set(self.queue)  # and none of theirs is free

    @invariant()
    def units_add_up(self):
        s = self.p.stats()
        assert s.reserved + s.free == s.total == self.n * self.bs
        assert s.free == len(self.queue) * self.bs == self.p.largest_free() == s.largest_free
        assert s.requested == sum(a.requested for a in self.live)
        ext = self.p.free_extents()
        assert sum(length for _, length in ext) == s.free and len(ext) == s.free_extents
        for (o1, l1), (o2, _) in zip(ext, ext[1:], strict=False):
            assert o1 + l1 < o2  # sorted and coalesced
        free_units = {u for o, length in ext for u in range(o, o + length)}
        assert free_units == {b * self.bs + k for b in self.queue for k in range(self.bs)}
        for a in self.live:
            for b in a.blocks:
                assert b * self.bs not in free_units


TestPagedMachine = PagedMachine.TestCase
TestPagedMachine.settings = settings(max_examples=200, stateful_step_count=30)
