"""Tests of the first-fit and best-fit allocators: hand-checked layouts, then one state machine per
allocator against a shadow model that records the owner of every single unit."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minipaged.alloc.base import Allocation
from minipaged.alloc.fit import BestFitAllocator, FirstFitAllocator, FitAllocator
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, OutOfMemory

BOTH = [FirstFitAllocator, BestFitAllocator]


def snapshot(f: FitAllocator):
    """Everything observable about ``f``: a failed call must leave all of it unchanged."""
    return (
        f.free_extents(),
        [(a.id, a.offset, a.size, a.requested) for a in f.allocations()],
        f.stats(),
    )


def raises_unchanged(f: FitAllocator, exc: type[Exception], fn, *args):
    before = snapshot(f)
    with pytest.raises(exc) as info:
        fn(*args)
    assert snapshot(f) == before
    return info.value


def layout(cls, total, sizes, keep):
    """Allocate ``sizes`` back to back, then free every allocation whose index is not in
    ``keep``; returns the allocator and the allocations."""
    f = cls(total)
    allocs = [f.alloc(n) for n in sizes]
    for i, a in enumerate(allocs):
        if i not in keep:
            f.free(a)
    return f, allocs


# ----- hand-checked unit tests ---------------------------------------------------------------


@pytest.mark.parametrize("cls", BOTH)
def test_fresh_arena(cls):
    f = cls(10)
    assert f.total == 10 and f.round_to == 1
    assert f.free_extents() == [(0, 10)]
    assert f.largest_free() == 10 and f.allocations() == []
    a = f.alloc(4)
    assert (a.offset, a.size, a.requested, a.blocks) == (0, 4, 4, ())
    assert f.free_extents() == [(4, 6)]


def test_first_fit_and_best_fit_choose_different_extents():
    # [0,3) free, [3,4) used, [4,6) free, [6,7) used, [7,12) free
    for cls, expected in ((FirstFitAllocator, 0), (BestFitAllocator, 4)):
        f, _ = layout(cls, 12, [3, 1, 2, 1, 5], keep={1, 3})
        assert f.free_extents() == [(0, 3), (4, 2), (7, 5)]
        assert f.alloc(2).offset == expected
    f, _ = layout(FirstFitAllocator, 12, [3, 1, 2, 1, 5], keep={1, 3})
    assert f.alloc(4).offset == 7  # only the last extent fits
    assert f.free_extents() == [(0, 3), (4, 2), (11, 1)]


def test_best_fit_ties_go_to_lowest_offset():
    f, _ = layout(BestFitAllocator, 12, [2, 1, 3, 1, 2, 1, 2], keep={1, 3, 5})
    assert f.free_extents() == [(0, 2), (3, 3), (7, 2), (10, 2)]
    assert f.alloc(2).offset == 0
    assert f.alloc(2).offset == 7
    assert f.alloc(2).offset == 10
    assert f.alloc(2).offset == 3  # the only extent left
    assert f.free_extents() == [(5, 1)]


@pytest.mark.parametrize("cls", BOTH)
def test_exact_fit_removes_the_extent(cls):
    f, _ = layout(cls, 10, [3, 2, 5], keep={0, 2})
    assert f.free_extents() == [(3, 2)]
    a = f.alloc(2)
    assert a.offset == 3 and f.free_extents() == [] and f.largest_free() == 0


@pytest.mark.parametrize("cls", BOTH)
def test_coalescing(cls):
    # left neighbour only
    f, (a, b, c, d) = layout(cls, 10, [2, 2, 2, 4], keep={1, 2, 3})
    f.free(b)
    assert f.free_extents() == [(0, 4)]
    # right neighbour only
    f, (a, b, c, d) = layout(cls, 10, [2, 2, 2, 4], keep={0, 2, 3})
    f.free(a)
    assert f.free_extents() == [(0, 4)]
    # both neighbours
    f, (a, b, c, d) = layout(cls, 10, [2, 2, 2, 4], keep={1, 3})
    assert f.free_extents() == [(0, 2), (4, 2)]
    f.free(b)
    assert f.free_extents() == [(0, 6)]
    # neither neighbour
    f, (a, b, c, d) = layout(cls, 10, [2, 2, 2, 4], keep={0, 1, 2, 3})
    f.free(b)
    assert f.free_extents() == [(2, 2)]
    f.free(d)  # right neighbour is the arena's end
    assert f.free_extents() == [(2, 2), (6, 4)]
    f.free(c)
    assert f.free_extents() == [(2, 8)]
    f.free(a)
    assert f.free_extents() == [(0, 10)] and f.allocations() == []


@pytest.mark.parametrize("cls", BOTH)
def test_round_to(cls):
    f = cls(16, round_to=4)
    a = f.alloc(5)
    assert (a.offset, a.size, a.requested, a.waste) == (0, 8, 5, 3)
    b = f.alloc(4)
    assert (b.offset, b.size, b.waste) == (8, 4, 0)
    s = f.stats()
    assert (s.reserved, s.requested, s.free, s.largest_free) == (12, 9, 4, 4)
    e = raises_unchanged(f, OutOfMemory, f.alloc, 5)  # needs 8 reserved units, 4 free
    assert (e.requested, e.free, e.fragmented) == (8, 4, False)


@pytest.mark.parametrize("cls", BOTH)
def test_round_to_with_ragged_total(cls):
    f = cls(10, round_to=4)  # the last 2 units can never hold a whole reservation
    assert f.largest_free() == 8
    raises_unchanged(f, InvalidRequest, f.alloc, 9)
    a = f.alloc(8)
    assert f.free_extents() == [(8, 2)] and f.largest_free() == 0
    e = raises_unchanged(f, OutOfMemory, f.alloc, 1)
    assert (e.requested, e.free, e.largest_free, e.fragmented) == (4, 2, 2, False)
    f.free(a)
    assert f.free_extents() == [(0, 10)]


@pytest.mark.parametrize("cls", BOTH)
def test_out_of_memory_fragmented_or_missing(cls):
    f, _ = layout(cls, 10, [2, 1, 2, 1, 4], keep={1, 3, 4})
    assert f.free_extents() == [(0, 2), (3, 2)]
    e = raises_unchanged(f, OutOfMemory, f.alloc, 3)
    assert (e.requested, e.free, e.largest_free, e.fragmented) == (3, 4, 2, True)
    assert "fragmented" in str(e)
    e = raises_unchanged(f, OutOfMemory, f.alloc, 5)
    assert (e.requested, e.free, e.largest_free, e.fragmented) == (5, 4, 2, False)
    assert "missing" in str(e)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("bad", [0, -1, 11, 2.0, True, "3", None])
def test_invalid_requests(cls, bad):
    f = cls(10)
    f.alloc(3)
    e = raises_unchanged(f, InvalidRequest, f.alloc, bad)
    assert repr(bad) in str(e) or str(bad) in str(e)


@pytest.mark.parametrize("cls", BOTH)
def test_double_free_and_foreign_handles(cls):
    f, g = cls(10), cls(10)
    a = f.alloc(3)
    f.alloc(2)
    f.free(a)
    e = raises_unchanged(f, DoubleFree, f.free, a)
    assert str(a.id) in str(e)
    raises_unchanged(f, InvalidHandle, f.free, g.alloc(3))
    raises_unchanged(f, InvalidHandle, f.free, Allocation(offset=3, size=2, requested=2))
    raises_unchanged(f, InvalidHandle, f.free, "not an allocation")
    raises_unchanged(f, InvalidHandle, f.free, [3, 2])


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "args", [(0,), (-4,), (8.0,), (True,), ("8",), (8, 0), (8, -1), (8, 2.0), (8, True), (8, 9)]
)
def test_bad_constructor_args(cls, args):
    with pytest.raises(InvalidRequest) as info:
        cls(*args)
    assert any(repr(v) in str(info.value) for v in args)


# ----- state machine -------------------------------------------------------------------------


def runs(owner: list[int | None]) -> list[tuple[int, int]]:
    """Maximal runs of free units in the shadow model, sorted by offset."""
    out: list[tuple[int, int]] = []
    for u, o in enumerate(owner):
        if o is None:
            if out and sum(out[-1]) == u:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((u, 1))
    return out


def first_fit(extents, size):
    return next((off for off, length in extents if length >= size), None)


def best_fit(extents, size):
    fits = [(length, off) for off, length in extents if length >= size]
    return min(fits)[1] if fits else None


class FitMachine(RuleBasedStateMachine):
    """Shadow model: ``owner[u]`` is the id of the allocation holding unit u, or None."""

    cls: type[FitAllocator]
    choose = staticmethod(first_fit)

    @initialize(total=st.integers(1, 64), round_to=st.sampled_from([1, 1, 1, 2, 3, 4]))
    def setup(self, total, round_to):
        round_to = min(round_to, total)
        self.f = self.cls(total, round_to)
        self.total, self.r = total, round_to
        self.owner: list[int | None] = [None] * total
        self.live: list[Allocation] = []
        self.freed: list[Allocation] = []

    def fails(self, exc, fn, *args):
        return raises_unchanged(self.f, exc, fn, *args)

    @rule(n=st.integers(1, 12))
    def alloc(self, n):
        size = -(-n // self.r) * self.r
        if size > self.total:
            self.fails(InvalidRequest, self.f.alloc, n)
            return
        extents = runs(self.owner)
        want = self.choose(extents, size)
        if want is None:
            e = self.fails(OutOfMemory, self.f.alloc, n)
            free = self.owner.count(None)
            assert (e.requested, e.free) == (size, free)
            assert e.largest_free == max((length for _, length in extents), default=0)
            assert e.fragmented == (free >= size)
            return
        a = self.f.alloc(n)
        assert (a.offset, a.size, a.requested, a.blocks) == (want, size, n, ())
        self.owner[a.offset : a.end] = [a.id] * size
        self.live.append(a)

    @precondition(lambda self: None in self.owner)
    @rule(i=st.integers(0, 100), k=st.integers(-1, 1))
    def alloc_near_hole_size(self, i, k):
        """Ask for about the size of one free extent: where first and best fit disagree."""
        ext = runs(self.owner)
        self.alloc(max(1, ext[i % len(ext)][1] + k))

    @rule(k=st.integers(0, 3))
    def alloc_just_too_big(self, k):
        """Ask for a little more than the largest extent: fails, and when enough units are free
        in total it fails only because memory is fragmented."""
        self.alloc(max((length for _, length in runs(self.owner)), default=0) + 1 + k)

    @rule(bad=st.sampled_from([0, -1, "too big", 2.0, True, None]))
    def alloc_invalid(self, bad):
        n = self.total + 1 if bad == "too big" else bad
        self.fails(InvalidRequest, self.f.alloc, n)

    def free_one(self, a):
        self.f.free(a)
        self.live.remove(a)
        self.owner[a.offset : a.end] = [None] * a.size
        self.freed.append(a)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.free_one(self.live[i % len(self.live)])

    @precondition(lambda self: len(self.live) >= 2)
    @rule(odd=st.booleans())
    def free_every_other(self, odd):
        """Punch holes: free every second live allocation in address order."""
        for a in sorted(self.live, key=lambda a: a.offset)[odd::2]:
            self.free_one(a)

    @precondition(lambda self: self.freed)
    @rule(i=st.integers(0, 100))
    def double_free(self, i):
        self.fails(DoubleFree, self.f.free, self.freed[i % len(self.freed)])

    @rule(made_up=st.booleans(), n=st.integers(1, 4))
    def free_foreign(self, made_up, n):
        if made_up:  # a copy of a live allocation's fields is still not that allocation
            src = self.live[0] if self.live else Allocation(0, 1, 1)
            a = Allocation(src.offset, src.size, src.requested)
        else:
            a = self.cls(8).alloc(n)
        self.fails(InvalidHandle, self.f.free, a)

    @invariant()
    def free_extents_match_model(self):
        ext = self.f.free_extents()
        assert ext == runs(self.owner)
        for (o1, l1), (o2, _) in zip(ext, ext[1:], strict=False):
            assert l1 > 0 and o1 + l1 < o2  # sorted, non-empty, never touching

    @invariant()
    def allocations_match_model(self):
        got = self.f.allocations()
        assert sorted(map(id, got)) == sorted(map(id, self.live))
        for a, b in zip(got, got[1:], strict=False):
            assert a.end <= b.offset  # sorted by offset, no overlap
        for a in got:
            assert self.owner[a.offset : a.end] == [a.id] * a.size
            assert a.size % self.r == 0 and 0 <= a.waste < self.r
            for off, length in self.f.free_extents():
                assert a.end <= off or off + length <= a.offset  # disjoint from free extents

    @invariant()
    def units_add_up(self):
        s = self.f.stats()
        assert s.reserved + s.free == s.total == self.total
        assert s.free == self.owner.count(None)
        assert s.requested == sum(a.requested for a in self.live)
        assert s.allocations == len(self.live)
        assert s.free_extents == len(runs(self.owner))
        lengths = [length for _, length in self.f.free_extents()]
        assert s.largest_free == self.f.largest_free()
        assert s.largest_free == max((x - x % self.r for x in lengths), default=0)


class FirstFitMachine(FitMachine):
    cls = FirstFitAllocator
    choose = staticmethod(first_fit)


class BestFitMachine(FitMachine):
    cls = BestFitAllocator
    choose = staticmethod(best_fit)


TestFirstFitMachine = FirstFitMachine.TestCase
TestFirstFitMachine.settings = settings(max_examples=200, stateful_step_count=30)
TestBestFitMachine = BestFitMachine.TestCase
TestBestFitMachine.settings = settings(max_examples=200, stateful_step_count=30)
