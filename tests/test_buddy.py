"""Tests of the binary buddy allocator: hand-checked examples, then a state machine that checks
the whole allocator against a shadow model of occupied pages after every step."""

from __future__ import annotations

import re

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minipaged.alloc.base import Allocation, merge_runs
from minipaged.alloc.buddy import BuddyAllocator
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, MinipagedError, OutOfMemory
from minipaged.lessons import under_test

# The code under test: the library's, or a student's file under `minipaged lesson check`.
BuddyAllocator = under_test("BuddyAllocator", BuddyAllocator)


def snapshot(b: BuddyAllocator) -> tuple:
    """Everything observable about ``b``: equal snapshots mean an unchanged allocator."""
    live = [(id(a), a.offset, a.size, a.requested) for a in b.allocations()]
    return (b.free_blocks(), b.buddyinfo(), b.free_extents(), b.largest_free(), b.stats(), live)


def canonical_free_blocks(total: int, max_order: int, occupied: set[int]) -> list[tuple[int, int]]:
    """The free blocks a fully coalesced buddy allocator must hold, derived from the occupied
    pages alone: the largest aligned blocks (order <= max_order, inside the arena) that contain
    no occupied page."""
    out: list[tuple[int, int]] = []

    def visit(offset: int, order: int) -> None:
        pages = range(offset, offset + (1 << order))
        if offset >= total:
            return
        if pages[-1] < total and not occupied.intersection(pages):
            out.append((offset, order))
        elif order > 0:
            visit(offset, order - 1)
            visit(offset + (1 << (order - 1)), order - 1)

    for root in range(0, total, 1 << max_order):
        visit(root, max_order)
    return sorted(out)


# -- hand-checked examples ---------------------------------------------------------------------


def test_worked_example_split_and_merge():
    b = BuddyAllocator(8, 3)
    assert b.free_blocks() == [(0, 3)]
    a = b.alloc(1)
    assert (a.offset, a.size, a.requested) == (0, 1, 1)
    assert b.free_blocks() == [(1, 0), (2, 1), (4, 2)]
    assert b.buddyinfo() == [1, 1, 1, 0]
    b.free(a)
    assert b.free_blocks() == [(0, 3)]
    assert b.buddyinfo() == [0, 0, 0, 1]


def test_merge_waits_for_the_buddy():
    b = BuddyAllocator(8, 3)
    a0, a1, a2 = b.alloc(1), b.alloc(1), b.alloc(2)
    assert (a0.offset, a1.offset, a2.offset) == (0, 1, 2)
    assert b.free_blocks() == [(4, 2)]
    b.free(a0)  # buddy 1 is taken: no merge
    assert b.free_blocks() == [(0, 0), (4, 2)]
    b.free(a2)  # buddy of (2, 1) is (0, 1), not free as a whole: no merge
    assert b.free_blocks() == [(0, 0), (2, 1), (4, 2)]
    b.free(a1)  # (0,0)+(1,0) -> (0,1); +(2,1) -> (0,2); +(4,2) -> (0,3)
    assert b.free_blocks() == [(0, 3)]


def test_merge_stops_at_max_order():
    b = BuddyAllocator(16, 2)
    assert b.free_blocks() == [(0, 2), (4, 2), (8, 2), (12, 2)]
    a = b.alloc(1)
    b.free(a)
    assert b.free_blocks() == [(0, 2), (4, 2), (8, 2), (12, 2)]
    assert b.buddyinfo() == [0, 0, 4]


@pytest.mark.parametrize(
    "total, max_order, blocks",
    [
        (12, 3, [(0, 3), (8, 2)]),
        (12, 4, [(0, 3), (8, 2)]),
        (7, 2, [(0, 2), (4, 1), (6, 0)]),
        (1, 5, [(0, 0)]),
        (5, 0, [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]),
        (24, 3, [(0, 3), (8, 3), (16, 3)]),
        (13, 2, [(0, 2), (4, 2), (8, 2), (12, 0)]),
        (64, 6, [(0, 6)]),
    ],
)
def test_initial_cover(total, max_order, blocks):
    b = BuddyAllocator(total, max_order)
    assert b.free_blocks() == blocks
    assert b.free_extents() == [(0, total)]
    assert b.total == total and b.max_order == max_order
    assert b.allocations() == []
    assert b.free_blocks() == canonical_free_blocks(total, max_order, set())


