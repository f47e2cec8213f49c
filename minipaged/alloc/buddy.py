"""A binary buddy allocator, the way Linux hands out physical pages.

The arena is cut into blocks whose sizes are powers of two (a block of *order* k holds 2**k pages)
and whose offsets are multiples of their size. A request of ``n`` pages is rounded up to the
smallest order k with 2**k >= n, so up to half of a block can be lost to internal fragmentation;
in exchange, finding and merging free blocks is cheap. Every block of order k < max_order has one
*buddy*, the other half of the order-(k+1) block it was split from, at ``offset ^ (1 << k)``.

Worked example, 8 pages, max_order 3, ``alloc(1)`` then ``free`` of it::

    page:        0   1   2   3   4   5   6   7
    start:      [              order 3          ]   free: order 3 {0}
    split 3:    [    order 2    ][    order 2    ]  keep 0..3, free 4..7 (order 2)
    split 2:    [ order 1][ o. 1][               ]  keep 0..1, free 2..3 (order 1)
    split 1:    [A][o0][ order 1][    order 2    ]  keep 0, free 1 (order 0)
                                                    free: order 0 {1}, 1 {2}, 2 {4}
    free(A):    buddy of (0, 0) is 0 ^ 1 = 1: free at order 0, merge into (0, 1);
                buddy of (0, 1) is 0 ^ 2 = 2: free at order 1, merge into (0, 2);
                buddy of (0, 2) is 0 ^ 4 = 4: free at order 2, merge into (0, 3) = the start.

Allocation (Linux: ``__rmqueue_smallest`` and ``expand`` in mm/page_alloc.c) walks the free lists
upward from the wanted order, takes a block from the first non-empty one and splits it down,
keeping the lower half each time and putting the upper half on the free list one order below.
Freeing (Linux: ``__free_one_page``) looks at the buddy; while the buddy is free *at the same
order*, it is taken off its list and the two merge into ``offset & ~(1 << k)``, one order up, never
beyond ``max_order``. Eager merging keeps the free lists *fully coalesced*: two free buddies never
coexist, so the free blocks are exactly the largest aligned blocks that lie wholly in free memory.

An arena that is not a multiple of 2**max_order is covered from page 0 by the largest aligned
blocks that fit, as Linux hands boot memory to the buddy allocator (``__free_pages_memory`` in
mm/memblock.c): 12 pages with max_order 3 become blocks (0, order 3) and (8, order 2). A buddy that
would lie past the end is never free, so such blocks simply never merge.

Simplifications against Linux: one arena instead of zones, migrate types and per-CPU page lists;
no watermarks, no fallback stealing, no locking. Linux takes the head of a free list (a recently
freed, cache-warm page); here each free list is a sorted Python list and the *lowest* address
wins, so every result is deterministic and easy to check by hand. Linux marks a free page with its
order in ``struct page`` to test "is my buddy free?" in O(1); here a binary search does it.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left, insort
from collections.abc import Callable

from minipaged.alloc.base import Allocation, Allocator, check_request, merge_runs
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, OutOfMemory


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}, got {value}")
    return value


def relocation_home(
    offset: object, old: int, order: int, total: int, free_blocks: list[tuple[int, int]]
) -> tuple[int, int] | None:
    """The free block ``(o, k)`` that holds the aligned order-``order`` block at ``offset``, for
    moving an allocation there from ``old``; None if ``offset`` is ``old`` (nothing to move).
    The target must be an int, aligned to its size, inside the arena of ``total`` pages and
    wholly free; since the free lists are fully coalesced, it then lies inside one free block
    of order >= ``order``. ``InvalidRequest`` otherwise."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise InvalidRequest(f"offset must be an int, got {offset!r}")
    if offset == old:
        return None
    size = 1 << order
    if offset < 0 or offset + size > total or offset % size:
        raise InvalidRequest(
            f"offset {offset} is not an aligned order-{order} block inside the arena of "
            f"{total} pages"
        )
    home = next(((o, k) for o, k in free_blocks if k >= order and o <= offset < o + (1 << k)), None)
    if home is None:
        raise InvalidRequest(f"pages {offset}..{offset + size - 1} are not all free")
    return home


