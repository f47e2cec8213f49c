"""Lesson 02: a binary buddy allocator, the way Linux hands out physical pages.

Fill in the three tasks; everything else is given. Check your work with

    minipaged lesson check 02

The arena is ``total`` pages cut into blocks of 2**k pages (order k), each starting at a multiple
of its size. ``self._free[k]`` is the sorted list of offsets of the free blocks of order k.
The buddy of the block (offset, k) is (offset ^ (1 << k), k); the two merge into
(offset & ~(1 << k), k + 1).

Invariants after every call (a call that raises changes nothing):
- every free block of order k starts at a multiple of 2**k and lies inside the arena;
- free blocks and live allocations are disjoint and together cover all ``total`` pages;
- no two free blocks are buddies of the same order (the free lists are fully coalesced).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left, insort  # noqa: F401 (insort: for your tasks)

from minipaged.alloc.base import Allocation, Allocator, check_request, merge_runs
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, OutOfMemory  # noqa: F401


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}, got {value}")
    return value


class BuddyAllocator(Allocator):
    """Binary buddy allocator over ``total_pages`` pages with blocks of order 0..``max_order``."""

    def __init__(self, total_pages: int, max_order: int) -> None:
        self.total = _check_int(total_pages, "total_pages", 1)
        self.max_order = _check_int(max_order, "max_order", 0)
        self._free: list[list[int]] = [[] for _ in range(self.max_order + 1)]
        self._top_order = min(self.max_order, self.total.bit_length() - 1)
        self._live: dict[Allocation, tuple[int, int]] = {}  # allocation -> (offset, order)
        self._freed: weakref.WeakSet[Allocation] = weakref.WeakSet()
        # TODO task 1 (about 4 lines): cover the arena with free blocks.
        # Walk from page 0; at each offset put the largest block that fits in what is left
        # (never above max_order) on its free list. 12 pages, max_order 3 -> (0, 3) and (8, 2);
        # 7 pages, max_order 2 -> (0, 2), (4, 1), (6, 0). Why is each block aligned to its size?
        raise NotImplementedError("task 1: cover the arena with free blocks (__init__)")

    def alloc(self, n: int) -> Allocation:
        """Reserve 2**k pages for the smallest k with 2**k >= n (``requested = n``)."""
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
        """Take the lowest free block of the smallest order k >= ``order`` and split it down to
        ``order``: each split keeps the lower half and puts the upper half (at offset + 2**(k-1))
        on the free list one order below. Record ``self._live[a] = (offset, order)`` and return
        ``Allocation(offset, 1 << order, requested)``.

        No free block of order >= ``order``: raise ``OutOfMemory(requested, free pages,
        largest_free, what="pages")`` and change nothing."""
        # TODO task 2 (about 10 lines)
        raise NotImplementedError("task 2: take a block and split it down (_take)")

    def free(self, a: Allocation) -> None:
        """Give ``a`` back and merge it with its buddy for as long as the buddy is free at the
        same order (never beyond ``max_order``), so the free lists stay fully coalesced."""
        if not isinstance(a, Allocation):
            raise InvalidHandle(f"not an allocation: {a!r}")
        if a not in self._live:
            if a in self._freed:
                raise DoubleFree(f"allocation {a.id} at page {a.offset} was already freed")
            raise InvalidHandle(f"allocation {a!r} did not come from this allocator")
        # TODO task 3 (about 10 lines): pop (offset, order) from self._live (use the record, not
        # a.offset: a holder may have changed its fields), add a to self._freed, then merge:
        # while the buddy is free at the same order, remove it and move one order up.
        # Finally insort the merged block into its free list. _is_free and _remove help.
        raise NotImplementedError("task 3: free a block and merge it with its buddy (free)")

    def _is_free(self, offset: int, order: int) -> bool:
        blocks = self._free[order]
        i = bisect_left(blocks, offset)
        return i < len(blocks) and blocks[i] == offset

    def _remove(self, offset: int, order: int) -> None:
        del self._free[order][bisect_left(self._free[order], offset)]

    # -- inspection (given) ----------------------------------------------------------------------

    def buddyinfo(self) -> list[int]:
        """Free-block counts for orders 0..max_order, like a row of /proc/buddyinfo."""
        return [len(blocks) for blocks in self._free]

    def free_blocks(self) -> list[tuple[int, int]]:
        """The free blocks as sorted ``(offset, order)`` pairs."""
        return sorted((off, k) for k, blocks in enumerate(self._free) for off in blocks)

    def _free_pages(self) -> int:
        return sum(len(blocks) << k for k, blocks in enumerate(self._free))

    def free_extents(self) -> list[tuple[int, int]]:
        return merge_runs([(off, 1 << k) for off, k in self.free_blocks()])

    def largest_free(self) -> int:
        k = next((k for k in range(self.max_order, -1, -1) if self._free[k]), None)
        return 0 if k is None else 1 << k

    def allocations(self) -> list[Allocation]:
        return sorted(self._live, key=lambda a: self._live[a][0])
