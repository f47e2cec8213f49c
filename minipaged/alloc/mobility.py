"""Grouping by mobility: a buddy allocator whose free lists are split by migrate type.

Compaction can only move *movable* allocations (in Linux: user pages, reached through page
tables that can be rewritten); *unmovable* ones (kernel data, DMA buffers; here e.g. a buffer a
kernel holds a raw pointer to) stay put. One unmovable page in the middle of a large block keeps
that block broken forever, whatever compaction does. So Linux groups allocations by mobility: the
arena is cut into *pageblocks* of ``2**pageblock_order`` pages, each pageblock has a migrate type,
and each type has its own free lists, so unmovable allocations gather in a few pageblocks and
compaction can empty the others.

The rules kept here (Linux: ``__rmqueue``, ``__rmqueue_fallback``, ``steal_suitable_fallback`` in
mm/page_alloc.c), simplified:

- a request of type T is served from T's free lists first, exactly like the plain buddy
  allocator (smallest order that has a block, lowest address);
- if T's lists have nothing large enough, it *falls back* to the other type and takes the
  *largest* free block there (the lowest one among equals): a large block now means fewer
  fallbacks later;
- if that block has order >= ``pageblock_order // 2`` (Linux's heuristic), the request *steals*
  the pageblock holding it: the pageblock changes type to T and all its free blocks move to T's
  lists. A smaller block is taken without stealing, leaving a mixed pageblock;
- a wholly free pageblock holds nothing, so its type is only a label: here it always goes back
  to movable (the type every pageblock has at the start), and free blocks of order >=
  ``pageblock_order`` are always on the movable lists. Linux keeps the label instead; going back
  keeps the rule "a free block is on the lists of its pageblock's type" simple to check. A block
  of order >= ``pageblock_order`` handed to an unmovable request marks its pageblocks unmovable.

With ``grouping=False`` types are recorded but ignored: one set of free lists, every pageblock
movable, so unmovable allocations end up scattered wherever the buddy allocator puts them. That is
the baseline :func:`grouping_demo` compares against.

Free blocks are still the largest aligned blocks wholly in free memory (buddies merge whatever
their pageblocks' types, since whole free pageblocks are all movable), so the compaction planner
of :mod:`minipaged.compaction` works unchanged; :meth:`MobilityAllocator.is_migration_target`
lets it move data only into movable pageblocks, as Linux's free scanner does.
"""

from __future__ import annotations

import random
import weakref
from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np

from minipaged.alloc.base import Allocation, Allocator, check_request, merge_runs
from minipaged.alloc.buddy import relocation_home, split_towards
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, OutOfMemory

