"""Allocators over an arena of units. See :mod:`minipaged.alloc.base` for the shared interface."""

from minipaged.alloc.base import Allocation, Allocator, Stats

__all__ = ["Allocation", "Allocator", "Stats"]
