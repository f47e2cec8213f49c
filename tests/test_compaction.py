"""Tests of fragmentation detection and compaction: hand-checked examples, a state machine that
compacts first fit, best fit and buddy arenas holding real bytes, and the paged pool's compaction
executed by the copy-blocks kernel (in the CUDA simulator)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from minipaged.alloc.base import merge_runs
from minipaged.alloc.buddy import BuddyAllocator
from minipaged.alloc.fit import BestFitAllocator, FirstFitAllocator
from minipaged.alloc.paged import PagedAllocator
from minipaged.block_manager import BlockManager
from minipaged.compaction import (
    FITS,
    FRAGMENTED,
    MISSING,
    CountingAllocator,
    Move,
    apply_moves,
    compact,
    diagnose,
    plan_compaction,
)
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, OutOfMemory
from minipaged.lessons import under_test

# The code under test: the library's, or a student's file under `minipaged lesson check 09`.
diagnose = under_test("diagnose", diagnose)
apply_moves = under_test("apply_moves", apply_moves)
plan_compaction = under_test("plan_compaction", plan_compaction)
compact = under_test("compact", compact)


def snapshot(alloc) -> tuple:
    live = [(id(a), a.offset, a.size, a.requested) for a in alloc.allocations()]
    return (alloc.free_extents(), alloc.largest_free(), alloc.stats(), live)


def fill(arena: np.ndarray, a) -> np.ndarray:
    """Write bytes that only ``a`` has into its units; returns a copy to compare with later."""
    data = np.random.default_rng(a.id).integers(0, 256, (a.size, *arena.shape[1:]), np.uint8)
    arena[a.offset : a.end] = data
    return data.copy()


# ----- detection -------------------------------------------------------------------------------


def test_diagnose_contiguous_compares_largest_extent_with_total_free():
    f = FirstFitAllocator(8)
    a, _, c = f.alloc(3), f.alloc(2), f.alloc(3)
    f.free(a)
    f.free(c)  # free: 0..2 and 5..7, 6 units in two holes of 3
    assert diagnose(f, 3).cause == FITS
    d = diagnose(f, 4)
    assert (d.cause, d.needed, d.free, d.largest_free) == (FRAGMENTED, 4, 6, 3)
    assert diagnose(f, 7).cause == MISSING
    rounded = FirstFitAllocator(8, round_to=4)
    rounded.alloc(1)
    assert diagnose(rounded, 3).cause == FITS
    assert diagnose(rounded, 5).needed == 8 and diagnose(rounded, 5).cause == MISSING


def test_diagnose_buddy_uses_the_fragmentation_index_and_threshold():
    b = BuddyAllocator(16, 4)
    pages = [b.alloc(1) for _ in range(16)]
    for a in pages[::2]:
        b.free(a)  # eight free single pages, no two buddies: order 3 fails
    d = diagnose(b, 8)
    assert d.free == 8 and d.largest_free == 1
    # index = 1000 - (1000 + 8 * 1000 // 8) // 8 = 750
    assert d.index == 750 and d.cause == FRAGMENTED
    assert diagnose(b, 8, threshold=750).cause == MISSING  # not above the threshold
    assert diagnose(b, 16).cause == MISSING  # more than is free
    assert diagnose(b, 1).cause == FITS and diagnose(b, 1).index == -1000
    assert diagnose(b, 3).needed == 4


def test_diagnose_paged_is_never_fragmented():
    p = PagedAllocator(4, 2)
    p.alloc(5)
    assert diagnose(p, 2).cause == FITS
    assert diagnose(p, 3).cause == MISSING


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_diagnose_rejects_bad_sizes(n):
    with pytest.raises(InvalidRequest, match=repr(n) if isinstance(n, str) else str(n)):
        diagnose(FirstFitAllocator(4), n)


def test_diagnose_rejects_bad_threshold():
    with pytest.raises(InvalidRequest, match="-1"):
        diagnose(FirstFitAllocator(4), 1, threshold=-1)


def test_counting_allocator_counts_failures_by_cause():
    c = CountingAllocator(FirstFitAllocator(8))
    a, _, d = c.alloc(3), c.alloc(2), c.alloc(3)
    c.free(a)
    c.free(d)
    with pytest.raises(OutOfMemory):
        c.alloc(4)  # fragmented
    with pytest.raises(OutOfMemory):
        c.alloc(7)  # missing
    with pytest.raises(InvalidRequest):
        c.alloc(9)  # can never fit: not counted
    assert (c.requests, c.served, c.missing, c.fragmented) == (5, 3, 1, 1)
    assert c.stats() == c.inner.stats() and c.allocations() == c.inner.allocations()
    assert c.free_extents() == c.inner.free_extents() and c.largest_free() == 3
    with pytest.raises(InvalidRequest, match="Allocator"):
        CountingAllocator(object())


# ----- moves -----------------------------------------------------------------------------------


def test_apply_moves_is_a_memmove_in_both_directions():
    arena = np.arange(10)
    apply_moves(arena, [Move(2, 0, 5)])  # down, overlapping itself
    assert arena.tolist() == [2, 3, 4, 5, 6, 5, 6, 7, 8, 9]
    arena = np.arange(10)
    apply_moves(arena, [(0, 3, 5)])  # up, overlapping itself
    assert arena.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 8, 9]


def test_plan_order_matters_and_is_safe():
    """A at 2..3 and B at 4..7: A slides to 0 and B to 2, over A's old place. In plan order B's
    source is untouched when it is copied; backwards, B would overwrite A before A is copied."""
    f = FirstFitAllocator(10)
    gap, a, b = f.alloc(2), f.alloc(2), f.alloc(4)
    f.free(gap)
    plan = plan_compaction(f)
    assert plan == [Move(2, 0, 2), Move(4, 2, 4)]
    arena = np.array([0, 0, 10, 11, 20, 21, 22, 23, 0, 0])
    wrong = arena.copy()
    apply_moves(wrong, plan[::-1])
    assert wrong[:2].tolist() != [10, 11]
    assert snapshot(f) == snapshot(f)  # planning changed nothing
    assert compact(f, arena) == plan
    assert arena[:6].tolist() == [10, 11, 20, 21, 22, 23]
    assert (a.offset, b.offset) == (0, 2) and f.free_extents() == [(6, 4)]


@pytest.mark.parametrize(
    "moves",
    [[(0, 8, 3)], [(-1, 0, 1)], [(0, 1, -1)], [(0, 1)], [(0.5, 1, 1)], ["abc"], [(True, 1, 1)]],
)
def test_apply_moves_checks_every_move_first(moves):
    arena = np.arange(10)
    with pytest.raises(InvalidRequest):
        apply_moves(arena, [(5, 0, 2), *moves])
    assert arena.tolist() == list(range(10))
    with pytest.raises(InvalidRequest, match="numpy"):
        apply_moves([1, 2], [])


def test_pinned_allocations_stay_and_split_the_slide():
    f = FirstFitAllocator(12)
    h1, a, h2, p, h3, b = (f.alloc(n) for n in (1, 2, 2, 1, 2, 3))
    for h in (h1, h2, h3):
        f.free(h)  # free: 0, 3..4, 6..7, 11
    moves = compact(f, pinned=[p])
    assert moves == [Move(1, 0, 2), Move(8, 6, 3)]
    assert (a.offset, p.offset, b.offset) == (0, 5, 6)
    assert f.free_extents() == [(2, 3), (9, 3)]


def test_buddy_compaction_lands_on_aligned_blocks_of_the_same_order():
    b = BuddyAllocator(16, 4)
    x, y, z, w = b.alloc(2), b.alloc(2), b.alloc(4), b.alloc(2)  # 0, 2, 4..7, 8
    b.free(x)
    b.free(y)  # free blocks: (0, order 2), (10, order 1), (12, order 2)
    arena = np.zeros(16, dtype=np.int64)
    arena[8:10] = [7, 8]
    moves = compact(b, arena)
    assert moves == [Move(8, 0, 2)]  # z cannot move: no free aligned order-2 block below it
    assert (w.offset, z.offset) == (0, 4) and arena[0:2].tolist() == [7, 8]
    assert b.free_blocks() == [(2, 1), (8, 3)]


def test_buddy_plan_keeps_only_moves_that_do_not_scatter_free_memory():
    """Pages 0 L, 1 free, 2..3 free, 4..5 Z, 6..7 a: moving a to 2 would leave two holes where
    there was one, so the plan is empty."""
    b = BuddyAllocator(8, 3)
    low, one, two, z, a = b.alloc(1), b.alloc(1), b.alloc(2), b.alloc(2), b.alloc(2)
    b.free(one)
    b.free(two)
    assert plan_compaction(b) == []
    assert (low.offset, z.offset, a.offset) == (0, 4, 6)


def test_compact_rejects_bad_input_and_changes_nothing():
    f = FirstFitAllocator(8)
    gap, a = f.alloc(2), f.alloc(2)
    f.free(gap)
    other = FirstFitAllocator(8).alloc(1)
    before = snapshot(f)
    with pytest.raises(InvalidHandle):
        compact(f, pinned=[other])
    with pytest.raises(InvalidHandle):
        compact(f, pinned=[gap])
    with pytest.raises(InvalidRequest, match="8 units"):
        compact(f, np.zeros(7))
    with pytest.raises(InvalidRequest, match="paged"):
        plan_compaction(PagedAllocator(4, 2))
    assert snapshot(f) == before and a.offset == 2


@pytest.mark.parametrize("make", [lambda: FirstFitAllocator(8), lambda: BuddyAllocator(8, 3)])
def test_relocate_rejects_bad_calls_and_changes_nothing(make):
    alloc = make()
    a, b = alloc.alloc(2), alloc.alloc(2)
    freed = alloc.alloc(2)
    alloc.free(freed)
    before = snapshot(alloc)
    for exc, handle, offset in [
        (InvalidRequest, a, 2),  # b is there
        (InvalidRequest, a, 7),  # past the end
        (InvalidRequest, a, -1),
        (InvalidRequest, a, "4"),
        (InvalidRequest, a, False),  # equal to its offset 0, yet not an int
        (InvalidRequest, b, 2.0),
        (DoubleFree, freed, 4),
        (InvalidHandle, make().alloc(1), 4),
        (InvalidHandle, "a", 4),
    ]:
        with pytest.raises(exc):
            alloc.relocate(handle, offset)
        assert snapshot(alloc) == before
    if isinstance(alloc, BuddyAllocator):
        with pytest.raises(InvalidRequest, match="aligned"):
            alloc.relocate(a, 5)
    alloc.relocate(b, 2)  # where it is: nothing changes
    assert snapshot(alloc) == before
    alloc.relocate(a, 6)
    assert a.offset == 6 and alloc.allocations() == [b, a]


# ----- the state machine -----------------------------------------------------------------------


class CompactionMachine(RuleBasedStateMachine):
    """Allocations hold real bytes in a numpy arena (3 bytes per unit); after every step each
    live allocation must still hold its own bytes, and allocations and free extents must tile
    the arena. Each compaction must not scatter free memory."""

    @initialize(
        kind=st.sampled_from(["first-fit", "best-fit", "buddy"]),
        total=st.integers(1, 48),
        round_to=st.integers(1, 3),
    )
    def setup(self, kind, total, round_to):
        if kind == "buddy":
            self.alloc = BuddyAllocator(total, total.bit_length() - 1)
        else:
            cls = FirstFitAllocator if kind == "first-fit" else BestFitAllocator
            self.alloc = cls(total, round_to=min(round_to, total))
        self.arena = np.zeros((total, 3), dtype=np.uint8)
        self.data: dict = {}

    @rule(n=st.integers(1, 12))
    def allocate(self, n):
        try:
            a = self.alloc.alloc(n)
        except (OutOfMemory, InvalidRequest):
            return
        self.data[a] = fill(self.arena, a)

    @rule(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=8))
    def punch_holes(self, sizes):
        """Allocate a few, then free every second one: holes for compaction to close."""
        new = []
        for n in sizes:
            try:
                new.append(self.alloc.alloc(n))
            except (OutOfMemory, InvalidRequest):
                continue
            self.data[new[-1]] = fill(self.arena, new[-1])
        for a in new[::2]:
            self.alloc.free(a)
            del self.data[a]

    @rule(data=st.data())
    def free(self, data):
        if self.data:
            a = data.draw(st.sampled_from(sorted(self.data, key=lambda a: a.id)))
            self.alloc.free(a)
            del self.data[a]

    @rule(data=st.data())
    def compact(self, data):
        live = sorted(self.data, key=lambda a: a.id)
        pinned = data.draw(st.lists(st.sampled_from(live), unique=True)) if live else []
        before = snapshot(self.alloc)
        extents = self.alloc.free_extents()
        largest = self.alloc.largest_free()
        pinned_at = [p.offset for p in pinned]
        plan = plan_compaction(self.alloc, pinned)
        assert snapshot(self.alloc) == before
        event(f"{type(self.alloc).__name__}: {'moves' if plan else 'no move'}")
        # Replay the plan: each destination holds only free units and its own source.
        occupied = {a.offset: a.end for a in live}
        for src, dst, length in plan:
            end = occupied.pop(src)
            assert end == src + length
            assert all(e <= dst or o >= dst + length for o, e in occupied.items())
            if isinstance(self.alloc, BuddyAllocator):
                assert dst % length == 0 and src != dst
            occupied[dst] = dst + length
        assert compact(self.alloc, self.arena, pinned) == plan
        assert [p.offset for p in pinned] == pinned_at
        after = self.alloc.free_extents()
        assert len(after) <= len(extents)
        assert max((n for _, n in after), default=0) >= max((n for _, n in extents), default=0)
        assert self.alloc.largest_free() >= largest
        if isinstance(self.alloc, FirstFitAllocator | BestFitAllocator) and not pinned:
            assert after == (
                [(self.alloc.total - sum(n for _, n in after), sum(n for _, n in after))]
                if after
                else []
            )

    @invariant()
    def every_byte_is_where_its_allocation_says(self):
        for a, data in self.data.items():
            assert np.array_equal(self.arena[a.offset : a.end], data)

    @invariant()
    def allocations_and_free_extents_tile_the_arena(self):
        live = self.alloc.allocations()
        assert set(map(id, live)) == set(map(id, self.data))
        runs = [(a.offset, a.size) for a in live] + self.alloc.free_extents()
        assert merge_runs(runs) == [(0, self.alloc.total)]
        assert sum(n for _, n in runs) == self.alloc.total  # so nothing overlaps


TestCompactionMachine = CompactionMachine.TestCase
TestCompactionMachine.settings = settings(max_examples=150, stateful_step_count=40)


# ----- the paged KV pool -----------------------------------------------------------------------


def kv_of(cache: np.ndarray, table: list[int]) -> bytes:
    """The bytes of one sequence's blocks in every layer, in block-table order."""
    return cache[:, table].tobytes()