MOVABLE, UNMOVABLE = "movable", "unmovable"
TYPES = (MOVABLE, UNMOVABLE)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class MobilityAllocator(Allocator):
    """A buddy allocator over ``total_pages`` pages (a multiple of the pageblock size) with
    orders 0..``max_order``, pageblocks of order ``pageblock_order <= max_order`` and free lists
    per migrate type (see the module docstring).

    Invariants (a call that raises changes nothing):
    - free blocks and live allocations tile the arena; no two free blocks are buddies of one
      order (fully coalesced), whatever lists they are on;
    - a free block of order < ``pageblock_order`` is on the lists of its pageblock's type; one of
      a larger order is on the movable lists, and all its pageblocks are movable;
    - without grouping every pageblock is movable.
    """

    def __init__(
        self, total_pages: int, max_order: int, pageblock_order: int, grouping: bool = True
    ) -> None:
        self.total = _check_int(total_pages, "total_pages", 1)
        self.max_order = _check_int(max_order, "max_order", 0)
        self.pageblock_order = _check_int(pageblock_order, "pageblock_order", 0)
        if pageblock_order > max_order:
            raise InvalidRequest(f"pageblock_order {pageblock_order} exceeds max_order {max_order}")
        if total_pages % (1 << pageblock_order):
            raise InvalidRequest(
                f"total_pages {total_pages} is not a multiple of the pageblock size "
                f"{1 << pageblock_order}"
            )
        self.grouping = bool(grouping)
        self._types = [MOVABLE] * (total_pages >> pageblock_order)  # per pageblock
        self._free: dict[str, list[list[int]]] = {
            t: [[] for _ in range(max_order + 1)] for t in TYPES
        }
        self._live: dict[Allocation, tuple[int, int, str]] = {}  # -> (offset, order, type)
        self._freed: weakref.WeakSet[Allocation] = weakref.WeakSet()
        self._top_order = min(max_order, total_pages.bit_length() - 1)
        offset = 0
        while offset < total_pages:  # the largest aligned blocks, as in BuddyAllocator
            order = min(max_order, (total_pages - offset).bit_length() - 1)
            self._free[MOVABLE][order].append(offset)
            offset += 1 << order

    # -- where a free block belongs ------------------------------------------------------------

    def _list_type(self, offset: int, order: int) -> str:
        if order >= self.pageblock_order:
            return MOVABLE
        return self._types[offset >> self.pageblock_order]

    def _put(self, offset: int, order: int) -> None:
        """Put a free block on the lists it belongs to; whole free pageblocks become movable."""
        if order >= self.pageblock_order:
            first = offset >> self.pageblock_order
            for pb in range(first, first + (1 << (order - self.pageblock_order))):
                self._types[pb] = MOVABLE
        insort(self._free[self._list_type(offset, order)][order], offset)

    def _is_free(self, offset: int, order: int) -> bool:
        blocks = self._free[self._list_type(offset, order)][order]
        i = bisect_left(blocks, offset)
        return i < len(blocks) and blocks[i] == offset

    def _remove(self, offset: int, order: int) -> None:
        blocks = self._free[self._list_type(offset, order)][order]
        del blocks[bisect_left(blocks, offset)]

    # -- allocation ----------------------------------------------------------------------------

    def alloc(self, n: int, migratetype: str = MOVABLE) -> Allocation:
        """Reserve ``2**k`` pages (smallest k with ``2**k >= n``) of ``migratetype``."""
        if migratetype not in TYPES:
            raise InvalidRequest(f"migratetype must be one of {TYPES}, got {migratetype!r}")
        check_request(n, 1 << self._top_order, "pages")
        order = (n - 1).bit_length()
        want = migratetype if self.grouping else MOVABLE
        own = self._free[want]
        k = next((k for k in range(order, self.max_order + 1) if own[k]), None)
        if k is not None:
            offset = own[k].pop(0)
        else:  # fall back to the other type's largest block
            other = self._free[UNMOVABLE if want == MOVABLE else MOVABLE]
            k = next((k for k in range(self.max_order, order - 1, -1) if other[k]), None)
            if k is None:
                raise OutOfMemory(1 << order, self._free_pages(), self.largest_free(), "pages")
            offset = other[k].pop(0)
            if order < self.pageblock_order:
                while k > self.pageblock_order:  # whole free pageblocks above stay movable
                    k -= 1
                    self._put(offset + (1 << k), k)
                if k >= self.pageblock_order // 2:
                    self._steal(offset >> self.pageblock_order, want)
        while k > order:  # split, keeping the lower half
            k -= 1
            self._put(offset + (1 << k), k)
        if order >= self.pageblock_order:  # whole pageblocks handed out take the request's type
            first = offset >> self.pageblock_order
            for pb in range(first, first + (1 << (order - self.pageblock_order))):
                self._types[pb] = want
        a = Allocation(offset=offset, size=1 << order, requested=n)
        self._live[a] = (offset, order, migratetype)
        return a

    def _steal(self, pb: int, new_type: str) -> None:
        """Pageblock ``pb`` changes type to ``new_type``; its free blocks move to that type's
        lists (a free block inside one pageblock has order < pageblock_order)."""
        old = self._types[pb]
        lo, hi = pb << self.pageblock_order, (pb + 1) << self.pageblock_order
        for k in range(self.pageblock_order):
            blocks = self._free[old][k]
            self._free[old][k] = [o for o in blocks if not lo <= o < hi]
            for o in blocks:
                if lo <= o < hi:
                    insort(self._free[new_type][k], o)
        self._types[pb] = new_type

    # -- freeing -------------------------------------------------------------------------------

    def _check_live(self, a: object) -> tuple[int, int, str]:
        if not isinstance(a, Allocation) or a not in self._live:
            if isinstance(a, Allocation) and a in self._freed:
                raise DoubleFree(f"allocation {a.id} at page {a.offset} was already freed")
            raise InvalidHandle(f"allocation {a!r} did not come from this allocator")
        return self._live[a]

    def free(self, a: Allocation) -> None:
        """Give ``a`` back, merging with free buddies (on whichever lists they are)."""
        offset, order, _ = self._check_live(a)
        del self._live[a]
        self._freed.add(a)
        self._merge_free(offset, order)

    def _merge_free(self, offset: int, order: int) -> None:
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            if not self._is_free(buddy, order):
                break
            self._remove(buddy, order)
            offset &= ~(1 << order)
            order += 1
        self._put(offset, order)

    # -- compaction support --------------------------------------------------------------------

    def is_migration_target(self, offset: int, order: int) -> bool:
        """May compaction move data into the free block ``(offset, order)``? Only into movable
        pageblocks (Linux's ``suitable_migration_target``), so compaction never mixes movable
        data into the unmovable group."""
        first = offset >> self.pageblock_order
        last = (offset + (1 << order) - 1) >> self.pageblock_order
        return all(self._types[pb] == MOVABLE for pb in range(first, last + 1))

    def relocate(self, a: Allocation, offset: int) -> None:
        """Move a live allocation to the free aligned block of its order at ``offset`` (see
        ``BuddyAllocator.relocate``); ``a`` keeps its identity. Unmovable ones refuse."""
        old, order, mt = self._check_live(a)
        if mt == UNMOVABLE:
            raise InvalidRequest(f"allocation {a.id} at page {old} is unmovable")
        home = relocation_home(offset, old, order, self.total, self.free_blocks())
        if home is None:
            return
        self._remove(*home)
        split_towards(home, offset, order, self._put)
        if order >= self.pageblock_order:
            first = offset >> self.pageblock_order
            for pb in range(first, first + (1 << (order - self.pageblock_order))):
                self._types[pb] = MOVABLE
        self._live[a] = (offset, order, mt)
        a.offset = offset
        self._merge_free(old, order)

    # -- inspection ----------------------------------------------------------------------------

    def migratetype(self, a: Allocation) -> str:
        """The migrate type ``a`` was allocated with."""
        return self._check_live(a)[2]

    def unmovable(self) -> list[Allocation]:
        """The live unmovable allocations: what compaction must leave in place."""
        return [a for a in self.allocations() if self._live[a][2] == UNMOVABLE]

    def pageblock_types(self) -> list[str]:
        return list(self._types)

    def free_blocks(self, migratetype: str | None = None) -> list[tuple[int, int]]:
        """Free blocks as sorted ``(offset, order)`` pairs, of one type's lists or of all."""
        types = TYPES if migratetype is None else (migratetype,)
        return sorted(
            (off, k) for t in types for k, blocks in enumerate(self._free[t]) for off in blocks
        )

    def buddyinfo(self) -> list[int]:
        """Free-block counts per order over both types (a row of /proc/buddyinfo)."""
        return [
            len(self._free[MOVABLE][k]) + len(self._free[UNMOVABLE][k])
            for k in range(self.max_order + 1)
        ]

    def _free_pages(self) -> int:
        return sum(1 << k for _, k in self.free_blocks())

    def free_extents(self) -> list[tuple[int, int]]:
        return merge_runs([(off, 1 << k) for off, k in self.free_blocks()])

    def largest_free(self) -> int:
        return max((1 << k for _, k in self.free_blocks()), default=0)

    def allocations(self) -> list[Allocation]:
        return sorted(self._live, key=lambda a: self._live[a][0])


