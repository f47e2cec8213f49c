"""Tests of minipaged.metrics and minipaged.viz.

Hand-checked vectors (each computed on paper in the comment beside it), plain property tests of
the pure functions against brute-force recomputations, and a state machine that drives every
allocator and re-derives the whole report and memory map from scratch after every step.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minipaged.alloc.base import Allocation
from minipaged.alloc.buddy import BuddyAllocator
from minipaged.alloc.fit import BestFitAllocator, FirstFitAllocator
from minipaged.alloc.paged import PagedAllocator
from minipaged.errors import InvalidRequest, OutOfMemory
from minipaged.lessons import under_test
from minipaged.metrics import (
    external_fragmentation,
    fragmentation_index,
    free_counts,
    free_counts_from_extents,
    index_ratio,
    internal_fragmentation,
    report,
    unusable_index,
    utilisation,
    would_compact,
)
from minipaged.viz import LEGEND, buddy_free_lists, memory_map, plot_memory_map, unit_states

# The code under test: the library's, or a student's file under `minipaged lesson check`.
internal_fragmentation = under_test("internal_fragmentation", internal_fragmentation)
external_fragmentation = under_test("external_fragmentation", external_fragmentation)
fragmentation_index = under_test("fragmentation_index", fragmentation_index)
unusable_index = under_test("unusable_index", unusable_index)
free_counts_from_extents = under_test("free_counts_from_extents", free_counts_from_extents)

# --- internal / external fragmentation, utilisation: hand-checked --------------------------------


def test_internal_fragmentation_by_hand():
    assert internal_fragmentation(0, 0) == 0.0  # nothing reserved, nothing wasted
    assert internal_fragmentation(3, 4) == 0.25
    assert internal_fragmentation((5, 8)) == 0.375  # the pair form
    assert internal_fragmentation(8, 8) == 0.0
    # 5 of 8 pages and 3 of 4 pages requested: 1 - 8 / 12 = 1/3
    live = [Allocation(0, 8, 5), Allocation(8, 4, 3)]
    assert internal_fragmentation(live) == pytest.approx(1 / 3)
    assert internal_fragmentation([]) == 0.0


def test_external_fragmentation_by_hand():
    assert external_fragmentation(0, 0) == 0.0  # nothing free
    assert external_fragmentation(4, 4) == 0.0  # one piece
    assert external_fragmentation((2, 8)) == 0.75
    # extents of 4, 2, 2 units: 1 - 4 / 8 = 0.5
    assert external_fragmentation([(0, 4), (6, 2), (10, 2)]) == 0.5
    assert external_fragmentation([]) == 0.0


def test_numpy_ints_are_accepted():
    np = pytest.importorskip("numpy")
    assert internal_fragmentation((np.int64(3), np.int64(4))) == 0.25
    assert external_fragmentation(np.int64(2), np.int64(8)) == 0.75
    assert fragmentation_index(np.array([4]), np.int64(2)) == 500


def test_utilisation_by_hand():
    assert utilisation(0, 0) == 0.0
    assert utilisation(3, 12) == 0.25
    assert utilisation(12, 12) == 1.0


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: internal_fragmentation(5, 4), "requested (5)"),
        (lambda: internal_fragmentation(-1, 4), "-1"),
        (lambda: internal_fragmentation(1.5, 4), "1.5"),
        (lambda: internal_fragmentation([1, 2, 3]), "1"),
        (lambda: internal_fragmentation(7), "7"),
        (lambda: internal_fragmentation(1, 2, 3), "got 3"),
        (lambda: external_fragmentation(5, 4), "largest_free (5)"),
        (lambda: external_fragmentation([(0, -2)]), "-2"),
        (lambda: external_fragmentation(["ab"]), "'ab'"),
        (lambda: utilisation(5, 4), "used (5)"),
        (lambda: utilisation(True, 4), "True"),
        (lambda: fragmentation_index([1, -1], 0), "free_counts[1]"),
        (lambda: fragmentation_index([1], -1), "-1"),
        (lambda: fragmentation_index("12", 0), "'12'"),
        (lambda: unusable_index([1.0], 0), "1.0"),
        (lambda: would_compact([1], 0, threshold=-5), "-5"),
        (lambda: free_counts_from_extents([(0, 3)], -1), "-1"),
        (lambda: free_counts_from_extents([3], 2), "3"),
    ],
)
def test_bad_input_is_a_clear_invalid_request(call, needle):
    with pytest.raises(InvalidRequest) as e:
        call()
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


# --- Linux's indices: hand-checked vectors ------------------------------------------------------
# free_counts[k] = number of free blocks of order k; F = free pages, B = blocks, S = suitable.

LINUX_VECTORS = [
    # counts, order, fragmentation index, unusable index
    # Four single pages, order-2 request: F=4, B=4, S=0 -> 1000 - (1000 + 4000//4)//4 = 500;
    # every free page is in a block too small: unusable (4 - 0) * 1000 // 4 = 1000.
    ([4], 2, 500, 1000),
    # Eight single pages, order 3: 1000 - (1000 + 8000//8)//8 = 1000 - 250 = 750.
    ([8, 0, 0, 0], 3, 750, 1000),
    # One page and one pair, order 3: F=3, B=2: 3000//8 = 375, 1375//2 = 687 -> 313.
    ([1, 1, 0, 0], 3, 313, 1000),
    # Three single pages, order 2: 3000//4 = 750, 1750//3 = 583 -> 417.
    ([3], 2, 417, 1000),
    # One order-2 block serves an order-1 request twice: S = 2 -> -1000; unusable (4 - 2<<1) = 0.
    ([0, 0, 1], 1, -1000, 0),
    # [2, 1, 1]: F = 2 + 2 + 4 = 8, B = 4.
    # order 1: S = 1 + 2 = 3 -> -1000; unusable (8 - 6) * 1000 // 8 = 250.
    ([2, 1, 1], 1, -1000, 250),
    # order 2: S = 1 -> -1000; unusable (8 - 4) * 1000 // 8 = 500.
    ([2, 1, 1], 2, -1000, 500),
    # order 3: S = 0: 8000//8 = 1000, 2000//4 = 500 -> 500; unusable 1000.
    ([2, 1, 1], 3, 500, 1000),
    # Nothing free: fragmentation index 0 (B = 0), unusable 1000 (F = 0).
    ([0, 0, 0], 0, 0, 1000),
    ([], 5, 0, 1000),
    # Any free page serves an order-0 request.
    ([1], 0, -1000, 0),
    # A single free page for an order-3 request: 1000//8 = 125, 1125//1 -> 1000 - 1125 = -125.
    ([1, 0, 0, 0], 3, -125, 1000),
    # An order beyond the list has no free blocks: [0, 0, 2] (F = 8, B = 2), order 4:
    # 8000//16 = 500, 1500//2 = 750 -> 250.
    ([0, 0, 2], 4, 250, 1000),
    # Many scattered pairs, order 4: [0, 100] F = 200, B = 100: 200000//16 = 12500,
    # 13500//100 = 135 -> 865, high: the failure is fragmentation.
    ([0, 100], 4, 865, 1000),
]


@pytest.mark.parametrize(("counts", "order", "fragidx", "unusable"), LINUX_VECTORS)
def test_linux_indices_by_hand(counts, order, fragidx, unusable):
    assert fragmentation_index(counts, order) == fragidx
    assert unusable_index(counts, order) == unusable
    assert would_compact(counts, order) == (fragidx > 500)


def test_index_ratio_and_would_compact_threshold():
    assert index_ratio(-1000) == -1.0
    assert index_ratio(613) == 0.613
    assert index_ratio(0) == 0.0
    # [0, 100] order 4 has index 865: above the default 500, not above 900.
    assert would_compact([0, 100], 4)
    assert not would_compact([0, 100], 4, threshold=900)
    assert not would_compact([0, 100], 4, threshold=865)  # strictly above
    assert would_compact([0, 100], 4, threshold=864)
    assert not would_compact([0, 0, 1], 1)  # would succeed: nothing to compact
    assert not would_compact([], 3)  # nothing free: compaction cannot help


# --- Linux's indices: properties against brute force ---------------------------------------------

counts_st = st.lists(st.integers(0, 20), max_size=8)
order_st = st.integers(0, 9)


def brute_force(counts: list[int], order: int) -> tuple[int, int]:
    """Both indices from an explicit list of free block sizes, with exact fractions turned into
    floors: independent of the integer shortcuts in the code under test."""
    from fractions import Fraction
    from math import floor

    sizes = [2**k for k, n in enumerate(counts) for _ in range(n)]
    need = 2**order
    pages, blocks = sum(sizes), len(sizes)
    serves = sum(size // need for size in sizes)
    if blocks == 0:
        frag = 0
    elif serves:
        frag = -1000
    else:
        frag = 1000 - floor((1000 + floor(Fraction(pages * 1000, need))) / Fraction(blocks))
    if pages == 0:
        unusable = 1000
    else:
        small = sum(size for size in sizes if size < need)
        unusable = floor(Fraction(small * 1000, pages))
    return frag, unusable


@given(counts_st, order_st)
def test_indices_equal_brute_force(counts, order):
    assert (fragmentation_index(counts, order), unusable_index(counts, order)) == brute_force(
        counts, order
    )


@given(counts_st, order_st)
def test_index_bounds(counts, order):
    frag = fragmentation_index(counts, order)
    blocks = sum(counts)
    fits = any(n for k, n in enumerate(counts) if k >= order)
    if blocks == 0:
        assert frag == 0
    elif fits:
        assert frag == -1000
    else:
        assert -500 <= frag < 1000
        if blocks >= 2:
            assert frag >= 0
    assert 0 <= unusable_index(counts, order) <= 1000
    assert (unusable_index(counts, order) == 1000) == (not fits)


@given(counts_st)
def test_indices_are_monotonic_in_order(counts):
    # A larger request can only find more of the free memory too small for it ...
    unusable = [unusable_index(counts, k) for k in range(10)]
    assert unusable == sorted(unusable)
    # ... and once a request fails, every larger one fails too.
    fails = [fragmentation_index(counts, k) != -1000 for k in range(10)]
    assert fails == sorted(fails)


@given(counts_st, order_st)
def test_a_large_enough_block_makes_the_request_succeed(counts, order):
    grown = list(counts) + [0] * (order + 1 - len(counts))
    grown[order] += 1
    assert fragmentation_index(grown, order) == -1000
    assert not would_compact(grown, order)


@given(counts_st, order_st, st.integers(0, 1000))
def test_would_compact_is_index_above_threshold(counts, order, threshold):
    assert would_compact(counts, order, threshold) == (
        fragmentation_index(counts, order) > threshold
    )


# --- internal / external: properties -------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 50)), max_size=10))
def test_internal_fragmentation_bounds_and_totals(pairs):
    live = [Allocation(0, req + extra, req) for req, extra in pairs]
    f = internal_fragmentation(live)
    assert 0.0 <= f < 1.0
    req, res = sum(a.requested for a in live), sum(a.size for a in live)
    assert f == internal_fragmentation(req, res)
    # An allocation without waste can only lower it.
    assert internal_fragmentation([*live, Allocation(0, 7, 7)]) <= f


@given(st.lists(st.integers(1, 50), max_size=10), st.integers(1, 50))
def test_external_fragmentation_bounds_and_growth(lengths, grow):
    extents, offset = [], 0
    for length in lengths:
        extents.append((offset, length))
        offset += length + 1
    f = external_fragmentation(extents)
    assert 0.0 <= f < 1.0
    assert (f == 0.0) == (len(extents) <= 1)
    # Growing the largest extent lowers it; a new extent no larger than the largest raises it.
    if extents:
        i = max(range(len(extents)), key=lambda j: extents[j][1])
        bigger = list(extents)
        bigger[i] = (extents[i][0], extents[i][1] + grow)
        assert external_fragmentation(bigger) <= f
        small = min(grow, extents[i][1])
        assert external_fragmentation([*extents, (offset, small)]) > f


# --- per-order counts from extents ---------------------------------------------------------------


def test_free_counts_from_extents_by_hand():
    # 13 = 8 + 4 + 1, 6 = 4 + 2, 1 = 1: orders 0..3.
    assert free_counts_from_extents([(0, 13), (20, 6), (30, 1)], 3) == [2, 1, 2, 1]
    # Capped at max_order 2: 13 = 3 * 4 + 1.
    assert free_counts_from_extents([(0, 13)], 2) == [1, 0, 3]
    assert free_counts_from_extents([], 3) == [0, 0, 0, 0]


@given(st.lists(st.integers(0, 300), max_size=8), st.integers(0, 9))
def test_free_counts_from_extents_keeps_units_and_servable_requests(lengths, max_order):
    extents = [(i * 1000, length) for i, length in enumerate(lengths)]
    counts = free_counts_from_extents(extents, max_order)
    assert len(counts) == max_order + 1
    assert sum(n << k for k, n in enumerate(counts)) == sum(lengths)
    for j in range(max_order + 1):
        serves = sum(n << (k - j) for k, n in enumerate(counts) if k >= j)
        assert serves == sum(length // 2**j for length in lengths)
        succeeds = any(length >= 2**j for length in lengths)
        assert (fragmentation_index(counts, j) == -1000) == succeeds


def test_free_counts_of_each_allocator():
    b = BuddyAllocator(16, 4)
    b.alloc(1)  # leaves free blocks (1, 0), (2, 1), (4, 2), (8, 3)
    assert free_counts(b) == [1, 1, 1, 1, 0] == b.buddyinfo()
    f = FirstFitAllocator(16)
    a1, _, a3, _ = f.alloc(3), f.alloc(2), f.alloc(5), f.alloc(1)
    f.free(a1)
    f.free(a3)  # free extents (0, 3), (5, 5), (11, 5): 3 = 2 + 1, 5 = 4 + 1
    assert free_counts(f) == [3, 1, 2, 0, 0]
    p = PagedAllocator(4, 4)
    x = p.alloc(4)
    p.alloc(4)
    p.free(x)  # blocks 0, 2, 3 free: 12 slots serve one request, counted as one extent 8 + 4
    assert free_counts(p) == [0, 0, 1, 1, 0]
    assert free_counts(PagedAllocator(0, 4)) == [0]


def test_report_by_hand():
    b = BuddyAllocator(16, 4)
    b.alloc(3)  # block [0, 4) with 1 page wasted
    b.alloc(1)  # page 4; free: (5, 0), (6, 1), (8, 3)
    r = report(b)
    assert (r.total, r.free, r.reserved, r.requested) == (16, 11, 5, 4)
    assert r.largest_free == 8 and r.allocations == 2 and r.free_extents == 1
    assert r.utilisation == 4 / 16
    assert r.internal_fragmentation == 1 - 4 / 5
    assert r.external_fragmentation == 1 - 8 / 11
    assert r.free_counts == [1, 1, 0, 1, 0]
    # order 4: F = 11, B = 3: 11000//16 = 687, 1687//3 = 562 -> 438.
    assert r.fragmentation_index == [-1000, -1000, -1000, -1000, 438]
    # order 1: 1 page unusable of 11: 90; order 2 and 3: 3 of 11: 272; order 4: all.
    assert r.unusable_index == [0, 90, 272, 272, 1000]
    assert r.as_dict()["free_counts"] == [1, 1, 0, 1, 0]


# --- the whole state, after every step, for every allocator -------------------------------------


KINDS = ["buddy", "first-fit", "best-fit", "paged"]


def make(kind: str, total: int, block_size: int):
    if kind == "buddy":
        return BuddyAllocator(total, max(0, total.bit_length() - 2))  # not always one block
    if kind == "first-fit":
        return FirstFitAllocator(total)
    if kind == "best-fit":
        return BestFitAllocator(total)
    return PagedAllocator(total // block_size, block_size)


class MetricsMachine(RuleBasedStateMachine):
    """Random allocs and frees on one allocator; after every step the report, the per-order counts
    and the memory map must agree with a from-scratch recount of every unit of the arena."""

    @initialize(kind=st.sampled_from(KINDS), total=st.integers(1, 80), block_size=st.integers(1, 6))
    def setup(self, kind, total, block_size):
        self.kind = kind
        self.a = make(kind, max(total, block_size), block_size)
        self.live: list[Allocation] = []

    @rule(n=st.integers(1, 40))
    def alloc(self, n):
        try:
            self.live.append(self.a.alloc(n))
        except (OutOfMemory, InvalidRequest):
            pass

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 1000))
    def free(self, i):
        self.a.free(self.live.pop(i % len(self.live)))

    @precondition(lambda self: self.kind == "paged" and self.a.num_free_blocks > 0)
    @rule()
    def bare_block(self):
        self.a.allocate_block()  # held through the block-level API: reserved, not requested

    @invariant()
    def unit_states_match_allocations(self):
        states = unit_states(self.a)
        assert len(states) == self.a.total
        requested = [False] * self.a.total
        for a in self.live:
            if a.blocks:
                bs = self.a.block_size
                units = [b * bs + i for b in a.blocks for i in range(bs)][: a.requested]
            else:
                units = list(range(a.offset, a.offset + a.requested))
            for u in units:
                requested[u] = True
        free = [False] * self.a.total
        for off, length in self.a.free_extents():
            for u in range(off, off + length):
                free[u] = True
        expected = "".join(
            "." if f else "#" if r else "+" for f, r in zip(free, requested, strict=True)
        )
        assert states == expected

    @invariant()
    def report_matches_a_recount(self):
        r = report(self.a)
        states = unit_states(self.a)
        assert r.free == states.count(".")
        assert r.requested == states.count("#") == sum(a.requested for a in self.live)
        assert r.reserved == states.count("#") + states.count("+")
        assert r.free + r.reserved == r.total == self.a.total
        assert r.utilisation == (r.requested / r.total if r.total else 0.0)
        assert 0.0 <= r.internal_fragmentation <= 1.0
        assert r.internal_fragmentation < 1.0 or r.requested == 0  # only bare paged blocks
        assert r.internal_fragmentation == (1 - r.requested / r.reserved if r.reserved else 0.0)
        assert r.external_fragmentation == (1 - r.largest_free / r.free if r.free else 0.0)
        if self.kind == "paged":
            assert r.external_fragmentation == 0.0

    @invariant()
    def indices_say_whether_a_request_fits(self):
        r = report(self.a)
        assert sum(n << k for k, n in enumerate(r.free_counts)) == r.free
        for j, (frag, unusable) in enumerate(
            zip(r.fragmentation_index, r.unusable_index, strict=True)
        ):
            assert frag == fragmentation_index(r.free_counts, j)
            assert unusable == unusable_index(r.free_counts, j)
            if r.free == 0:
                assert frag == 0 and unusable == 1000
            else:
                # -1000 exactly when alloc(2**j) would succeed now.
                assert (frag == -1000) == (r.largest_free >= 2**j)

    @invariant()
    def maps_agree_with_states(self):
        states = unit_states(self.a)
        first = memory_map(self.a, width=max(1, self.a.total)).split("\n")[0]
        assert first == f"|{states}|"
        scaled = memory_map(self.a, width=7).split("\n")[0][1:-1]
        scale = -(-len(states) // 7)
        cells = [states[i : i + scale] for i in range(0, len(states), scale)]
        assert len(scaled) == len(cells) <= 7
        for cell, chunk in zip(scaled, cells, strict=True):
            # the majority state; on a tie the first of '#', '+', '.'
            assert chunk.count(cell) == max(chunk.count(c) for c in "#+.")
            assert all(chunk.count(c) < chunk.count(cell) for c in "#+."[: "#+.".index(cell)])
        info = buddy_free_lists(self.a).split("\n")[1].split()
        assert info[0] == "free" and [int(n) for n in info[1:]] == free_counts(self.a)


TestMetricsMachine = MetricsMachine.TestCase
TestMetricsMachine.settings = settings(max_examples=150, stateful_step_count=30)


# --- viz: exact text on hand-made layouts --------------------------------------------------------


def test_memory_map_fit_layout_exactly():
    f = FirstFitAllocator(16, round_to=4)
    a = f.alloc(4)  # [0, 4)
    f.alloc(3)  # [4, 8): 3 requested, 1 wasted
    f.alloc(5)  # [8, 16): 5 requested, 3 wasted
    f.free(a)
    assert memory_map(f) == (
        "|....###+#####+++|\n"
        "16 units, 1 cell = 1 unit\n"
        "# requested   + reserved, not requested (internal fragmentation)   . free"
    )


def test_memory_map_paged_layout_follows_the_block_table():
    p = PagedAllocator(4, 4)
    a = p.alloc(6)  # blocks 0, 1
    p.alloc(1)  # block 2: '#+++'
    p.free(a)  # free queue: 3, 0, 1
    p.alloc(5)  # blocks (3, 0): block 3 full, block 0 holds one slot
    assert unit_states(p) == "#+++....#+++####"
    p.allocate_block()  # block 1, held through the block-level API
    assert memory_map(p).split("\n")[0] == "|#+++++++#+++####|"


def test_memory_map_scaled_majority_and_ties():
    b = BuddyAllocator(16, 4)
    b.alloc(3)  # [0, 4): '###+'
    b.alloc(1)  # page 4
    assert unit_states(b) == "###+#..........."
    # 4 units per cell: '###+' -> '#', '#...' -> '.', then free.
    assert memory_map(b, width=4) == (
        "|#...|\n"
        "16 units, 1 cell = 4 units (a mixed cell shows the state of most of its units)\n"
        f"{LEGEND}"
    )
    # 2 units per cell: '##', '#+' (tie -> '#'), '#.' (tie -> '#'), then free.
    assert memory_map(b, width=8).split("\n")[0] == "|###.....|"
    # 16 units in 5 cells: scale ceil(16 / 5) = 4, so only 4 cells are needed.
    assert memory_map(b, width=5).split("\n")[0] == "|#...|"
    # A tie between '+' and '.' goes to '+'.
    f = FirstFitAllocator(4, round_to=4)
    f.alloc(2)  # '##++'
    assert memory_map(f, width=1).split("\n")[0] == "|#|"
    g = FirstFitAllocator(6, round_to=3)
    g.alloc(1)  # '#++...': cells of 2: '#+' -> '#', '+.' -> '+', '..' -> '.'
    assert memory_map(g, width=3).split("\n")[0] == "|#+.|"


def test_memory_map_rejects_a_bad_width():
    with pytest.raises(InvalidRequest, match="0"):
        memory_map(FirstFitAllocator(4), width=0)


def test_buddy_free_lists_exactly():
    b = BuddyAllocator(16, 4)
    b.alloc(3)
    b.alloc(1)
    assert buddy_free_lists(b) == "order 0 1 2 3 4\nfree  1 1 0 1 0"
    assert buddy_free_lists(b, indices=True) == (
        "order         0      1      2      3      4\n"
        "free          1      1      0      1      0\n"
        "extfrag  -1.000 -1.000 -1.000 -1.000  0.438\n"
        "unusable  0.000  0.090  0.272  0.272  1.000"
    )


def test_plot_memory_map_writes_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    b = BuddyAllocator(100, 5)
    b.alloc(3)
    b.alloc(20)
    png = plot_memory_map(b, tmp_path / "map.png", width=16)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_memory_map(b, str(tmp_path / "map.svg"))
    assert b"<svg" in svg.read_bytes()


def test_plot_memory_map_without_matplotlib(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ModuleNotFoundError, match=r"minipaged\[plot\]"):
        plot_memory_map(FirstFitAllocator(4), tmp_path / "map.png")
    assert not (tmp_path / "map.png").exists()
