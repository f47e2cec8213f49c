"""One exception hierarchy for everything minipaged refuses to do.

Why one hierarchy: a student (or a scheduler) can catch ``MinipagedError`` to handle any refusal,
or a precise subclass to handle one cause. Every message names the offending value, and every
operation that raises leaves the object it was called on exactly as it was before the call.
"""

from __future__ import annotations


class MinipagedError(Exception):
    """Base class of every error minipaged raises on purpose."""


class InvalidRequest(MinipagedError, ValueError):
    """A request that can never succeed as asked: a size of zero or below, a size larger than the
    whole arena, a misaligned offset, a wrong shape or dtype given to a kernel wrapper."""


class OutOfMemory(MinipagedError):
    """An allocation that cannot be served now.

    ``fragmented`` tells the two causes apart: ``False`` when there are fewer free units than
    requested (memory is missing), ``True`` when enough units are free in total but no single free
    extent (or buddy block) is large enough (memory is only fragmented).
    """

    def __init__(self, requested: int, free: int, largest_free: int, what: str = "units") -> None:
        self.requested = int(requested)
        self.free = int(free)
        self.largest_free = int(largest_free)
        self.fragmented = self.free >= self.requested
        if self.fragmented:
            why = (
                f"memory is fragmented: {self.free} {what} are free in total, but the largest "
                f"free extent holds only {self.largest_free}"
            )
        else:
            why = f"memory is missing: only {self.free} {what} are free"
        super().__init__(f"out of memory: cannot allocate {self.requested} {what}; {why}")


class DoubleFree(MinipagedError):
    """Freeing (or decrementing) something that is already free."""


class InvalidHandle(MinipagedError):
    """A handle, block id or offset that this allocator never handed out (a foreign handle)."""


class UnknownSequence(MinipagedError, KeyError):
    """A sequence id that the block manager does not know."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else "unknown sequence"


class DuplicateSequence(MinipagedError):
    """A sequence id that is already in use."""


class InvalidState(MinipagedError):
    """An operation that is not allowed in the object's current state, e.g. appending to a
    sequence that is swapped out to CPU memory."""


class InvalidBlockTable(MinipagedError, ValueError):
    """A block table that refers to blocks that do not exist, or does not cover a sequence."""


class TraceFormatError(MinipagedError, ValueError):
    """A malformed line in a workload trace file; the message names the file and line."""
