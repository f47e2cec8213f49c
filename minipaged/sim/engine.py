"""The serving loop: continuous batching over one KV-cache policy, one step at a time.

A step is one forward pass of the model. In step ``t`` the engine

1. moves the requests that arrive at ``t`` to the waiting queue (first come, first served);
2. *decodes*: every running group stores one more token per sample, oldest group first. When
   memory runs out (paged policies only; contiguous ones reserved everything up front), the
   newest running group is preempted, possibly the one that was growing, until the growth fits:
   by *recompute* (its memory is freed, it goes back to the head of the waiting queue, keeping
   the tokens it generated, and is prefilled again on readmission) or by *swap* (its blocks move
   to CPU memory; when CPU memory is full it is recomputed instead);
3. unless it preempted, *resumes* swapped groups (oldest first) while they fit, and then, if none
   is left swapped, *admits* waiting requests in order while the policy finds memory and the
   batch stays within ``max_batch`` sequences. Admission prefills the prompt and stores the first
   output token in the same step, so a request with ``output_len`` tokens runs ``output_len``
   steps (a resumed group only moves back in its first step);
4. measures where the budget is (:class:`Usage`, plus external fragmentation, below) and the
   batch size (sequences that stored a token in this step);
5. completes the groups whose every sample has all its output tokens, freeing their memory.

External fragmentation: in a step where the request at the head of the waiting queue could not
be admitted although the policy had at least as much memory free in total as it needed (the
allocator failed only for lack of a large enough piece), all the free memory of that step counts
as external fragmentation instead of free; the budget slots a policy can never hand out (the
paged policies' last partial block) count as external too. Every other part is defined in
:mod:`minipaged.sim.policies`. So in every step
``tokens + reserved + internal + external + free == budget``, and the run's breakdown is the
average of the steps.

Steps in which no request is in the system are skipped in one jump; the timeline stores that
stretch as one row whose ``weight`` is its length, and averages weight every row by it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from minipaged.errors import InvalidRequest, InvalidState
from minipaged.sim.policies import Group, Policy, make_policy
from minipaged.sim.workload import Request, check_max_len

GIB = 1 << 30
KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2  # OPT-13B in fp16: 800 KiB per token (figures.md)
DEFAULT_KV_GIB = 40.0  # of an 80 GiB GPU, the rest holds weights and activations
PREEMPT_MODES = ("recompute", "swap")
PARTS = ("tokens", "reserved", "internal", "external", "free")
COLUMNS = ("step", "weight", *PARTS, "batch")  # the timeline's columns


def slots_for_gib(gib: float) -> int:
    """Token slots that ``gib`` GiB of KV memory hold at 800 KiB per token (OPT-13B)."""
    if isinstance(gib, bool) or not isinstance(gib, int | float) or not gib >= 0:
        raise InvalidRequest(f"memory must be a number of GiB >= 0, got {gib!r}")
    if math.isinf(gib):
        raise InvalidRequest(f"memory must be finite, got {gib!r} GiB")
    return int(gib * GIB) // KV_BYTES_PER_TOKEN


@dataclass(frozen=True)
class SimConfig:
    """The knobs of a run. ``kv_slots`` is the KV budget in token slots (default: 40 GiB of
    OPT-13B KV, 52,428 slots); ``swap_slots`` the CPU memory for swapping (default 4 GiB, vLLM's
    swap space); ``max_batch`` caps the running sequences (0: only memory limits the batch)."""

    kv_slots: int = slots_for_gib(DEFAULT_KV_GIB)
    max_len: int = 2048
    block_size: int = 16
    samples: int = 1
    preempt: str = "recompute"
    swap_slots: int = slots_for_gib(4)
    watermark: float = 0.01
    max_batch: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (
            ("kv_slots", 1),
            ("block_size", 1),
            ("samples", 1),
            ("swap_slots", 0),
            ("max_batch", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InvalidRequest(f"{name} must be an int >= {minimum}, got {value!r}")
        check_max_len(self.max_len)
        if self.samples > 1000:
            raise InvalidRequest(f"samples must be at most 1000, got {self.samples}")
        if self.preempt not in PREEMPT_MODES:
            raise InvalidRequest(
                f"preempt must be one of {', '.join(PREEMPT_MODES)}, got {self.preempt!r}"
            )
        if isinstance(self.watermark, bool) or not isinstance(self.watermark, int | float):
            raise InvalidRequest(f"watermark must be a number in [0, 1), got {self.watermark!r}")
        if not 0 <= self.watermark < 1:
            raise InvalidRequest(f"watermark must be in [0, 1), got {self.watermark!r}")
        if 0 < self.max_batch < self.samples:
            raise InvalidRequest(
                f"max_batch {self.max_batch} is smaller than one request's {self.samples} samples"
            )


@dataclass
class RunResult:
    """What one policy did with one workload.

    ``timeline`` has one row per simulated step (or skipped idle stretch) with the columns
    :data:`COLUMNS`; ``completed`` lists ``(request id, step, output tokens per sample)`` in
    completion order."""

    policy: str
    budget: int
    requests: int
    timeline: np.ndarray
    completed: list[tuple[int, int, int]] = field(default_factory=list)
    preemptions: int = 0
    swaps: int = 0
    cow_copies: int = 0
    prefix_hit_blocks: int = 0

    @property
    def steps(self) -> int:
        return int(self.timeline[:, 1].sum())

    def shares(self) -> dict[str, float]:
        """Each part's share of the budget, averaged over all steps."""
        w = self.timeline[:, 1]
        total = max(1, self.steps) * self.budget
        return {p: float((self.timeline[:, 2 + i] * w).sum() / total) for i, p in enumerate(PARTS)}

    @property
    def mean_batch(self) -> float:
        return float((self.timeline[:, 7] * self.timeline[:, 1]).sum() / max(1, self.steps))

    @property
    def peak_batch(self) -> int:
        return int(self.timeline[:, 7].max(initial=0))

    @property
    def throughput(self) -> float:
        """Completed requests per simulated step."""
        return len(self.completed) / max(1, self.steps)

    def summary(self) -> dict[str, object]:
        """The numbers the report shows, as plain JSON-ready values."""
        return {
            "policy": self.policy,
            "memory": self.shares(),
            "mean_batch": self.mean_batch,
            "peak_batch": self.peak_batch,
            "completed": len(self.completed),
            "steps": self.steps,
            "requests_per_step": self.throughput,
            "preemptions": self.preemptions,
            "swaps": self.swaps,
            "cow_copies": self.cow_copies,
            "prefix_hit_blocks": self.prefix_hit_blocks,
        }


