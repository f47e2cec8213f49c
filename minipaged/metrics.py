"""How fragmented is an arena? Pure functions that turn an allocator's state into numbers.

Two kinds of waste, as in the PagedAttention paper:
- internal fragmentation: units reserved for an allocation but never requested (a buddy allocator
  rounding 5 pages up to 8, a paged allocator's partly filled last block);
- external fragmentation: free units that cannot serve a request because they are scattered over
  pieces too small for it.

Linux measures the second kind per request order ``j`` (a request of ``2**j`` pages) from the
number ``n_k`` of free blocks of each order ``k`` (``/proc/buddyinfo``), with integer arithmetic in
thousandths (``mm/vmstat.c``). :func:`fragmentation_index` and :func:`unusable_index` repeat that
arithmetic exactly, so a student can check a kernel's ``extfrag_index`` by hand; divide by 1000
(:func:`index_ratio`) for the value Linux prints.

Every function here only reads its arguments; bad input raises ``InvalidRequest`` naming it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from minipaged.alloc.base import Allocation, Allocator
from minipaged.errors import InvalidRequest


def _is_int(value: object) -> bool:
    """An int or an int-like scalar (``numpy.int64``), but not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _count(value: object, name: str) -> int:
    """A non-negative int, or ``InvalidRequest`` naming ``name`` and the value."""
    if not _is_int(value):
        raise InvalidRequest(f"{name} must be an int, got {value!r}")
    value = operator.index(value)  # type: ignore[arg-type]
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative, got {value}")
    return value


def _pair(args: tuple[object, ...]) -> tuple[object, object] | None:
    """``(a, b)`` when the caller passed two numbers, either as two arguments or as one pair."""
    if len(args) == 2:
        return args[0], args[1]
    (x,) = args
    if isinstance(x, tuple) and len(x) == 2 and all(_is_int(v) for v in x):
        return x[0], x[1]
    return None


def _items(x: object, name: str) -> list:
    """The items of an iterable argument, or ``InvalidRequest`` if it is not one."""
    try:
        return list(x)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidRequest(f"{name} must be iterable, got {x!r}") from None


# --- internal and external fragmentation, utilisation -------------------------------------------


def internal_fragmentation(*args: object) -> float:
    """Share of reserved units that were never requested: ``1 - requested / reserved``.

    Call it with the live allocations (``internal_fragmentation(alloc.allocations())``) or with
    the two totals (``internal_fragmentation(requested, reserved)`` or one ``(requested,
    reserved)`` pair). 0 when nothing is reserved: no reservation, no waste. The result lies in
    ``[0, 1)`` for live allocations, since each requests at least one of its units; it reaches 1
    only from totals with ``requested == 0`` (paged blocks held through the block-level API,
    whose use only their holder knows).
    """
    if len(args) not in (1, 2):
        raise InvalidRequest(f"internal_fragmentation takes 1 or 2 arguments, got {len(args)}")
    pair = _pair(args)
    if pair is None:
        live = _items(args[0], "allocations")
        for a in live:
            if not isinstance(a, Allocation):
                raise InvalidRequest(f"expected Allocation objects, got {a!r}")
        pair = (sum(a.requested for a in live), sum(a.size for a in live))
    requested = _count(pair[0], "requested")
    reserved = _count(pair[1], "reserved")
    if requested > reserved:
        raise InvalidRequest(f"requested ({requested}) cannot exceed reserved ({reserved})")
    return 0.0 if reserved == 0 else 1.0 - requested / reserved


def external_fragmentation(*args: object) -> float:
    """Share of free units outside the largest free piece: ``1 - largest_free / total_free``.

    Call it with the free extents (``external_fragmentation(alloc.free_extents())``, sorted
    ``(offset, length)`` pairs) or with the two totals (``external_fragmentation(largest_free,
    total_free)`` or one such pair). 0 when nothing is free (nothing to be fragmented) and when all
    free memory is one piece; it nears 1 as free memory breaks into many small pieces.

    Passing totals is the only right way for allocators whose largest servable request is not the
    longest free run: a buddy allocator's adjacent free blocks of one order that are not buddies
    form one extent but cannot serve one request, and a paged allocator serves any request from
    scattered blocks (its external fragmentation is 0).
    """
    if len(args) not in (1, 2):
        raise InvalidRequest(f"external_fragmentation takes 1 or 2 arguments, got {len(args)}")
    pair = _pair(args)
    if pair is None:
        lengths = []
        for extent in _items(args[0], "free extents"):
            if not (isinstance(extent, tuple) and len(extent) == 2):
                raise InvalidRequest(f"expected (offset, length) pairs, got {extent!r}")
            lengths.append(_count(extent[1], "extent length"))
        pair = (max(lengths, default=0), sum(lengths))
    largest = _count(pair[0], "largest_free")
    total_free = _count(pair[1], "total_free")
    if largest > total_free:
        raise InvalidRequest(f"largest_free ({largest}) cannot exceed total_free ({total_free})")
    return 0.0 if total_free == 0 else 1.0 - largest / total_free