def split_towards(
    home: tuple[int, int], offset: int, order: int, put: Callable[[int, int], None]
) -> None:
    """Split the free block ``home``, already off its list, down to the order-``order`` block at
    ``offset``: each time, the half not holding the target goes back, one order down, through
    ``put(o, k)``; as an allocation splits a block, but steered to the target."""
    o, k = home
    while k > order:
        k -= 1
        half = 1 << k
        if offset >= o + half:  # the target is in the upper half: the lower one goes back
            put(o, k)
            o += half
        else:
            put(o + half, k)


class BuddyAllocator(Allocator):
    """Binary buddy allocator over ``total_pages`` pages with blocks of order 0..``max_order``.

    Invariants kept after every call (a call that raises changes nothing):
    - every free block of order k starts at a multiple of 2**k and lies inside the arena;
    - free blocks and live allocations are disjoint and together cover all ``total`` pages;
    - no two free blocks are buddies of the same order (the free lists are fully coalesced).
    """

    def __init__(self, total_pages: int, max_order: int) -> None:
        self.total = _check_int(total_pages, "total_pages", 1)
        self.max_order = _check_int(max_order, "max_order", 0)
        # _free[k]: sorted offsets of the free blocks of order k.
        self._free: list[list[int]] = [[] for _ in range(self.max_order + 1)]
        # The largest block the arena can ever hold: the first block of the initial cover.
        self._top_order = min(self.max_order, self.total.bit_length() - 1)
        # Live allocations (compared by identity) -> (offset, order) as handed out, so a handle
        # whose fields were changed by its holder still frees the right block.
        self._live: dict[Allocation, tuple[int, int]] = {}
        # Allocations this allocator has freed; weak, so a long run does not keep them all alive,
        # yet one still held by its owner is recognised when it is freed a second time.
        self._freed: weakref.WeakSet[Allocation] = weakref.WeakSet()
        # Cover the arena from page 0 with the largest blocks that fit: first blocks of
        # max_order, then one block per set bit of what is left, largest first. Each block starts
        # where larger (or equal) power-of-two blocks end, so it is aligned to its own size.
        offset = 0
        while offset < self.total:
            order = min(self.max_order, (self.total - offset).bit_length() - 1)
            self._free[order].append(offset)  # offsets grow, so each list stays sorted
            offset += 1 << order

    # -- allocation ----------------------------------------------------------------------------

    def alloc(self, n: int) -> Allocation:
        """Reserve ``2**k`` pages for the smallest k with ``2**k >= n`` (``requested = n``).

        ``n`` larger than the largest block this arena can ever hold (``2**max_order``, or the
        largest power of two <= ``total`` if that is smaller) raises ``InvalidRequest``: no amount
        of freeing could serve it, so it is not an ``OutOfMemory``."""
        check_request(n, 1 << self._top_order, "pages")
        return self._take((n - 1).bit_length(), n)

    def alloc_order(self, order: int) -> Allocation:
        """Reserve one block of exactly ``order`` (``requested = 2**order``)."""
        _check_int(order, "order", 0)
        if order > self._top_order:
            raise InvalidRequest(
                f"order {order} can never fit: the largest block of this arena has order "
                f"{self._top_order} ({self.total} pages, max_order {self.max_order})"
            )
        return self._take(order, 1 << order)

    def _take(self, order: int, requested: int) -> Allocation:
        """Take the lowest free block of the smallest order >= ``order`` and split it down,
        keeping the lower half each time (Linux's ``__rmqueue_smallest`` + ``expand``)."""
        k = next((k for k in range(order, self.max_order + 1) if self._free[k]), None)
        if k is None:
            raise OutOfMemory(requested, self._free_pages(), self.largest_free(), what="pages")
        offset = self._free[k].pop(0)
        while k > order:
            k -= 1
            insort(self._free[k], offset + (1 << k))  # the upper half goes back, one order down
        a = Allocation(offset=offset, size=1 << order, requested=requested)
        self._live[a] = (offset, order)
        return a

    # -- freeing -------------------------------------------------------------------------------

    def free(self, a: Allocation) -> None:
        """Give ``a`` back and merge it with its buddy for as long as the buddy is free at the
        same order (Linux's ``__free_one_page``), so the free lists stay fully coalesced."""
        if not isinstance(a, Allocation):
            raise InvalidHandle(f"not an allocation: {a!r}")
        if a not in self._live:
            if a in self._freed:
                raise DoubleFree(f"allocation {a.id} at page {a.offset} was already freed")
            raise InvalidHandle(f"allocation {a!r} did not come from this allocator")
        offset, order = self._live.pop(a)
        self._freed.add(a)
        self._merge_free(offset, order)

    def _merge_free(self, offset: int, order: int) -> None:
        """Put the block ``(offset, order)`` on the free lists, merged with its buddies."""
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            if not self._is_free(buddy, order):
                break
            self._remove(buddy, order)
            offset &= ~(1 << order)
            order += 1
        insort(self._free[order], offset)

    # -- relocation (compaction) ---------------------------------------------------------------

    def relocate(self, a: Allocation, offset: int) -> None:
        """Move the live allocation ``a`` to the free, aligned block of its own order at
        ``offset``; ``a`` keeps its identity and reports the new offset (the caller copies the
        data). Moving it to where it already is changes nothing.

        The target must be aligned to ``a.size``, lie inside the arena and be wholly free, so it
        lies inside one free block of order >= a's order (the free lists are fully coalesced).
        That block is split down towards the target, the upper or lower half not containing it
        going back one order down each time (as ``_take`` does, but steered), and the old block
        is freed with merging. Raises ``InvalidHandle``/``DoubleFree`` for a bad handle and
        ``InvalidRequest`` for a bad target, changing nothing."""
        if not isinstance(a, Allocation) or a not in self._live:
            if isinstance(a, Allocation) and a in self._freed:
                raise DoubleFree(f"allocation {a.id} at page {a.offset} was already freed")
            raise InvalidHandle(f"allocation {a!r} did not come from this allocator")
        old, order = self._live[a]
        home = relocation_home(offset, old, order, self.total, self.free_blocks())
        if home is None:
            return
        self._remove(*home)
        split_towards(home, offset, order, lambda o, k: insort(self._free[k], o))
        self._live[a] = (offset, order)
        a.offset = offset
        self._merge_free(old, order)

    def _is_free(self, offset: int, order: int) -> bool:
        blocks = self._free[order]
        i = bisect_left(blocks, offset)
        return i < len(blocks) and blocks[i] == offset

    def _remove(self, offset: int, order: int) -> None:
        del self._free[order][bisect_left(self._free[order], offset)]

    # -- inspection ----------------------------------------------------------------------------

    def buddyinfo(self) -> list[int]:
        """Free-block counts for orders 0..max_order, like a row of /proc/buddyinfo."""
        return [len(blocks) for blocks in self._free]

    def free_blocks(self) -> list[tuple[int, int]]:
        """The free blocks as sorted ``(offset, order)`` pairs."""
        return sorted((off, k) for k, blocks in enumerate(self._free) for off in blocks)

    def _free_pages(self) -> int:
        """The number of free pages, whatever blocks they are in."""
        return sum(len(blocks) << k for k, blocks in enumerate(self._free))

    def free_extents(self) -> list[tuple[int, int]]:
        return merge_runs([(off, 1 << k) for off, k in self.free_blocks()])

    def largest_free(self) -> int:
        """The size of the largest free block: any ``n`` up to it succeeds, nothing larger."""
        k = next((k for k in range(self.max_order, -1, -1) if self._free[k]), None)
        return 0 if k is None else 1 << k

    def allocations(self) -> list[Allocation]:
        return sorted(self._live, key=lambda a: self._live[a][0])
