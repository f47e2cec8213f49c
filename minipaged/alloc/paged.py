"""The paged allocator: vLLM's answer to KV-cache fragmentation.

The arena is cut into ``num_blocks`` fixed-size blocks of ``block_size`` token slots each, and a
sequence's KV cache lives in a list of blocks that need not be adjacent (its block table maps
logical block i to a physical block id, as a page table maps virtual to physical pages).

Why paging has no external fragmentation: every block is interchangeable with every other, so a
request for ``n`` slots needs ``ceil(n / block_size)`` free blocks, *any* free blocks. Whenever at
least that many are free the request succeeds; free memory can never be "there but unusable"
because of where it lies. So ``largest_free() == num_free_blocks * block_size``, and an
``OutOfMemory`` from this allocator always has ``fragmented == False``.

Why internal fragmentation is at most ``block_size - 1`` slots per sequence: only the last block
of a sequence can be partly filled; every other block is full. (Contiguous schemes instead lose
the whole reservation for tokens never generated.) Smaller blocks waste less but make block
tables longer and kernels gather from more places; vLLM's default is 16 tokens.

The free queue. Freed blocks go to the TAIL and allocation takes from the HEAD, so the block
reused first is the one freed longest ago: least recently used order. With prefix caching a freed
block still holds valid KV for its tokens until it is handed out again, so LRU order keeps
recently freed (likely to be hit again) blocks alive longest, and ``take`` revives one from the
middle of the queue. That needs three O(1) operations: pop the head, push the tail, unlink any
block. vLLM builds a doubly linked list by hand through prev/next fields of its block objects,
which avoids hashing and per-node allocation in its hot path. Here an ``OrderedDict`` is used: it
*is* a hash map threaded with a doubly linked list, so ``popitem(last=False)``, assignment of a
new key and ``del`` give exactly those three operations in O(1), in a few readable lines.

Two views of the same pool:
- the block-level API (``allocate_block``, ``take``, ``incref``, ``decref``), which the block
  manager uses; a block's ref count is the number of holders (sequences sharing it after a fork
  or a prefix-cache hit), and it returns to the free queue when the count drops to 0;
- the common :class:`~minipaged.alloc.base.Allocator` interface (``alloc``/``free``), which
  hands out whole :class:`Allocation` objects so the paged scheme can be compared with the
  contiguous ones on the same workload.
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict
from collections.abc import Sequence

from minipaged.alloc.base import Allocation, Allocator, Stats, check_request, merge_runs
from minipaged.errors import DoubleFree, InvalidHandle, InvalidRequest, InvalidState, OutOfMemory


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class PagedAllocator(Allocator):
    """A pool of ``num_blocks`` blocks of ``block_size`` slots with ref counts and an LRU free
    queue.

    Invariant: every block is either in the free queue (exactly once) with ref count 0, or out of
    it with ref count >= 1. Every public method checks all its preconditions before changing
    anything; the private ``_take``, ``_share`` and ``_drop`` are the same changes unchecked,
    for a caller that already knows the preconditions hold (see "unchecked fast paths").
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
        if not self._free:
            raise OutOfMemory(1, 0, 0, what="blocks")
        b, _ = self._free.popitem(last=False)
        self._refs[b] = 1
        return b

    def take(self, block_id: int) -> None:
        """Take a specific free block out of the queue, wherever it is, with ref count 1 (prefix
        caching reviving a freed block whose KV is still valid). ``InvalidState`` if it is in
        use."""
        b = self._block(block_id)
        if b not in self._free:
            raise InvalidState(f"block {b} is not free (ref count {self._refs[b]})")
        self._take(b)

    def incref(self, block_id: int) -> int:
        """Add a holder to a block in use; returns the new count. ``InvalidState`` if the block
        is free: a free block must be taken (``take``/``allocate_block``), not shared."""
        b = self._block(block_id)
        if self._refs[b] == 0:
            raise InvalidState(f"cannot share block {b}: it is free")
        return self._share(b)

    def decref(self, block_id: int) -> int:
        """Drop a holder; returns the new count. At 0 the block goes to the tail of the free
        queue. ``DoubleFree`` if the block is already free."""
        b = self._block(block_id)
        if self._refs[b] == 0:
            raise DoubleFree(f"block {b} is already free")
        return self._drop(b)

    def refcount(self, block_id: int) -> int:
        return self._refs[self._block(block_id)]

    @property
    def ref_counts(self) -> Sequence[int]:
        """Every block's ref count, indexed by block id: the pool's own list, not a copy.

        For hot loops over block ids already known to be valid (the block manager's decode step
        reads one count per sequence), where ``refcount``'s validation of each id would cost
        more than the read. Read it only: counts change through ``take``, ``incref`` and
        ``decref`` (or their unchecked forms below), which keep the free queue in step."""
        return self._refs

    def is_free(self, block_id: int) -> bool:
        return self._refs[self._block(block_id)] == 0

    def free_queue(self) -> list[int]:
        """The free block ids, head (next to be allocated) first."""
        return list(self._free)

    # ----- unchecked fast paths --------------------------------------------------------------
    #
    # What ``take``, ``incref`` and ``decref`` do once their checks have passed (they call
    # these, so each change is written once). They are for a caller that knows the
    # preconditions from its own invariant and calls them so often that checking each id again
    # is wasted work: the block manager, whose ids all come from its own block tables (a block
    # in a table is a valid block in use), calls ``_drop`` once per block it frees. They check
    # nothing: a wrong id breaks the pool's invariant silently instead of raising, so ids from
    # outside must go through the public methods.

    def _take(self, b: int) -> None:
        """``take`` for a block known to be free: unlink it from the queue, count 1."""
        del self._free[b]
        self._refs[b] = 1

    def _share(self, b: int) -> int:
        """``incref`` for a block known to be in use; returns the new count."""
        count = self._refs[b] + 1
        self._refs[b] = count
        return count

    def _drop(self, b: int) -> int:
        """``decref`` for a block known to be in use; returns the new count. At 0 the block
        goes to the tail of the free queue."""
        count = self._refs[b] - 1
        self._refs[b] = count
        if count == 0:
            self._free[b] = None
        return count

    # ----- common Allocator interface ----------------------------------------------------------

    def alloc(self, n: int) -> Allocation:
        """Reserve ``ceil(n / block_size)`` blocks from the head of the free queue. The blocks
        need not be adjacent; ``offset`` is the first slot of the first block."""
        check_request(n, self.total, "slots")
        need = -(-n // self.block_size)
        if need > len(self._free):
            free = len(self._free) * self.block_size
            raise OutOfMemory(n, free, free, what="slots")
        blocks = tuple(self.allocate_block() for _ in range(need))
        a = Allocation(
            offset=blocks[0] * self.block_size,
            size=need * self.block_size,
            requested=n,
            blocks=blocks,
        )
        self._live[a] = None
        return a

    def free(self, a: Allocation) -> None:
        """Drop this allocation's hold on each of its blocks, in order; a block that nobody else
        holds goes to the tail of the free queue."""
        if not isinstance(a, Allocation) or a not in self._live:
            if isinstance(a, Allocation) and a in self._freed:
                raise DoubleFree(f"allocation {a.id} at offset {a.offset} is already free")
            raise InvalidHandle(f"{a!r} was not allocated by this allocator")
        for b in a.blocks:  # check all before changing any
            if self._refs[b] == 0:
                raise DoubleFree(f"block {b} of allocation {a.id} was already freed")
        for b in a.blocks:
            self.decref(b)
        del self._live[a]
        self._freed.add(a)

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
