"""Lesson 04: the block manager: block tables, copy-on-write and swapping.

Fill in the three tasks; check your work with

    minipaged lesson check 04

Your ``BlockManager`` inherits everything else from the library's (allocation, freeing, prefix
caching, the helpers named below), so each task is one piece you can test on its own. State:

- ``self._tables[seq_id]``: the block table, a list of physical block ids (GPU ones while
  running, CPU ones while ``seq_id in self._swapped``);
- ``self._tokens[seq_id]``: the sequence's tokens (``None`` for ids the caller did not give);
- ``self.gpu`` / ``self.cpu``: the two :class:`~minipaged.alloc.paged.PagedAllocator` pools,
  whose ref count of a block is the number of tables holding it.

Every operation checks all its preconditions before changing anything.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from minipaged import block_manager as library
from minipaged.block_manager import same_prefix  # noqa: F401 (the tests import it from here)
from minipaged.errors import InvalidRequest, OutOfMemory  # noqa: F401 (for your tasks)


class BlockManager(library.BlockManager):
    def slot_mapping(self, seq_id: Hashable, positions: Sequence[int] | None = None) -> np.ndarray:
        """Physical GPU slots (int64) of the given token positions, all of them by default:
        position p lives in slot ``table[p // block_size] * block_size + p % block_size``.

        ``table = self._running(seq_id, "map the slots of")`` checks the sequence (it raises for
        an unknown or swapped-out one). ``InvalidRequest`` for positions that are not a 1-d
        sequence of ints, or that lie outside ``0 .. num_tokens - 1`` (name the first bad one)."""
        # TODO task 1 (about 15 lines, numpy makes it short)
        raise NotImplementedError("task 1: slot_mapping")

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent (one more holder each: ``self.gpu.incref``)
        and gets a copy of its table and tokens; needs no free block. Check the parent with
        ``self._running(parent_id, "fork")`` and the child with ``self._check_new(child_id)``."""
        # TODO task 2 (about 6 lines)
        raise NotImplementedError("task 2: fork")

    def append_slots(
        self, seq_id: Hashable, n: int = 1, tokens: Sequence[int] | None = None
    ) -> list[tuple[int, int]]:
        """Make room for ``n`` new tokens; returns the ``(src, dst)`` copies that copy-on-write
        needs (at most one).

        The last block is copied first when it is partly filled AND shared (ref count > 1): take
        a fresh block (``self._new_gpu_block()``), drop this sequence's hold on the old one
        (``self._release_gpu(src)``), put the new one in the table, report ``(src, dst)``. Then
        add blocks until the table covers ``num_tokens + n`` tokens, extend the tokens with
        ``tokens`` (or ``n`` Nones) and ``self._register(seq_id, old_length // block_size)``.

        Check first: ``self._running(seq_id, "append to")``; ``library._check_int("n", n, 1)``;
        ``tokens``, if given, through ``self._check_tokens(tokens, "tokens")`` and of length n
        (``InvalidRequest``); ``self._append_need(seq_id, n)`` gives (blocks needed, copy?);
        ``raise self._out_of_gpu(need, 0)`` when fewer blocks are free."""
        # TODO task 2 (about 20 lines)
        raise NotImplementedError("task 2: append_slots")

    def swap_out(self, seq_ids: Hashable | Sequence[Hashable]) -> list[tuple[int, int]]:
        """Move a group of sequences to the CPU pool; returns the ``(gpu, cpu)`` block pairs to
        copy, each shared block once.

        ``ids, holders = self._group(seq_ids, swapped=False)`` validates the group (closed
        under sharing) and counts, per distinct block, the group's tables holding it.
        ``OutOfMemory(len(holders), free, free, what="CPU blocks")`` when the CPU pool has too
        few free blocks. ``self._move(ids, holders, self.cpu.allocate_block, self.cpu.incref)``
        rewrites the tables and returns the pairs; then release each old GPU block once per
        holder, last blocks first (``reversed(holders)``), and mark the ids swapped."""
        # TODO task 3 (about 10 lines)
        raise NotImplementedError("task 3: swap_out")

    def swap_in(self, seq_ids: Hashable | Sequence[Hashable]) -> list[tuple[int, int]]:
        """Move a swapped group back to the GPU; returns the ``(cpu, gpu)`` block pairs.

        Like ``allocate`` it must leave ``self.watermark_blocks`` free blocks: else
        ``raise self._out_of_gpu(len(holders), self.watermark_blocks)``. Move with
        ``self._new_gpu_block`` and ``self.gpu.incref``, drop every CPU hold
        (``self.cpu.decref``), unmark the ids and ``self._register(seq_id, 0)`` each (the prefix
        cache covers the GPU only)."""
        # TODO task 3 (about 10 lines)
        raise NotImplementedError("task 3: swap_in")
