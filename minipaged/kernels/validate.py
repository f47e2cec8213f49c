"""Host-side checks and staging shared by the kernel wrappers.

A CUDA kernel does not check bounds: an out-of-range block id read from a block table silently
reads (or, worse, writes) another sequence's memory. So every wrapper runs these checks on the
host BEFORE it launches anything or writes anything, and raises a typed error from
``minipaged.errors`` that names the offending value:

- ``InvalidRequest``: wrong kind of object, shape, dtype or layout; a scalar out of range;
- ``InvalidBlockTable``: a block id outside the cache, a length that its block table does not
  cover, a slot outside the cache, two writes to the same slot or block.

Index arrays (block tables, lengths, slot mappings, block mappings) are always brought to the host
for these checks, also when they live on the device: they are small next to the KV cache, and no
unchecked index may reach a kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from minipaged.errors import InvalidBlockTable, InvalidRequest

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def is_device_array(x: object) -> bool:
    """True for a Numba device array (also the simulator's stand-in for one)."""
    return bool(getattr(x, "__cuda_ndarray__", False))


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in x.shape)


def check_float_array(name: str, x: object, ndim: int, empty_ok: bool = False) -> np.dtype:
    """``x`` must be a NumPy or device array of ``ndim`` dimensions, none of them empty (but the
    first when ``empty_ok``), holding float16 or float32; a device array must also be C-contiguous
    (kernels index it as such and wrappers take reshaped views of it). Returns its dtype."""
    if not isinstance(x, np.ndarray) and not is_device_array(x):
        raise InvalidRequest(
            f"{name} must be a numpy array or a numba device array, got {type(x).__name__}"
        )
    shape = shape_of(x)
    if len(shape) != ndim:
        raise InvalidRequest(f"{name} must have {ndim} dimensions, got shape {shape}")
    if min(shape[1:] if empty_ok else shape) <= 0:
        raise InvalidRequest(f"{name} has an empty dimension: shape {shape}")
    dtype = np.dtype(x.dtype)
    if dtype not in FLOAT_DTYPES:
        raise InvalidRequest(f"{name} must be float16 or float32, got {dtype}")
    if is_device_array(x) and not x.is_c_contiguous():
        raise InvalidRequest(f"device array {name} must be C-contiguous")
    return dtype


def check_same(what: str, names: tuple[str, str], a: object, b: object) -> None:
    """Raise ``InvalidRequest`` unless ``a == b`` (two arrays' shapes, dtypes, ...)."""
    if a != b:
        raise InvalidRequest(f"{names[0]} and {names[1]} must have the same {what}: {a} != {b}")


def check_kv_caches(
    key_cache: object, value_cache: object, names: tuple[str, str] = ("key_cache", "value_cache")
) -> tuple[int, int, int, int]:
    """Both caches ``[num_blocks, block_size, num_kv_heads, head_dim]``, same shape and dtype.
    Returns that shape."""
    dtype = check_float_array(names[0], key_cache, 4)
    check_same("dtype", names, dtype, check_float_array(names[1], value_cache, 4))
    shape = shape_of(key_cache)
    check_same("shape", names, shape, shape_of(value_cache))
    return shape  # type: ignore[return-value]


def host_index_array(name: str, x: object, dtype: type, ndim: int | None) -> np.ndarray:
    """An index array as a host NumPy array of ``dtype`` (a copy, so later changes to the
    caller's array cannot undo the checks made on this one).

    Accepts nested lists, NumPy arrays of any integer dtype (converted after a range check) and
    device arrays (copied to the host; they must already have ``dtype``, since the kernels use
    them as they are). ``ndim=None`` accepts any number of dimensions."""
    want = np.dtype(dtype)
    if is_device_array(x):
        if np.dtype(x.dtype) != want:
            raise InvalidRequest(f"device array {name} must be {want}, got {np.dtype(x.dtype)}")
        host = x.copy_to_host()
    else:
        try:
            host = np.array(x)
        except ValueError as e:  # ragged nested lists
            raise InvalidRequest(f"{name} is not a rectangular array: {e}") from None
        if host.size == 0 and host.dtype.kind == "f":  # np.array([]) is float64
            host = host.astype(want)
    if host.dtype.kind not in "iu":
        raise InvalidRequest(f"{name} must hold integers, got dtype {host.dtype}")
    if ndim is not None and host.ndim != ndim:
        raise InvalidRequest(f"{name} must have {ndim} dimensions, got shape {host.shape}")
    info = np.iinfo(want)
    if host.size and (host.min() < info.min or host.max() > info.max):
        raise InvalidRequest(f"{name} holds values that do not fit {want}")
    return np.ascontiguousarray(host, dtype=want)


