"""Why did a request fail, and can moving allocations around help? Detection and compaction.

Detection. A request fails either because memory is *missing* (fewer units free than it needs:
nothing but freeing helps) or because memory is *fragmented* (enough units are free, but not in
one piece: moving allocations together would help). :func:`diagnose` decides the way Linux does
before it compacts a zone (``compaction_suitable`` in mm/compaction.c): first check that enough
memory is free at all, then, for a buddy allocator, ask the fragmentation index of the request's
order: above ``threshold`` (``vm.extfrag_threshold``, default 500) the failure is blamed on
fragmentation, at or below it on missing memory (the free memory lies in so few blocks that the
request is simply too large). A contiguous allocator (first/best fit) places a request anywhere,
so there the test is exact: enough free units but a largest free extent that is too small.
:class:`CountingAllocator` wraps any allocator and counts failures by cause.

Compaction. Linux's compactor runs two scanners over a zone: the *migrate* scanner walks up from
the bottom and picks movable pages, the *free* scanner walks down from the top and collects free
pages, and each movable page is copied into a free page near the top; they stop when they meet,
so free memory gathers at the bottom in large blocks. Here allocations move *down* instead, and
free memory gathers at the top, which makes memory maps easier to read:

- First/best fit (:func:`plan_compaction` on a ``FitAllocator``): a sliding compactor. Walk the
  live allocations from the lowest offset and move each one down to where the previous one
  ends, so they keep their order and close every gap. No free scanner is needed, because the
  place of each allocation is always the gap right below it. An allocation in ``pinned`` does
  not move and the next one slides down only to its end: free memory then gathers at the top of
  each stretch between pinned allocations. Sliding never scatters free memory: each stretch ends
  with its free units in one extent, and every extent before lay inside one stretch, so the
  extents get fewer (or stay) and the largest never shrinks. Unlike Linux nothing jumps over a
  pinned allocation, even into a hole large enough for it.
- Buddy (:func:`plan_compaction` on a buddy allocator): a moved block must land on a free block
  of its own order aligned to its size, so sliding is impossible. Here the migrate scanner
  starts at the *top*: each movable allocation, from the highest offset down, moves to the
  lowest free aligned block of its order below it, if there is one (the free scanner from the
  bottom). A move into a hole can still split a free extent while leaving a hole behind, so the
  planner replays its moves on a page map and keeps the prefix of the plan that leaves the
  largest free block (then: the fewest free extents, then: the longest extent, then: the
  shortest plan) among the prefixes that leave free memory in no more extents, with no smaller
  largest extent and no smaller largest block than before.

Moves are :class:`Move` ``(src, dst, length)`` triples meant to be executed in order
(:func:`apply_moves`): a move's destination holds only free units and its own source (sliding),
so nothing is overwritten before it has been copied. :func:`compact` plans, relocates the
allocations (each keeps its identity and reports its new offset) and moves the data of an arena.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from minipaged.alloc.base import Allocation, Allocator, Stats
from minipaged.alloc.fit import FitAllocator
from minipaged.errors import InvalidHandle, InvalidRequest, OutOfMemory
from minipaged.metrics import fragmentation_index, free_counts

FITS, MISSING, FRAGMENTED = "fits", "missing", "fragmented"

# --- detection -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diagnosis:
    """Why a request of ``requested`` units would fail now (``cause``), with the numbers behind
    the verdict. ``needed`` is what the allocator would reserve for it (a buddy rounds up to a
    power of two); ``index`` is Linux's fragmentation index of the request's order, in
    thousandths (-1000 when it fits)."""

    cause: str  # FITS, MISSING or FRAGMENTED
    requested: int
    needed: int
    free: int
    largest_free: int
    index: int


def _order_of(n: int) -> int:
    """The smallest order k with 2**k >= n."""
    return (n - 1).bit_length()


def diagnose(allocator: Allocator, n: int, threshold: int = 500) -> Diagnosis:
    """Would ``alloc(n)`` succeed now, and if not, is memory missing or only fragmented?

    Fits when ``n <= largest_free()``. Otherwise missing when fewer than ``needed`` units are
    free. Otherwise fragmented when the allocator places requests anywhere (no ``buddyinfo``) and,
    for a buddy allocator, when the fragmentation index is above ``threshold``. Reads only."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequest(f"request size must be an int >= 1, got {n!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise InvalidRequest(f"threshold must be an int >= 0, got {threshold!r}")
    s = allocator.stats()
    is_buddy = callable(getattr(allocator, "buddyinfo", None))
    round_to = getattr(allocator, "round_to", 1)
    needed = 1 << _order_of(n) if is_buddy else -(-n // round_to) * round_to
    index = fragmentation_index(free_counts(allocator), _order_of(n))
    if n <= s.largest_free:
        cause = FITS
    elif s.free < needed or (is_buddy and index <= threshold):
        cause = MISSING
    else:
        cause = FRAGMENTED
    return Diagnosis(cause, n, needed, s.free, s.largest_free, index)


class CountingAllocator(Allocator):
    """Any allocator, counting its allocation requests and their failures by cause.

    Every call is passed to ``inner``; a failed ``alloc`` is diagnosed (the failure changed
    nothing, so the state it looks at is the one that failed) and re-raised. Invariant:
    ``requests == served + missing + fragmented`` (requests that can never fit raise
    ``InvalidRequest`` and are not counted)."""

    def __init__(self, inner: Allocator, threshold: int = 500) -> None:
        if not isinstance(inner, Allocator):
            raise InvalidRequest(f"inner must be an Allocator, got {inner!r}")
        diagnose(inner, 1, threshold)  # validates the threshold
        self.inner = inner
        self.total = inner.total
        self.threshold = threshold
        self.requests = self.served = self.missing = self.fragmented = 0

    def alloc(self, n: int) -> Allocation:
        try:
            a = self.inner.alloc(n)
        except OutOfMemory:
            cause = diagnose(self.inner, n, self.threshold).cause
            self.requests += 1
            if cause == FRAGMENTED:
                self.fragmented += 1
            else:  # FITS cannot happen: the allocation just failed
                self.missing += 1
            raise
        self.requests += 1
        self.served += 1
        return a

    def free(self, a: Allocation) -> None:
        self.inner.free(a)

    def free_extents(self) -> list[tuple[int, int]]:
        return self.inner.free_extents()

    def largest_free(self) -> int:
        return self.inner.largest_free()

    def allocations(self) -> list[Allocation]:
        return self.inner.allocations()

    def stats(self) -> Stats:
        return self.inner.stats()


# --- moves ---------------------------------------------------------------------------------------


class Move(NamedTuple):
    """Copy ``length`` units from offset ``src`` to offset ``dst``."""

    src: int
    dst: int
    length: int


def _int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def apply_moves(arena: np.ndarray, moves: Iterable[tuple[int, int, int]]) -> None:
    """Execute ``moves`` on ``arena`` (units along axis 0) one after the other, each as a
    memmove: a move whose source and destination overlap copies its source out first.

    Order matters when one move's destination overlaps a later move's source; the plans of
    :func:`plan_compaction` are ordered so that a destination only ever holds free units and the
    move's own source. All moves are checked before anything is written."""
    if not isinstance(arena, np.ndarray) or arena.ndim < 1:
        raise InvalidRequest(f"arena must be a numpy array with units along axis 0, got {arena!r}")
    checked = []
    for m in moves:
        if not (isinstance(m, tuple) and len(m) == 3 and all(_int(v) for v in m)):
            raise InvalidRequest(f"a move must be an (src, dst, length) triple of ints, got {m!r}")
        src, dst, length = (int(v) for v in m)
        if length < 0 or min(src, dst) < 0 or max(src, dst) + length > len(arena):
            raise InvalidRequest(f"move {m!r} leaves the arena of {len(arena)} units")
        checked.append((src, dst, length))
    for src, dst, length in checked:
        arena[dst : dst + length] = arena[src : src + length].copy()


# --- planning ------------------------------------------------------------------------------------


def _pinned_set(allocator: Allocator, pinned: Iterable[Allocation]) -> set[int]:
    """Ids (``id()``) of the pinned allocations, each checked to be live in ``allocator``."""
    live = {id(a) for a in allocator.allocations()}
    out = set()
    for a in pinned:
        if id(a) not in live:
            raise InvalidHandle(f"pinned allocation {a!r} is not live in this allocator")
        out.add(id(a))
    return out


def _plan_slide(live: list[Allocation], pinned: set[int]) -> list[tuple[Allocation, int]]:
    """Sliding compaction: every movable allocation moves down to where the one before ends."""
    plan = []
    cursor = 0
    for a in live:  # sorted by offset
        if id(a) in pinned:
            cursor = a.end
            continue
        if a.offset != cursor:
            plan.append((a, cursor))
        cursor += a.size
    return plan


def _largest_block(used: np.ndarray, max_order: int) -> int:
    """The size of the largest aligned block (order <= max_order) with no used page."""
    for k in range(max_order, -1, -1):
        size = 1 << k
        whole = len(used) // size * size
        if whole and not used[:whole].reshape(-1, size).any(axis=1).all():
            return size
    return 0


def _extents(used: np.ndarray) -> tuple[int, int]:
    """(number of free extents, length of the longest one) of a page map."""
    free = np.concatenate(([0], (~used).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(free))
    starts, ends = edges[::2], edges[1::2]
    return len(starts), int((ends - starts).max(initial=0))


def _plan_buddy(
    allocator: Any, live: list[Allocation], pinned: set[int], target: Any = None
) -> list[tuple[Allocation, int]]:
    """Buddy compaction: see the module docstring. ``target(offset, order)``, when given, says
    whether a free block may receive a moved allocation (the mobility allocator's pageblocks)."""
    used = np.zeros(allocator.total, dtype=bool)
    for a in live:
        used[a.offset : a.end] = True

    def score() -> tuple[int, int, int]:
        count, longest = _extents(used)
        return count, longest, _largest_block(used, allocator.max_order)

    start = best = score()
    plan: list[tuple[Allocation, int]] = []
    keep = 0
    for a in sorted(live, key=lambda a: -a.offset):
        if id(a) in pinned:
            continue
        size = a.size
        order = size.bit_length() - 1
        whole = a.offset // size * size  # only aligned blocks below a
        blocks = used[:whole].reshape(-1, size).any(axis=1)
        for i in np.flatnonzero(~blocks):
            dst = int(i) * size
            if target is None or target(dst, order):
                break
        else:
            continue
        used[a.offset : a.end] = False
        used[dst : dst + size] = True
        plan.append((a, dst))
        now = score()
        better = (now[2], -now[0], now[1]) > (best[2], -best[0], best[1])
        if now[0] <= start[0] and now[1] >= start[1] and now[2] >= start[2] and better:
            best, keep = now, len(plan)
    return plan[:keep]


def _plan(allocator: Allocator, pinned: Iterable[Allocation] = ()) -> list[tuple[Allocation, int]]:
    """(allocation, new offset) pairs, in the order they must be executed."""
    pins = _pinned_set(allocator, pinned)
    live = allocator.allocations()
    if isinstance(allocator, FitAllocator):
        return _plan_slide(live, pins)
    if callable(getattr(allocator, "buddyinfo", None)) and hasattr(allocator, "relocate"):
        return _plan_buddy(allocator, live, pins, getattr(allocator, "is_migration_target", None))
    raise InvalidRequest(
        f"cannot compact a {type(allocator).__name__}: only first/best fit and buddy allocators "
        "(a paged pool is compacted by BlockManager.compact)"
    )


def plan_compaction(allocator: Allocator, pinned: Iterable[Allocation] = ()) -> list[Move]:
    """The moves that compact ``allocator``, in execution order; ``pinned`` allocations stay
    where they are. Changes nothing (see the module docstring for the two plans)."""
    return [Move(a.offset, dst, a.size) for a, dst in _plan(allocator, pinned)]


def compact(
    allocator: Allocator, arena: np.ndarray | None = None, pinned: Iterable[Allocation] = ()
) -> list[Move]:
    """Compact ``allocator``: relocate every planned allocation (each keeps its identity and
    reports its new offset) and, if ``arena`` is given (``allocator.total`` units along axis 0),
    move the data with :func:`apply_moves`. Returns the moves. Everything is checked first."""
    if arena is not None and (
        not isinstance(arena, np.ndarray) or arena.ndim < 1 or len(arena) != allocator.total
    ):
        shape = getattr(arena, "shape", type(arena).__name__)
        raise InvalidRequest(f"arena must be a numpy array of {allocator.total} units, got {shape}")
    plan = _plan(allocator, pinned)
    moves = [Move(a.offset, dst, a.size) for a, dst in plan]
    for a, dst in plan:
        allocator.relocate(a, dst)  # type: ignore[attr-defined]
    if arena is not None:
        apply_moves(arena, moves)
    return moves
