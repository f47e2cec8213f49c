"""Lesson 06: your first Numba CUDA kernels: reshape-and-cache and copy-blocks.

Fill in the two kernels; check your work with

    minipaged lesson check 06

(in Numba's CUDA simulator when there is no GPU: one Python thread per CUDA thread, so the tests
use tiny shapes). The host wrappers are the library's (they validate every argument, stage NumPy
arrays on the device and copy results back); they launch YOUR kernels.

The trick that keeps both kernels short: a cache ``[num_blocks, block_size, heads, dim]`` is, in
memory, also ``[num_slots, heads * dim]`` (slot = block * block_size + row) and
``[num_blocks, block_size * heads * dim]``. The wrappers hand the kernels these flat views, so a
token is one row to copy and a block is one row to copy. Let thread i of a thread block copy
elements i, i + blockDim.x, i + 2 * blockDim.x, ...: neighbouring threads then touch neighbouring
addresses (coalesced loads and stores).
"""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

from numba import cuda

from minipaged.kernels import cache_ops


@cuda.jit
def reshape_and_cache_kernel(key, value, key_cache, value_cache, slot_mapping):
    """Grid: one thread block per token. ``key``/``value``: ``[num_tokens, heads * dim]``;
    caches: ``[num_slots, heads * dim]``. Copy row ``token`` of key and value into row
    ``slot_mapping[token]`` of the caches; a negative slot means: skip this token (padding)."""
    # TODO task 1 (about 6 lines): token = cuda.blockIdx.x; stride over the row by blockDim.x
    raise NotImplementedError("task 1: reshape_and_cache_kernel")


@cuda.jit
def copy_blocks_kernel(key_caches, value_caches, block_mapping):
    """Grid ``(num_pairs, num_layers)``: thread block ``(p, layer)`` copies block
    ``block_mapping[p, 0]`` over block ``block_mapping[p, 1]`` in that layer of both caches.
    Caches: ``[num_layers, num_blocks, block_elems]``; mapping: int64 ``[num_pairs, 2]``."""
    # TODO task 2 (about 7 lines)
    raise NotImplementedError("task 2: copy_blocks_kernel")


# ----- given: the library's host side, launching the kernels above ------------------------------


def reshape_and_cache(
    key: Any,
    value: Any,
    key_cache: Any,
    value_cache: Any,
    slot_mapping: Any,
    threads: int = cache_ops.THREADS,
) -> None:
    """Write ``key[i]``/``value[i]`` into slot ``slot_mapping[i]`` of the caches (see
    :func:`minipaged.kernels.reshape_and_cache`), with your kernel."""
    with patch.object(cache_ops, "reshape_and_cache_kernel", reshape_and_cache_kernel):
        cache_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, threads)


def copy_blocks(
    key_caches: Any, value_caches: Any, block_mapping: Any, threads: int = cache_ops.THREADS
) -> None:
    """Copy block ``src`` over block ``dst`` for every pair and layer (see
    :func:`minipaged.kernels.copy_blocks`), with your kernel."""
    with patch.object(cache_ops, "copy_blocks_kernel", copy_blocks_kernel):
        cache_ops.copy_blocks(key_caches, value_caches, block_mapping, threads)