# --- the grouping demo ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupingResult:
    """Largest free block (pages) before and after compaction, with and without grouping."""

    grouped_before: int
    grouped_after: int
    scattered_before: int
    scattered_after: int


def mobility_workload(
    seed: int, allocs: int = 256, unmovable_share: float = 0.2, max_order: int = 2
) -> list[tuple[str, float, str]]:
    """A reproducible list of operations: ``allocs`` allocations ``("alloc", order, type)``,
    unmovable ones of one page (small kernel objects) with probability ``unmovable_share``,
    movable ones of order 0..``max_order``; then ``allocs // 2`` frees ``("free", u, "")``, each
    removing the live allocation at index ``int(u * live)``. Filling first and freeing at random
    afterwards leaves holes everywhere: the situation compaction is for."""
    rng = random.Random(seed)
    ops: list[tuple[str, float, str]] = []
    for _ in range(allocs):
        if rng.random() < unmovable_share:
            ops.append(("alloc", 0, UNMOVABLE))
        else:
            ops.append(("alloc", rng.randint(0, max_order), MOVABLE))
    ops += [("free", rng.random(), "") for _ in range(allocs // 2)]
    return ops


def run_mobility(allocator: MobilityAllocator, ops: list[tuple[str, float, str]]) -> None:
    """Drive ``allocator`` through ``ops``; a failed allocation is skipped."""
    live: list[Allocation] = []
    for kind, value, mt in ops:
        if kind == "free":
            if live:
                allocator.free(live.pop(int(value * len(live))))
            continue
        try:
            live.append(allocator.alloc(1 << int(value), mt))
        except OutOfMemory:
            pass


def grouping_demo(
    seed: int = 0, total_pages: int = 512, pageblock_order: int = 4, allocs: int = 256
) -> GroupingResult:
    """Run one workload with and without grouping by mobility, compact both (movable
    allocations only), and report the largest free block before and after. With unmovable
    allocations scattered over every pageblock compaction cannot rebuild large blocks; grouped
    in a few pageblocks, it can. (The stolen pageblocks themselves end up spread out, because a
    fallback takes the largest free block: with the defaults they sit 128 pages apart, so 64
    pages is the most compaction can recover here, against 16 or 32 without grouping.)"""
    from minipaged.compaction import compact

    ops = mobility_workload(seed, allocs)
    out = []
    for grouping in (True, False):
        m = MobilityAllocator(total_pages, total_pages.bit_length() - 1, pageblock_order, grouping)
        run_mobility(m, ops)
        arena = np.zeros(total_pages, dtype=np.uint8)
        before = m.largest_free()
        compact(m, arena, pinned=m.unmovable())
        out += [before, m.largest_free()]
    return GroupingResult(*out)