def test_block_manager_compact_moves_kv_with_the_copy_blocks_kernel():
    from minipaged.kernels import copy_blocks

    bm = BlockManager(12, 2, watermark=0.0, enable_prefix_caching=True)
    bm.allocate("a", [1, 2, 3, 4, 5])  # blocks 0, 1, 2
    bm.allocate("b", [7, 8, 9, 10, 11, 12, 13])  # 3, 4, 5, 6
    bm.fork("b", "c")
    bm.allocate("d", [1, 2, 3, 4, 9])  # prefix hit: shares 0 and 1 with a
    bm.free("a")  # block 2 becomes free
    bm.allocate("e", [5, 6, 7])  # takes blocks 8 (full: cached as 5, 6) and 9
    bm.free("d")  # 0 and 1 stay cached, 7 is free
    shape = (2, 12, 2, 2, 4)  # layers, blocks, block_size, heads, head_dim
    rng = np.random.default_rng(0)
    key, value = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    seqs = ["b", "c", "e"]
    expected = {s: (kv_of(key, bm.block_table(s)), kv_of(value, bm.block_table(s))) for s in seqs}
    used = bm.stats().used_blocks
    evictions = bm.stats().evictions
    pairs = bm.compact()
    assert pairs == [(6, 0), (8, 1), (9, 2)] and used == 6
    assert bm.stats().evictions == evictions + 2  # the cached blocks 0 and 1 were in the way
    copy_blocks(key, value, np.array(pairs))
    for s in seqs:
        assert max(bm.block_table(s)) < used
        assert (kv_of(key, bm.block_table(s)), kv_of(value, bm.block_table(s))) == expected[s]
    assert bm.block_table("b") == bm.block_table("c") and bm.gpu.refcount(3) == 2
    assert sorted(bm.gpu.free_queue()) == list(range(used, 12))
    assert bm.compact() == []  # already compact
    # The moved cache entry still hits: a new prompt starting with 5, 6 reuses block 1.
    assert bm.allocate("f", [5, 6, 0]) == 2
    assert bm.block_table("f")[0] == 1 == bm.block_table("e")[0]


def test_block_manager_compact_leaves_swapped_tables_alone():
    bm = BlockManager(6, 2, num_cpu_blocks=4, watermark=0.0)
    bm.allocate("a", [1, 2, 3])  # 0, 1
    bm.allocate("b", [4, 5])  # 2
    bm.swap_out("b")
    bm.free("a")
    bm.allocate("c", [6, 7, 8])  # 3, 4
    cpu_table = bm.block_table("b")
    assert bm.compact() == [(3, 0), (4, 1)]
    assert bm.block_table("c") == [0, 1] and bm.block_table("b") == cpu_table
