"""KV-cache allocation policies: how a serving system finds memory for a request's KV cache.

Every policy manages one budget of ``budget`` token slots and serves *groups*: a request and its
``samples`` output sequences, which share a prompt and advance one token per step together. The
engine (:mod:`minipaged.sim.engine`) calls four operations; all of them either succeed or change
nothing:

- ``admit(g)``: store the prompt and the group's output so far plus this step's token, for every
  sample (a prefill, or a recompute after preemption);
- ``grow(g)``: one more token per sample (a decode step);
- ``release(g)``: free everything the group holds (completion, or preemption by recompute);
- ``swap_out(g)`` / ``swap_in(g)``: move the group to CPU memory and back (paged policies only).

Contiguous policies, as in Orca (the paper's baselines), reserve at admission one region per
sample for the whole sequence, so they never need memory while a request runs and never preempt:

- ``max``: the model's maximum length ``max_len``, from a buddy allocator (rounded up to a power
  of two if ``max_len`` is not one);
- ``pow2``: the next power of two of the request's real total length, from a buddy allocator;
- ``oracle``: exactly the real total length, from a contiguous best-fit allocator.

Paged policies, as in vLLM, take fixed-size blocks on demand from a
:class:`~minipaged.block_manager.BlockManager` over ``budget // block_size`` blocks:

- ``paged``: every sample is its own sequence with its own copy of the prompt;
- ``paged+prefix``: the same with prefix caching, so equal prompt blocks (shared system prompts,
  the prompt copies of several samples) are stored once;
- ``paged+sharing``: the samples of a request fork from one prompt and share its blocks;
  copy-on-write gives each sample its own copy of a shared block when it first writes to it.

Where the memory goes (:meth:`Policy.usage`; the engine adds external fragmentation):

=================  ===========================================  =================================
part               contiguous policies                          paged policies
=================  ===========================================  =================================
token states       tokens stored, every sample counted          slots of used blocks holding a
                                                                token (a shared block once)
reservation        real total length of every sample minus      0 (blocks are taken on demand)
                   its tokens stored: slots for future tokens
internal frag.     reserved slots minus real total lengths:     empty slots of partly filled last
                   slots no token will ever use                 blocks
unusable           0                                            the budget's last
                                                                ``budget % block_size`` slots,
                                                                too few for a block
free               slots the allocator has not handed out       slots of free blocks (also those
                                                                still cached for prefix reuse)
=================  ===========================================  =================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from minipaged.alloc.base import Allocation, Allocator
from minipaged.alloc.buddy import BuddyAllocator
from minipaged.alloc.fit import BestFitAllocator
from minipaged.block_manager import BlockManager
from minipaged.errors import InvalidRequest, InvalidState, OutOfMemory
from minipaged.sim.workload import Request, prompt_tokens, token_id

POLICIES = ("max", "pow2", "oracle", "paged", "paged+prefix", "paged+sharing")
CONTIGUOUS = ("max", "pow2", "oracle")

SeqId = tuple[int, int]  # (request id, sample)


@dataclass(eq=False)
class Group:
    """A request in service with its ``samples`` output sequences. ``generated`` is the number
    of output tokens every sample holds (or is about to hold) in KV memory."""

    request: Request
    samples: int = 1
    generated: int = 0
    seq_ids: list[SeqId] = field(init=False)

    def __post_init__(self) -> None:
        self.seq_ids = [(self.request.id, s) for s in range(self.samples)]

    @property
    def done(self) -> bool:
        return self.generated == self.request.output_len


class Usage(NamedTuple):
    """A policy's budget split five ways, in token slots; the parts sum to the budget."""

    tokens: int
    reserved: int
    internal: int
    unusable: int
    free: int


class Policy(ABC):
    """Common interface (see the module docstring). ``fragmented`` tells, after ``admit``
    returned False, whether enough memory was free in total (so only its layout stood in the
    way: external fragmentation) or not."""

    name: str
    budget: int
    fragmented: bool = False
    cow_copies: int = 0  # block copies made by copy-on-write
    swaps: int = 0  # groups swapped out to CPU memory

    @abstractmethod
    def check(self, request: Request, samples: int) -> None:
        """Raise ``InvalidRequest`` if the group could not run even in an empty KV cache."""

    @abstractmethod
    def admit(self, g: Group) -> bool:
        """Store ``prompt + g.generated + 1`` tokens per sample, or change nothing and return
        False."""

    @abstractmethod
    def grow(self, g: Group) -> bool:
        """Make every sample hold ``prompt + g.generated + 1`` tokens. False when memory ran out;
        samples grown so far keep their token, so calling again after memory was freed
        finishes the step."""

    @abstractmethod
    def release(self, g: Group) -> None:
        """Free all the group holds, on the GPU or swapped out."""

    def swap_out(self, g: Group) -> bool:
        """Move the group to CPU memory; False (nothing changed) when it cannot go: CPU memory
        is full, or (prefix caching) it shares a block with another request, and a block cannot
        be in both memories at once. The engine recomputes it instead."""
        raise InvalidState(f"policy {self.name} cannot swap")

    def swap_in(self, g: Group) -> bool:
        """Move a swapped group back; False (nothing changed) when it does not fit now."""
        raise InvalidState(f"policy {self.name} cannot swap")

    @abstractmethod
    def usage(self) -> Usage:
        """Where the budget is now."""


