"""Paged attention version 7 (the cache through shared memory by bulk copies) against the NumPy
reference, in the CUDA simulator (MINIPAGED_GPU=1 runs the same tests on a GPU of compute
capability 9.0, with real bulk copies, ``mbarrier`` waits, warp shuffles and ``mma.sync``).

Shapes drawn by Hypothesis: a ring of 2 or 3 buffers with more stages than buffers, stages of
one or two blocks of the cache (runs past a short sequence's end), blocks over one or two kv
heads, several partitions, a partly filled last block whose unused slots hold NaN, and 1 to 8
query heads per kv head. Rows of 64 values only: what a lane reads and multiplies is version 6's
code, tested on rows of 128 in test_attention_v6.py; what is version 7's own is the ring.
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
from minipaged.kernels.attention_v7 import launch_v7, paged_attention_v7, supports


@st.composite
def cases(draw):  # noqa: ANN001, ANN201
    """(args, partition_size, warps, heads, stages) for one launch version 7 supports; every
    sequence's last block holds NaN past its end."""
    head_dim = 64  # the products are version 6's, tested there over 128 too
    group = draw(st.sampled_from([1, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    block_size = draw(st.sampled_from([16, 32]))
    heads = draw(st.sampled_from([h for h in (1, 2) if kv_heads % h == 0]))
    warps = heads * draw(st.sampled_from([1, 2]))
    stages = draw(st.sampled_from([2, 3]))
    partition = block_size * warps // heads * draw(st.integers(1, 3))
    lens = draw(st.lists(st.integers(1, 80), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    args = nan_past_end_args(rng, lens, group, kv_heads, head_dim, block_size)
    args = (*args, draw(st.sampled_from([head_dim**-0.5, 2.0])))
    return args, partition, warps, heads, stages


@settings(max_examples=3, deadline=None)
@given(cases())
def test_v7_matches_reference(case: tuple) -> None:
    args, partition, warps, heads, stages = case
    out = paged_attention_v7(
        *args, partition, warps, heads, stages, out=np.full_like(args[0], np.nan)
    )
    close(out, expected(args), np.float16)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((np.float32, 4, 1, 64, 16, 16, 1, 1), "float16"),
        ((np.float16, 4, 1, 32, 16, 16, 1, 1), "multiple of 64"),
        ((np.float16, 8, 2, 64, 16, 48, 4, 2), "multiple of 2 x block_size"),
        ((np.float16, 8, 2, 64, 16, 32, 4, 2), None),
        ((np.float16, 8, 2, 64, 16, 32, 2, 4), "must divide both warps = 2"),
        ((np.float16, 8, 2, 64, 16, 32, 4, 2, 1), "at least 2 buffers"),
        ((np.float16, 32, 8, 128, 16, 4096, 8, 8, 4), "more than"),
    ],
)
def test_supports_says_why_not(shape: tuple, reason: str | None) -> None:
    if reason is None:
        assert supports(*shape) is None
    else:
        assert reason in supports(*shape)


def test_a_shape_it_cannot_serve_is_refused() -> None:
    rng = np.random.default_rng(1)
    shape = (2, 16, 1, 64)
    args = (
        rng.standard_normal((1, 2, 64)).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        np.array([[1, 0]], np.int32),
        np.array([20], np.int32),
        0.25,
    )
    with pytest.raises(InvalidRequest, match="multiple of 2 x block_size"):
        paged_attention_v7(*args, 48, 2, 1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the merge of meaningless partitions
@pytest.mark.parametrize(("read_back", "fold"), [(True, False), (False, False)])
def test_the_parts_for_timing_run(read_back: bool, fold: bool) -> None:
    """The kernel with its folds, or its reads of the ring, left out (for timing its parts
    on a GPU) still runs its copies and writes every output, whatever their values."""
    rng = np.random.default_rng(7)
    args = (*nan_past_end_args(rng, [40], 2, 2, 64, 16), 0.125)
    a = prepare_attention(*args, np.full_like(args[0], 7.0))
    launch_v7(a, 32, 2, 1, 2, read_back=read_back, fold=fold)
    out = a.result()
    assert out.shape == args[0].shape
    assert not np.any(out == 7.0)
