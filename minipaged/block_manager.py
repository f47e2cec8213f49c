"""A vLLM-style block manager: block tables, copy-on-write, prefix caching and swapping.

The KV cache of every sequence lives in fixed-size blocks of ``block_size`` token slots taken from
one :class:`~minipaged.alloc.paged.PagedAllocator` (the GPU pool). A sequence's *block table* maps
its logical block i (tokens ``i*block_size .. (i+1)*block_size - 1``) to a physical block id, so
token position p lives in the physical slot ``table[p // block_size] * block_size +
p % block_size``: :meth:`BlockManager.slot_mapping` is exactly what the reshape-and-cache kernel
needs to write new keys and values, and the block table is what the attention kernel reads.

Sharing. A block may sit in several tables at once; its ref count in the pool is the number of
tables holding it. ``fork`` (parallel sampling, beam search) shares every block of the parent.
Only the last block of a sequence is ever written, and only while it is partly filled, so sharing
is safe until a sequence appends to a shared, partly filled last block: then that block is
*copied on write* into a fresh block first, and the ``(src, dst)`` pair is returned for the
copy-blocks kernel. A full block is never written again.

Prefix caching (``enable_prefix_caching=True``). A full block whose tokens are all known gets a
:class:`BlockKey`: its tokens, the key of the block before it, and a hash chained over the parent
block's hash and its own tokens, so equal hashes mean "probably the same whole prefix". The cache
maps hash -> block id. A new sequence walks its prompt block by block and reuses every block of its
longest cached prefix. A hash hit is *confirmed* by comparing tokens and the parent chain, so a
hash collision is a miss, never someone else's KV. Freed blocks keep their key and stay reusable
("cached") until the pool hands them out again: the pool's free queue is in LRU order, so its head
is the eviction victim, and evicting a block drops its cache entry. A sequence is freed from its
last block to its first, so a prefix's tail is evicted before its head.

Why a fully cached prompt still recomputes its last block: the model must run at least one token
of the prompt to get the logits that pick the first output token. Reusing every cached block and
recomputing only the last token would write that token's KV into a full block that others share
(or may share later), which breaks the rule that full blocks are read-only. So at most
``(len(prompt) - 1) // block_size`` blocks are reused and the rest of the prompt, at least one
token, is computed into fresh blocks. A fully cached prompt whose length is a multiple of
``block_size`` thus recomputes its whole last block: at most ``block_size - 1`` tokens more than
strictly needed, a small price for never writing into a shared block.

Watermark. A new sequence (``allocate``, ``swap_in``) must leave ``watermark_blocks`` free blocks
behind; appends may use them. Running sequences can then keep decoding for a while after
admission stops, instead of being preempted at once (as in vLLM).

Swapping. ``swap_out`` moves a *group* of sequences to a second pool (the CPU pool) and returns
the ``(gpu, cpu)`` block pairs for the swap kernel; ``swap_in`` moves a group back and returns
``(cpu, gpu)`` pairs. A block shared inside the group moves once and stays shared. A group must be
closed under sharing: if one of its blocks is also held by a sequence outside the group, the
swap raises ``InvalidState`` (the block cannot be in both pools at once). Copy the returned pairs
before the next call to the manager: the source blocks are free from then on. The prefix cache
covers the GPU pool only; blocks swapped back in are registered again.

Every operation checks all its preconditions first and is all-or-nothing: when blocks run out it
raises ``OutOfMemory`` (or ``can_*`` returns False) and nothing changes. That holds for a whole
decode step too: ``append_slots_batch`` appends one slot to each of many sequences, as a serving
engine does once per step, and checks the whole step before it changes anything.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from minipaged.alloc.paged import PagedAllocator
from minipaged.errors import (
    DuplicateSequence,
    InvalidRequest,
    InvalidState,
    OutOfMemory,
    UnknownSequence,
)

_PLAIN_INT = frozenset({int})


def _getter(keys: Sequence[Hashable]) -> Callable[[dict], tuple]:
    """``d -> tuple(d[k] for k in keys)``. The lookups run in C (``operator.itemgetter``), about
    twice as fast as ``list(map(d.__getitem__, keys))`` on a decode batch of a few hundred ids;
    the decode step makes two per step. Raises what ``d[k]`` raises (``KeyError``, or
    ``TypeError`` for an unhashable key)."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    return lambda d: tuple(d[k] for k in keys)  # itemgetter of one key returns no tuple


