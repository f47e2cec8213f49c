"""Kernels that move KV data into, within and out of the paged cache.

- ``reshape_and_cache``: after a forward step, write each new token's K and V into its slot.
- ``copy_blocks``: copy whole blocks inside the cache (copy-on-write after a fork, compaction),
  every pair and every layer in ONE launch.
- ``swap_blocks``: move blocks between a device cache and a host cache (preemption by swapping),
  or between two device caches: DMA copies, plus a gather/scatter kernel.

The trick that keeps the first two kernels short: a cache ``[num_blocks, block_size, heads, dim]``
is, in memory, also ``[num_slots, heads * dim]`` (slot = block * block_size + row) and
``[num_blocks, block_size * heads * dim]``. The wrappers hand the kernels these flat views, so a
token is one row to copy and a block is one row to copy, and threads stride along the row, which
makes neighbouring threads touch neighbouring addresses (coalesced loads and stores).

Wrappers accept NumPy arrays (copied to the device, and caches copied back in place afterwards)
or Numba device arrays (used in place, nothing leaves the device). They validate everything on
the host first (``validate.py``); on an error nothing has been launched or written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import config, cuda

from minipaged.errors import InvalidRequest
from minipaged.kernels import validate as v

# Threads per block: tiny in the simulator (one Python thread each), a few warps on a GPU.
THREADS = 32 if config.ENABLE_CUDASIM else 128
WORDS_PER_THREAD = 2  # words of K (and as many of V) a thread copies: _copy_words


def as_words(array: Any) -> Any:
    """The same memory seen as 8-byte (or else 4-byte) unsigned words along its last axis.

    Copying does not care what the bytes mean, and one 8-byte load moves four float16 values
    where a float16 load moves one: a warp then fetches 256 bytes per load instruction instead
    of 64, and needs a quarter of the instructions for the same bytes. An array whose rows are
    not a whole number of words is returned as it is."""
    itemsize = np.dtype(array.dtype).itemsize
    row = array.shape[len(array.shape) - 1]  # (the simulator's shapes take no negative index)
    for word in (np.uint64, np.uint32):
        size = np.dtype(word).itemsize
        if itemsize < size and row * itemsize % size == 0:
            return array.view(word)
    return array


@cuda.jit(device=True)
def _copy_words(dst_k, dst_v, src_k, src_v, i, step, stop):
    """Copy words ``i`` and ``i + step`` (if below ``stop``) of ``src_k`` and ``src_v`` into the
    same places of ``dst_k`` and ``dst_v``: ``WORDS_PER_THREAD`` words of each.

    All four loads come before any store. Written as load, store, load, store, each load would
    wait for the store before it (the compiler cannot know that a store to ``dst_k`` leaves
    ``src_v`` alone), so a thread would have one load in flight at a time; this way it has four,
    and the copies reach 7 to 9 points more of the copy bandwidth (docs/benchmarks.md). When
    ``i + step`` is past ``stop`` the second loads read word ``stop - 1`` instead and nothing is
    stored from them, so no load waits on a branch."""
    j = min(i + step, stop - 1)
    k0 = src_k[i]
    v0 = src_v[i]
    k1 = src_k[j]
    v1 = src_v[j]
    dst_k[i] = k0
    dst_v[i] = v0
    if i + step < stop:
        dst_k[j] = k1
        dst_v[j] = v1


# --- 1. reshape_and_cache ------------------------------------------------------------------------


@cuda.jit
def reshape_and_cache_kernel(key, value, key_cache, value_cache, slot_mapping):
    """One thread block per token. ``key``/``value``: ``[num_tokens, heads * dim]``;
    caches: ``[num_slots, heads * dim]``. A negative slot skips the token (padding)."""
    token = cuda.blockIdx.x
    slot = slot_mapping[token]
    if slot < 0:
        return
    row = key.shape[1]
    step = cuda.blockDim.x
    for i in range(cuda.threadIdx.x, row, WORDS_PER_THREAD * step):
        _copy_words(key_cache[slot], value_cache[slot], key[token], value[token], i, step, row)


def launch_reshape_and_cache(
    key: Any, value: Any, key_cache: Any, value_cache: Any, slots: Any, threads: int = THREADS
) -> None:
    """Launch on checked device arrays: ``key``/``value`` ``[num_tokens, row]``, caches
    ``[num_slots, row]``, ``slots`` int64 on the device. Rows are copied as 8-byte words when
    their size allows (see ``as_words``)."""
    reshape_and_cache_kernel[key.shape[0], threads](
        as_words(key), as_words(value), as_words(key_cache), as_words(value_cache), slots
    )


def reshape_and_cache(
    key: Any,
    value: Any,
    key_cache: Any,
    value_cache: Any,
    slot_mapping: Any,
    threads: int = THREADS,
) -> None:
    """Write ``key[i]`` and ``value[i]`` (``[num_tokens, num_kv_heads, head_dim]``) into slot
    ``slot_mapping[i]`` of the caches (``[num_blocks, block_size, num_kv_heads, head_dim]``).

    Slots must lie in ``[0, num_blocks * block_size)`` or be negative (token skipped), and no slot
    may be written twice. Only the named slots change.
    """
    num_blocks, block_size, kv_heads, head_dim = v.check_kv_caches(key_cache, value_cache)
    dtype = v.check_float_array("key", key, 3, empty_ok=True)
    v.check_same("dtype", ("key", "value"), dtype, v.check_float_array("value", value, 3, True))
    v.check_same("dtype", ("key", "key_cache"), dtype, np.dtype(key_cache.dtype))
    shape = v.shape_of(key)
    v.check_same("shape", ("key", "value"), shape, v.shape_of(value))
    v.check_same("[num_kv_heads, head_dim]", ("key", "key_cache"), shape[1:], (kv_heads, head_dim))
    slots = v.host_index_array("slot_mapping", slot_mapping, np.int64, 1)
    v.check_slot_mapping(slots, shape[0], num_blocks * block_size)
    threads = v.check_int("threads", threads, 1, 1024)
    if shape[0] == 0:
        return

    row = kv_heads * head_dim
    d_key_cache, d_value_cache = v.to_device(key_cache), v.to_device(value_cache)
    launch_reshape_and_cache(
        v.to_device(key).reshape(shape[0], row),
        v.to_device(value).reshape(shape[0], row),
        d_key_cache.reshape(num_blocks * block_size, row),
        d_value_cache.reshape(num_blocks * block_size, row),
        cuda.to_device(slots),
        threads,
    )
    _copy_back(d_key_cache, key_cache)
    _copy_back(d_value_cache, value_cache)


# --- 2. copy_blocks ------------------------------------------------------------------------------


@cuda.jit
def copy_blocks_kernel(key_caches, value_caches, block_mapping):
    """Grid ``(num_pairs, num_layers, pieces)``: thread block ``(p, layer, piece)`` copies its
    piece (one of ``gridDim.z`` equal runs of words) of pair ``p`` in that layer. Caches:
    ``[num_layers, num_blocks, block_elems]``; mapping: int64 ``[num_pairs, 2]``."""
    pair = cuda.blockIdx.x
    layer = cuda.blockIdx.y
    src = block_mapping[pair, 0]
    dst = block_mapping[pair, 1]
    size = key_caches.shape[2]
    piece = (size + cuda.gridDim.z - 1) // cuda.gridDim.z
    first = cuda.blockIdx.z * piece
    stop = min(first + piece, size)
    step = cuda.blockDim.x
    keys, values = key_caches[layer], value_caches[layer]
    for i in range(first + cuda.threadIdx.x, stop, WORDS_PER_THREAD * step):
        _copy_words(keys[dst], values[dst], keys[src], values[src], i, step, stop)


def launch_copy_blocks(
    key_caches: Any, value_caches: Any, pairs: Any, threads: int = THREADS
) -> None:
    """Launch on checked device arrays: caches ``[num_layers, num_blocks, block_elems]``,
    ``pairs`` int64 ``[num_pairs, 2]`` on the device; blocks are copied as 8-byte words when
    their size allows (see ``as_words``).

    Each block copy is cut into pieces of ``WORDS_PER_THREAD * threads`` words, one thread
    block each: with few pairs and one thread block per pair there are too few loads in flight
    to keep the memory busy (measured on an H100, 256 block copies: 58% of the copy bandwidth
    with a thread block per pair, 66% in pieces; docs/benchmarks.md)."""
    key_words, value_words = as_words(key_caches), as_words(value_caches)
    pieces = -(-key_words.shape[2] // (WORDS_PER_THREAD * threads))
    copy_blocks_kernel[(pairs.shape[0], key_words.shape[0], pieces), threads](
        key_words, value_words, pairs
    )


def copy_blocks(
    key_caches: Any, value_caches: Any, block_mapping: Any, threads: int = THREADS
) -> None:
    """Copy block ``src`` over block ``dst`` for every ``(src, dst)`` pair of ``block_mapping``
    and every layer.

    Why caches come stacked: one launch must reach every layer, and a Numba kernel cannot take a
    list of arrays (CUDA C++ would pass an array of pointers). So the natural layout is ONE array
    per K and V, ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``, allocated once,
    whose ``[layer]`` views are the per-layer caches; pass those stacked arrays and everything
    runs in one launch. A list of per-layer 4-D caches is accepted too: NumPy ones are stacked on
    the host (and written back), device ones get one launch per layer, since stacking them would
    copy the whole cache.

    Destinations must be distinct and no block may be both a source and a destination (the
    copies run in parallel); an empty mapping does nothing.
    """
    if isinstance(key_caches, Sequence) != isinstance(value_caches, Sequence):
        raise InvalidRequest("key_caches and value_caches must both be stacked or both be lists")
    keys, values = _as_layers(key_caches, "key_caches"), _as_layers(value_caches, "value_caches")
    v.check_same("number of layers", ("key_caches", "value_caches"), len(keys), len(values))
    shape = v.check_kv_caches(keys[0], values[0], ("key_caches[0]", "value_caches[0]"))
    for layer, (k, val) in enumerate(zip(keys, values, strict=True)):
        names = (f"key_caches[{layer}]", f"value_caches[{layer}]")
        v.check_same("shape", ("key_caches[0]", names[0]), shape, v.check_kv_caches(k, val, names))
        v.check_same("dtype", ("key_caches[0]", names[0]), keys[0].dtype, k.dtype)
    pairs = v.check_block_mapping(block_mapping, shape[0], shape[0], same_cache=True)
    threads = v.check_int("threads", threads, 1, 1024)
    if len(pairs) == 0:
        return

    host_list = isinstance(key_caches, Sequence) and all(
        isinstance(x, np.ndarray) for x in (*keys, *values)
    )
    if not isinstance(key_caches, Sequence):  # stacked: one launch
        launches = [(key_caches, value_caches)]
    elif host_list:  # stack on the host, one launch, unstack afterwards
        launches = [(np.stack(keys), np.stack(values))]
    else:  # list holding device arrays: one launch per layer
        launches = list(zip(keys, values, strict=True))
    d_pairs = cuda.to_device(pairs)
    num_blocks, elems = shape[0], shape[1] * shape[2] * shape[3]
    for k, val in launches:
        d_k, d_v = v.to_device(k), v.to_device(val)
        layers = k.shape[0] if len(k.shape) == 5 else 1
        launch_copy_blocks(
            d_k.reshape(layers, num_blocks, elems),
            d_v.reshape(layers, num_blocks, elems),
            d_pairs,
            threads,
        )
        if host_list:
            host_k, host_v = d_k.copy_to_host(), d_v.copy_to_host()
            for layer in range(layers):
                np.copyto(keys[layer], host_k[layer])
                np.copyto(values[layer], host_v[layer])
        else:
            _copy_back(d_k, k)
            _copy_back(d_v, val)


def _as_layers(caches: Any, name: str) -> list[Any]:
    """The per-layer caches of a stacked 5-D array or of a list of 4-D arrays."""
    if isinstance(caches, Sequence):
        if len(caches) == 0:
            raise InvalidRequest(f"{name} is an empty list")
        return list(caches)
    if not isinstance(caches, np.ndarray) and not v.is_device_array(caches):
        raise InvalidRequest(
            f"{name} must be an array or a list of arrays, got {type(caches).__name__}"
        )
    if len(caches.shape) != 5:
        raise InvalidRequest(
            f"{name} must be [num_layers, num_blocks, block_size, num_kv_heads, head_dim] or a "
            f"list of 4-D caches, got shape {v.shape_of(caches)}"
        )
    if v.is_device_array(caches) and not caches.is_c_contiguous():
        raise InvalidRequest(f"device array {name} must be C-contiguous")
    return [caches[layer] for layer in range(caches.shape[0])]


# --- 3. swap_blocks ------------------------------------------------------------------------------


# Up to this many runs of consecutive pairs, a host <-> device swap makes one DMA per run, in
# place; beyond it, one DMA of a staging buffer beats many small ones (see docs/kernels.md).
DIRECT_RUNS = 8


@cuda.jit
def copy_between_kernel(src, dst, pairs):
    """Grid ``num_pairs``: copy block ``pairs[p, 0]`` of ``src`` over block ``pairs[p, 1]`` of
    ``dst``; both caches viewed as ``[num_blocks, block_elems]``."""
    pair = cuda.blockIdx.x
    s = pairs[pair, 0]
    d = pairs[pair, 1]
    for i in range(cuda.threadIdx.x, src.shape[1], cuda.blockDim.x):
        dst[d, i] = src[s, i]


def swap_blocks(src: Any, dst: Any, block_mapping: Any, threads: int = THREADS) -> None:
    """Copy block ``s`` of ``src`` over block ``d`` of ``dst`` for every ``(s, d)`` pair.

    ``src`` and ``dst`` are C-contiguous caches ``[num_blocks, ...]`` with equal trailing shapes
    and dtypes, each a device array or a host NumPy array (best allocated with
    ``cuda.pinned_array``: the DMA engine reads and writes pinned pages directly, at full PCIe
    speed). How the bytes move:

    - device -> device: one launch of ``copy_between_kernel`` for all pairs;
    - host <-> device, pairs forming at most ``DIRECT_RUNS`` runs (``s, s+1, ...`` to
      ``d, d+1, ...``): one DMA per run, straight between the two caches;
    - host <-> device, more runs: the blocks are gathered into one contiguous staging buffer
      (by the kernel on the device side, by NumPy on the host side), moved in one DMA, and
      scattered on the other side. Each DMA call costs a fixed overhead (about 0.1 ms through
      Numba), which dominates when blocks are scattered;
    - host -> host: NumPy copies.
    """
    for name, x in (("src", src), ("dst", dst)):
        if isinstance(x, np.ndarray):
            contiguous = x.flags.c_contiguous
        elif v.is_device_array(x):
            contiguous = x.is_c_contiguous()
        else:
            raise InvalidRequest(
                f"{name} must be a numpy array or a numba device array, got {type(x).__name__}"
            )
        if len(x.shape) == 0:
            raise InvalidRequest(f"{name} must have a leading block dimension")
        if not contiguous:
            raise InvalidRequest(f"{name} must be C-contiguous")
    v.check_same("dtype", ("src", "dst"), np.dtype(src.dtype), np.dtype(dst.dtype))
    v.check_same("block shape", ("src", "dst"), v.shape_of(src)[1:], v.shape_of(dst)[1:])
    same = _same_memory(src, dst)
    pairs = v.check_block_mapping(block_mapping, src.shape[0], dst.shape[0], same_cache=same)
    threads = v.check_int("threads", threads, 1, 1024)
    if len(pairs) == 0:
        return

    on_host = isinstance(src, np.ndarray), isinstance(dst, np.ndarray)
    runs = _runs(pairs)
    if on_host == (True, True):
        dst[pairs[:, 1]] = src[pairs[:, 0]]
    elif on_host == (False, False):
        _copy_between(src, dst, pairs, threads)
    elif len(runs) <= DIRECT_RUNS:
        stream = cuda.stream()
        for s, d, n in runs:
            if on_host[1]:  # device -> host
                src[s : s + n].copy_to_host(dst[d : d + n], stream=stream)
            else:  # host -> device
                dst[d : d + n].copy_to_device(src[s : s + n], stream=stream)
        stream.synchronize()
    elif on_host[1]:  # device -> host: gather on the device, one DMA, scatter on the host
        staging = cuda.device_array((len(pairs), *v.shape_of(src)[1:]), dtype=src.dtype)
        order = np.arange(len(pairs))
        _copy_between(src, staging, np.stack([pairs[:, 0], order], axis=1), threads)
        dst[pairs[:, 1]] = staging.copy_to_host()
    else:  # host -> device: gather on the host, one DMA, scatter on the device
        staging = cuda.to_device(src[pairs[:, 0]])
        order = np.arange(len(pairs))
        _copy_between(staging, dst, np.stack([order, pairs[:, 1]], axis=1), threads)


def _copy_between(src: Any, dst: Any, pairs: np.ndarray, threads: int) -> None:
    """Launch ``copy_between_kernel`` on flat ``[num_blocks, block_elems]`` views."""
    elems = int(np.prod(v.shape_of(src)[1:]))
    copy_between_kernel[len(pairs), threads](
        as_words(src.reshape(src.shape[0], elems)),
        as_words(dst.reshape(dst.shape[0], elems)),
        cuda.to_device(np.ascontiguousarray(pairs, dtype=np.int64)),
    )


def _same_memory(src: Any, dst: Any) -> bool:
    """True when src and dst are one cache; partly overlapping caches are refused."""
    if src is dst:
        return True
    if isinstance(src, np.ndarray) and isinstance(dst, np.ndarray):
        overlap = np.shares_memory(src, dst)
    elif v.is_device_array(src) and v.is_device_array(dst):
        overlap = _device_ranges_overlap(src, dst)
    else:
        overlap = False
    if overlap:
        raise InvalidRequest("src and dst overlap in memory; use one cache for both")
    return False


def _device_ranges_overlap(a: Any, b: Any) -> bool:
    if config.ENABLE_CUDASIM:  # the simulator's device arrays wrap NumPy arrays
        return bool(np.shares_memory(a._ary, b._ary))
    start_a, start_b = a.device_ctypes_pointer.value, b.device_ctypes_pointer.value
    return start_a < start_b + b.nbytes and start_b < start_a + a.nbytes


def _runs(pairs: np.ndarray) -> list[tuple[int, int, int]]:
    """Group ``(src, dst)`` pairs, sorted by src, into maximal runs ``(src, dst, length)`` where
    both sides advance by one block per pair."""
    runs: list[tuple[int, int, int]] = []
    for s, d in sorted(pairs.tolist()):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def _copy_back(device_array: Any, original: Any) -> None:
    """After a launch on a staged copy, write the result back into the caller's NumPy array."""
    if isinstance(original, np.ndarray):
        np.copyto(original, device_array.copy_to_host())
