"""Every kernel against its NumPy reference, and the references against dead-simple attention.

Runs in Numba's CUDA simulator (one Python thread per CUDA thread), so shapes are tiny: a few
sequences and heads, head_dim 4..16, thread blocks of 8..32 threads. Outputs are poisoned with
NaN before each run, so an element a kernel forgets to write fails the comparison.
Set MINIPAGED_GPU=1 to run the same tests on a real GPU.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from numba import cuda

from minipaged.kernels import (
    attention,
    cache_ops,
    choose_version,
    copy_blocks,
    paged_attention,
    paged_attention_naive,
    paged_attention_v1,
    paged_attention_v2,
    reshape_and_cache,
    swap_blocks,
)
from minipaged.kernels import reference as ref
from minipaged.lessons import under_test

# The code under test: the library's, or a student's file under `minipaged lesson check`.
reshape_and_cache = under_test("reshape_and_cache", reshape_and_cache)
copy_blocks = under_test("copy_blocks", copy_blocks)
paged_attention_v1 = under_test("paged_attention_v1", paged_attention_v1)
paged_attention_v2 = under_test("paged_attention_v2", paged_attention_v2)


@pytest.fixture(autouse=True, scope="module")
def quick_thread_switches():
    """The simulator's barriers wait for every Python thread of a block; a short GIL switch
    interval lets them meet quickly (several times faster), without changing any result."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def assert_close(out: np.ndarray, expected: np.ndarray, dtype: np.dtype) -> None:
    """float32 to 1e-5 and float16 to 1e-2, relative to the largest expected magnitude (outputs
    are averages of V rows, so single elements may be near 0)."""
    assert not np.isnan(out).any(), "an output element was never written"
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-2
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=tol, atol=tol * scale)


# --- a dead-simple oracle for the references -----------------------------------------------------


