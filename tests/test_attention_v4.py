"""Paged attention version 4 against the NumPy reference, in the CUDA simulator (MINIPAGED_GPU=1
runs the same tests on a GPU, where the copies really are asynchronous).

Shapes are drawn by Hypothesis: several thread blocks (sequences, kv heads and partitions), a
partly filled last block, grouped-query attention, float16 and float32, and rings of 2 to 4
buffers, with partitions both shorter and longer than the ring (so that some copies are never
needed and some buffers are refilled several times).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import config, cuda

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention, attention_v4
from minipaged.kernels import reference as ref
from minipaged.kernels.attention_v4 import paged_attention_v4, supports


@pytest.fixture(autouse=True, scope="module")
def quick_thread_switches():
    """Barriers in the simulator meet sooner with a short GIL switch interval."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def close(out: np.ndarray, expected: np.ndarray, dtype: np.dtype) -> None:
    assert not np.isnan(out).any(), "an output element was never written"
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-2
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=tol, atol=tol * scale)


def random_tables(
    rng: np.random.Generator, lens: list[int], block_size: int
) -> tuple[np.ndarray, int]:
    """Block tables on shuffled blocks for sequences of ``lens`` tokens, and the pool size."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 2
    ids = rng.permutation(num_blocks)
    tables = np.full((len(lens), max(needed) + 1), -1, np.int32)
    start = 0
    for s, n in enumerate(needed):
        tables[s, :n] = ids[start : start + n]
        start += n
    return tables, num_blocks


def random_args(
    rng: np.random.Generator, lens: list[int], heads: int, head_dim: int, scale: float
) -> tuple:
    """``paged_attention``'s arguments for ``heads`` query heads over one kv head, blocks of 16
    tokens on shuffled blocks, float16 values drawn from ``rng``."""
    tables, num_blocks = random_tables(rng, lens, 16)
    shape = (num_blocks, 16, 1, head_dim)
    return (
        rng.standard_normal((len(lens), heads, head_dim)).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        tables,
        np.array(lens, np.int32),
        scale,
    )


@st.composite
def cases(draw):
    """(args, partition_size, threads, stages) for one launch version 4 supports."""
    dtype = np.dtype(draw(st.sampled_from([np.float16, np.float32])))
    head_dim = draw(st.sampled_from([16, 32]))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    partition = block_size * draw(st.integers(1, max(1, 12 // block_size)))
    stages = draw(st.integers(2, 4))
    lens = draw(st.lists(st.integers(1, 20), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tables, num_blocks = random_tables(rng, lens, block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    args = (
        rng.standard_normal((len(lens), group * kv_heads, head_dim)).astype(dtype),
        rng.standard_normal(shape).astype(dtype),
        rng.standard_normal(shape).astype(dtype),
        tables,
        np.array(lens, np.int32),
        draw(st.sampled_from([head_dim**-0.5, 2.0])),
    )
    team = head_dim * dtype.itemsize // 8 // attention_v4.V_WORDS_PER_LANE
    sizes = (16, 32) if config.ENABLE_CUDASIM else (32, 64)  # a GPU wants whole warps
    threads = draw(st.sampled_from([t for t in sizes if t % team == 0]))
    return args, partition, threads, stages


def expected(args: tuple) -> np.ndarray:
    return ref.paged_attention_ref(args[0].astype(np.float64), *args[1:])


@settings(max_examples=20, deadline=None)
@given(cases())
def test_v4_matches_reference(case: tuple) -> None:
    args, partition, threads, stages = case
    a = attention.prepare_attention(
        *args, out=cuda.to_device(np.full(args[0].shape, np.nan, args[0].dtype))
    )
    attention_v4.launch_v4(a, partition, threads, stages)
    close(a.out.copy_to_host(), expected(args), args[0].dtype)


def small_args(block_size: int = 4, head_dim: int = 16) -> tuple:
    rng = np.random.default_rng(5)
    shape = (4, block_size, 1, head_dim)
    return (
        rng.standard_normal((1, 2, head_dim)).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        np.array([[3, 1, 0, 2]], np.int32),
        np.array([4 * block_size - 1], np.int32),
        0.25,
    )


def test_v4_wrapper_takes_and_returns_host_arrays() -> None:
    args = small_args()
    out = paged_attention_v4(*args, partition_size=8)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    close(out, expected(args), np.float16)


def test_supports_names_the_reason() -> None:
    assert supports(np.float16, 32, 8, 128, 16) is None
    assert supports(np.float16, 32, 32, 128, 16) is None
    assert "head_dim = 20" in supports(np.float16, 4, 4, 20, 16)  # version 3's reasons first
    assert "multiple of block_size" in supports(np.float16, 4, 4, 128, 16, partition_size=40)
    assert "at least 2 buffers" in supports(np.float16, 4, 4, 128, 16, stages=1)
    assert "shared memory" in supports(np.float16, 32, 4, 256, 32)  # 8 heads, long rows


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"partition_size": 6}, "multiple of block_size"),
        ({"threads": 23}, "threads = 23"),
        ({"threads": 2048}, "<= 1024"),
    ],
)
def test_v4_refuses_bad_launch_settings_and_writes_nothing(kwargs: dict, message: str) -> None:
    args = small_args()
    out = np.full(args[0].shape, 7.0, np.float16)
    with pytest.raises(InvalidRequest, match=message):
        paged_attention_v4(*args, out=out, **kwargs)
    assert (out == 7.0).all()
