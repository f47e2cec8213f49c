"""Paged attention version 5 (tensor cores) against the NumPy reference, in the CUDA simulator
(MINIPAGED_GPU=1 runs the same tests on a GPU, where ``_mma`` is the real ``mma.sync``).

First the product itself: the fragment maps place every value of A, B and C exactly once, and
one warp-wide ``_mma`` over fragments laid out by those maps gives ``A @ B + C``. On a GPU that
checks the maps against the hardware; in the simulator, the emulation against NumPy. Then the
kernel on shapes drawn by Hypothesis: several thread blocks, partitions and ring refills, a
partly filled last block whose unused slots hold NaN, and 1 to 8 query heads per kv head.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda, float32, uint32
from test_attention_v4 import (  # noqa: F401
    close,
    expected,
    quick_thread_switches,
    random_args,
    random_tables,
)

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention, attention_v4, attention_v5
from minipaged.kernels.attention_v5 import (
    WARP,
    fragment_a,
    fragment_b,
    fragment_c,
    paged_attention_v5,
    supports,
)


def test_fragment_maps_place_every_value_once() -> None:
    for fragment, rows, cols, per_lane in ((fragment_a, 16, 16, 8), (fragment_b, 16, 8, 4),
                                           (fragment_c, 16, 8, 4)):  # fmt: skip
        seen = sorted(fragment(lane, i) for lane in range(WARP) for i in range(per_lane))
        assert seen == [(r, c) for r in range(rows) for c in range(cols)]


@cuda.jit
def mma_kernel(a_regs, b_regs, c, d):
    lane = cuda.threadIdx.x
    d[lane, 0], d[lane, 1], d[lane, 2], d[lane, 3] = attention_v5._mma(
        a_regs[lane, 0],
        a_regs[lane, 1],
        a_regs[lane, 2],
        a_regs[lane, 3],
        b_regs[lane, 0],
        b_regs[lane, 1],
        float32(c[lane, 0]),
        float32(c[lane, 1]),
        float32(c[lane, 2]),
        float32(c[lane, 3]),
        cuda.shared.array(0, uint32),
    )


def lane_values(matrix: np.ndarray, fragment, per_lane: int) -> np.ndarray:  # noqa: ANN001
    """``matrix``'s values as the lanes hold them: ``[lane, i]``."""
    return np.array([[matrix[fragment(lane, i)] for i in range(per_lane)] for lane in range(WARP)])


def test_mma_multiplies_fragments_laid_out_by_the_maps() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b = rng.standard_normal((16, 8)).astype(np.float16)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    a_regs = lane_values(a, fragment_a, 8).view(np.uint32)  # two halves a register, low first
    b_regs = lane_values(b, fragment_b, 4).view(np.uint32)
    d_lanes = cuda.to_device(np.full((WARP, 4), np.nan, np.float32))
    mma_kernel[1, WARP, 0, 4 * 6 * WARP](a_regs, b_regs, lane_values(c, fragment_c, 4), d_lanes)
    d = np.empty((16, 8))
    for lane, values in enumerate(d_lanes.copy_to_host()):
        for i, x in enumerate(values):
            d[fragment_c(lane, i)] = x
    want = a.astype(np.float64) @ b.astype(np.float64) + c
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)


ONE_WARP = st.just(1)


