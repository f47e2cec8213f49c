"""Paged attention version 8 (version 6's warps over equal runs of the batch's cache) against the
NumPy reference, in the CUDA simulator (MINIPAGED_GPU=1 runs the same tests on a GPU).

The plan is checked on its own first, on lengths drawn by Hypothesis: equal runs, every token
in one segment, pieces numbered in order. Then the kernel, on grids small enough for the
simulator: a few blocks, so that runs end in the middle of sequences and their pieces are
merged by whichever warp finishes last, blocks over one or two kv heads, more runs than blocks
of the cache (empty runs), a partly filled last block whose unused slots hold NaN, and 1 to 8
query heads per kv head. Rows of 64 values only: what a lane reads and multiplies is version
6's code, tested on rows of 128 in test_attention_v6.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_v4 import close, expected
from test_attention_v5 import nan_past_end_args

from minipaged.errors import InvalidRequest
from minipaged.kernels.attention import prepare_attention
from minipaged.kernels.attention_v8 import (
    choose_launch,
    launch_v8,
    paged_attention_v8,
    plan,
    supports,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=12),
    st.sampled_from([16, 32]),
    st.integers(1, 40),
)
def test_plan_cuts_the_stream_into_equal_runs(lens: list[int], block_size: int, runs: int) -> None:
    work, pieces = plan(np.array(lens, np.int32), block_size, runs)
    assert work.shape[0] == runs and pieces.shape == (len(lens),)
    blocks = [-(-n // block_size) for n in lens]
    seen = [np.zeros(n, dtype=int) for n in lens]
    found: list[list[int]] = [[] for _ in lens]
    sizes = []
    for r in range(runs):
        size = 0
        ended = False
        for seq, start, end, piece, count in work[r].tolist():
            if seq < 0:
                ended = True
                continue
            assert not ended, "a segment after the run's end"
            assert start % block_size == 0 and start < end <= lens[seq]
            assert count == pieces[seq]
            seen[seq][start:end] += 1
            found[seq].append(piece)
            size += -(-end // block_size) - start // block_size
        sizes.append(size)
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == sum(blocks)
    for s in range(len(lens)):
        assert (seen[s] == 1).all(), f"sequence {s}: a token in no segment or in two"
        assert found[s] == list(range(pieces[s])), f"sequence {s}: pieces out of order"


@st.composite
def cases(draw):  # noqa: ANN001, ANN201
    """(args, warps, heads, blocks) for one launch version 8 supports; every sequence's last
    block holds NaN past its end."""
    head_dim = 64  # the products are version 6's, tested there over 128 too
    group = draw(st.sampled_from([1, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    block_size = draw(st.sampled_from([16, 32]))
    heads = draw(st.sampled_from([h for h in (1, 2) if kv_heads % h == 0]))
    warps = heads * draw(st.sampled_from([1, 2]))
    blocks = draw(st.integers(1, 3))
    lens = draw(st.lists(st.integers(1, 80), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    args = nan_past_end_args(rng, lens, group, kv_heads, head_dim, block_size)
    args = (*args, draw(st.sampled_from([head_dim**-0.5, 2.0])))
    return args, warps, heads, blocks


@settings(max_examples=3, deadline=None)
@given(cases())
def test_v8_matches_reference(case: tuple) -> None:
    args, warps, heads, blocks = case
    out = paged_attention_v8(*args, warps, heads, blocks, out=np.full_like(args[0], np.nan))
    close(out, expected(args), np.float16)


def test_warps_over_two_kv_heads_match_reference() -> None:
    """Blocks of 4 warps over 2 kv heads, whose runs cross sequences (4 runs over 8 blocks of
    the cache, sequences of 3 and 5): the two warps of each run walk the same segments, as a
    barrier between them (version 6's ``lockstep``, one a pair of tiles) needs."""
    rng = np.random.default_rng(6)
    args = (*nan_past_end_args(rng, [40, 70], 4, 2, 64, 16), 0.125)
    out = paged_attention_v8(*args, 4, 2, 2, out=np.full_like(args[0], np.nan))
    close(out, expected(args), np.float16)


def test_pieces_are_merged_and_the_counters_left_zero() -> None:
    """Three sequences over 3 runs of 3 blocks each: the first run holds all three (two
    whole), the last sequence is 3 pieces that other warps finish; twice, so the second
    launch starts from the counters the first set back."""
    rng = np.random.default_rng(3)
    args = (*nan_past_end_args(rng, [16, 9, 112], 4, 1, 64, 16), 0.125)
    work, pieces = plan(args[4], 16, 3)
    assert pieces.tolist() == [1, 1, 3] and (work[0, :, 0] == [0, 1, 2]).all()
    a = prepare_attention(*args, np.full_like(args[0], np.nan))
    for _ in range(2):
        launch_v8(a, 1, 1, 3)
        close(a.result(), expected(args), np.float16)
        assert not a.counters(1).copy_to_host().any()


def test_pieces_merged_by_the_merge_kernel() -> None:
    """With ``merge=False`` every piece, a whole sequence too, goes through the merge kernel."""
    rng = np.random.default_rng(4)
    args = (*nan_past_end_args(rng, [16, 9, 112], 2, 1, 64, 16), 2.0)
    out = paged_attention_v8(*args, 1, 1, 3, out=np.full_like(args[0], np.nan), merge=False)
    close(out, expected(args), np.float16)


def test_choose_launch_fills_one_wave() -> None:
    assert choose_launch(8) == (8, 8, 132)  # the simulator has an H100's 132 SMs
    assert choose_launch(32) == (8, 8, 33)
    assert choose_launch(2) == (8, 2, 132)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((np.float32, 4, 1, 64, 16, 1, 1), "float16"),
        ((np.float16, 4, 1, 32, 16, 1, 1), "multiple of 64"),
        ((np.float16, 8, 2, 64, 16, 4, 2), None),
        ((np.float16, 8, 2, 64, 16, 2, 4), "must divide both warps = 2"),
        ((np.float16, 8, 2, 64, 24, 2, 1), "power of two"),
    ],
)
def test_supports_says_why_not(shape: tuple, reason: str | None) -> None:
    if reason is None:
        assert supports(*shape) is None
    else:
        assert reason in supports(*shape)


def test_a_shape_it_cannot_serve_is_refused() -> None:
    rng = np.random.default_rng(1)
    args = (*nan_past_end_args(rng, [20], 2, 2, 64, 16), 0.25)
    with pytest.raises(InvalidRequest, match="must divide both warps = 2"):
        paged_attention_v8(*args, 2, 4)
    with pytest.raises(InvalidRequest, match="blocks"):
        paged_attention_v8(*args, 2, 2, 0)
