"""Paged attention version 3 against the NumPy reference, in the CUDA simulator (MINIPAGED_GPU=1
runs the same tests on a GPU).

Shapes are drawn by Hypothesis: several thread blocks (sequences, kv heads and partitions), a
partly filled last block, grouped-query attention, float16 and float32, and every ``Tuning``
knob, since each one changes which thread reads which word.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import config, cuda

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention, attention_v3, attention_v4, paged_attention
from minipaged.kernels import reference as ref
from minipaged.kernels.attention_v3 import Tuning, paged_attention_v3, supports


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


@st.composite
def cases(draw):
    """(args, partition_size, tuning, threads) for one v3 launch version 3 supports."""
    dtype = np.dtype(draw(st.sampled_from([np.float16, np.float32])))
    tuning = Tuning(
        words_per_lane=draw(st.sampled_from([1, 2, 4])),
        tokens_per_step=draw(st.sampled_from([1, 2])),
        v_words_per_lane=draw(st.sampled_from([1, 2])),
        v_tokens_per_step=draw(st.sampled_from([1, 3, 4])),
    )
    head_dim = draw(st.sampled_from([8, 16, 32]))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))  # 3: not a power of two; 8: MAX_GROUP
    kv_heads = draw(st.integers(1, 2))
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    if supports(dtype, group * kv_heads, kv_heads, head_dim, block_size, tuning):
        tuning = Tuning(1, 1, 1, 1)  # every head_dim drawn splits into single words
    partition = block_size * draw(st.integers(1, max(1, 12 // block_size)))
    num_seqs = draw(st.integers(1, 2))
    lens = draw(st.lists(st.integers(1, 20), min_size=num_seqs, max_size=num_seqs))
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 2
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.permutation(num_blocks)
    tables = np.full((num_seqs, max(needed) + 1), -1, np.int32)
    start = 0
    for s, n in enumerate(needed):
        tables[s, :n] = ids[start : start + n]
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    args = (
        rng.standard_normal((num_seqs, group * kv_heads, head_dim)).astype(dtype),
        rng.standard_normal(shape).astype(dtype),
        rng.standard_normal(shape).astype(dtype),
        tables,
        np.array(lens, np.int32),
        draw(st.sampled_from([head_dim**-0.5, 2.0])),
    )
    words = head_dim * dtype.itemsize // 8
    team = words // tuning.v_words_per_lane
    sizes = (16, 32) if config.ENABLE_CUDASIM else (32, 64)  # a GPU wants whole warps
    threads = draw(st.sampled_from([t for t in sizes if t % team == 0]))
    return args, partition, tuning, threads


def expected(args: tuple) -> np.ndarray:
    return ref.paged_attention_ref(args[0].astype(np.float64), *args[1:])


def run(args: tuple, partition: int, tuning: Tuning | None, threads: int | None) -> np.ndarray:
    a = attention.prepare_attention(
        *args, out=cuda.to_device(np.full(args[0].shape, np.nan, args[0].dtype))
    )
    attention_v3.launch_v3(a, partition, threads, tuning)
    return a.out.copy_to_host()


@settings(max_examples=25, deadline=None)
@given(cases())
def test_v3_matches_reference(case: tuple) -> None:
    args, partition, tuning, threads = case
    close(run(args, partition, tuning, threads), expected(args), args[0].dtype)


def test_v3_wrapper_on_host_arrays_and_huge_logits() -> None:
    """The public wrapper takes NumPy arrays and returns NumPy; logits near 1000 stay finite
    because every partition subtracts its maximum before exp()."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((5, 4, 1, 16)).astype(np.float32)
    args = (
        np.ones((1, 2, 16), np.float32) * 30,
        keys,
        rng.standard_normal((5, 4, 1, 16)).astype(np.float32),
        np.array([[4, 0, 2, 1]], np.int32),
        np.array([14], np.int32),
        10.0,
    )
    out = paged_attention_v3(*args, partition_size=8)
    assert isinstance(out, np.ndarray) and np.isfinite(out).all()
    close(out, expected(args), np.float32)


def test_supports_names_the_reason() -> None:
    assert supports(np.float16, 32, 8, 128, 16) is None
    assert supports(np.float32, 8, 8, 64, 32) is None
    assert "head_dim = 20" in supports(np.float16, 4, 4, 20, 16)
    assert "power of two threads" in supports(np.float16, 4, 4, 48, 16)  # 12 words: 3 lanes
    assert "more than version 3's" in supports(np.float16, 64, 4, 128, 16)
    assert "block_size = 12" in supports(np.float16, 4, 4, 128, 12)
    assert "shared memory" in supports(np.float16, 32, 8, 128, 16, partition_size=8192)


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"partition_size": 6}, "multiple of block_size"),
        ({"threads": 23}, "threads = 23"),
        ({"threads": 2048}, "at most 1024"),
    ],
)
def test_v3_refuses_bad_launch_settings_and_writes_nothing(kwargs: dict, message: str) -> None:
    args = small_args()
    out = np.full(args[0].shape, 7.0, np.float16)
    with pytest.raises(InvalidRequest, match=message):
        paged_attention_v3(*args, out=out, **kwargs)
    assert (out == 7.0).all()


def test_v3_refuses_unsupported_shapes() -> None:
    with pytest.raises(InvalidRequest, match="head_dim = 12"):
        paged_attention_v3(*small_args(head_dim=12))


def test_dispatch_prefers_v4_then_v3(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(attention_v4, "launch_v4", lambda a, p: calls.append(f"v4/{p}"))
    monkeypatch.setattr(attention_v3, "launch_v3", lambda a, p: calls.append(f"v3/{p}"))
    monkeypatch.setattr(attention, "launch_v1", lambda a: calls.append("v1"))
    monkeypatch.setattr(attention, "launch_v2", lambda a, p: calls.append(f"v2/{p}"))
    paged_attention(*small_args(), partition_size=8)  # supported: v4
    paged_attention(*small_args(), partition_size=6)  # partition not a multiple of 4: v1/v2
    paged_attention(*small_args(block_size=3), partition_size=6)  # block size 3: v1/v2
    paged_attention(*small_args(), partition_size=8192)  # logits beyond shared memory: v1/v2
    monkeypatch.setattr(attention_v4, "supports", lambda *args: "a shape v4 does not serve")
    paged_attention(*small_args(), partition_size=8)  # v3
    assert calls == ["v4/8", "v2/6", "v2/6", "v1", "v3/8"]
