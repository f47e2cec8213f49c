"""Lesson 05: prefix caching: requests that share a prompt prefix share its KV blocks.

Fill in the three tasks; check your work with

    minipaged lesson check 05

Your ``BlockManager`` inherits everything else from the library's. The prefix-cache state:

- ``self._keys[block]``: the :class:`BlockKey` of a full GPU block (its tokens, the key of the
  block before it, and ``hash = self._hash(parent, tokens)``, chained over the parent's hash);
- ``self._cache[hash]``: the GPU block holding that key. A FREE block that still has a key (and
  that the cache maps to) is *cached*: its KV is valid until the pool hands it out again.

Invariants: a GPU block has a key only while it is full with known tokens; a free block has one
only while the cache maps the key's hash to it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from minipaged import block_manager as library
from minipaged.block_manager import BlockKey


def same_prefix(a: BlockKey | None, b: BlockKey | None) -> bool:
    """True when two key chains hold the same tokens block by block (both None: the empty
    prefix). Walk both chains through ``.parent`` together, comparing ``.tokens``; stop early
    when the two keys are the same object (the chains have met)."""
    # TODO task 2 (about 5 lines)
    raise NotImplementedError("task 2: same_prefix")


class BlockManager(library.BlockManager):
    def _register(self, seq_id: Hashable, start: int) -> None:
        """Give keys to the sequence's full blocks from logical block ``start`` on, and enter
        each into the cache unless its hash is taken (``self._cache.setdefault``).

        Nothing to do without ``self.enable_prefix_caching``. The parent of block ``start`` is
        the key of block ``start - 1`` (None for block 0); if that block has no key, no later
        block can have one: return. A block that already has a key keeps it (it becomes the
        next parent). Stop at the first block with an unknown (None) token."""
        # TODO task 1 (about 18 lines)
        raise NotImplementedError("task 1: _register")

    def _match(self, tokens: Sequence[int]) -> list[int]:
        """The cached blocks of the longest cached prefix of ``tokens``: at most
        ``(len(tokens) - 1) // block_size`` blocks (the last token is always computed). Changes
        nothing; [] without prefix caching.

        For block i, hash its tokens after the parent key found so far, look the hash up in
        ``self._cache``, and CONFIRM the hit: the block's key must hold the same tokens and the
        same prefix (``same_prefix``), else it is a hash collision: stop there."""
        # TODO task 2 (about 15 lines)
        raise NotImplementedError("task 2: _match")

    def _new_gpu_block(self) -> int:
        """The head of the free queue (``self.gpu.allocate_block()``). If that block still had a
        key, it was a cached block and is evicted now: drop its key and its cache entry, and
        count ``self.evictions``."""
        # TODO task 3 (about 6 lines)
        raise NotImplementedError("task 3: _new_gpu_block")

    def _release_gpu(self, b: int) -> None:
        """Drop one holder (``self.gpu.decref``). A block that becomes free stays cached only if
        the cache maps its key's hash to it; a key the cache does not map to this block could
        never be found again: drop it."""
        # TODO task 3 (about 5 lines)
        raise NotImplementedError("task 3: _release_gpu")
