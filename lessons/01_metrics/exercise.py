"""Lesson 01: how fragmented is an arena? Four numbers, computed from an allocator's state.

Fill in the four tasks; check your work with

    minipaged lesson check 01

Every function only reads its arguments; bad input raises ``InvalidRequest`` naming it (the
argument checks are given). The rest of the module (``utilisation``, ``report``, ...) is the
library's: ``from minipaged.metrics import report``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from minipaged.alloc.base import Allocation  # noqa: F401 (for the tasks)
from minipaged.errors import InvalidRequest
from minipaged.metrics import _contig_info, _count, _items, _pair  # noqa: F401 (for the tasks)


def _totals(args: tuple[object, ...], name: str) -> tuple[object, object] | None:
    """The two totals when the caller passed them (two numbers or one pair), else None."""
    if len(args) not in (1, 2):
        raise InvalidRequest(f"{name} takes 1 or 2 arguments, got {len(args)}")
    return _pair(args)


def internal_fragmentation(*args: object) -> float:
    """Share of reserved units that were never requested: ``1 - requested / reserved``.

    Called with the live allocations (``Allocation`` objects: sum their ``requested`` and
    ``size``) or with the two totals ``(requested, reserved)``, as two numbers or one pair.
    0.0 when nothing is reserved. ``InvalidRequest`` if an item is not an Allocation, a total is
    not a non-negative int (``_count`` checks that), or requested > reserved (the message says
    ``requested (5) cannot exceed reserved (4)``)."""
    # TODO task 1 (about 10 lines): pair = _totals(args, "internal_fragmentation"); when it is
    # None, args[0] is an iterable of allocations (_items(args[0], "allocations") lists it).
    raise NotImplementedError("task 1: internal_fragmentation")


def external_fragmentation(*args: object) -> float:
    """Share of free units outside the largest free piece: ``1 - largest_free / total_free``.

    Called with the free extents (sorted ``(offset, length)`` pairs: the largest piece is the
    longest extent) or with the two totals ``(largest_free, total_free)``. 0.0 when nothing is
    free. ``InvalidRequest`` if an extent is not an ``(offset, length)`` pair, a length or total
    is not a non-negative int, or largest_free > total_free (``largest_free (5) cannot exceed
    total_free (4)``)."""
    # TODO task 2 (about 10 lines): pair = _totals(args, "external_fragmentation"), as in task 1
    raise NotImplementedError("task 2: external_fragmentation")


def fragmentation_index(free_counts: Sequence[int], order: int) -> int:
    """Linux's fragmentation index for a request of ``2**order`` pages, in thousandths.

    ``free_counts[k]`` is the number of free blocks of order k. With
    ``free_pages, blocks, suitable = _contig_info(free_counts, order)`` (it validates too):
    0 when ``blocks == 0``; -1000 when ``suitable > 0`` (the request succeeds); otherwise, with
    integer division, ``1000 - (1000 + free_pages * 1000 // 2**order) // blocks``."""
    # TODO task 3 (about 5 lines)
    raise NotImplementedError("task 3: fragmentation_index")


def unusable_index(free_counts: Sequence[int], order: int) -> int:
    """Linux's unusable free space index for a request of ``2**order`` pages, in thousandths:
    the share of free memory in blocks too small for it,
    ``(free_pages - (suitable << order)) * 1000 // free_pages``; 1000 when nothing is free."""
    # TODO task 3 (about 4 lines)
    raise NotImplementedError("task 3: unusable_index")


def free_counts_from_extents(extents: Iterable[tuple[int, int]], max_order: int) -> list[int]:
    """Per-order free-block counts (``k`` in ``0..max_order``) for an allocator that has no buddy
    free lists: cut each free extent of length L into the power-of-two pieces of L's binary
    representation, pieces larger than ``2**max_order`` becoming several of that order.
    E.g. extents of 13 and 3 units, max_order 2: 13 = 4+4+4+1 and 3 = 2+1 -> [2, 1, 3].

    ``InvalidRequest`` for a negative ``max_order``, an extent that is not an ``(offset,
    length)`` pair, or a negative length."""
    # TODO task 4 (about 10 lines): max_order = _count(max_order, "max_order") first
    raise NotImplementedError("task 4: free_counts_from_extents")
