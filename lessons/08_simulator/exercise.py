"""Lesson 08: the serving simulator: why paging wins.

Fill in the two tasks; check your work with

    minipaged lesson check 08

A serving engine runs requests in continuous batches; each needs KV-cache memory for its prompt
and for every token it generates. A *policy* finds that memory. Contiguous policies (Orca's
baselines) reserve one region per sample up front; paged policies (vLLM) take one block at a
time, when the sequence actually needs it. The engine, the workloads and the accounting are the
library's (``minipaged/sim``); your two policy methods decide where the memory goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from unittest.mock import patch

from minipaged.errors import OutOfMemory  # noqa: F401 (for your tasks)
from minipaged.sim import engine, policies
from minipaged.sim.engine import Engine, RunResult, SimConfig
from minipaged.sim.policies import Group, Policy
from minipaged.sim.workload import Request


class ContiguousPolicy(policies.ContiguousPolicy):
    def admit(self, g: Group) -> bool:
        """Reserve ``self.reserve(g.request)`` slots for each of the group's ``g.samples``
        samples with ``self.allocator.alloc``, all or nothing.

        On ``OutOfMemory``: free what this call took, set ``self.fragmented`` (True when at
        least ``g.samples * self.footprint(size)`` slots are free in total, i.e. only the
        layout stood in the way: external fragmentation) and return False. On success: record
        ``self.allocations[g.request.id]`` (the list), and add to the counters
        ``reserved_slots`` (sizes), ``needed`` (samples x real total length) and ``tokens``
        (samples x (prompt + generated + 1)); return True."""
        # TODO task 1 (about 15 lines)
        raise NotImplementedError("task 1: ContiguousPolicy.admit")


class PagedPolicy(policies.PagedPolicy):
    def grow(self, g: Group) -> bool:
        """Make every sample hold ``prompt + g.generated + 1`` tokens, one token each, through
        ``self.bm.append_slots(seq, 1, tokens)``.

        ``old = self.lengths[seq]``; a sample already that long (grown before a preemption by
        swapping) is skipped. ``tokens = self._tokens(g, s, old, length)`` when the block manager
        caches prefixes, else None. On ``OutOfMemory`` return False at once (the samples grown
        so far keep their token). Count ``self.cow_copies`` (the pairs returned), update
        ``self.lengths[seq]`` and ``self.wasted`` (empty slots of last blocks:
        ``-length % block_size`` replaces ``-old % block_size``). True when all grew."""
        # TODO task 2 (about 15 lines)
        raise NotImplementedError("task 2: PagedPolicy.grow")


# ----- given: the library's factory and loop, using the classes above ---------------------------


def make_policy(
    name: str,
    budget: int,
    max_len: int,
    block_size: int = 16,
    swap_blocks: int = 0,
    watermark: float = 0.01,
) -> Policy:
    """:func:`minipaged.sim.policies.make_policy`, building your classes."""
    with (
        patch.object(policies, "ContiguousPolicy", ContiguousPolicy),
        patch.object(policies, "PagedPolicy", PagedPolicy),
    ):
        return policies.make_policy(name, budget, max_len, block_size, swap_blocks, watermark)


def simulate(
    requests: Sequence[Request],
    policy: str,
    config: SimConfig | None = None,
    on_step: Callable[[Engine], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """:func:`minipaged.sim.simulate` with your policies."""
    with patch.object(engine, "make_policy", make_policy):
        return engine.simulate(requests, policy, config, on_step, progress)