class ContiguousPolicy(Policy):
    """One region per sample, reserved at admission and held until completion.

    Invariant: ``reserved_slots`` is the size of all live allocations, ``needed`` the real total
    length of all their samples, ``tokens`` the tokens stored in them, and
    ``tokens <= needed <= reserved_slots <= budget``.
    """

    def __init__(
        self,
        name: str,
        budget: int,
        make_allocator: Callable[[], Allocator],
        reserve: Callable[[Request], int],
    ) -> None:
        self.name, self.budget = name, budget
        self.make_allocator, self.reserve = make_allocator, reserve
        self.allocator = make_allocator()
        self.allocations: dict[int, list[Allocation]] = {}  # request id -> one per sample
        self.tokens = self.needed = self.reserved_slots = 0
        self._fits_alone: dict[tuple[int, int], bool] = {}

    def footprint(self, n: int) -> int:
        """Slots the allocator reserves for a request of ``n``: buddy blocks are powers of two,
        best-fit regions multiples of ``round_to``."""
        if isinstance(self.allocator, BuddyAllocator):
            return 1 << (n - 1).bit_length()
        step = getattr(self.allocator, "round_to", 1)
        return -(-n // step) * step

    def check(self, request: Request, samples: int) -> None:
        size = self.reserve(request)
        if (size, samples) not in self._fits_alone:
            empty, ok = self.make_allocator(), True
            try:
                for _ in range(samples):
                    empty.alloc(size)
            except (OutOfMemory, InvalidRequest):
                ok = False
            self._fits_alone[size, samples] = ok
        if not self._fits_alone[size, samples]:
            raise InvalidRequest(
                f"request {request.id} needs {samples} x {size} slots under policy {self.name}, "
                f"more than an empty KV cache of {self.budget} slots can hold"
            )

    def admit(self, g: Group) -> bool:
        size, got = self.reserve(g.request), []
        try:
            for _ in range(g.samples):
                got.append(self.allocator.alloc(size))
        except OutOfMemory:
            for a in got:
                self.allocator.free(a)
            free = self.budget - self.reserved_slots
            self.fragmented = free >= g.samples * self.footprint(size)
            return False
        self.allocations[g.request.id] = got
        self.reserved_slots += sum(a.size for a in got)
        self.needed += g.samples * g.request.total_len
        self.tokens += g.samples * (g.request.input_len + g.generated + 1)
        return True

    def grow(self, g: Group) -> bool:
        self.tokens += g.samples  # the reservation already holds the slot
        return True

    def release(self, g: Group) -> None:
        for a in self.allocations.pop(g.request.id):
            self.allocator.free(a)
            self.reserved_slots -= a.size
        self.needed -= g.samples * g.request.total_len
        self.tokens -= g.samples * (g.request.input_len + g.generated)

    def usage(self) -> Usage:
        return Usage(
            tokens=self.tokens,
            reserved=self.needed - self.tokens,
            internal=self.reserved_slots - self.needed,
            unusable=0,
            free=self.budget - self.reserved_slots,
        )


class PagedPolicy(Policy):
    """Blocks on demand from a block manager.

    Invariant: ``lengths`` holds the token count of every sequence the manager knows (the same
    as ``bm.num_tokens``), and ``wasted`` the empty slots of the last blocks of those on the GPU.
    That count is exact because no partly filled block is ever shared between steps: forked
    samples copy their shared last block on their first write, and prefix-cache hits are only
    ever full blocks.
    """

    def __init__(
        self,
        name: str,
        budget: int,
        block_size: int,
        prefix_caching: bool = False,
        sharing: bool = False,
        swap_blocks: int = 0,
        watermark: float = 0.01,
    ) -> None:
        if budget < block_size:
            raise InvalidRequest(f"a budget of {budget} slots holds no block of {block_size}")
        self.name, self.budget, self.block_size = name, budget, block_size
        self.sharing = sharing
        self.bm = BlockManager(
            budget // block_size, block_size, swap_blocks, watermark, prefix_caching
        )
        self.lengths: dict[SeqId, int] = {}
        self.wasted = 0
        self.swapped: set[int] = set()  # request ids

    def blocks_needed(self, g: Group, length: int) -> int:
        """Blocks the group holds when every sample has ``length`` tokens, without prefix-cache
        hits: with sharing, the prompt's full blocks once and each sample's tail alone."""
        bs, prompt = self.block_size, g.request.input_len
        if self.sharing:
            return prompt // bs + g.samples * -(-(prompt % bs + length - prompt) // bs)
        return g.samples * -(-length // bs)

    def check(self, request: Request, samples: int) -> None:
        need = self.blocks_needed(Group(request, samples), request.total_len)
        if need + self.bm.watermark_blocks > self.bm.gpu.num_blocks:
            raise InvalidRequest(
                f"request {request.id} needs {need} blocks under policy {self.name} (plus a "
                f"watermark of {self.bm.watermark_blocks}), more than the "
                f"{self.bm.gpu.num_blocks} blocks of the KV cache"
            )

    def _tokens(self, g: Group, sample: int, start: int, stop: int) -> list[int] | None:
        """Ids of a sample's tokens ``start..stop-1``; only prefix caching looks at them."""
        if not self.bm.enable_prefix_caching:
            return None
        r, p = g.request, g.request.input_len
        return [token_id(r, i) if i < p else token_id(r, i, sample) for i in range(start, stop)]

    def _waste(self, length: int) -> int:
        return -length % self.block_size

    def admit(self, g: Group) -> bool:
        self.fragmented = False  # any free blocks will do: paging never fragments
        length, prompt = g.request.input_len + g.generated + 1, g.request.input_len
        # Conservative, as vLLM's first block manager: prefix-cache hits could only need less.
        if not self.bm.can_allocate(self.blocks_needed(g, length) * self.block_size):
            return False
        if self.sharing:
            first, *rest = g.seq_ids
            self.bm.allocate(first, prompt_tokens(g.request))
            for child in rest:
                self.bm.fork(first, child)
            for s, seq in enumerate(g.seq_ids):
                pairs = self.bm.append_slots(
                    seq, length - prompt, self._tokens(g, s, prompt, length)
                )
                self.cow_copies += len(pairs)
        else:
            for s, seq in enumerate(g.seq_ids):
                tokens = prompt_tokens(g.request) + (self._tokens(g, s, prompt, length) or [])
                tokens += [0] * (length - len(tokens))  # ids of output tokens do not matter here
                self.bm.allocate(seq, tokens)
        for seq in g.seq_ids:
            self.lengths[seq] = length
            self.wasted += self._waste(length)
        return True

    def grow(self, g: Group) -> bool:
        length = g.request.input_len + g.generated + 1
        caching = self.bm.enable_prefix_caching
        for s, seq in enumerate(g.seq_ids):
            old = self.lengths[seq]
            if old >= length:
                continue  # grown before the group was preempted by swapping
            tokens = self._tokens(g, s, old, length) if caching else None
            try:
                pairs = self.bm.append_slots(seq, 1, tokens)
            except OutOfMemory:
                return False
            if pairs:
                self.cow_copies += len(pairs)
            self.lengths[seq] = length
            self.wasted += -length % self.block_size - -old % self.block_size
        return True

    def release(self, g: Group) -> None:
        on_gpu = g.request.id not in self.swapped
        for seq in g.seq_ids:
            self.bm.free(seq)
            length = self.lengths.pop(seq)
            if on_gpu:
                self.wasted -= self._waste(length)
        self.swapped.discard(g.request.id)

    def swap_out(self, g: Group) -> bool:
        try:
            self.bm.swap_out(g.seq_ids)
        except OutOfMemory:  # CPU memory is full
            return False
        except InvalidState:  # a prefix-cache hit shares a block with another request
            return False
        self.swapped.add(g.request.id)
        self.wasted -= sum(self._waste(self.lengths[seq]) for seq in g.seq_ids)
        self.swaps += 1
        return True

    def swap_in(self, g: Group) -> bool:
        if not self.bm.can_swap_in(g.seq_ids):
            return False
        self.bm.swap_in(g.seq_ids)
        self.swapped.discard(g.request.id)
        self.wasted += sum(self._waste(self.lengths[seq]) for seq in g.seq_ids)
        return True

    def usage(self) -> Usage:
        gpu, bs = self.bm.gpu, self.block_size
        used = gpu.num_blocks - gpu.num_free_blocks
        return Usage(
            tokens=used * bs - self.wasted,
            reserved=0,
            internal=self.wasted,
            unusable=self.budget - gpu.num_blocks * bs,
            free=gpu.num_free_blocks * bs,
        )


def make_policy(
    name: str,
    budget: int,
    max_len: int,
    block_size: int = 16,
    swap_blocks: int = 0,
    watermark: float = 0.01,
) -> Policy:
    """A fresh policy ``name`` (one of :data:`POLICIES`) over ``budget`` token slots."""
    if name in CONTIGUOUS:
        # Buddy blocks up to the power of two that holds max_len: any request fits in one.
        max_order = (max_len - 1).bit_length()

        def buddy() -> Allocator:
            return BuddyAllocator(budget, max_order)

        if name == "max":
            return ContiguousPolicy(name, budget, buddy, lambda r: max_len)
        if name == "pow2":
            return ContiguousPolicy(name, budget, buddy, lambda r: r.total_len)
        return ContiguousPolicy(
            name, budget, lambda: BestFitAllocator(budget), lambda r: r.total_len
        )
    if name in POLICIES:
        return PagedPolicy(
            name,
            budget,
            block_size,
            prefix_caching=name == "paged+prefix",
            sharing=name == "paged+sharing",
            swap_blocks=swap_blocks,
            watermark=watermark,
        )
    raise InvalidRequest(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