# ----- sizing --------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of a model's KV cache: what one token costs in bytes."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes"):
            _check_int(name, getattr(self, name), 1)

    @property
    def bytes_per_token(self) -> int:
        """One key and one value vector per layer and KV head: 2 x layers x heads x dim x dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def bytes_per_block(self, block_size: int) -> int:
        """The bytes of one block of ``block_size`` token slots: the unit the pool is cut into."""
        return self.bytes_per_token * _check_int("block_size", block_size, 1)


def num_blocks_for(
    memory_bytes: int, spec: KVCacheSpec, block_size: int, utilization: float = 0.9
) -> int:
    """How many whole blocks fit in ``utilization`` of ``memory_bytes`` (rounded down): the rest
    is kept back for activations and the allocator's own slack, as vLLM's
    ``gpu_memory_utilization`` does."""
    _check_int("memory_bytes", memory_bytes, 0)
    if isinstance(utilization, bool) or not isinstance(utilization, int | float):
        raise InvalidRequest(f"utilization must be a number in (0, 1], got {utilization!r}")
    if not 0 < utilization <= 1:
        raise InvalidRequest(f"utilization must be in (0, 1], got {utilization!r}")
    return math.floor(memory_bytes * utilization) // spec.bytes_per_block(block_size)


def gpu_num_blocks(spec: KVCacheSpec, block_size: int, utilization: float = 0.9) -> int:
    """Size the GPU pool from the device's free memory right now (numba's memory info).

    Raises ``InvalidState`` when there is no usable CUDA device, and under numba's CUDA simulator,
    which reports unlimited memory: size the pool with :func:`num_blocks_for` there instead."""
    spec.bytes_per_block(block_size)  # validate before touching the device
    try:
        from numba import cuda  # imported here: sizing from a number needs no CUDA at all

        free, _total = cuda.current_context().get_memory_info()
    except Exception as e:  # CudaSupportError (no driver), CudaDriverError, ImportError, ...
        raise InvalidState(f"cannot read free GPU memory: {e}") from e
    if not math.isfinite(free):
        raise InvalidState(
            f"the device reports {free} bytes of free memory (numba's CUDA simulator does): "
            "size the pool with num_blocks_for(memory_bytes, ...) instead"
        )
    return num_blocks_for(int(free), spec, block_size, utilization)


# ----- prefix-cache keys ---------------------------------------------------------------------


def default_block_hash(parent_hash: Hashable | None, tokens: tuple[int, ...]) -> int:
    """Python's hash of (parent hash, tokens): deterministic for ints and tuples of ints."""
    return hash((parent_hash, tokens))


class BlockKey:
    """What a full block holds: its tokens after the prefix ``parent`` (None for block 0).

    The keys of a sequence form a chain, so a key stands for the whole prefix up to and including
    its block while storing only ``block_size`` tokens; chains of sequences with a common prefix
    share their first keys. ``hash`` is ``hash_fn(parent.hash, tokens)``.

    A key is never changed after it is made (treat it as read-only) and compares by identity:
    two keys with equal tokens are still two keys. Every block that fills gets one, so it is a
    plain class with ``__slots__`` rather than a frozen dataclass, whose ``__init__`` (it sets
    each field through ``object.__setattr__``) costs about 3.5 times as much."""

    __slots__ = ("hash", "tokens", "parent")

    def __init__(self, hash: Hashable, tokens: tuple[int, ...], parent: BlockKey | None) -> None:
        self.hash = hash
        self.tokens = tokens
        self.parent = parent

    def __repr__(self) -> str:
        parent = None if self.parent is None else f"<key {self.parent.hash!r}>"
        return f"BlockKey(hash={self.hash!r}, tokens={self.tokens!r}, parent={parent})"


def same_prefix(a: BlockKey | None, b: BlockKey | None) -> bool:
    """True when two key chains hold the same tokens block by block. Stops as soon as the chains
    meet (the usual case: one step), so confirming a hit is cheap."""
    while a is not b:
        if a is None or b is None or a.tokens != b.tokens:
            return False
        a, b = a.parent, b.parent
    return True


# ----- the manager ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockManagerStats:
    """A snapshot in blocks and token slots. On the GPU, ``free_blocks + used_blocks +
    cached_blocks == num_blocks``: *cached* blocks are free (ref count 0) but still hold KV that
    the prefix cache can hand out again; *free* blocks hold nothing of use. ``tokens_stored`` and
    ``slots_wasted`` count each used GPU block once, however many sequences share it; the wasted
    slots are the empty tails of partly filled last blocks (internal fragmentation)."""

    num_blocks: int
    free_blocks: int
    used_blocks: int
    cached_blocks: int
    num_cpu_blocks: int
    cpu_used_blocks: int
    num_sequences: int
    num_swapped: int
    tokens_stored: int
    slots_wasted: int
    prefix_hits: int
    prefix_misses: int
    evictions: int