def nan_past_end_args(
    rng: np.random.Generator, lens: list[int], group: int, kv_heads: int, head_dim: int,
    block_size: int,
) -> tuple:  # fmt: skip
    """(query, key_cache, value_cache, tables, lens) of float16 for sequences of ``lens``
    tokens on shuffled blocks, every sequence's last block holding NaN past its end."""
    tables, num_blocks = random_tables(rng, lens, block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = rng.standard_normal(shape).astype(np.float16)
    value_cache = rng.standard_normal(shape).astype(np.float16)
    for s, n in enumerate(lens):
        last = tables[s, (n - 1) // block_size]
        key_cache[last, (n - 1) % block_size + 1 :] = np.nan
        value_cache[last, (n - 1) % block_size + 1 :] = np.nan
    query = rng.standard_normal((len(lens), group * kv_heads, head_dim)).astype(np.float16)
    return query, key_cache, value_cache, tables, np.array(lens, np.int32)


@st.composite
def cases(draw, warps=ONE_WARP):  # noqa: ANN001, ANN201
    """(args, partition_size, stages, merge_threads, warps) for one launch version 5 supports;
    the slots of every sequence's last block past its end hold NaN (a kernel must never let
    them reach a sum)."""
    head_dim = draw(st.sampled_from([16, 32]))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    block_size = draw(st.sampled_from([16, 32]))
    w = draw(warps)
    partition = block_size * w * draw(st.integers(1, 2))
    stages = draw(st.integers(2, 4))
    lens = draw(st.lists(st.integers(1, 72), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    args = nan_past_end_args(rng, lens, group, kv_heads, head_dim, block_size)
    args = (*args, draw(st.sampled_from([head_dim**-0.5, 2.0])))
    merge = draw(st.sampled_from([None, attention_v5.IN_KERNEL, 16, 32, 64]))
    return args, partition, stages, merge, w


def check_v5(case: tuple) -> None:
    """Every way to merge gives the reference. Merging in the kernel is launched twice on the
    same workspace: the last block of each group set its counter back to zero, so the second
    launch counts from zero again (else no block would merge, and the NaN would stay)."""
    args, partition, stages, merge_threads, warps = case
    a = attention.prepare_attention(
        *args, out=cuda.to_device(np.full(args[0].shape, np.nan, args[0].dtype))
    )
    attention_v5.launch_v5(a, partition, stages, merge_threads, warps)
    close(a.out.copy_to_host(), expected(args), np.float16)
    if merge_threads == attention_v5.IN_KERNEL:
        kv_heads = args[1].shape[2]
        assert (a.counters(kv_heads).copy_to_host() == 0).all()
        a.out.copy_to_device(np.full(args[0].shape, np.nan, args[0].dtype))
        attention_v5.launch_v5(a, partition, stages, merge_threads, warps)
        close(a.out.copy_to_host(), expected(args), np.float16)


@settings(max_examples=15, deadline=None)
@given(cases())
def test_v5_matches_reference(case: tuple) -> None:
    check_v5(case)


@settings(max_examples=8, deadline=None)
@given(cases(st.sampled_from([2, 4])))
def test_v5_with_several_warps_a_block_matches_reference(case: tuple) -> None:
    """A partition cut into runs of 2 or 4 warps, each walking its own ring, and combined in
    shared memory: short sequences leave the last warps' runs empty (weight 0), a partly
    filled last block falls inside any run, and a group merged in the kernel has every
    thread of the block merging."""
    check_v5(case)


@pytest.mark.parametrize("warps", [1, 2])
def test_merging_in_the_kernel_a_sequence_of_one_partition_writes_its_output_alone(
    warps: int,
) -> None:
    """A sequence that fits in one partition has nothing to merge: its block writes the output
    itself and leaves its partial results and its counter alone (NaN and 0 here), while a
    longer sequence of the same batch still merges its partitions in the kernel."""
    rng = np.random.default_rng(11)
    partition, lens = 32 * warps, [20, 3 * 32 * warps - 5]
    args = random_args(rng, lens, 2, 16, 0.25)
    nan_out = cuda.to_device(np.full((2, 2, 16), np.nan, np.float16))
    a = attention.prepare_attention(*args, out=nan_out)
    for buffer in a.workspace(partition):
        buffer.copy_to_device(np.full(buffer.shape, np.nan, np.float32))
    attention_v5.launch_v5(a, partition, 2, attention_v5.IN_KERNEL, warps)
    close(a.out.copy_to_host(), expected(args), np.float16)
    partial_out, max_logits, exp_sums = (x.copy_to_host() for x in a.workspace(partition))
    assert np.isnan(partial_out[0]).all() and np.isnan(max_logits[0]).all()
    assert np.isfinite(partial_out[1]).all() and np.isfinite(exp_sums[1]).all()
    assert (a.counters(1).copy_to_host() == 0).all()


def test_merging_in_the_kernel_refuses_more_partitions_than_its_scratch_holds() -> None:
    """2 floats a partition and head in the first warp's spent ring, logits and red: for 2
    heads, 16-dimension rows, 16-token partitions and 2 buffers that is 480 floats, 120
    partitions, and a context of 121 x 16 tokens needs 121. Refused before any launch: the
    output is untouched; twice as long partitions (61) are fine."""
    room = attention_v5.merge_scratch_floats(2, 16, 16, 16, 2)
    assert room == 2 * 2 * 16 * (16 // 4 + attention_v5.PAD_WORDS) + 2 * (16 + WARP) == 480
    blocks = room // 4 + 1
    rng = np.random.default_rng(2)
    shape = (blocks, 16, 1, 16)
    args = (
        rng.standard_normal((1, 2, 16)).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        np.arange(blocks, dtype=np.int32)[None],
        np.array([blocks * 16], np.int32),
        0.25,
    )
    a = attention.prepare_attention(*args, out=cuda.to_device(np.full((1, 2, 16), 7, np.float16)))
    with pytest.raises(InvalidRequest, match="at most 120 partitions"):
        attention_v5.launch_v5(a, 16, 2, attention_v5.IN_KERNEL)
    assert (a.out.copy_to_host() == 7).all()
    attention_v5.launch_v5(a, 32, 2, attention_v5.IN_KERNEL)
    close(a.out.copy_to_host(), expected(args), np.float16)


def test_shared_memory_granted_to_a_kernel_only_rises() -> None:
    """On a GPU more than 48 KB of shared memory a block needs the driver's permission, which a
    smaller grant later lowers: the same compiled kernel launched with 111 KB, then 86 KB,
    then 111 KB again must still launch, and right (in the simulator nothing is asked)."""
    rng = np.random.default_rng(12)
    args = random_args(rng, [40], 4, 64, 0.125)
    a = attention.prepare_attention(*args)
    for partition in (2048, 512, 2048):
        assert attention_v5.shared_bytes(4, 64, 16, partition, 4, 8) > 80_000
        a.out.copy_to_device(np.full((1, 4, 64), np.nan, np.float16))
        attention_v5.launch_v5(a, partition, 4, attention_v5.IN_KERNEL, 8)
        close(a.out.copy_to_host(), expected(args), np.float16)


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(1, 400), min_size=1, max_size=2),
    head_dim=st.sampled_from([4, 8, 16]),
    threads=st.sampled_from([4, 8, 16, 32, 64]),
    splits=st.sampled_from([1, 2, 4]),
    loads=st.sampled_from([2, attention_v5.MERGE_LOADS]),
    seed=st.integers(0, 2**32 - 1),
)
def test_merge_partitions_matches_the_formula(
    lens: list[int], head_dim: int, threads: int, splits: int, loads: int, seed: int
) -> None:
    """``out = sum_p w_p o_p / sum_p w_p`` with ``w_p = l_p exp(m_p - max_p m_p)``, over the
    partitions each sequence has (up to 50 of 8 tokens: with 2 ``loads``, many rounds of them,
    the sums rescaled as the maximum grows, and a partial last round); what lies past them in
    the workspace is NaN and must not be read. ``splits`` blocks share each head's dimensions;
    where every thread's partitions fit its registers, the ``direct`` form merges them."""
    rng = np.random.default_rng(seed)
    partition, heads = 8, 2
    parts = -(-max(lens) // partition)
    partial = rng.standard_normal((len(lens), heads, parts, head_dim)).astype(np.float32)
    logits = (3 * rng.standard_normal((len(lens), heads, parts))).astype(np.float32)
    sums = rng.uniform(0.5, 8, (len(lens), heads, parts)).astype(np.float32)
    want = np.empty((len(lens), heads, head_dim))
    for s, n in enumerate(lens):
        used = -(-n // partition)
        for array in (partial, logits, sums):
            array[s, :, used:] = np.nan
        w = sums[s, :, :used] * np.exp(
            logits[s, :, :used] - logits[s, :, :used].max(1, keepdims=True)
        )
        want[s] = (w[:, :, None] * partial[s, :, :used]).sum(1) / w.sum(1)[:, None]
    out = cuda.to_device(np.full((len(lens), heads, head_dim), np.nan, np.float32))
    merge_args = (out, cuda.to_device(partial), cuda.to_device(logits), cuda.to_device(sums))
    shared = attention_v5.merge_shared_bytes(threads, head_dim // splits)
    dims = head_dim // splits
    direct = threads >= dims and parts <= loads * (threads // dims)  # its registers suffice
    kernel = attention_v5.make_merge_kernel(loads, None, direct)
    kernel[(heads, len(lens), splits), threads, 0, shared](
        *merge_args, cuda.to_device(np.array(lens, np.int32)), partition
    )
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-5, atol=1e-5)


def small_args(block_size: int = 16, head_dim: int = 16) -> tuple:
    rng = np.random.default_rng(5)
    shape = (3, block_size, 1, head_dim)
    return (
        rng.standard_normal((1, 4, head_dim)).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        np.array([[2, 0]], np.int32),
        np.array([2 * block_size - 3], np.int32),
        0.25,
    )


def test_v5_wrapper_takes_and_returns_host_arrays() -> None:
    args = small_args()
    out = paged_attention_v5(*args, partition_size=16)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    close(out, expected(args), np.float16)


def test_supports_names_the_reason() -> None:
    assert supports(np.float16, 32, 8, 128, 16) is None
    assert supports(np.float16, 32, 32, 128, 16) is None
    assert supports(np.float16, 64, 8, 128, 32) is None
    assert "float32" in supports(np.float32, 32, 8, 128, 16)
    assert "at most 8" in supports(np.float16, 32, 2, 128, 16)
    assert "head_dim = 72" in supports(np.float16, 8, 8, 72, 16)
    assert "block_size = 8" in supports(np.float16, 8, 8, 128, 8)
    assert "multiple of block_size" in supports(np.float16, 8, 8, 128, 16, partition_size=40)
    assert "at least 2 buffers" in supports(np.float16, 8, 8, 128, 16, stages=1)
    assert "shared memory" in supports(np.float16, 64, 8, 256, 32, partition_size=1024)
    # several warps a block may ask for more than 48 KB (8 x 22 KB here), up to what an SM has
    assert supports(np.float16, 32, 8, 128, 16, 2048, 4, warps=8) is None
    assert "more than 232448" in supports(np.float16, 32, 8, 128, 16, 4096, 8, warps=16)
    assert "multiple of 2 x block_size = 32" in supports(np.float16, 8, 8, 128, 16, 48, warps=2)
    assert "1 to 16 warps" in supports(np.float16, 8, 8, 128, 16, 512, warps=32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"partition_size": 24}, "multiple of block_size"),
        ({"stages": 1}, "at least 2 buffers"),
        ({"partition_size": 0}, "partition_size"),
        ({"merge_threads": 48}, "power of two"),
        ({"warps": 0}, "warps must be >= 1"),
        ({"partition_size": 16, "warps": 2}, "multiple of 2 x block_size"),
    ],
)
def test_v5_refuses_bad_launch_settings_and_writes_nothing(kwargs: dict, message: str) -> None:
    args = small_args()
    out = np.full(args[0].shape, 7.0, np.float16)
    with pytest.raises(InvalidRequest, match=message):
        paged_attention_v5(*args, out=out, **kwargs)
    assert (out == 7.0).all()


def as_float32(args: tuple) -> tuple:
    return tuple(x.astype(np.float32) for x in args[:3]) + args[3:]


def test_v5_refuses_float32() -> None:
    with pytest.raises(InvalidRequest, match="float16"):
        paged_attention_v5(*as_float32(small_args()), partition_size=16)


def test_dispatch_prefers_v5_for_grouped_query_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(attention_v5, "launch_v5", lambda a, *how: calls.append(f"v5/{how}"))
    monkeypatch.setattr(attention_v4, "launch_v4", lambda a, p: calls.append(f"v4/{p}"))
    args = small_args()  # 4 query heads over 1 kv head, float16, blocks of 16
    attention.paged_attention(*args, partition_size=16)
    attention.paged_attention(*args)  # a tiny batch: v5's small-grid launch
    attention.paged_attention(*args, partition_size=24)  # not whole blocks: v1/v2
    attention.paged_attention(*small_args(block_size=8), partition_size=16)  # blocks of 8: v4
    attention.paged_attention(*as_float32(args), partition_size=16)  # float32: v4
    one_head_each = (args[0][:, :1], *args[1:])  # multi-head attention
    attention.paged_attention(*one_head_each, partition_size=16)  # a given partition: v4
    attention.paged_attention(*one_head_each)  # a small batch: v5's small-grid launch
    small4, small1 = (attention_v5.choose_launch(1, 1, 2 * 16 - 3, 16, g, 16) for g in (4, 1))
    assert calls == ["v5/(16,)", f"v5/{small4}", "v4/16", "v4/16", "v4/16", f"v5/{small1}"]
    # head_dim 32: too narrow for version 6's 16-byte pieces of V
    assert attention.fast_version(np.float16, 32, 8, 32, 16, small_grid=True) == "v5"
    assert attention.fast_version(np.float16, 32, 32, 128, 8) == "v4"
    assert attention.fast_version(np.float16, 32, 32, 32, 16, small_grid=True) == "v5"
    assert attention.fast_version(np.float16, 32, 32, 32, 16) == "v4"


def test_choose_launch_takes_blocks_of_several_warps_and_one_partition_up_to_4096() -> None:
    """The bench's batches as measured (docs/benchmarks.md): 8 warps of 512 tokens, so up to
    4,096 tokens a sequence is one partition; 4 warps up to 2,048 tokens, with 3 buffers where
    that fits 3 blocks on an SM instead of 2; runs halved to 256 tokens when the grid would
    leave more than half the SMs idle; everything merged in the kernel."""
    choose, inside = attention_v5.choose_launch, attention_v5.IN_KERNEL
    assert not attention_v5.small_grid(64, 8, 4096)  # 4,096 blocks of 512 tokens
    assert attention_v5.small_grid(8, 32, 2048)  # 1,024
    assert choose(64, 8, 4096, 16, 4, 128) == (4096, 4, inside, 8)
    assert choose(32, 8, 8192, 16, 4, 128) == (4096, 4, inside, 8)  # 2 partitions
    assert choose(128, 8, 2048, 16, 4, 128) == (2048, 4, inside, 4)
    assert choose(256, 8, 1024, 16, 4, 128) == (1024, 3, inside, 4)  # 3 blocks an SM, not 2
    assert choose(1, 8, 32768, 16, 4, 128) == (2048, 4, inside, 8)  # 128 blocks, not 64
    assert choose(1, 32, 32768, 16, 1, 128) == (4096, 4, inside, 8)  # 256 blocks already
    # short contexts: no more warps than runs of 256 tokens, one partition
    assert choose(4, 8, 300, 16, 4, 128) == (320, 3, inside, 2)
    assert choose(1, 1, 29, 16, 4, 16) == (32, 4, inside, 1)
    # 8 warps of 8 heads of 256 dimensions need more shared memory than a block may have: 4
    assert choose(8, 8, 16384, 16, 8, 256) == (2048, 4, inside, 4)
    # more partitions than merging in the kernel has room for (2 floats a partition and head,
    # 5,120 here: 320 partitions of 4,096 tokens): the merge kernel
    assert attention_v5.merge_scratch_floats(8, 16, 16, 4096, 4, 8) == 5120
    assert choose(1, 1, 320 * 4096, 16, 8, 16) == (4096, 4, inside, 8)
    assert choose(1, 1, 320 * 4096 + 1, 16, 8, 16) == (4096, 4, attention_v5.MERGE_THREADS, 8)
    # blocks of 512 tokens: not even one warp's ring fits, so the defaults, which launch_v5 refuses
    assert choose(1, 8, 32768, 512, 4, 128) == (512, attention_v5.STAGES, None, 1)
    assert attention_v5.blocks_per_sm(21 * 1024) == 10  # shared memory: 10 one-warp blocks
    assert attention_v5.blocks_per_sm(1024, warps=16) == 4  # threads: 4 blocks of 512


def test_merge_splits_only_small_grids() -> None:
    assert attention_v5.merge_splits(128, 32) == 4  # 1 x 32k, 32 heads: 128 blocks
    assert attention_v5.merge_splits(128, 64) == 2
    assert attention_v5.merge_splits(128, 256) == 1  # enough blocks already
    assert attention_v5.merge_splits(64, 8) == 2  # no fewer than 32 dimensions a block
    assert attention_v5.merge_splits(80, 8) == 2  # 40 dimensions a block; 20 would be too few
    assert attention_v5.merge_splits(48, 8) == 1
    args = small_args()
    a = attention.prepare_attention(*args)
    attention_v5.launch_v5(a, 16, 2, None)
    with pytest.raises(InvalidRequest, match="does not divide"):
        attention_v5.merge_partitions(a, 16, 32, 3)
