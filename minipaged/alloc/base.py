"""The small interface every allocator over an arena shares.

An arena is ``total`` units (pages, or token slots for the paged allocator) numbered from 0.
``alloc(n)`` reserves at least ``n`` units and returns an :class:`Allocation`; ``free`` gives it
back. Allocators differ only in *where* they put a request and *how much* they reserve for it,
which is exactly what decides internal and external fragmentation.

Invariants every allocator keeps (and its property tests check):
- reserved units of live allocations + free units == total;
- no two live allocations overlap, and no free unit lies inside a live allocation;
- a call that raises changes nothing.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

_ids = itertools.count(1)


@dataclass(eq=False)
class Allocation:
    """A live reservation. Compared by identity: two allocations are equal only if they are the
    same object, so a stale copy can never free someone else's memory.

    ``offset`` is the first unit (for the paged allocator, the first unit of the first block);
    ``size`` is what was reserved, ``requested`` what was asked for, so
    ``size - requested`` units are lost to internal fragmentation. ``blocks`` holds the physical
    block ids for the paged allocator and is empty for contiguous ones. ``offset`` may change when
    compaction moves the allocation; the object itself keeps its identity.
    """

    offset: int
    size: int
    requested: int
    blocks: tuple[int, ...] = ()
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def end(self) -> int:
        """One past the last reserved unit (contiguous allocators)."""
        return self.offset + self.size

    @property
    def waste(self) -> int:
        """Units reserved but not requested: this allocation's internal fragmentation."""
        return self.size - self.requested


@dataclass(frozen=True)
class Stats:
    """A snapshot of an allocator, in units. ``largest_free`` is the largest request that would
    succeed right now."""

    total: int
    reserved: int
    requested: int
    free: int
    largest_free: int
    allocations: int
    free_extents: int


class Allocator(ABC):
    """Common interface. Subclasses implement ``alloc``, ``free``, ``free_extents``,
    ``largest_free`` and ``allocations``; ``stats`` is derived from them."""

    total: int

    @abstractmethod
    def alloc(self, n: int) -> Allocation:
        """Reserve at least ``n`` units. Raises ``InvalidRequest`` for ``n <= 0`` or ``n`` larger
        than anything this arena could ever serve, ``OutOfMemory`` when it cannot serve ``n``
        now; in both cases the state is unchanged."""

    @abstractmethod
    def free(self, a: Allocation) -> None:
        """Give ``a`` back. Raises ``DoubleFree`` if it was already freed and ``InvalidHandle`` if
        it never came from this allocator; in both cases the state is unchanged."""

    @abstractmethod
    def free_extents(self) -> list[tuple[int, int]]:
        """Maximal runs of free units as sorted ``(offset, length)`` pairs; adjacent runs are
        always merged, so two returned extents never touch."""

    @abstractmethod
    def largest_free(self) -> int:
        """The largest ``n`` for which ``alloc(n)`` would succeed now (0 when full)."""

    @abstractmethod
    def allocations(self) -> list[Allocation]:
        """The live allocations, sorted by offset."""

    def stats(self) -> Stats:
        live = self.allocations()
        extents = self.free_extents()
        return Stats(
            total=self.total,
            reserved=sum(a.size for a in live),
            requested=sum(a.requested for a in live),
            free=sum(length for _, length in extents),
            largest_free=self.largest_free(),
            allocations=len(live),
            free_extents=len(extents),
        )


def check_request(n: object, limit: int, what: str = "units") -> int:
    """Validate an allocation size: a positive int no larger than ``limit``."""
    from minipaged.errors import InvalidRequest

    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidRequest(f"allocation size must be an int, got {n!r}")
    if n <= 0:
        raise InvalidRequest(f"allocation size must be positive, got {n}")
    if n > limit:
        raise InvalidRequest(f"allocation of {n} {what} can never fit: the limit is {limit}")
    return n


def merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ``(offset, length)`` runs and merge those that touch. Used by ``free_extents``."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(runs):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out
