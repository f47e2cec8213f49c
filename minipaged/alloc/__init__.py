"""Allocators over an arena of units. See :mod:`minipaged.alloc.base` for the shared interface."""

from minipaged.alloc.base import Allocation, Allocator, Stats
from minipaged.alloc.buddy import BuddyAllocator
from minipaged.alloc.fit import BestFitAllocator, FirstFitAllocator, FitAllocator
from minipaged.alloc.paged import PagedAllocator

__all__ = [
    "Allocation",
    "Allocator",
    "BestFitAllocator",
    "BuddyAllocator",
    "FirstFitAllocator",
    "FitAllocator",
    "PagedAllocator",
    "Stats",
]
