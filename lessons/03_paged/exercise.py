"""Lesson 03: paged allocation, vLLM's answer to KV-cache fragmentation.

Fill in the three tasks; check your work with

    minipaged lesson check 03

The arena is ``num_blocks`` blocks of ``block_size`` token slots. A block is either in the free
queue ``self._free`` (an OrderedDict used as a queue: head = next to be handed out, tail = freed
most recently) with ref count 0, or out of it with ref count >= 1 (``self._refs[b]``, the number
of holders). An allocation's ``blocks`` is its block table: logical block i -> physical block.

Invariant after every call (a call that raises changes nothing): every block is in the free queue
exactly once with ref count 0, or out of it with ref count >= 1.
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict

from minipaged.alloc.base import Allocation, Allocator, Stats, check_request, merge_runs  # noqa: F401
from minipaged.errors import (  # noqa: F401 (some are for your tasks)
    DoubleFree,
    InvalidHandle,
    InvalidRequest,
    InvalidState,
    OutOfMemory,
)


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class PagedAllocator(Allocator):
    """A pool of ``num_blocks`` blocks of ``block_size`` slots with ref counts and an LRU free
    queue.

    Invariant: every block is either in the free queue (exactly once) with ref count 0, or out of
    it with ref count >= 1. Every method checks all its preconditions before changing anything.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        # 0 blocks is allowed: an empty pool, e.g. when swapping to CPU memory is switched off.
        self.num_blocks = _positive_int("num_blocks", num_blocks, 0)
        self.block_size = _positive_int("block_size", block_size, 1)
        self.total = self.num_blocks * self.block_size
        self._refs = [0] * self.num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))
        self._live: dict[Allocation, None] = {}  # keyed by identity (Allocation has eq=False)
        # Allocations freed here and still referenced somewhere: freeing one again is a double
        # free, not a foreign handle. Weak, so the set never outgrows what callers still hold.
        self._freed: weakref.WeakSet[Allocation] = weakref.WeakSet()

    # ----- block-level API ---------------------------------------------------------------------

    def _block(self, block_id: object) -> int:
        """Validate a block id (any int-like value except bool) and return it as an int."""
        if isinstance(block_id, bool):
            raise InvalidHandle(f"block id must be an int, got {block_id!r}")
        try:
            b = operator.index(block_id)
        except TypeError:
            raise InvalidHandle(f"block id must be an int, got {block_id!r}") from None
        if not 0 <= b < self.num_blocks:
            raise InvalidHandle(
                f"block {b} does not exist: this pool has blocks 0..{self.num_blocks - 1}"
            )
        return b

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate_block(self) -> int:
        """Take the block at the head of the free queue (the least recently freed) with ref
        count 1. ``OutOfMemory`` (what="blocks") when no block is free."""
        # TODO task 1 (about 5 lines): OutOfMemory(1, 0, 0, what="blocks") when nothing is free;
        # else pop the head of self._free (popitem(last=False)) and set its ref count to 1.
        raise NotImplementedError("task 1: allocate_block")

    def take(self, block_id: int) -> None:
        """Take a specific free block out of the queue, wherever it is, with ref count 1 (prefix
        caching reviving a freed block whose KV is still valid). ``InvalidState`` if it is in
        use."""
        # TODO task 2 (about 5 lines): validate with self._block, InvalidState if it is in use.
        raise NotImplementedError("task 2: take")

    def incref(self, block_id: int) -> int:
        """Add a holder to a block in use; returns the new count. ``InvalidState`` if the block
        is free: a free block must be taken (``take``/``allocate_block``), not shared."""
        # TODO task 2 (about 5 lines)
        raise NotImplementedError("task 2: incref")

    def decref(self, block_id: int) -> int:
        """Drop a holder; returns the new count. At 0 the block goes to the tail of the free
        queue. ``DoubleFree`` if the block is already free."""
        # TODO task 1 (about 6 lines): DoubleFree if the block is already free; at 0 the block
        # goes to the TAIL of the queue (self._free[b] = None).
        raise NotImplementedError("task 1: decref")

    def refcount(self, block_id: int) -> int:
        return self._refs[self._block(block_id)]

    def is_free(self, block_id: int) -> bool:
        return self._refs[self._block(block_id)] == 0

    def free_queue(self) -> list[int]:
        """The free block ids, head (next to be allocated) first."""
        return list(self._free)

    # ----- common Allocator interface ----------------------------------------------------------

    def alloc(self, n: int) -> Allocation:
        """Reserve ``ceil(n / block_size)`` blocks from the head of the free queue. The blocks
        need not be adjacent; ``offset`` is the first slot of the first block."""
        # TODO task 3 (about 12 lines): check_request(n, self.total, "slots") first; OutOfMemory
        # (n, free slots, free slots, what="slots") when too few blocks are free; take the blocks
        # with allocate_block, record the Allocation in self._live.
        raise NotImplementedError("task 3: alloc")

    def free(self, a: Allocation) -> None:
        """Drop this allocation's hold on each of its blocks, in order; a block that nobody else
        holds goes to the tail of the free queue."""
        if not isinstance(a, Allocation) or a not in self._live:
            if isinstance(a, Allocation) and a in self._freed:
                raise DoubleFree(f"allocation {a.id} at offset {a.offset} is already free")
            raise InvalidHandle(f"{a!r} was not allocated by this allocator")
        # TODO task 3 (about 8 lines): DoubleFree if any of its blocks is already free (check all
        # before changing any); then decref each block, drop a from self._live, add it to
        # self._freed.
        raise NotImplementedError("task 3: free")

    def free_extents(self) -> list[tuple[int, int]]:
        return merge_runs([(b * self.block_size, self.block_size) for b in self._free])

    def largest_free(self) -> int:
        """All free slots: any free blocks will do, adjacent or not."""
        return len(self._free) * self.block_size

    def allocations(self) -> list[Allocation]:
        return sorted(self._live, key=lambda a: (a.offset, a.id))

    def stats(self) -> Stats:
        """Like the base class, except that ``reserved`` counts every block in use once, also
        blocks held only through the block-level API and blocks shared by several holders, so
        that ``reserved + free == total`` always holds. ``requested`` counts live ``Allocation``
        objects only: how much of a bare block is used is known to its holder, not here."""
        live = self._live
        free = len(self._free) * self.block_size
        return Stats(
            total=self.total,
            reserved=self.total - free,
            requested=sum(a.requested for a in live),
            free=free,
            largest_free=free,
            allocations=len(live),
            free_extents=len(self.free_extents()),
        )