def utilisation(used: int, total: int) -> float:
    """Share of the arena in use: ``used / total`` (0 for an empty arena).

    Pass the requested units for the share that holds useful data (vLLM's "effective memory
    usage") or the reserved units for the share that is merely taken.
    """
    used = _count(used, "used")
    total = _count(total, "total")
    if used > total:
        raise InvalidRequest(f"used ({used}) cannot exceed total ({total})")
    return 0.0 if total == 0 else used / total


# --- Linux's indices (mm/vmstat.c) ---------------------------------------------------------------


def _contig_info(free_counts: Sequence[int], order: int) -> tuple[int, int, int]:
    """``(free_pages, blocks, suitable)`` as Linux's ``fill_contig_page_info`` computes them.

    ``suitable`` counts how many order-``order`` requests the free blocks could serve: a free
    block of order ``k >= order`` serves ``2**(k - order)`` of them. Orders beyond the end of
    ``free_counts`` simply have no free blocks, so a request larger than every block gets
    ``suitable == 0``.
    """
    order = _count(order, "order")
    if isinstance(free_counts, (str, bytes)):
        raise InvalidRequest(f"free_counts must be a sequence of ints, got {free_counts!r}")
    free_pages = blocks = suitable = 0
    for k, n in enumerate(_items(free_counts, "free_counts")):
        n = _count(n, f"free_counts[{k}]")
        blocks += n
        free_pages += n << k
        if k >= order:
            suitable += n << (k - order)
    return free_pages, blocks, suitable