def test_non_power_of_two_arena_never_merges_past_the_end():
    b = BuddyAllocator(12, 3)
    a = b.alloc_order(2)  # the smallest order with a free block: (8, 2)
    assert a.offset == 8
    assert b.free_blocks() == [(0, 3)]
    b.free(a)  # its buddy (12, 2) lies past the end
    assert b.free_blocks() == [(0, 3), (8, 2)]


def test_buddyinfo():
    b = BuddyAllocator(12, 3)
    assert b.buddyinfo() == [0, 0, 1, 1]
    b.alloc(1)  # splits (8, 2): keeps 8, frees (9, 0) and (10, 1)
    assert b.buddyinfo() == [1, 1, 0, 1]
    assert b.free_blocks() == [(0, 3), (9, 0), (10, 1)]


def test_rounds_up_to_a_power_of_two():
    b = BuddyAllocator(16, 4)
    a = b.alloc(3)
    assert (a.size, a.requested, a.waste) == (4, 3, 1)
    c = b.alloc(5)
    assert (c.offset, c.size, c.requested) == (8, 8, 5)
    d = b.alloc_order(1)
    assert (d.offset, d.size, d.requested) == (4, 2, 2)
    s = b.stats()
    assert (s.reserved, s.requested, s.free, s.allocations) == (14, 10, 2, 3)
    assert b.allocations() == [a, d, c]


def test_lowest_address_within_an_order():
    b = BuddyAllocator(16, 2)
    live = [b.alloc(4) for _ in range(4)]
    assert [a.offset for a in live] == [0, 4, 8, 12]
    b.free(live[3])
    b.free(live[1])
    assert b.alloc(4).offset == 4
    assert b.alloc(4).offset == 12


def test_smallest_order_before_lowest_address():
    b = BuddyAllocator(16, 3)
    low = b.alloc(8)  # (0, 3)
    rest = [b.alloc(1) for _ in range(8)]  # 8..15
    b.free(low)
    b.free(rest[7])  # page 15 free, order 0
    assert b.free_blocks() == [(0, 3), (15, 0)]
    assert b.alloc(1).offset == 15  # order 0 at 15 beats splitting order 3 at 0
    assert b.free_blocks() == [(0, 3)]


def test_largest_free_and_extents():
    b = BuddyAllocator(8, 3)
    pages = [b.alloc(1) for _ in range(8)]
    assert b.largest_free() == 0 and b.free_extents() == []
    for i in (1, 2, 3, 5):
        b.free(pages[i])
    # (1,0), (2,1), (5,0): extents merge the touching blocks 1..3
    assert b.free_blocks() == [(1, 0), (2, 1), (5, 0)]
    assert b.free_extents() == [(1, 3), (5, 1)]
    assert b.largest_free() == 2


# -- failures: typed errors, naming the value, changing nothing --------------------------------


def test_out_of_memory_fragmented_leaves_state_equal():
    b = BuddyAllocator(8, 3)
    pages = [b.alloc(1) for _ in range(8)]
    for p in pages[::2]:
        b.free(p)
    before = snapshot(b)
    with pytest.raises(OutOfMemory) as e:
        b.alloc(2)
    assert (e.value.requested, e.value.free, e.value.largest_free) == (2, 4, 1)
    assert e.value.fragmented
    assert "pages" in str(e.value)
    assert snapshot(b) == before


def test_out_of_memory_missing_leaves_state_equal():
    b = BuddyAllocator(8, 3)
    b.alloc(4)
    b.alloc(2)
    before = snapshot(b)
    with pytest.raises(OutOfMemory) as e:
        b.alloc_order(2)
    assert (e.value.requested, e.value.free, e.value.largest_free) == (4, 2, 2)
    assert not e.value.fragmented
    assert snapshot(b) == before


@pytest.mark.parametrize("bad", [0, -1, 9, 2.0, True, None, "1"])
def test_bad_sizes(bad):
    b = BuddyAllocator(8, 3)
    keep = b.alloc(1)
    before = snapshot(b)
    with pytest.raises(InvalidRequest, match=re.escape(repr(bad))):
        b.alloc(bad)
    assert snapshot(b) == before
    assert b.allocations() == [keep]