class Engine:
    """One run of one policy. ``running`` is in admission order (the newest group last: it is
    the first to be preempted); ``waiting`` and ``swapped`` are first come, first served."""

    def __init__(self, policy: Policy, config: SimConfig, requests: Sequence[Request] = ()) -> None:
        self.policy, self.config = policy, config
        self.pending: deque[Request] = deque()
        self.waiting: deque[Group] = deque()
        self.running: list[Group] = []
        self.swapped: deque[Group] = deque()
        self.ids: set[int] = set()
        self.step = 0
        self.preemptions = 0
        self.rows: list[tuple[int, ...]] = []
        self.completed: list[tuple[int, int, int]] = []
        for r in sorted(requests, key=lambda r: (r.arrival, r.id)):
            self.submit(r)

    def submit(self, r: Request) -> None:
        """Add a request; it joins the waiting queue in the first step at or after its arrival.
        ``InvalidRequest`` (and nothing changes) if its id is taken, it is longer than
        ``max_len``, or the policy could not serve it even with an empty KV cache."""
        if r.id in self.ids:
            raise InvalidRequest(f"request id {r.id} is already taken")
        if r.total_len > self.config.max_len:
            raise InvalidRequest(
                f"request {r.id} has {r.total_len} tokens, more than max_len {self.config.max_len}"
            )
        self.policy.check(r, self.config.samples)
        self.ids.add(r.id)
        self.pending.append(r)
        if len(self.pending) > 1 and r.arrival < self.pending[-2].arrival:
            self.pending = deque(sorted(self.pending, key=lambda r: (r.arrival, r.id)))

    def _preempt(self, g: Group) -> None:
        self.preemptions += 1
        if self.config.preempt == "swap" and self.policy.swap_out(g):
            self.swapped.append(g)
        else:
            self.policy.release(g)
            self.waiting.appendleft(g)

    def _decode(self) -> tuple[int, int]:
        """Grow every running group by one token; returns (sequences grown, preemptions)."""
        grown = preempted = i = 0
        while i < len(self.running):
            g = self.running[i]
            while not self.policy.grow(g):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is g:
                    break
            else:
                g.generated += 1
                grown += g.samples
                i += 1
        return grown, preempted

    def _schedule(self) -> tuple[int, bool, bool]:
        """Resume and admit; returns (sequences admitted, whether anything moved in, whether
        the head of the queue was blocked by external fragmentation)."""
        moved = False
        batch = sum(g.samples for g in self.running)
        cap = self.config.max_batch or math.inf
        while self.swapped and batch + self.swapped[0].samples <= cap:
            if not self.policy.swap_in(self.swapped[0]):
                break
            g = self.swapped.popleft()
            self.running.append(g)
            batch += g.samples
            moved = True
        admitted = 0
        while self.waiting and not self.swapped and batch + self.waiting[0].samples <= cap:
            g = self.waiting[0]
            if not self.policy.admit(g):
                return admitted, moved, self.policy.fragmented
            self.waiting.popleft()
            g.generated += 1
            self.running.append(g)
            batch += g.samples
            admitted += g.samples
            moved = True
        return admitted, moved, False

    def run_step(self) -> None:
        """Simulate one step (or jump over an idle stretch), appending its timeline row."""
        if self.finished:
            return
        if not (self.waiting or self.running or self.swapped):
            gap = self.pending[0].arrival - self.step
            if gap > 0:
                u = self.policy.usage()
                self.rows.append((self.step, gap, 0, 0, 0, u.unusable, u.free, 0))
                self.step += gap
                return
        while self.pending and self.pending[0].arrival <= self.step:
            self.waiting.append(Group(self.pending.popleft(), self.config.samples))
        grown, preempted = self._decode()
        admitted, moved, fragmented = (0, False, False) if preempted else self._schedule()
        if not (self.running or preempted or moved):  # nothing runs, nothing can start
            head = (self.waiting or self.swapped)[0].request
            raise InvalidState(
                f"policy {self.policy.name}: request {head.id} cannot be served even by an "
                "empty KV cache"
            )
        u = self.policy.usage()
        external = u.unusable + (u.free if fragmented else 0)
        free = u.free - (u.free if fragmented else 0)
        row = (self.step, 1, u.tokens, u.reserved, u.internal, external, free, grown + admitted)
        self.rows.append(row)
        still = []
        for g in self.running:
            if g.done:
                self.policy.release(g)
                self.completed.append((g.request.id, self.step, g.generated))
            else:
                still.append(g)
        self.running = still
        self.step += 1

    @property
    def finished(self) -> bool:
        return not (self.pending or self.waiting or self.running or self.swapped)

    def result(self) -> RunResult:
        bm = getattr(self.policy, "bm", None)
        return RunResult(
            policy=self.policy.name,
            budget=self.policy.budget,
            requests=len(self.ids),
            timeline=np.array(self.rows, dtype=np.int64).reshape(-1, len(COLUMNS)),
            completed=list(self.completed),
            preemptions=self.preemptions,
            swaps=self.policy.swaps,
            cow_copies=self.policy.cow_copies,
            prefix_hit_blocks=bm.prefix_hits if bm is not None else 0,
        )


def simulate(
    requests: Sequence[Request],
    policy: str,
    config: SimConfig | None = None,
    on_step: Callable[[Engine], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Serve ``requests`` with ``policy`` until every request has completed.

    ``on_step(engine)`` is called after every step (tests use it to check the whole state);
    ``progress(completed, total)`` after every step too. Deterministic: the same arguments give
    the same result."""
    config = config or SimConfig()
    swap_blocks = config.swap_slots // config.block_size if config.preempt == "swap" else 0
    p = make_policy(
        policy, config.kv_slots, config.max_len, config.block_size, swap_blocks, config.watermark
    )
    engine = Engine(p, config, requests)
    while not engine.finished:
        engine.run_step()
        if on_step is not None:
            on_step(engine)
        if progress is not None:
            progress(len(engine.completed), len(requests))
    return engine.result()
