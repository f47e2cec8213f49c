"""Tests of the buddy allocator with migrate types: fallback, stealing, the grouping demo, and a
state machine checking pageblock types, coalescing and conservation after every step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from minipaged.alloc.base import merge_runs
from minipaged.alloc.mobility import (
    MOVABLE,
    UNMOVABLE,
    MobilityAllocator,
    grouping_demo,
    mobility_workload,
)
from minipaged.compaction import compact, plan_compaction
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, OutOfMemory


def snapshot(m: MobilityAllocator) -> tuple:
    live = [(id(a), a.offset, a.size) for a in m.allocations()]
    return (m.free_blocks(MOVABLE), m.free_blocks(UNMOVABLE), m.pageblock_types(), live)


def canonical_free_blocks(total: int, max_order: int, occupied: set[int]) -> list[tuple[int, int]]:
    """The largest aligned blocks (order <= max_order, inside the arena) with no occupied page:
    what fully coalesced free lists must hold, whatever their types."""
    out: list[tuple[int, int]] = []

    def visit(offset: int, order: int) -> None:
        if offset >= total:
            return
        pages = range(offset, offset + (1 << order))
        if pages[-1] < total and not occupied.intersection(pages):
            out.append((offset, order))
        elif order > 0:
            visit(offset, order - 1)
            visit(offset + (1 << (order - 1)), order - 1)

    for root in range(0, total, 1 << max_order):
        visit(root, max_order)
    return sorted(out)


def test_unmovable_steals_a_pageblock_and_groups_there():
    m = MobilityAllocator(32, 5, 3)  # four pageblocks of 8 pages, all movable
    u = m.alloc(1, UNMOVABLE)  # falls back to the largest block (0, order 5) and steals pb 0
    assert u.offset == 0 and m.pageblock_types() == [UNMOVABLE, MOVABLE, MOVABLE, MOVABLE]
    assert m.free_blocks(UNMOVABLE) == [(1, 0), (2, 1), (4, 2)]
    assert m.free_blocks(MOVABLE) == [(8, 3), (16, 4)]
    v = m.alloc(1)  # movable stays out of the unmovable pageblock
    assert v.offset == 8
    w = m.alloc(2, UNMOVABLE)  # unmovable keeps to its own pageblock
    assert w.offset == 2
    for a in (u, w):
        m.free(a)  # pageblock 0 becomes wholly free: movable again, and merges
    assert m.pageblock_types() == [MOVABLE] * 4
    assert m.free_blocks(UNMOVABLE) == [] and m.free_blocks() == [
        (0, 3),
        (9, 0),
        (10, 1),
        (12, 2),
        (16, 4),
    ]
    assert m.migratetype(v) == MOVABLE


def test_small_fallback_does_not_steal():
    m = MobilityAllocator(8, 3, 3)  # one pageblock of 8: pageblock_order // 2 == 1
    movable = [m.alloc(1) for _ in range(8)]
    m.free(movable[5])  # one free page (order 0 < 1) in a movable pageblock
    u = m.alloc(1, UNMOVABLE)
    assert u.offset == 5 and m.pageblock_types() == [MOVABLE]  # a mixed pageblock
    m.free(movable[2])
    m.free(movable[3])  # a free order-1 block: large enough to steal
    u2 = m.alloc(1, UNMOVABLE)
    assert u2.offset == 2 and m.pageblock_types() == [UNMOVABLE]
    assert m.free_blocks(UNMOVABLE) == [(3, 0)]
    with pytest.raises(OutOfMemory):
        m.alloc(2)


def test_large_unmovable_request_marks_whole_pageblocks():
    m = MobilityAllocator(32, 5, 2)
    big = m.alloc(8, UNMOVABLE)
    assert big.offset == 0 and m.pageblock_types()[:3] == [UNMOVABLE, UNMOVABLE, MOVABLE]
    m.free(big)
    assert m.pageblock_types() == [MOVABLE] * 8 and m.free_blocks() == [(0, 5)]


def test_without_grouping_types_are_ignored():
    m = MobilityAllocator(16, 4, 2, grouping=False)
    u = m.alloc(1, UNMOVABLE)
    v = m.alloc(1)
    assert (u.offset, v.offset) == (0, 1) and m.pageblock_types() == [MOVABLE] * 4
    assert m.unmovable() == [u]


def test_bad_calls_name_the_value_and_change_nothing():
    for args, text in [
        ((12, 3, 4), "exceeds"),
        ((12, 3, 3), "multiple"),
        ((0, 3, 1), "0"),
        ((8, -1, 0), "-1"),
        ((8, 3, True), "True"),
    ]:
        with pytest.raises(InvalidRequest, match=text):
            MobilityAllocator(*args)
    m = MobilityAllocator(16, 4, 2)
    u, v = m.alloc(1, UNMOVABLE), m.alloc(2)
    gone = m.alloc(1)
    m.free(gone)
    before = snapshot(m)
    for exc, fn, args in [
        (InvalidRequest, m.alloc, (1, "pinned")),
        (InvalidRequest, m.alloc, (17,)),
        (InvalidRequest, m.alloc, (0,)),
        (DoubleFree, m.free, (gone,)),
        (InvalidHandle, m.free, (MobilityAllocator(16, 4, 2).alloc(1),)),
        (InvalidRequest, m.relocate, (u, 8)),  # unmovable
        (InvalidRequest, m.relocate, (v, 9)),  # misaligned
        (InvalidRequest, m.relocate, (v, 16)),  # outside
        (InvalidRequest, m.relocate, (v, 0)),  # u is there
        (InvalidRequest, m.relocate, (v, None)),
        (InvalidRequest, m.relocate, (v, 4.0)),  # equal to its offset 4, yet not an int
        (DoubleFree, m.relocate, (gone, 8)),
    ]:
        with pytest.raises(exc):
            fn(*args)
        assert snapshot(m) == before


def test_grouping_lets_compaction_recover_larger_blocks():
    """Same workload and seed: with grouping, compaction rebuilds a 64-page block; with the
    unmovable pages scattered, it cannot get past 32."""
    for seed in (0, 1, 2):
        r = grouping_demo(seed)
        assert r.grouped_after == 64 and r.scattered_after <= 32, (seed, r)
        assert r.grouped_after >= r.grouped_before and r.scattered_after >= r.scattered_before
    assert mobility_workload(3) == mobility_workload(3) != mobility_workload(4)


def test_compaction_moves_only_movable_data_into_movable_pageblocks():
    m = MobilityAllocator(32, 5, 3)
    u = m.alloc(1, UNMOVABLE)  # steals pageblock 0: pages 1..7 are free but not targets
    live = [m.alloc(2) for _ in range(8)]  # 8..23
    arena = np.zeros(32, dtype=np.int64)
    for i, a in enumerate(live):
        arena[a.offset : a.end] = i + 1
    for a in live[:4]:
        m.free(a)  # 8..15 free
    assert m.largest_free() == 8
    moves = compact(m, arena, pinned=m.unmovable())
    assert [dst for _, dst, _ in moves] == [8, 10, 12, 14]
    assert all(m.is_migration_target(dst, 1) for _, dst, _ in moves)
    assert u.offset == 0 and m.largest_free() == 16 and m.free_blocks(MOVABLE) == [(16, 4)]
    for i, a in enumerate(live[4:], start=5):
        assert arena[a.offset : a.end].tolist() == [i, i]


# ----- the state machine -----------------------------------------------------------------------


class MobilityMachine(RuleBasedStateMachine):
    @initialize(
        pageblocks=st.integers(1, 6),
        pageblock_order=st.integers(0, 3),
        extra=st.integers(0, 2),
        grouping=st.booleans(),
    )
    def setup(self, pageblocks, pageblock_order, extra, grouping):
        self.total = pageblocks << pageblock_order
        self.max_order = pageblock_order + extra
        self.m = MobilityAllocator(self.total, self.max_order, pageblock_order, grouping)
        self.arena = np.zeros(self.total, dtype=np.int64)
        self.types: dict = {}

    @rule(n=st.integers(1, 9), unmovable=st.booleans())
    def allocate(self, n, unmovable):
        mt = UNMOVABLE if unmovable else MOVABLE
        before = snapshot(self.m)
        try:
            a = self.m.alloc(n, mt)
        except (OutOfMemory, InvalidRequest):
            assert snapshot(self.m) == before
            return
        assert a.size >= n > a.size // 2 and a.offset % a.size == 0
        self.types[a] = mt
        self.arena[a.offset : a.end] = a.id

    @rule(data=st.data())
    def free(self, data):
        if self.types:
            a = data.draw(st.sampled_from(sorted(self.types, key=lambda a: a.id)))
            self.m.free(a)
            del self.types[a]

    @rule()
    def compact(self):
        extents = self.m.free_extents()
        unmovable = {a: a.offset for a in self.types if self.types[a] == UNMOVABLE}
        plan = plan_compaction(self.m, self.m.unmovable())
        for _, dst, length in plan:  # aligned, and only into movable pageblocks
            assert dst % length == 0
            assert self.m.is_migration_target(dst, length.bit_length() - 1)
        compact(self.m, self.arena, pinned=self.m.unmovable())
        assert {a: a.offset for a in unmovable} == unmovable
        assert len(self.m.free_extents()) <= len(extents)

    @invariant()
    def conservation_and_data(self):
        live = self.m.allocations()
        assert set(map(id, live)) == set(map(id, self.types))
        runs = [(a.offset, a.size) for a in live] + [(o, 1 << k) for o, k in self.m.free_blocks()]
        assert merge_runs(runs) == [(0, self.total)] and sum(n for _, n in runs) == self.total
        for a in live:
            assert (self.arena[a.offset : a.end] == a.id).all()
            assert self.m.migratetype(a) == self.types[a]

    @invariant()
    def free_lists_coalesced(self):
        occupied = {p for a in self.m.allocations() for p in range(a.offset, a.end)}
        assert self.m.free_blocks() == canonical_free_blocks(self.total, self.max_order, occupied)

    @invariant()
    def pageblock_types_consistent(self):
        m, pbo = self.m, self.m.pageblock_order
        types = m.pageblock_types()
        if not m.grouping:
            assert set(types) == {MOVABLE}
        for mt in (MOVABLE, UNMOVABLE):
            for off, k in m.free_blocks(mt):
                if k >= pbo:  # whole free pageblocks are movable
                    assert mt == MOVABLE
                    assert set(types[off >> pbo : (off + (1 << k)) >> pbo]) == {MOVABLE}
                else:
                    assert types[off >> pbo] == mt
        for a in m.allocations():  # whole pageblocks handed out carry the request's type
            if a.size >= 1 << pbo and m.grouping:
                assert set(types[a.offset >> pbo : a.end >> pbo]) == {self.types[a]}


TestMobilityMachine = MobilityMachine.TestCase
TestMobilityMachine.settings = settings(max_examples=150, stateful_step_count=40)