@pytest.mark.parametrize(
    "total, max_order, n",
    [(64, 2, 5), (12, 3, 9), (12, 4, 9), (12, 4, 12), (12, 4, 13), (3, 5, 3)],
)
def test_sizes_that_can_never_fit(total, max_order, n):
    b = BuddyAllocator(total, max_order)
    before = snapshot(b)
    with pytest.raises(InvalidRequest, match=str(n)):
        b.alloc(n)
    assert snapshot(b) == before


@pytest.mark.parametrize("bad", [-1, 4, 1.0, True, None])
def test_bad_orders(bad):
    b = BuddyAllocator(12, 5)  # the largest block of this arena has order 3
    before = snapshot(b)
    with pytest.raises(InvalidRequest, match="order"):
        b.alloc_order(bad)
    assert snapshot(b) == before


@pytest.mark.parametrize(
    "total, max_order",
    [(0, 3), (-4, 3), (8, -1), (8.0, 3), (8, 3.0), (True, 0), (8, None), ("8", 3)],
)
def test_bad_constructor_args(total, max_order):
    with pytest.raises(InvalidRequest):
        BuddyAllocator(total, max_order)


def test_double_free_leaves_state_equal():
    b = BuddyAllocator(8, 3)
    a = b.alloc(2)
    keep = b.alloc(1)
    b.free(a)
    before = snapshot(b)
    with pytest.raises(DoubleFree, match="already freed"):
        b.free(a)
    assert snapshot(b) == before
    assert b.allocations() == [keep]


def test_foreign_handles_leave_state_equal():
    b = BuddyAllocator(8, 3)
    a = b.alloc(2)
    other = BuddyAllocator(8, 3)
    theirs = other.alloc(2)
    other.free(theirs)  # freed by the other allocator: still foreign here
    before = snapshot(b)
    forged = Allocation(offset=a.offset, size=a.size, requested=a.requested)
    for handle in (forged, other.alloc(2), theirs, 0, None):
        with pytest.raises(InvalidHandle):
            b.free(handle)
        assert snapshot(b) == before
    b.free(a)
    assert b.free_blocks() == [(0, 3)]


def test_handle_fields_changed_by_the_holder_do_not_matter():
    b = BuddyAllocator(8, 3)
    a = b.alloc(2)
    a.offset, a.size = 4, 4  # the allocator keeps its own record of what it handed out
    b.free(a)
    assert b.free_blocks() == [(0, 3)]


def test_errors_share_the_base_class():
    b = BuddyAllocator(4, 2)
    b.alloc(4)
    for call in (lambda: b.alloc(1), lambda: b.alloc(0), lambda: b.free(None)):
        with pytest.raises(MinipagedError):
            call()


# -- the state machine -------------------------------------------------------------------------