HashFn = Callable[[Hashable | None, tuple[int, ...]], Hashable]


class BlockManager:
    """Block tables over a GPU pool (and a CPU pool for swapping).

    Invariants (checked by the property tests after every step):
    - a block's ref count equals the number of tables holding it; no table holds a free block;
    - a running sequence's table has exactly ``ceil(num_tokens / block_size)`` GPU blocks, a
      swapped one as many CPU blocks;
    - a GPU block has a key only while it is full with known tokens, and a free block has one
      only while the cache maps the key's hash to it (a cached block).

    ``hash_fn(parent_hash, tokens)`` replaces the block hash, e.g. to force collisions in tests.
    """

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        num_cpu_blocks: int = 0,
        watermark: float = 0.01,
        enable_prefix_caching: bool = False,
        *,
        hash_fn: HashFn | None = None,
    ) -> None:
        if isinstance(watermark, bool) or not isinstance(watermark, int | float):
            raise InvalidRequest(f"watermark must be a number in [0, 1), got {watermark!r}")
        if not 0 <= watermark < 1:
            raise InvalidRequest(f"watermark must be in [0, 1), got {watermark!r}")
        self.gpu = PagedAllocator(num_gpu_blocks, block_size)
        self.cpu = PagedAllocator(num_cpu_blocks, block_size)
        self.block_size = block_size
        self.watermark = watermark
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.hash_fn: HashFn = hash_fn or default_block_hash
        self._tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, list[int | None]] = {}  # None: a token the caller didn't give
        self._swapped: set[Hashable] = set()
        self._keys: dict[int, BlockKey] = {}  # GPU block -> key
        self._cache: dict[Hashable, int] = {}  # hash -> GPU block
        self.prefix_hits = 0  # blocks reused from the cache
        self.prefix_misses = 0  # reusable prompt blocks (see _match) that were not found
        self.evictions = 0  # cached blocks handed out for new content

    # ----- queries -------------------------------------------------------------------------

    def _table(self, seq_id: Hashable) -> list[int]:
        table = self._table_or_none(seq_id)
        if table is None:
            raise UnknownSequence(f"unknown sequence {seq_id!r}")
        return table

    def _table_or_none(self, seq_id: Hashable) -> list[int] | None:
        try:
            return self._tables.get(seq_id)
        except TypeError:  # unhashable
            return None

    def _running(self, seq_id: Hashable, action: str) -> list[int]:
        table = self._table(seq_id)
        if seq_id in self._swapped:
            raise InvalidState(f"cannot {action} sequence {seq_id!r}: it is swapped out to CPU")
        return table

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's block table: GPU block ids, or CPU ones while swapped out."""
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds (prompt and appended), whose KV its blocks store."""
        self._table(seq_id)
        return len(self._tokens[seq_id])

    def is_swapped(self, seq_id: Hashable) -> bool:
        """Whether the sequence's blocks are in the CPU pool (it cannot run until swapped in)."""
        self._table(seq_id)
        return seq_id in self._swapped

    def slot_mapping(self, seq_id: Hashable, positions: Sequence[int] | None = None) -> np.ndarray:
        """Physical GPU slots (``block_id * block_size + offset``, int64) of the given token
        positions, all of them by default: where the reshape-and-cache kernel writes them."""
        table = self._running(seq_id, "map the slots of")
        n = len(self._tokens[seq_id])
        if positions is None:
            pos = np.arange(n, dtype=np.int64)
        else:
            pos = np.asarray(positions)
            if pos.ndim != 1 or (pos.size and pos.dtype.kind not in "iu"):
                raise InvalidRequest(f"positions must be a 1-d sequence of ints, got {positions!r}")
            pos = pos.astype(np.int64)
            bad = pos[(pos < 0) | (pos >= n)]
            if bad.size:
                raise InvalidRequest(
                    f"position {int(bad[0])} is outside sequence {seq_id!r} of {n} tokens"
                )
        blocks = np.asarray(table, dtype=np.int64)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def stats(self) -> BlockManagerStats:
        """Where the blocks are now; see :class:`BlockManagerStats` for what each count means."""
        fill: dict[int, int] = {}  # used GPU block -> tokens in it (same for every holder)
        for seq_id, table in self._tables.items():
            if seq_id not in self._swapped:
                n = len(self._tokens[seq_id])
                for i, b in enumerate(table):
                    fill[b] = min(self.block_size, n - i * self.block_size)
        cached = sum(1 for b in self._cache.values() if self.gpu.is_free(b))
        used = self.gpu.num_blocks - self.gpu.num_free_blocks
        return BlockManagerStats(
            num_blocks=self.gpu.num_blocks,
            free_blocks=self.gpu.num_free_blocks - cached,
            used_blocks=used,
            cached_blocks=cached,
            num_cpu_blocks=self.cpu.num_blocks,
            cpu_used_blocks=self.cpu.num_blocks - self.cpu.num_free_blocks,
            num_sequences=len(self._tables),
            num_swapped=len(self._swapped),
            tokens_stored=sum(fill.values()),
            slots_wasted=used * self.block_size - sum(fill.values()),
            prefix_hits=self.prefix_hits,
            prefix_misses=self.prefix_misses,
            evictions=self.evictions,
        )

    # ----- GPU blocks and the prefix cache -------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _new_gpu_block(self) -> int:
        """The head of the free queue; if it still held cached KV, that entry is evicted."""
        b = self.gpu.allocate_block()
        key = self._keys.pop(b, None)
        if key is not None:  # a free block with a key is a cached one
            del self._cache[key.hash]
            self.evictions += 1
        return b

    def _release_gpu(self, b: int) -> None:
        """Drop one holder. A block that becomes free stays cached only if the cache maps its
        hash to it; any other key could never be found again, so it is dropped.

        ``b`` comes from a block table, so it is a valid block in use: the pool's unchecked
        ``_drop`` suffices (``decref`` would check that again, once per block freed)."""
        if self.gpu._drop(b) == 0:
            key = self._keys.get(b)
            if key is not None and self._cache.get(key.hash) != b:
                del self._keys[b]

    def _hash(self, parent: BlockKey | None, tokens: tuple[int, ...]) -> Hashable:
        """The chained hash of a block with these tokens after the prefix ``parent``."""
        return self.hash_fn(None if parent is None else parent.hash, tokens)

    def _match(self, tokens: Sequence[int]) -> list[int]:
        """The cached blocks of the longest cached prefix of ``tokens``, at most
        ``(len(tokens) - 1) // block_size`` of them (see the module docstring). Changes nothing.

        The hash is computed inline rather than through :meth:`_hash` (the same value: with the
        default ``hash_fn`` it is ``hash((parent_hash, tokens))`` straight away), since every
        prompt block costs one."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        bs, cache, keys, hash_fn = self.block_size, self._cache, self._keys, self.hash_fn
        plain = hash_fn is default_block_hash
        parent, parent_hash = None, None
        for start in range(0, (len(tokens) - 1) // bs * bs, bs):
            want = tuple(tokens[start : start + bs])
            b = cache.get(hash((parent_hash, want)) if plain else hash_fn(parent_hash, want))
            if b is None:
                break
            key = keys[b]
            # Confirm the hit: the same tokens after the same prefix. Usually the key's parent
            # is the very key matched before it (the chains meet at once): no walk needed.
            if key.tokens != want or (
                key.parent is not parent and not same_prefix(key.parent, parent)
            ):
                break  # a hash collision: a miss, not someone else's KV
            hits.append(b)
            parent, parent_hash = key, key.hash
        return hits

    def _register(self, seq_id: Hashable, start: int) -> None:
        """Give keys to the sequence's full blocks from logical block ``start`` on, and enter
        them into the cache unless their hash is taken (by an equal block or a collision). Stops
        at the first block with an unknown token: no later block can have a key then.

        Called for every block that fills (once per ``block_size`` appends), so the hash is
        computed inline as in :meth:`_match`."""
        if not self.enable_prefix_caching:
            return
        table, tokens, keys = self._tables[seq_id], self._tokens[seq_id], self._keys
        parent = None
        if start > 0:
            parent = keys.get(table[start - 1])
            if parent is None:
                return
        bs, cache, hash_fn = self.block_size, self._cache, self.hash_fn
        plain = hash_fn is default_block_hash
        for i in range(start, len(tokens) // bs):
            b = table[i]
            key = keys.get(b)
            if key is None:
                toks = tuple(tokens[i * bs : (i + 1) * bs])
                if None in toks:
                    return
                parent_hash = None if parent is None else parent.hash
                h = hash((parent_hash, toks)) if plain else hash_fn(parent_hash, toks)
                key = keys[b] = BlockKey(h, toks, parent)
                cache.setdefault(h, b)
            parent = key

    def _out_of_gpu(self, need: int, keep: int) -> OutOfMemory:
        free = max(0, self.gpu.num_free_blocks - keep)
        err = OutOfMemory(need, free, free, what="GPU blocks")
        if keep:
            err.args = (f"{err.args[0]} (after keeping {keep} back as the watermark)",)
        return err

    # ----- sequences -----------------------------------------------------------------------

    @staticmethod
    def _check_tokens(tokens: object, what: str) -> list[int]:
        """The token ids as a new list of ints (the caller may keep it), or ``InvalidRequest``."""
        # The common case first, checked in C: a list or tuple of plain ints needs no converting
        # (bools and numpy ints take the loop below, which rejects or converts them).
        if isinstance(tokens, list | tuple) and set(map(type, tokens)) <= _PLAIN_INT:
            return list(tokens)
        if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence | np.ndarray):
            raise InvalidRequest(f"{what} must be a sequence of token ids, got {tokens!r}")
        out = []
        for t in tokens:
            try:
                if isinstance(t, bool):
                    raise TypeError
                out.append(operator.index(t))
            except TypeError:
                raise InvalidRequest(f"{what} must be ints, got {t!r} in {tokens!r}") from None
        return out

    def _check_new(self, seq_id: Hashable) -> None:
        try:
            exists = seq_id in self._tables
        except TypeError:
            raise InvalidRequest(f"a sequence id must be hashable, got {seq_id!r}") from None
        if exists:
            raise DuplicateSequence(f"sequence {seq_id!r} already exists")

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` tokens fits now, leaving the watermark free.
        Conservative: prefix-cache hits can only lower the need, so True means ``allocate``
        succeeds."""
        _check_int("num_tokens", num_tokens, 1)
        need = self._blocks_for(num_tokens)
        return self.gpu.num_free_blocks - need >= self.watermark_blocks

    def allocate(self, seq_id: Hashable, tokens: Sequence[int]) -> int:
        """Create a sequence holding the prompt ``tokens``; returns how many leading tokens are
        already cached (a multiple of ``block_size``, less than ``len(tokens)``; 0 without prefix
        caching): the model computes KV only for the rest.

        ``InvalidRequest`` if the prompt could never fit next to the watermark, ``OutOfMemory``
        if it does not fit now."""
        toks = self._check_tokens(tokens, "tokens")
        if not toks:
            raise InvalidRequest("a sequence needs at least one token, got none")
        self._check_new(seq_id)
        num_blocks = self._blocks_for(len(toks))
        if num_blocks + self.watermark_blocks > self.gpu.num_blocks:
            raise InvalidRequest(
                f"a prompt of {len(toks)} tokens needs {num_blocks} blocks, which can never fit "
                f"in {self.gpu.num_blocks} blocks with a watermark of {self.watermark_blocks}"
            )
        hits = self._match(toks)
        gpu = self.gpu
        refs = gpu.ref_counts  # read-only view; the hits are valid block ids
        need = num_blocks - len(hits) + sum(1 for b in hits if refs[b] == 0)
        if gpu.num_free_blocks - need < self.watermark_blocks:
            raise self._out_of_gpu(need, self.watermark_blocks)
        # Revive or share the hits first, so that eviction cannot pick them. A hit is a cached
        # block (free) or a block in use, as its count says: the unchecked pool calls suffice.
        for b in hits:
            if refs[b] == 0:
                gpu._take(b)
            else:
                gpu._share(b)
        new_block = self._new_gpu_block
        table = hits + [new_block() for _ in range(num_blocks - len(hits))]
        self._tables[seq_id] = table
        self._tokens[seq_id] = toks  # _check_tokens made a new list: no need to copy it again
        self._register(seq_id, len(hits))
        if self.enable_prefix_caching:
            self.prefix_hits += len(hits)
            self.prefix_misses += (len(toks) - 1) // self.block_size - len(hits)
        return len(hits) * self.block_size

    def _append_need(self, seq_id: Hashable, n: int) -> tuple[int, bool]:
        """(free blocks needed, whether the last block must be copied first) to append n."""
        table, length = self._tables[seq_id], len(self._tokens[seq_id])
        cow = length % self.block_size != 0 and self.gpu.refcount(table[-1]) > 1
        return self._blocks_for(length + n) - len(table) + cow, cow

    def can_append(self, seq_id: Hashable, n: int = 1) -> bool:
        """Whether ``n`` more tokens fit now; appends may use the watermark's blocks."""
        self._running(seq_id, "append to")
        _check_int("n", n, 1)
        return self._append_need(seq_id, n)[0] <= self.gpu.num_free_blocks

    def append_slots(
        self, seq_id: Hashable, n: int = 1, tokens: Sequence[int] | None = None
    ) -> list[tuple[int, int]]:
        """Make room for ``n`` new tokens (a decode step); their slots are the last ``n`` of
        ``slot_mapping``. ``tokens`` are their ids if known (needed to cache the blocks they
        fill). Returns the ``(src, dst)`` block copies that copy-on-write needs (at most one),
        to be done before the new KV is written."""
        table = self._running(seq_id, "append to")
        _check_int("n", n, 1)
        new: list[int | None] = [None] * n
        if tokens is not None:
            new = self._check_tokens(tokens, "tokens")
            if len(new) != n:
                raise InvalidRequest(f"got {len(new)} tokens for n={n} new slots")
        need, cow = self._append_need(seq_id, n)
        if need > self.gpu.num_free_blocks:
            raise self._out_of_gpu(need, 0)
        pairs: list[tuple[int, int]] = []
        if cow:
            src, dst = table[-1], self._new_gpu_block()
            self._release_gpu(src)
            table[-1] = dst
            pairs.append((src, dst))
        if need > cow:
            table.extend(self._new_gpu_block() for _ in range(need - cow))
        seq_tokens, bs = self._tokens[seq_id], self.block_size
        old_length = len(seq_tokens)
        seq_tokens.extend(new)
        if len(seq_tokens) // bs > old_length // bs:  # only a block just filled can get a key
            self._register(seq_id, old_length // bs)
        return pairs

    def append_slots_batch(
        self, seq_ids: Sequence[Hashable], tokens: Sequence[int] | None = None
    ) -> list[tuple[int, int]]:
        """One decode step: a slot for one new token in each sequence of ``seq_ids`` (a list or
        tuple of distinct running sequences); ``tokens[i]``, if given, is the id of the new
        token of ``seq_ids[i]``. Returns the step's copy-on-write ``(src, dst)`` pairs, in
        order, to be copied before any new KV is written.

        The blocks, tokens, pairs and cache afterwards are exactly those of
        ``append_slots(seq, 1, [token])`` for each sequence in order, but the step is
        all-or-nothing: every id, the tokens and the free blocks the whole step needs are
        checked before anything changes (``UnknownSequence``, ``InvalidState`` for a swapped-out
        sequence, ``InvalidRequest`` for a repeated id or bad tokens, ``OutOfMemory``), so a
        refused step can be retried after preempting a sequence. An empty step does nothing.

        Why it is fast: most appends write into a sequence's own, partly filled last block, so
        they only add the token to the sequence's list. The loop below does just that and takes
        the longer path (a new block, a copy, a prefix-cache key) only for the sequences that
        need it, about one in ``block_size``; the checks run over the whole batch at once.
        """
        if not isinstance(seq_ids, list | tuple):
            raise InvalidRequest(
                f"seq_ids must be a list or tuple of sequence ids, got {seq_ids!r}"
            )
        lookup = _getter(seq_ids)  # one getter for the batch, used on both dicts
        try:
            tables = lookup(self._tables)
        except (KeyError, TypeError):
            tables = [self._table(s) for s in seq_ids]  # raises, naming the first unknown id
        swapped = self._swapped
        if swapped and not swapped.isdisjoint(seq_ids):
            seq_id = next(s for s in seq_ids if s in swapped)
            raise InvalidState(f"cannot append to sequence {seq_id!r}: it is swapped out to CPU")
        if len(set(seq_ids)) != len(seq_ids):
            seq_id = next(s for s, count in Counter(seq_ids).items() if count > 1)
            raise InvalidRequest(
                f"a decode step appends to each sequence once, got {seq_id!r} twice"
            )
        if tokens is None:
            new: list[int | None] = [None] * len(seq_ids)
        else:
            new = self._check_tokens(tokens, "tokens")
            if len(new) != len(seq_ids):
                raise InvalidRequest(f"got {len(new)} tokens for {len(seq_ids)} sequences")
        # Each sequence needs at most one block (a new one when its last block is full, or a
        # copy when its last block is shared and partly filled, never both), so counting
        # exactly is needed only when fewer blocks than sequences are free.
        if len(seq_ids) > self.gpu.num_free_blocks:
            need = self._step_need(seq_ids, tables)
            if need > self.gpu.num_free_blocks:
                raise self._out_of_gpu(need, 0)

        bs, refs = self.block_size, self.gpu.ref_counts
        token_lists = lookup(self._tokens)
        new_block, release, register = self._new_gpu_block, self._release_gpu, self._register
        # The offset in its last block where a token completes the block; only then, and only
        # with known tokens, is a key due (None: no keys in this step).
        last_slot = bs - 1 if tokens is not None and self.enable_prefix_caching else None
        pairs: list[tuple[int, int]] = []
        for seq_id, table, seq_tokens, token in zip(seq_ids, tables, token_lists, new, strict=True):
            offset = len(seq_tokens) % bs  # where the new token lands in the last block
            if offset == 0:  # the last block is full, so read-only: start a new one
                table.append(new_block())
            elif refs[table[-1]] > 1:  # partly filled but shared: copy it on write
                src, dst = table[-1], new_block()
                release(src)
                table[-1] = dst
                pairs.append((src, dst))
            seq_tokens.append(token)
            if offset == last_slot:  # the token filled its block: give the block a key
                register(seq_id, len(seq_tokens) // bs - 1)
        return pairs

    def _step_need(self, seq_ids: Sequence[Hashable], tables: Sequence[list[int]]) -> int:
        """The free blocks that ``append_slots_batch(seq_ids)`` takes: one per full last block,
        plus the copies. Of ``k`` sequences in the step that share a partly filled last block
        of ref count ``r``, each copies it while the count (one lower after every copy) is still
        above 1: ``min(k, r - 1)`` copies, and the last holder may keep the block."""
        bs, refs = self.block_size, self.gpu.ref_counts
        need, holders = 0, Counter[int]()
        for seq_id, table in zip(seq_ids, tables, strict=True):
            if len(self._tokens[seq_id]) % bs == 0:
                need += 1
            elif refs[table[-1]] > 1:
                holders[table[-1]] += 1
        return need + sum(min(k, refs[b] - 1) for b, k in holders.items())

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent (and its tokens); needs no free block."""
        table = self._running(parent_id, "fork")
        self._check_new(child_id)
        for b in table:
            self.gpu.incref(b)
        self._tables[child_id] = list(table)
        self._tokens[child_id] = list(self._tokens[parent_id])

    def free(self, seq_id: Hashable) -> None:
        """Forget a sequence and drop its hold on its blocks, last block first (so that the tail
        of a cached prefix is evicted before its head). Freeing it again: ``UnknownSequence``."""
        table = self._table(seq_id)
        if seq_id in self._swapped:
            for b in table:
                self.cpu.decref(b)
            self._swapped.discard(seq_id)
        else:
            release = self._release_gpu
            for b in reversed(table):
                release(b)
        del self._tables[seq_id], self._tokens[seq_id]

    # ----- swapping ------------------------------------------------------------------------

    def _group(
        self, seq_ids: Hashable | Sequence[Hashable], swapped: bool
    ) -> tuple[list[Hashable], Counter[int]]:
        """Validate a swap group: one id, or a list or tuple of ids (a tuple that is itself a
        known sequence id is that one sequence). Returns the ids and the group's distinct blocks
        in first-seen order, each with the number of the group's tables holding it."""
        ids = [seq_ids]
        if isinstance(seq_ids, list) or (
            isinstance(seq_ids, tuple) and self._table_or_none(seq_ids) is None
        ):
            ids = list(seq_ids)
        if not ids:
            raise InvalidRequest("a swap group needs at least one sequence id, got none")
        for seq_id in ids:
            self._table(seq_id)
            if (seq_id in self._swapped) != swapped:
                where = "not swapped out" if swapped else "already swapped out"
                raise InvalidState(f"sequence {seq_id!r} is {where}")
        if len(set(ids)) != len(ids):
            raise InvalidRequest(f"a swap group needs distinct sequence ids, got {seq_ids!r}")
        pool = self.cpu if swapped else self.gpu
        holders: Counter[int] = Counter()
        for seq_id in ids:
            holders.update(self._tables[seq_id])
        for seq_id in ids:
            for b in self._tables[seq_id]:
                if pool.refcount(b) != holders[b]:
                    raise InvalidState(
                        f"block {b} of sequence {seq_id!r} is shared with a sequence outside "
                        f"the group {ids!r}: swap the sequences that share it together"
                    )
        return ids, holders

    def _move(
        self,
        ids: list[Hashable],
        holders: Counter[int],
        new_block: Callable[[], int],
        incref: Callable[[int], int],
    ) -> list[tuple[int, int]]:
        """Give each distinct block of the group a new block in the other pool with as many
        holders, and rewrite the group's tables. The caller releases the old blocks."""
        moved: dict[int, int] = {}
        for b, count in holders.items():
            moved[b] = new_block()
            for _ in range(count - 1):
                incref(moved[b])
        for seq_id in ids:
            self._tables[seq_id] = [moved[b] for b in self._tables[seq_id]]
        return list(moved.items())

    def can_swap_in(self, seq_ids: Hashable | Sequence[Hashable]) -> bool:
        """Whether the swapped group fits back on the GPU, leaving the watermark free."""
        _, holders = self._group(seq_ids, swapped=True)
        return self.gpu.num_free_blocks - len(holders) >= self.watermark_blocks

    def swap_out(self, seq_ids: Hashable | Sequence[Hashable]) -> list[tuple[int, int]]:
        """Move a group of sequences to the CPU pool; returns the ``(gpu, cpu)`` block pairs to
        copy, each shared block once. The GPU blocks are free afterwards; cached ones stay
        cached, since their KV is still there until the block is handed out again."""
        ids, holders = self._group(seq_ids, swapped=False)
        if len(holders) > self.cpu.num_free_blocks:
            free = self.cpu.num_free_blocks
            raise OutOfMemory(len(holders), free, free, what="CPU blocks")
        moved = self._move(ids, holders, self.cpu.allocate_block, self.cpu.incref)
        for b in reversed(holders):  # tails first, as in free()
            for _ in range(holders[b]):
                self._release_gpu(b)
        self._swapped.update(ids)
        return moved

    def swap_in(self, seq_ids: Hashable | Sequence[Hashable]) -> list[tuple[int, int]]:
        """Move a swapped group back to the GPU; returns the ``(cpu, gpu)`` block pairs to copy.
        Like ``allocate``, it must leave the watermark free."""
        ids, holders = self._group(seq_ids, swapped=True)
        if self.gpu.num_free_blocks - len(holders) < self.watermark_blocks:
            raise self._out_of_gpu(len(holders), self.watermark_blocks)
        moved = self._move(ids, holders, self._new_gpu_block, self.gpu.incref)
        for b, count in holders.items():
            for _ in range(count):
                self.cpu.decref(b)
        self._swapped.difference_update(ids)
        for seq_id in ids:
            self._register(seq_id, 0)
        return moved

    # ----- compaction ----------------------------------------------------------------------

    def compact(self) -> list[tuple[int, int]]:
        """Move every GPU block in use into the lowest block ids, so that blocks
        ``used_blocks..num_blocks - 1`` hold nothing in use and the pool could shrink (hand that
        memory back). Returns the ``(src, dst)`` block pairs for the copy-blocks kernel; copy them
        before the next call to the manager, since the sources are free from then on.

        The used blocks at or above the boundary ``used = num_blocks - num_free_blocks`` are
        paired, in increasing order, with the free blocks below it (there are exactly as many).
        No block is both a source and a destination, so the kernel may run all pairs at once.
        Each destination is taken with the source's ref count, every running table and the
        block's prefix-cache key and cache entry are rewritten, and the source goes to the tail
        of the free queue. A cached block below the boundary is in the way: it is evicted (its
        KV would be overwritten). Cached blocks above it stay cached. CPU tables are untouched.
        """
        used = self.gpu.num_blocks - self.gpu.num_free_blocks
        srcs = [b for b in range(used, self.gpu.num_blocks) if not self.gpu.is_free(b)]
        dsts = [b for b in range(used) if self.gpu.is_free(b)]
        moved = dict(zip(srcs, dsts, strict=True))
        for src, dst in moved.items():
            key = self._keys.pop(dst, None)
            if key is not None:  # a cached block in the way
                del self._cache[key.hash]
                self.evictions += 1
            self.gpu.take(dst)
            for _ in range(self.gpu.refcount(src) - 1):
                self.gpu.incref(dst)
            key = self._keys.pop(src, None)
            if key is not None:
                self._keys[dst] = key
                if self._cache.get(key.hash) == src:
                    self._cache[key.hash] = dst
            while self.gpu.decref(src):
                pass
        for seq_id, table in self._tables.items():
            if seq_id not in self._swapped:
                table[:] = [moved.get(b, b) for b in table]
        return list(moved.items())
