"""First fit and best fit: the contiguous baseline that paging is measured against.

Before vLLM, serving systems gave each request one contiguous region of KV-cache memory, sized
for the longest sequence it might reach, because attention kernels expected a request's keys and
values side by side. Requests come and go with different lengths, so the free memory between the
survivors breaks into holes: enough memory may be free in total, yet no single hole is large
enough (external fragmentation), and the unused tail of each reservation is lost as well
(internal fragmentation).

PyTorch's CUDA caching allocator, which holds the memory of most training and inference jobs,
works on the same principle: it keeps freed blocks in pools (small and large requests apart),
rounds every size up (to multiples of 512 bytes), serves a request from the *smallest* cached
block that fits (best fit, ties to the lowest address), splits the rest off as a new free block
and merges a freed block with its free neighbours.

These allocators keep only that core: one arena of ``total`` units (no segments requested from
the driver on a miss, no pools or streams), sizes rounded up to a multiple of ``round_to``, the
request placed at the low end of the chosen free extent and the rest always split off, and a
freed allocation always merged with both free neighbours. First fit and best fit differ only in
which extent they choose (:meth:`FitAllocator._choose`).

The free list is a Python list of ``(offset, length)`` pairs sorted by offset, so ``alloc`` and
``free`` are O(number of extents): plain to read, and fast enough for the simulator's arenas.
"""

from __future__ import annotations

import bisect
import weakref
from abc import abstractmethod

from minipaged.alloc.base import Allocation, Allocator, check_request, merge_runs
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, OutOfMemory


class FitAllocator(Allocator):
    """A contiguous allocator over ``total`` units with a sorted, coalesced free list.

    Invariants: free extents are sorted by offset, never empty and never touch (a freed
    allocation is merged with its neighbours at once); live allocations and free extents tile
    ``[0, total)`` exactly. Every method checks all its preconditions before changing anything.
    """

    def __init__(self, total: int, round_to: int = 1) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise InvalidRequest(f"total must be an int >= 1, got {total!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise InvalidRequest(f"round_to must be an int >= 1, got {round_to!r}")
        if round_to > total:
            raise InvalidRequest(f"round_to={round_to} is larger than total={total}")
        self.total = total
        self.round_to = round_to
        self._free: list[tuple[int, int]] = [(0, total)]
        self._live: dict[Allocation, None] = {}  # keyed by identity (Allocation has eq=False)
        # Allocations freed here and still referenced somewhere: freeing one again is a double
        # free, not a foreign handle. Weak, so the set never outgrows what callers still hold.
        self._freed: weakref.WeakSet[Allocation] = weakref.WeakSet()

    @abstractmethod
    def _choose(self, size: int) -> int | None:
        """Index in ``self._free`` of the extent to serve ``size`` units from, or None."""

    def _round(self, n: int) -> int:
        return -(-n // self.round_to) * self.round_to

    def alloc(self, n: int) -> Allocation:
        """Reserve ``n`` units rounded up to a multiple of ``round_to``, at the low end of the
        chosen free extent. ``OutOfMemory`` counts in reserved (rounded) units, so its
        ``fragmented`` is True exactly when enough units are free but no extent is large enough.
        """
        # The largest reservation that could ever fit is total rounded down to a round_to multiple.
        check_request(n, self.total - self.total % self.round_to)
        size = self._round(n)
        i = self._choose(size)
        if i is None:
            free = sum(length for _, length in self._free)
            largest = max((length for _, length in self._free), default=0)
            raise OutOfMemory(size, free, largest)
        offset, length = self._free[i]
        if length == size:
            del self._free[i]
        else:
            self._free[i] = (offset + size, length - size)
        a = Allocation(offset=offset, size=size, requested=n)
        self._live[a] = None
        return a

    def free(self, a: Allocation) -> None:
        """Give ``a`` back, merging it with the free extent just before and just after it."""
        if not isinstance(a, Allocation) or a not in self._live:
            if isinstance(a, Allocation) and a in self._freed:
                raise DoubleFree(f"allocation {a.id} at offset {a.offset} is already free")
            raise InvalidHandle(f"{a!r} was not allocated by this allocator")
        start, end = a.offset, a.end
        lo = hi = bisect.bisect_left(self._free, (start,))  # first extent after a
        if lo > 0 and sum(self._free[lo - 1]) == start:  # left neighbour ends where a starts
            lo -= 1
            start = self._free[lo][0]
        if hi < len(self._free) and self._free[hi][0] == end:  # right neighbour starts at a's end
            end = sum(self._free[hi])
            hi += 1
        self._free[lo:hi] = [(start, end - start)]
        del self._live[a]
        self._freed.add(a)

    def relocate(self, a: Allocation, offset: int) -> None:
        """Move the live allocation ``a`` so that it starts at ``offset``; ``a`` keeps its
        identity and reports the new offset (the caller copies the data, as a memmove: the new
        place may overlap the old one). Every unit of the new place must be free or ``a``'s own.

        Works on the free list with ``a``'s units counted as free: merge them in, carve the new
        place out of the extent that holds it. Raises ``InvalidHandle``/``DoubleFree`` for a bad
        handle and ``InvalidRequest`` for a bad offset, changing nothing."""
        if not isinstance(a, Allocation) or a not in self._live:
            if isinstance(a, Allocation) and a in self._freed:
                raise DoubleFree(f"allocation {a.id} at offset {a.offset} is already free")
            raise InvalidHandle(f"{a!r} was not allocated by this allocator")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise InvalidRequest(f"offset must be an int, got {offset!r}")
        if offset < 0 or offset + a.size > self.total:
            raise InvalidRequest(
                f"offset {offset} puts {a.size} units outside the arena of {self.total}"
            )
        runs = merge_runs([*self._free, (a.offset, a.size)])
        i = next((i for i, (o, n) in enumerate(runs) if o <= offset < o + n), None)
        if i is None or offset + a.size > sum(runs[i]):
            raise InvalidRequest(
                f"units {offset}..{offset + a.size - 1} are not all free (allocation {a.id} "
                f"has {a.size} units at offset {a.offset})"
            )
        start, end = runs[i][0], sum(runs[i])
        pieces = [(start, offset - start), (offset + a.size, end - offset - a.size)]
        runs[i : i + 1] = [(o, n) for o, n in pieces if n > 0]
        self._free = runs
        a.offset = offset

    def free_extents(self) -> list[tuple[int, int]]:
        return list(self._free)

    def largest_free(self) -> int:
        """The largest request that fits now: the longest extent, rounded down to a multiple of
        ``round_to`` (only whole reservations fit)."""
        return max((length - length % self.round_to for _, length in self._free), default=0)

    def allocations(self) -> list[Allocation]:
        return sorted(self._live, key=lambda a: a.offset)


class FirstFitAllocator(FitAllocator):
    """Take the lowest-offset extent that fits: quick, and keeps the high end of the arena
    free, but leaves small holes near the start."""

    def _choose(self, size: int) -> int | None:
        return next((i for i, (_, length) in enumerate(self._free) if length >= size), None)


class BestFitAllocator(FitAllocator):
    """Take the smallest extent that fits (ties to the lowest offset), as PyTorch's caching
    allocator does: large extents survive for large requests, at the price of tiny leftovers."""

    def _choose(self, size: int) -> int | None:
        best = None
        for i, (_, length) in enumerate(self._free):
            if length >= size and (best is None or length < self._free[best][1]):
                best = i  # strict < keeps the lowest offset among equal lengths
        return best