class BuddyMachine(RuleBasedStateMachine):
    """Random sequences of alloc / alloc_order / free / double free / foreign free over a small
    arena, cross-checked after every step against a shadow set of occupied pages."""

    @initialize(total=st.integers(1, 64), max_order=st.integers(0, 6))
    def setup(self, total: int, max_order: int) -> None:
        self.b = BuddyAllocator(total, max_order)
        self.total, self.max_order = total, max_order
        self.top = min(max_order, total.bit_length() - 1)  # largest order this arena can hold
        self.initial_blocks = self.b.free_blocks()
        self.live: list[Allocation] = []
        self.freed: list[Allocation] = []
        self.occupied: set[int] = set()  # the shadow model

    # helpers

    def expect_unchanged(self, error: type[Exception], call) -> Exception:
        before = snapshot(self.b)
        with pytest.raises(error) as e:
            call()
        assert snapshot(self.b) == before
        return e.value

    def do_alloc(self, order: int, requested: int, call) -> None:
        """Predict the block from the free lists (smallest order >= ``order``, then lowest
        address), make the call, and check the allocator took exactly that block."""
        candidates = [(k, off) for off, k in self.b.free_blocks() if k >= order]
        if not candidates:
            e = self.expect_unchanged(OutOfMemory, call)
            assert e.requested == requested
            assert e.largest_free < (1 << order)
            assert e.free == self.total - len(self.occupied)
            return
        _, expected_offset = min(candidates)
        a = call()
        assert (a.offset, a.size, a.requested) == (expected_offset, 1 << order, requested)
        pages = set(range(a.offset, a.end))
        assert not pages & self.occupied
        self.occupied |= pages
        self.live.append(a)

    # rules

    @rule(data=st.data())
    def alloc(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, 1 << self.max_order), label="n")
        if n > (1 << self.top):
            self.expect_unchanged(InvalidRequest, lambda: self.b.alloc(n))
            return
        self.do_alloc((n - 1).bit_length(), n, lambda: self.b.alloc(n))

    @rule(data=st.data())
    def alloc_order(self, data: st.DataObject) -> None:
        order = data.draw(st.integers(0, self.max_order + 1), label="order")
        if order > self.top:
            self.expect_unchanged(InvalidRequest, lambda: self.b.alloc_order(order))
            return
        self.do_alloc(order, 1 << order, lambda: self.b.alloc_order(order))

    @rule(n=st.sampled_from([0, -1, 1000, 1.5, True, None]))
    def alloc_invalid(self, n: object) -> None:
        self.expect_unchanged(InvalidRequest, lambda: self.b.alloc(n))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.live), label="victim")
        self.b.free(a)
        self.live.remove(a)
        self.freed.append(a)
        self.occupied -= set(range(a.offset, a.end))

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.freed), label="freed")
        self.expect_unchanged(DoubleFree, lambda: self.b.free(a))

    @rule(data=st.data())
    def foreign_free(self, data: st.DataObject) -> None:
        if self.live and data.draw(st.booleans(), label="forge a live one"):
            a = data.draw(st.sampled_from(self.live), label="original")
            handle = Allocation(offset=a.offset, size=a.size, requested=a.requested)
        else:
            handle = BuddyAllocator(self.total, self.max_order).alloc(1)
        self.expect_unchanged(InvalidHandle, lambda: self.b.free(handle))

    @rule()
    def free_everything(self) -> None:
        for a in list(self.live):
            self.b.free(a)
            self.freed.append(a)
        self.live.clear()
        self.occupied.clear()
        assert self.b.free_blocks() == self.initial_blocks

    # invariants: the whole state, after every step

    @invariant()
    def pages_add_up(self) -> None:
        s = self.b.stats()
        assert s.total == self.total
        assert s.reserved + s.free == self.total
        assert s.reserved == len(self.occupied)
        assert s.allocations == len(self.live)
        assert s.requested == sum(a.requested for a in self.live)

    @invariant()
    def no_overlaps_and_full_cover(self) -> None:
        owner = [0] * self.total
        for a in self.b.allocations():
            for p in range(a.offset, a.end):
                owner[p] += 1
        for off, k in self.b.free_blocks():
            assert off + (1 << k) <= self.total
            for p in range(off, off + (1 << k)):
                owner[p] += 1
        assert owner == [1] * self.total
        occupied = {p for a in self.b.allocations() for p in range(a.offset, a.end)}
        assert occupied == self.occupied

    @invariant()
    def live_allocations_match(self) -> None:
        got = self.b.allocations()
        assert {id(a) for a in got} == {id(a) for a in self.live}
        assert [a.offset for a in got] == sorted(a.offset for a in self.live)
        for a in got:
            assert a.size & (a.size - 1) == 0 and a.offset % a.size == 0
            assert a.requested <= a.size < 2 * a.requested  # rounded up to a power of two

    @invariant()
    def free_blocks_aligned_and_coalesced(self) -> None:
        blocks = self.b.free_blocks()
        free = set(blocks)
        for off, k in blocks:
            assert 0 <= k <= self.max_order
            assert off % (1 << k) == 0
            if k < self.max_order:
                assert (off ^ (1 << k), k) not in free
        assert blocks == canonical_free_blocks(self.total, self.max_order, self.occupied)

    @invariant()
    def summaries_match_free_blocks(self) -> None:
        blocks = self.b.free_blocks()
        info = self.b.buddyinfo()
        assert len(info) == self.max_order + 1
        assert info == [sum(1 for _, k in blocks if k == j) for j in range(self.max_order + 1)]
        assert self.b.free_extents() == merge_runs([(off, 1 << k) for off, k in blocks])
        assert self.b.largest_free() == max((1 << k for _, k in blocks), default=0)


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(max_examples=200, stateful_step_count=30)
