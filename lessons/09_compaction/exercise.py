"""Lesson 09: detection and compaction: why did a request fail, and can moving memory help?

Fill in the three tasks; check your work with

    minipaged lesson check 09

Detection tells missing memory (only freeing helps) from fragmented memory (moving allocations
together would help). Compaction for first/best fit slides every movable allocation down to where
the one before it ends, so free memory gathers at the top. The buddy planner, ``relocate`` and the
bookkeeping are the library's (``minipaged/compaction.py``); ``plan_compaction`` and ``compact``
below are the library's too, calling your functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from unittest.mock import patch

import numpy as np

from minipaged import compaction
from minipaged.alloc.base import Allocation, Allocator
from minipaged.compaction import FITS, FRAGMENTED, MISSING, Diagnosis, Move  # noqa: F401
from minipaged.errors import InvalidRequest  # noqa: F401 (for your tasks)
from minipaged.metrics import fragmentation_index, free_counts  # noqa: F401 (for your tasks)


def diagnose(allocator: Allocator, n: int, threshold: int = 500) -> Diagnosis:
    """Would ``alloc(n)`` succeed now, and if not, is memory missing or only fragmented?

    ``InvalidRequest`` unless n is an int >= 1 and threshold an int >= 0. ``needed`` is what the
    allocator would reserve: the next power of two for a buddy allocator (one with
    ``buddyinfo``), else n rounded up to ``round_to`` (default 1). ``index`` is
    ``fragmentation_index(free_counts(allocator), order)`` with order the smallest k, 2**k >= n.
    FITS when ``n <= largest_free()``; else MISSING when fewer than ``needed`` units are free, or
    for a buddy allocator when the index is at most ``threshold`` (Linux's rule); else
    FRAGMENTED. Reads only."""
    # TODO task 1 (about 15 lines)
    raise NotImplementedError("task 1: diagnose")


def apply_moves(arena: np.ndarray, moves: Iterable[tuple[int, int, int]]) -> None:
    """Execute ``(src, dst, length)`` moves on ``arena`` (units along axis 0) in order, each as a
    memmove (copy the source out first: source and destination may overlap).

    Check every move before writing anything: ``InvalidRequest`` unless arena is a numpy array
    with ndim >= 1 and each move a triple of ints (numpy ints too, not bools) with length >= 0
    lying inside the arena."""
    # TODO task 2 (about 12 lines)
    raise NotImplementedError("task 2: apply_moves")


def _plan_slide(live: list[Allocation], pinned: set[int]) -> list[tuple[Allocation, int]]:
    """Sliding compaction: ``(allocation, new offset)`` for every allocation that moves. Walk the
    live allocations (sorted by offset) with a cursor from 0: a pinned one (``id(a) in pinned``)
    stays and puts the cursor at its end; any other moves down to the cursor (if it is not
    there already) and the cursor advances by its size."""
    # TODO task 3 (about 10 lines)
    raise NotImplementedError("task 3: _plan_slide")


# ----- given: the library's planner and compactor, calling your functions -----------------------


def plan_compaction(allocator: Allocator, pinned: Iterable[Allocation] = ()) -> list[Move]:
    """:func:`minipaged.compaction.plan_compaction` with your sliding planner."""
    with patch.object(compaction, "_plan_slide", _plan_slide):
        return compaction.plan_compaction(allocator, pinned)


def compact(
    allocator: Allocator, arena: np.ndarray | None = None, pinned: Iterable[Allocation] = ()
) -> list[Move]:
    """:func:`minipaged.compaction.compact` with your planner and your ``apply_moves``."""
    with (
        patch.object(compaction, "_plan_slide", _plan_slide),
        patch.object(compaction, "apply_moves", apply_moves),
    ):
        return compaction.compact(allocator, arena, pinned)