def fragmentation_index(free_counts: Sequence[int], order: int) -> int:
    """Linux's fragmentation index for a request of ``2**order`` pages, in thousandths.

    ``free_counts[k]`` is the number of free blocks of order ``k``. The index explains why the
    request *fails*: near 0 it fails because memory is missing, near 1000 because the free memory
    is only fragmented (compaction would help). It is -1000 when the request would succeed (some
    free block is large enough) and 0 when nothing is free. Otherwise, with integer division::

        1000 - (1000 + free_pages * 1000 // 2**order) // blocks

    Divide by 1000 (:func:`index_ratio`) for the value Linux prints in ``extfrag_index``.

    For a failing request the value lies in ``[-500, 1000)``: it is negative only when a single
    block is free, e.g. one free page and an order-3 request give ``1000 - 1125 = -125``. Linux
    computes the same (its unsigned result wraps back to that int), so this is kept, not clamped.
    """
    free_pages, blocks, suitable = _contig_info(free_counts, order)
    if blocks == 0:
        return 0
    if suitable > 0:
        return -1000
    return 1000 - (1000 + free_pages * 1000 // (1 << order)) // blocks


def unusable_index(free_counts: Sequence[int], order: int) -> int:
    """Linux's unusable free space index for a request of ``2**order`` pages, in thousandths.

    The share of free memory that lies in blocks too small for the request:
    ``(free_pages - (suitable << order)) * 1000 // free_pages``, 0 when every free page could
    serve such requests, and 1000 when nothing is free (no free memory counts as all unusable).
    """
    free_pages, _, suitable = _contig_info(free_counts, order)
    if free_pages == 0:
        return 1000
    return (free_pages - (suitable << order)) * 1000 // free_pages


def index_ratio(thousandths: int) -> float:
    """An index in thousandths as the ratio Linux prints (``-1000 -> -1.0``, ``613 -> 0.613``)."""
    return thousandths / 1000


def would_compact(free_counts: Sequence[int], order: int, threshold: int = 500) -> bool:
    """Would Linux try compaction for this request? Only if it fails *because of fragmentation*:
    its fragmentation index is above ``threshold`` (``vm.extfrag_threshold``, default 500).

    A request that would succeed (-1000) needs no compaction, and one that fails for lack of
    memory (index near 0) cannot be helped by moving pages around.
    """
    threshold = _count(threshold, "threshold")
    return fragmentation_index(free_counts, order) > threshold


# --- per-order free counts for any allocator -----------------------------------------------------


def free_counts_from_extents(extents: Iterable[tuple[int, int]], max_order: int) -> list[int]:
    """Per-order free-block counts (``free_counts[k]`` for ``k`` in ``0..max_order``) for an
    allocator that has no buddy free lists.

    Each free extent of length ``L`` is cut, largest first, into the power-of-two pieces of the
    binary representation of ``L`` (capped at ``2**max_order``; the rest goes into more pieces of
    that order). The pieces need not be aligned, because first/best fit place a request anywhere.
    The cut keeps two facts exact: the pieces hold ``L`` units, and they can serve exactly
    ``L // 2**j`` requests of order ``j``, as many as the extent itself can. So Linux's indices
    computed from these counts say the truth about contiguous requests: -1000 exactly when some
    extent holds ``2**j`` units.
    """
    max_order = _count(max_order, "max_order")
    counts = [0] * (max_order + 1)
    top = 1 << max_order
    for extent in _items(extents, "extents"):
        if not (isinstance(extent, tuple) and len(extent) == 2):
            raise InvalidRequest(f"expected (offset, length) pairs, got {extent!r}")
        length = _count(extent[1], "extent length")
        counts[max_order] += length // top
        rest = length % top
        for k in range(max_order):
            if rest >> k & 1:
                counts[k] += 1
    return counts


def free_counts(allocator: Allocator) -> list[int]:
    """Per-order free-block counts of any allocator, for Linux's indices.

    A buddy allocator (one with ``buddyinfo()``) reports its free lists as they are. For the
    others, orders run from 0 to ``floor(log2(total))`` and the counts come from
    :func:`free_counts_from_extents` over the free extents, except that an allocator that can
    serve one request from all its free units at once (``largest_free() >= free units``, as the
    paged allocator's block table allows) counts its free memory as one extent.
    """
    buddyinfo = getattr(allocator, "buddyinfo", None)
    if callable(buddyinfo):
        return list(buddyinfo())
    extents = allocator.free_extents()
    free = sum(length for _, length in extents)
    if free and allocator.largest_free() >= free:
        extents = [(0, free)]
    return free_counts_from_extents(extents, max(allocator.total, 1).bit_length() - 1)


@dataclass(frozen=True)
class Report:
    """A snapshot of every metric of one allocator. Units are the allocator's (pages, or token
    slots for the paged allocator); the three per-order lists are indexed by order ``k`` and the
    indices are in thousandths, as Linux reports them."""

    total: int
    free: int
    reserved: int
    requested: int
    largest_free: int
    allocations: int
    free_extents: int
    utilisation: float  # requested / total
    internal_fragmentation: float  # 1 - requested / reserved
    external_fragmentation: float  # 1 - largest_free / free
    free_counts: list[int]
    fragmentation_index: list[int]
    unusable_index: list[int]

    def as_dict(self) -> dict:
        return asdict(self)


def report(allocator: Allocator) -> Report:
    """Collect every metric for ``allocator`` (any allocator of the common interface).

    External fragmentation uses ``largest_free()`` rather than the longest free extent, so it
    means "free units a single request cannot use" for every allocator alike; per-order counts
    come from :func:`free_counts`.
    """
    s = allocator.stats()
    counts = free_counts(allocator)
    orders = range(len(counts))
    return Report(
        total=s.total,
        free=s.free,
        reserved=s.reserved,
        requested=s.requested,
        largest_free=s.largest_free,
        allocations=s.allocations,
        free_extents=s.free_extents,
        utilisation=utilisation(s.requested, s.total),
        internal_fragmentation=internal_fragmentation(s.requested, s.reserved),
        external_fragmentation=external_fragmentation(s.largest_free, s.free),
        free_counts=counts,
        fragmentation_index=[fragmentation_index(counts, k) for k in orders],
        unusable_index=[unusable_index(counts, k) for k in orders],
    )