def check_block_tables(
    block_tables: np.ndarray, seq_lens: np.ndarray, num_blocks: int, block_size: int
) -> None:
    """Every sequence has at least one token, its table row covers all of its tokens, and every
    block id it uses (the first ``ceil(len / block_size)`` entries) names a block of the cache.
    Entries past those are never read and may hold anything (e.g. -1 as padding)."""
    num_seqs, max_blocks = block_tables.shape
    check_same("number of sequences", ("block_tables", "seq_lens"), num_seqs, len(seq_lens))
    for s, length in enumerate(seq_lens.tolist()):
        if length <= 0:
            raise InvalidRequest(
                f"sequence {s} has length {length}: decode attention needs at least one token"
            )
    needed = -(-seq_lens.astype(np.int64) // block_size)
    short = np.flatnonzero(needed > max_blocks)
    if short.size:
        s = int(short[0])
        raise InvalidBlockTable(
            f"sequence {s} has {int(seq_lens[s])} tokens, which need {int(needed[s])} blocks of "
            f"{block_size}, but block_tables has only {max_blocks} columns"
        )
    used = np.arange(max_blocks)[None, :] < needed[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bad.any():
        s, i = (int(v) for v in np.argwhere(bad)[0])
        raise InvalidBlockTable(
            f"block_tables[{s}, {i}] = {int(block_tables[s, i])} is not a block of the cache "
            f"(num_blocks = {num_blocks})"
        )


def check_slot_mapping(slot_mapping: np.ndarray, num_tokens: int, num_slots: int) -> None:
    """One slot per token; a slot is below ``num_slots`` (negative means skip the token), and no
    two tokens write the same slot (which one would win is undefined on a GPU)."""
    check_same("number of tokens", ("key", "slot_mapping"), num_tokens, len(slot_mapping))
    over = np.flatnonzero(slot_mapping >= num_slots)
    if over.size:
        i = int(over[0])
        raise InvalidBlockTable(
            f"slot_mapping[{i}] = {int(slot_mapping[i])} is outside the cache's {num_slots} slots"
        )
    written = slot_mapping[slot_mapping >= 0]
    values, counts = np.unique(written, return_counts=True)
    if (counts > 1).any():
        raise InvalidBlockTable(
            f"slot {int(values[counts > 1][0])} appears more than once in slot_mapping"
        )


def check_block_mapping(
    block_mapping: object, num_src_blocks: int, num_dst_blocks: int, same_cache: bool
) -> np.ndarray:
    """``(src, dst)`` pairs as an int64 ``[n, 2]`` host array (``n`` may be 0).

    Each src names a block of the source cache, each dst a block of the destination; a dst appears
    once (two copies into one block race). When source and destination are the same cache, no
    block may be both a dst and a src: the copies run in parallel, so a chain such as
    ``a -> b, b -> c`` would have no defined result.
    """
    pairs = host_index_array("block_mapping", block_mapping, np.int64, None)
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise InvalidRequest(f"block_mapping must be (src, dst) pairs, got shape {pairs.shape}")
    for col, what, limit in ((0, "source", num_src_blocks), (1, "destination", num_dst_blocks)):
        bad = np.flatnonzero((pairs[:, col] < 0) | (pairs[:, col] >= limit))
        if bad.size:
            i = int(bad[0])
            raise InvalidBlockTable(
                f"block_mapping[{i}] = {tuple(pairs[i].tolist())}: {what} block "
                f"{int(pairs[i, col])} is not a block of the {what} cache ({limit} blocks)"
            )
    values, counts = np.unique(pairs[:, 1], return_counts=True)
    if (counts > 1).any():
        raise InvalidBlockTable(
            f"destination block {int(values[counts > 1][0])} appears more than once in "
            "block_mapping"
        )
    if same_cache:
        both = np.intersect1d(pairs[:, 0], pairs[:, 1])
        if both.size:
            raise InvalidBlockTable(
                f"block {int(both[0])} is both a source and a destination in block_mapping; "
                "split the copies into rounds"
            )
    return pairs


def check_scalar(name: str, value: object, minimum: float | None = None) -> float:
    """A finite real number (not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidRequest(f"{name} must be a real number, got {value!r}")
    if not np.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InvalidRequest(f"{name} must be finite{bound}, got {value!r}")
    return float(value)


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An int (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequest(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise InvalidRequest(f"{name} must be >= {minimum}{upper}, got {value}")
    return int(value)


def to_device(x: Any) -> Any:
    """A device array with ``x``'s contents: ``x`` itself if it already is one."""
    return x if is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))