def dense_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float
) -> np.ndarray:
    """q ``[num_heads, head_dim]``; keys, values ``[len, num_kv_heads, head_dim]``. Loops only."""
    num_heads, head_dim = q.shape
    group = num_heads // keys.shape[1]
    out = np.zeros((num_heads, head_dim))
    for h in range(num_heads):
        scores = [scale * float(np.dot(q[h], keys[t, h // group])) for t in range(len(keys))]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        for t, w in enumerate(weights):
            out[h] += w / sum(weights) * values[t, h // group]
    return out


# --- drawing paged batches -----------------------------------------------------------------------


@dataclass
class Batch:
    query: np.ndarray
    key_cache: np.ndarray
    value_cache: np.ndarray
    block_tables: np.ndarray
    seq_lens: np.ndarray
    scale: float

    @property
    def args(self) -> tuple:
        return (
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.seq_lens,
            self.scale,
        )

    def expected(self) -> np.ndarray:
        """The reference in float64 (the query is widened so nothing is rounded to its dtype)."""
        q = self.query.astype(np.float64)
        return ref.paged_attention_ref(q, *self.args[1:])


@st.composite
def batches(draw, max_seqs: int = 3, max_len: int = 24, max_heads: int = 4) -> Batch:
    """Random sequences over a shuffled pool of physical blocks: GQA ratios 1/2/4, block sizes
    1..32, lengths that leave the last block partly filled, tables padded with -1 past each
    sequence's blocks, and (sometimes) blocks shared between sequences."""
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    group = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.integers(1, max(1, max_heads // group)))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    block_size = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32]))
    num_seqs = draw(st.integers(1, max_seqs))
    lens = draw(st.lists(st.integers(1, max_len), min_size=num_seqs, max_size=num_seqs))
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + draw(st.integers(0, 3))
    shared = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, num_blocks, sum(needed)) if shared else rng.permutation(num_blocks)
    tables = np.full((num_seqs, max(needed) + draw(st.integers(0, 2))), -1, dtype=np.int32)
    start = 0
    for s, n in enumerate(needed):
        tables[s, :n] = ids[start : start + n]
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return Batch(
        query=rng.standard_normal((num_seqs, kv_heads * group, head_dim)).astype(dtype),
        key_cache=rng.standard_normal(shape).astype(dtype),
        value_cache=rng.standard_normal(shape).astype(dtype),
        block_tables=tables,
        seq_lens=np.array(lens, dtype=np.int32),
        scale=draw(st.sampled_from([1 / math.sqrt(head_dim), 0.05, 2.0])),
    )


def run_version(version: str, b: Batch, on_device: bool, threads: int, partition: int):
    """Run one version with a NaN-poisoned output; return the output on the host."""
    out = np.full(b.query.shape, np.nan, dtype=b.query.dtype)
    args = b.args
    if on_device:
        args = tuple(cuda.to_device(x) for x in args[:5]) + (b.scale,)
        out = cuda.to_device(out)
    kw = {"out": out, "threads": threads}
    if version == "naive":
        result = paged_attention_naive(*args, **kw)
    elif version == "v1":
        result = paged_attention_v1(*args, **kw)
    elif version == "v2":
        result = paged_attention_v2(*args, partition_size=partition, **kw)
    else:
        result = paged_attention(*args, partition_size=partition, **kw)
    assert result is out
    return out.copy_to_host() if on_device else out


# --- the references ------------------------------------------------------------------------------


@settings(max_examples=60)
@given(batches(max_seqs=3, max_len=40, max_heads=8), st.integers(1, 12))
def test_references_match_dense_attention(b: Batch, partition: int) -> None:
    """paged_attention_ref and the two-phase v2 reference both equal dense attention over the
    gathered K/V of each sequence."""
    dense = np.stack(
        [
            dense_attention(
                b.query[s].astype(np.float64),
                ref.gather_kv(b.key_cache, b.block_tables[s], int(n)).astype(np.float64),
                ref.gather_kv(b.value_cache, b.block_tables[s], int(n)).astype(np.float64),
                b.scale,
            )
            for s, n in enumerate(b.seq_lens)
        ]
    )
    np.testing.assert_allclose(b.expected(), dense, rtol=1e-10, atol=1e-10)
    parts = ref.paged_attention_partitions_ref(*b.args, partition)
    merged = ref.reduce_partitions_ref(*parts, b.seq_lens, partition)
    np.testing.assert_allclose(merged, dense, rtol=1e-10, atol=1e-10)


def test_gather_kv_puts_tokens_in_order() -> None:
    cache = np.arange(5 * 2).reshape(5, 2, 1, 1)  # block b row r holds 2b + r
    assert ref.gather_kv(cache, np.array([3, 0, 4]), 5).ravel().tolist() == [6, 7, 0, 1, 8]


def test_layout_diagram_names_every_token_and_slot() -> None:
    text = ref.layout_diagram([7, 2, 9, -1], seq_len=10, block_size=4)
    assert "2 (tokens 8..9) -> 9" in text
    assert "block   9 tokens | t8  | t9  | --  | --" in text
    assert "slots | s36 | s37 | s38 | s39" in text
    assert all(f"t{t} " in text for t in range(10))


# --- attention kernels against the reference -----------------------------------------------------


@pytest.mark.parametrize("version", ["naive", "v1", "v2", "dispatch"])
@settings(max_examples=15)
@given(data=st.data())
def test_attention_matches_reference(version: str, data: st.DataObject) -> None:
    long = version in ("v2", "dispatch")
    b = data.draw(batches(max_seqs=2 if long else 3, max_len=16 if long else 24))
    head_dim = b.query.shape[2]
    threads = data.draw(st.sampled_from([t for t in (8, 16, 32) if t >= head_dim]), "threads")
    partition = data.draw(st.integers(3, 8), "partition")
    on_device = data.draw(st.booleans(), "on_device")
    out = run_version(version, b, on_device, threads, partition)
    assert out.dtype == b.query.dtype
    assert_close(out, b.expected(), b.query.dtype)


@pytest.mark.parametrize("version", ["naive", "v1", "v2"])
def test_huge_logits_stay_finite(version: str) -> None:
    """Logits near 1000 overflow exp() in float32 unless the maximum is subtracted first."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((3, 4, 1, 4)).astype(np.float32)
    b = Batch(
        query=np.ones((1, 2, 4), np.float32) * 30,
        key_cache=keys,
        value_cache=rng.standard_normal((3, 4, 1, 4)).astype(np.float32),
        block_tables=np.array([[2, 0, 1]], np.int32),
        seq_lens=np.array([11], np.int32),
        scale=10.0,
    )
    out = run_version(version, b, on_device=False, threads=8, partition=3)
    assert np.isfinite(out).all()
    assert_close(out, b.expected(), np.float32)


def test_v2_skips_partitions_past_a_short_sequence() -> None:
    """One sequence of 1 token beside one of 14: the short one has a single partition, and its
    empty partitions are never read by the reduction (their buffers hold garbage)."""
    rng = np.random.default_rng(2)
    b = Batch(
        query=rng.standard_normal((2, 2, 4)).astype(np.float32),
        key_cache=rng.standard_normal((6, 4, 2, 4)).astype(np.float32),
        value_cache=rng.standard_normal((6, 4, 2, 4)).astype(np.float32),
        block_tables=np.array([[5, -1, -1, -1], [0, 1, 2, 3]], np.int32),
        seq_lens=np.array([1, 14], np.int32),
        scale=0.5,
    )
    out = run_version("v2", b, on_device=True, threads=8, partition=3)
    assert_close(out, b.expected(), np.float32)


def test_choose_version() -> None:
    P = attention.PARTITION_SIZE
    assert choose_version(P, P) == "v1"  # one partition: nothing to split
    assert choose_version(P + 1, P) == "v2"  # two partitions: split the context
    assert choose_version(100, 8) == "v2"
    huge = attention.V1_MAX_CONTEXT + 1
    assert choose_version(huge, huge) == "v2"  # v1's logits would not fit in shared memory


def test_paged_attention_dispatches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(attention, "launch_v1", lambda a: calls.append("v1"))
    monkeypatch.setattr(attention, "launch_v2", lambda a, p: calls.append(f"v2/{p}"))
    b = Batch(
        query=np.zeros((1, 2, 4), np.float32),
        key_cache=np.zeros((4, 2, 1, 4), np.float32),
        value_cache=np.zeros((4, 2, 1, 4), np.float32),
        block_tables=np.array([[0, 1, 2, 3]], np.int32),
        seq_lens=np.array([7], np.int32),
        scale=1.0,
    )
    paged_attention(*b.args, partition_size=8)
    paged_attention(*b.args, partition_size=4)
    assert calls == ["v1", "v2/4"]


# --- cache kernels against their references ------------------------------------------------------


@st.composite
def caches(draw, layers: int | None = None):
    """``(key_caches, value_caches)`` stacked ``[layers, blocks, block_size, heads, dim]``."""
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    shape = (
        layers or draw(st.integers(1, 3)),
        draw(st.integers(1, 8)),
        draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32])),
        draw(st.integers(1, 2)),
        draw(st.sampled_from([1, 4, 8])),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


@settings(max_examples=25)
@given(caches(layers=1), st.data())
def test_reshape_and_cache_matches_reference(kv: tuple, data: st.DataObject) -> None:
    """Caches start as NaN; every written slot must equal the reference's and every other slot
    must still be NaN."""
    key_cache, value_cache = np.full_like(kv[0][0], np.nan), np.full_like(kv[1][0], np.nan)
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    slots = data.draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=12))
    slots += [-1] * data.draw(st.integers(0, 3))  # padding tokens
    slots = data.draw(st.permutations(slots))
    rng = np.random.default_rng(len(slots))
    shape = (len(slots), *key_cache.shape[2:])
    key = rng.standard_normal(shape).astype(key_cache.dtype)
    value = rng.standard_normal(shape).astype(key_cache.dtype)
    expected_k, expected_v = key_cache.copy(), value_cache.copy()
    ref.reshape_and_cache_ref(key, value, expected_k, expected_v, np.array(slots))
    threads = data.draw(st.sampled_from([8, 32]), "threads")
    if data.draw(st.booleans(), "on_device"):
        d_k, d_v = cuda.to_device(key_cache), cuda.to_device(value_cache)
        reshape_and_cache(
            cuda.to_device(key),
            cuda.to_device(value),
            d_k,
            d_v,
            cuda.to_device(np.array(slots, np.int64)),
            threads=threads,
        )
        key_cache, value_cache = d_k.copy_to_host(), d_v.copy_to_host()
    else:
        reshape_and_cache(key, value, key_cache, value_cache, slots, threads=threads)
    np.testing.assert_array_equal(key_cache, expected_k)
    np.testing.assert_array_equal(value_cache, expected_v)


@settings(max_examples=25)
@given(caches(), st.data())
def test_copy_blocks_matches_reference(kv: tuple, data: st.DataObject) -> None:
    """All four ways to pass caches (stacked or per-layer lists, host or device) give the
    reference's result in every layer."""
    num_blocks = kv[0].shape[1]
    blocks = data.draw(st.permutations(range(num_blocks)))
    n = data.draw(st.integers(0, num_blocks // 2))
    srcs = data.draw(st.lists(st.sampled_from(blocks[n:] or [0]), min_size=n, max_size=n))
    mapping = list(zip(srcs, blocks[:n], strict=True))  # dsts distinct and never sources
    expected_k, expected_v = list(kv[0].copy()), list(kv[1].copy())
    ref.copy_blocks_ref(expected_k, expected_v, np.array(mapping))
    form = data.draw(st.sampled_from(["stacked", "list", "device stacked", "device list"]))
    keys, values = kv[0].copy(), kv[1].copy()
    if form == "stacked":
        copy_blocks(keys, values, mapping, threads=8)
    elif form == "list":
        copy_blocks(list(keys), list(values), mapping, threads=8)  # views: written through
    elif form == "device stacked":
        d_k, d_v = cuda.to_device(keys), cuda.to_device(values)
        copy_blocks(d_k, d_v, cuda.to_device(np.array(mapping, np.int64).reshape(-1, 2)))
        keys, values = d_k.copy_to_host(), d_v.copy_to_host()
    else:
        d_k = [cuda.to_device(layer) for layer in keys]
        d_v = [cuda.to_device(layer) for layer in values]
        copy_blocks(d_k, d_v, mapping, threads=8)
        keys = np.stack([d.copy_to_host() for d in d_k])
        values = np.stack([d.copy_to_host() for d in d_v])
    np.testing.assert_array_equal(keys, np.stack(expected_k))
    np.testing.assert_array_equal(values, np.stack(expected_v))


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_copy_blocks_kernel_takes_any_number_of_pieces(pieces: int) -> None:
    """The launch cuts each block copy into pieces of two words per thread; the kernel itself
    copies a whole block with any number of pieces, the last one short (one piece is how
    ``scripts/gpu_check.py`` times it)."""
    rng = np.random.default_rng(pieces)
    keys = rng.standard_normal((2, 4, 37)).astype(np.float32)  # 37: no piece divides it evenly
    values = rng.standard_normal((2, 4, 37)).astype(np.float32)
    mapping = np.array([[3, 0], [1, 2]], np.int64)
    expected_k, expected_v = list(keys.copy()), list(values.copy())
    ref.copy_blocks_ref(expected_k, expected_v, mapping)
    d_k, d_v = cuda.to_device(keys), cuda.to_device(values)
    cache_ops.copy_blocks_kernel[(2, 2, pieces), 8](d_k, d_v, cuda.to_device(mapping))
    np.testing.assert_array_equal(d_k.copy_to_host(), np.stack(expected_k))
    np.testing.assert_array_equal(d_v.copy_to_host(), np.stack(expected_v))


@settings(max_examples=30)
@given(caches(layers=1), st.integers(1, 8), st.data())
def test_swap_blocks_matches_reference(kv: tuple, dst_blocks: int, data: st.DataObject) -> None:
    src = kv[0][0]
    dst = np.full((dst_blocks, *src.shape[1:]), np.nan, dtype=src.dtype)
    n = data.draw(st.integers(0, dst_blocks))
    dsts = data.draw(st.permutations(range(dst_blocks)))[:n]
    srcs = data.draw(st.lists(st.integers(0, src.shape[0] - 1), min_size=n, max_size=n))
    if data.draw(st.booleans(), "runs"):  # consecutive pairs become one copy
        srcs = sorted(srcs)
    mapping = list(zip(srcs, dsts, strict=True))
    expected = dst.copy()
    ref.swap_blocks_ref(src, expected, np.array(mapping))
    way = data.draw(st.sampled_from(["d2h", "h2d", "d2d", "h2h"]))
    pinned = cuda.pinned_array(dst.shape, dtype=dst.dtype)
    pinned[...] = dst
    # 0: always through a staging buffer; 8: one DMA per run for these small mappings
    direct_runs = data.draw(st.sampled_from([0, 8]), "direct_runs")
    with patch.object(cache_ops, "DIRECT_RUNS", direct_runs):
        result = run_swap(way, src, dst, pinned, mapping)
    np.testing.assert_array_equal(result, expected)


def run_swap(way: str, src: np.ndarray, dst: np.ndarray, pinned: np.ndarray, mapping: list):
    """Swap from ``src`` into ``dst`` (or its pinned copy) the ``way`` asked; the result on the
    host."""
    if way == "d2h":
        swap_blocks(cuda.to_device(src), pinned, mapping)
        result = pinned
    elif way == "h2d":
        d_dst = cuda.to_device(dst)
        swap_blocks(src, d_dst, mapping)
        result = d_dst.copy_to_host()
    elif way == "d2d":
        d_dst = cuda.to_device(dst)
        swap_blocks(cuda.to_device(src), d_dst, mapping)
        result = d_dst.copy_to_host()
    else:
        swap_blocks(src, dst, mapping)
        result = dst
    return result


def test_swap_runs_coalesce_consecutive_pairs() -> None:
    pairs = np.array([[4, 1], [0, 5], [2, 7], [1, 6], [3, 9]])
    assert cache_ops._runs(pairs) == [(0, 5, 3), (3, 9, 1), (4, 1, 1)]


# --- a KV cache driven like a serving engine drives it -------------------------------------------


class KVCacheMachine(RuleBasedStateMachine):
    """A device KV cache (plus a pinned host cache for swapping) against a NumPy model of it.

    Rules write new tokens (``reshape_and_cache``, with padding slots), fork sequences
    (``copy_blocks``), swap sequences out to the host and back (``swap_blocks``), free them and
    run attention. The invariants compare the WHOLE device and host caches with the model, bit
    for bit (never-written slots are NaN on both sides), after every step, and check the block
    bookkeeping.
    """

    @initialize(
        dtype=st.sampled_from([np.float32, np.float16]),
        block_size=st.sampled_from([1, 2, 3, 4]),
        kv_heads=st.integers(1, 2),
    )
    def setup(self, dtype: type, block_size: int, kv_heads: int) -> None:
        self.block_size, self.kv_heads, self.head_dim = block_size, kv_heads, 4
        shape = (10, block_size, kv_heads, self.head_dim)
        self.model_k = np.full(shape, np.nan, dtype=dtype)
        self.model_v = self.model_k.copy()
        self.model_host = np.full((2, 6, *shape[1:]), np.nan, dtype=dtype)  # [k|v, blocks, ...]
        self.key_cache = cuda.to_device(self.model_k)
        self.value_cache = cuda.to_device(self.model_v)
        self.host_k = cuda.pinned_array(self.model_host.shape[1:], dtype=dtype)
        self.host_v = cuda.pinned_array(self.model_host.shape[1:], dtype=dtype)
        self.host_k[...] = np.nan
        self.host_v[...] = np.nan
        self.free = list(range(10))
        self.host_free = list(range(6))
        self.seqs: dict[int, list[int]] = {}  # resident: block table
        self.lens: dict[int, int] = {}
        self.swapped: dict[int, list[int]] = {}  # swapped out: host block table
        self.next_id = 0
        self.rng = np.random.default_rng(0)

    def blocks_for(self, n: int) -> int:
        return -(-n // self.block_size)

    @rule(n=st.integers(1, 5), new=st.booleans(), pad=st.integers(0, 2), pick=st.integers(0, 99))
    def write_tokens(self, n: int, new: bool, pad: int, pick: int) -> None:
        if new or not self.seqs:
            seq, length = self.next_id, 0
        else:
            seq = sorted(self.seqs)[pick % len(self.seqs)]
            length = self.lens[seq]
        table = list(self.seqs.get(seq, []))
        extra = self.blocks_for(length + n) - len(table)
        if extra > len(self.free):
            return
        table += [self.free.pop() for _ in range(extra)]
        bs = self.block_size
        slots = [table[t // bs] * bs + t % bs for t in range(length, length + n)]
        slots = list(self.rng.permutation(slots + [-1] * pad))
        shape = (len(slots), self.kv_heads, self.head_dim)
        key = self.rng.standard_normal(shape).astype(self.model_k.dtype)
        value = self.rng.standard_normal(shape).astype(self.model_k.dtype)
        reshape_and_cache(
            cuda.to_device(key),
            cuda.to_device(value),
            self.key_cache,
            self.value_cache,
            np.array(slots, np.int64),
            threads=8,
        )
        ref.reshape_and_cache_ref(key, value, self.model_k, self.model_v, np.array(slots))
        self.seqs[seq], self.lens[seq] = table, length + n
        self.next_id = max(self.next_id, seq + 1)

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 99))
    def fork(self, pick: int) -> None:
        parent = sorted(self.seqs)[pick % len(self.seqs)]
        table = self.seqs[parent]
        if len(table) > len(self.free):
            return
        child = [self.free.pop() for _ in table]
        mapping = list(zip(table, child, strict=True))
        copy_blocks([self.key_cache], [self.value_cache], mapping, threads=8)
        ref.copy_blocks_ref([self.model_k], [self.model_v], np.array(mapping))
        self.seqs[self.next_id], self.lens[self.next_id] = child, self.lens[parent]
        self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 99))
    def swap_out(self, pick: int) -> None:
        seq = sorted(self.seqs)[pick % len(self.seqs)]
        table = self.seqs[seq]
        if len(table) > len(self.host_free):
            return
        host_table = [self.host_free.pop() for _ in table]
        mapping = list(zip(table, host_table, strict=True))
        swap_blocks(self.key_cache, self.host_k, mapping)
        swap_blocks(self.value_cache, self.host_v, mapping)
        ref.swap_blocks_ref(self.model_k, self.model_host[0], np.array(mapping))
        ref.swap_blocks_ref(self.model_v, self.model_host[1], np.array(mapping))
        self.free += self.seqs.pop(seq)
        self.swapped[seq] = host_table

    @precondition(lambda self: self.swapped)
    @rule(pick=st.integers(0, 99))
    def swap_in(self, pick: int) -> None:
        seq = sorted(self.swapped)[pick % len(self.swapped)]
        host_table = self.swapped[seq]
        if len(host_table) > len(self.free):
            return
        table = [self.free.pop() for _ in host_table]
        mapping = list(zip(host_table, table, strict=True))
        swap_blocks(self.host_k, self.key_cache, mapping)
        swap_blocks(self.host_v, self.value_cache, mapping)
        ref.swap_blocks_ref(self.model_host[0], self.model_k, np.array(mapping))
        ref.swap_blocks_ref(self.model_host[1], self.model_v, np.array(mapping))
        self.host_free += self.swapped.pop(seq)
        self.seqs[seq] = table

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 99))
    def free_sequence(self, pick: int) -> None:
        seq = sorted(self.seqs)[pick % len(self.seqs)]
        self.free += self.seqs.pop(seq)
        del self.lens[seq]

    @precondition(lambda self: self.seqs)
    @rule(version=st.sampled_from(["v1", "v2"]))
    def attend(self, version: str) -> None:
        ids = sorted(self.seqs)[:2]
        width = max(len(self.seqs[s]) for s in ids)
        tables = np.array([self.seqs[s] + [-1] * (width - len(self.seqs[s])) for s in ids])
        lens = np.array([self.lens[s] for s in ids], dtype=np.int32)
        query = self.rng.standard_normal((len(ids), self.kv_heads, self.head_dim))
        query = query.astype(self.model_k.dtype)
        args = (query, self.key_cache, self.value_cache, tables.astype(np.int32), lens, 0.5)
        if version == "v1":
            out = paged_attention_v1(*args, threads=8)
        else:
            out = paged_attention_v2(*args, partition_size=3, threads=8)
        model_args = (query.astype(np.float64), self.model_k, self.model_v, tables, lens, 0.5)
        assert_close(out, ref.paged_attention_ref(*model_args), query.dtype)

    @invariant()
    def device_cache_matches_model(self) -> None:
        np.testing.assert_array_equal(self.key_cache.copy_to_host(), self.model_k)
        np.testing.assert_array_equal(self.value_cache.copy_to_host(), self.model_v)

    @invariant()
    def host_cache_matches_model(self) -> None:
        np.testing.assert_array_equal(self.host_k, self.model_host[0])
        np.testing.assert_array_equal(self.host_v, self.model_host[1])

    @invariant()
    def every_block_has_one_owner(self) -> None:
        used = [b for table in self.seqs.values() for b in table]
        assert sorted(used + self.free) == list(range(10))
        host_used = [b for table in self.swapped.values() for b in table]
        assert sorted(host_used + self.host_free) == list(range(6))
        assert all(len(self.seqs[s]) == self.blocks_for(self.lens[s]) for s in self.seqs)


KVCacheMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=20)
TestKVCache = KVCacheMachine.TestCase
