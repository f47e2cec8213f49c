"""Paged attention version 6 (the cache loaded straight into the tensor cores' registers)
against the NumPy reference, in the CUDA simulator (MINIPAGED_GPU=1 runs the same tests on a
GPU, with real 16-byte loads, warp shuffles and ``mma.sync``).

The kernel renames dimensions so that each lane's loads are whole 16-byte pieces of a row;
these tests check that the renaming is the same for Q and K, and that V's output lands in the
dimensions it came from: shapes drawn by Hypothesis with several tiles, blocks and partitions,
2 and 4 warps a block (runs past a short sequence's end) over one or two kv heads, a partly
filled last block whose unused slots hold NaN, and 1 to 8 query heads per kv head.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda
from test_attention_v4 import (  # noqa: F401
    close,
    expected,
    quick_thread_switches,
    random_args,
    random_tables,
)
from test_attention_v5 import nan_past_end_args

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention, attention_v4, attention_v6
from minipaged.kernels.attention_v6 import paged_attention_v6, supports


@st.composite
def cases(draw):  # noqa: ANN001, ANN201
    """(args, partition_size, warps, heads) for one launch version 6 supports; every
    sequence's last block holds NaN past its end."""
    head_dim = draw(st.sampled_from([64, 128]))
    group = draw(st.sampled_from([1, 3, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    block_size = draw(st.sampled_from([16, 32]))
    warps = draw(st.sampled_from([1, 2, 4]))
    heads = draw(st.sampled_from([h for h in (1, 2) if kv_heads % h == 0 and warps % h == 0]))
    partition = block_size * warps // heads * draw(st.integers(1, 2))
    lens = draw(st.lists(st.integers(1, 80), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    args = nan_past_end_args(rng, lens, group, kv_heads, head_dim, block_size)
    args = (*args, draw(st.sampled_from([head_dim**-0.5, 2.0])))
    return args, partition, warps, heads


@settings(max_examples=8, deadline=None)
@given(cases())
def test_v6_matches_reference(case: tuple) -> None:
    args, partition, warps, heads = case
    out = paged_attention_v6(
        *args, partition_size=partition, warps=warps, heads=heads,
        out=np.full_like(args[0], np.nan),
    )  # fmt: skip
    close(out, expected(args), np.float16)


@settings(max_examples=6, deadline=None)
@given(cases(), st.sets(st.sampled_from(attention_v6.CHOICES)))
def test_v6_with_any_tuning_choices_matches_reference(case: tuple, tuning: set) -> None:
    """Any set of ``CHOICES`` on the drawn shapes: the tuning choices change how the kernel
    gets there, never what it computes."""
    args, partition, warps, heads = case
    a = attention.prepare_attention(*args, out=np.full_like(args[0], np.nan))
    attention_v6.launch_v6(a, partition, warps, heads, tuning=tuple(tuning))
    close(a.result(), expected(args), np.float16)


@pytest.mark.parametrize(
    "tuning",
    [
        (),
        *((x,) for x in attention_v6.TUNING),
        attention_v6.TUNING,
        (*attention_v6.TUNING, "early"),
        attention_v6.CHOICES,
    ],
)
def test_v6_tuning_choices_match_reference(tuning: tuple) -> None:
    """Whole tiles loaded without tests, sums rescaled only when a maximum grew, and the warps
    of a run keeping pace (each alone, all three as ``launch_v6`` makes them, and none), and
    with them block numbers read before the length (runs that reach past the table, and
    blocks and warps past a sequence's end), and every choice at once: the same attention, on
    runs of 1 to 3 tiles (the last partly past the end) and 1 to 3 partitions."""
    rng = np.random.default_rng(1)
    args = (*nan_past_end_args(rng, [200, 45, 7], 4, 2, 64, 16), 0.125)
    a = attention.prepare_attention(*args)
    a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))
    attention_v6.launch_v6(a, 96, 4, 2, tuning=tuning)
    close(a.result(), expected(args), np.float16)


@pytest.mark.parametrize(
    ("group", "warps", "heads", "weights", "extra"),
    [
        (3, 4, 2, True, ()),
        (3, 4, 2, True, ("padded",)),
        (1, 4, 1, False, ("padded",)),
        (3, 4, 2, True, ("lean",)),
        (3, 4, 2, True, ("lean", "padded")),
        (3, 4, 1, True, ("lean",)),
        (1, 4, 1, False, ("lean",)),
    ],
)
def test_v6_combines_runs_either_way(
    group: int, warps: int, heads: int, weights: bool, extra: tuple
) -> None:
    """A block's runs combined with their weights worked out once a head, where a thread has
    several outputs to combine (in plain or padded runs, written and combined lean or not;
    lean over one kv head, some threads have one output fewer), and one output at a time
    where it has one (where padding changes nothing): the same attention, in partitions of 64
    tokens (some runs past a sequence's end, a merge after) and of 192 (the output written by
    the block)."""
    assert attention_v6.combines_with_weights(group, 64, warps, heads) == weights
    rng = np.random.default_rng(2)
    args = (*nan_past_end_args(rng, [130, 7], group, 2, 64, 16), 0.125)
    a = attention.prepare_attention(*args)
    for partition in (64, 192):
        a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))
        attention_v6.launch_v6(a, partition, warps, heads, tuning=(*attention_v6.TUNING, *extra))
        close(a.result(), expected(args), np.float16)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("padded", [False, True])
def test_lean_stores_lie_at_the_same_distances_for_every_lane(head_dim: int, padded: bool) -> None:
    """Each of a lane's outputs lies as far from its first one as ``lean_offsets`` says, for
    every lane: the lean ``write_run`` stores them all from one address."""
    stride, _ = attention_v6.run_layout(8, head_dim, padded)
    offsets = attention_v6.lean_offsets(head_dim, stride, int(padded))
    for lane in range(32):
        places = [attention_v6.acc_output(lane, n) for n in range(head_dim // 4)]
        at = [attention_v6.run_at(h, d, stride, int(padded)) for h, d in places]
        assert [a - at[0] for a in at] == list(offsets)


def _store_banks(group: int, head_dim: int, padded: bool) -> list[list[int]]:
    """The shared-memory bank of each lane's word in each of ``write_run``'s stores of a run
    (lanes whose query head is past ``group`` store nothing), from the same addresses."""
    stride, _ = attention_v6.run_layout(group, head_dim, padded)
    stores = []
    for n in range(head_dim // 4):  # a lane's accumulators
        places = [attention_v6.acc_output(lane, n) for lane in range(32)]
        stores.append(
            [attention_v6.run_at(h, d, stride, int(padded)) % 32 for h, d in places if h < group]
        )
    return stores


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_padded_runs_give_every_lane_its_own_bank(group: int, head_dim: int) -> None:
    """Padded, no two lanes of a store of ``write_run`` meet in a bank, and the combine's 32
    threads of a warp read 32 neighbouring words; unpadded, 8 query heads put 8 lanes in a
    bank. And padding only moves the outputs: each still has a word of its own (and each has
    one accumulator in the warp)."""
    for banks in _store_banks(group, head_dim, True):
        assert len(set(banks)) == len(banks)
    if group == 8:
        assert max(np.bincount(_store_banks(8, head_dim, False)[0])) == 8
        # and a warp's accumulators hold each output of its 8 heads once
        places = {
            attention_v6.acc_output(lane, n) for lane in range(32) for n in range(head_dim // 4)
        }
        assert places == {(h, d) for h in range(8) for d in range(head_dim)}
    stride, slot = attention_v6.run_layout(group, head_dim, True)
    at = [attention_v6.run_at(h, d, stride, 1) for h in range(group) for d in range(head_dim)]
    assert len(set(at)) == len(at) and max(at) < slot - 2 * group
    for first in range(0, group * head_dim, 32):  # a warp's outputs in the combine
        h, d = divmod(first, head_dim)
        words = [attention_v6.run_at(h, d + x, stride, 1) for x in range(32)]
        assert words == list(range(words[0], words[0] + 32))


def test_v6_refuses_an_unknown_tuning_choice() -> None:
    rng = np.random.default_rng(1)
    a = attention.prepare_attention(*random_args(rng, [20], 4, 64, 0.125))
    with pytest.raises(InvalidRequest, match="unknown tuning"):
        attention_v6.launch_v6(a, 32, tuning=("fast",))


def test_v6_early_refuses_a_query_off_a_16_byte_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """``early`` loads the query 16 bytes at a time, so a query that starts off a 16-byte
    boundary (a view into a larger device array) is refused before the launch, and the
    output is left as it was; without ``early`` the query is read a word at a time."""
    rng = np.random.default_rng(1)
    args = random_args(rng, [20], 4, 64, 0.125)
    a = attention.prepare_attention(*args)
    a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))
    real = attention_v4._address
    monkeypatch.setattr(attention_v4, "_address", lambda x: 8 if x is a.query else real(x))
    with pytest.raises(InvalidRequest, match="query starts at 0x8, not on a 16-byte boundary"):
        attention_v6.launch_v6(a, 32, tuning=(*attention_v6.TUNING, "early"))
    assert np.isnan(a.out.copy_to_host()).all()
    attention_v6.launch_v6(a, 32)
    close(a.result(), expected(args), np.float16)


def test_v6_on_its_own_launch_choice() -> None:
    """No partition size: ``choose_launch`` picks partitions and warps."""
    rng = np.random.default_rng(4)
    args = random_args(rng, [300, 45], 4, 64, 0.125)
    close(paged_attention_v6(*args), expected(args), np.float16)


def test_paged_attention_runs_v6_wherever_it_serves(monkeypatch) -> None:  # noqa: ANN001
    """``paged_attention`` runs version 6 wherever it serves the shape, on its own launch or a
    given partition size, small grids and multi-head attention alike; where it does not
    (blocks of 8 tokens), version 4. The launches are recorded, not run: the batch is 64
    sequences of 4,096 tokens, all in one block of the cache."""
    calls = []
    monkeypatch.setattr(attention_v6, "launch_v6", lambda a, p=None: calls.append(("v6", p)))
    cache = np.zeros((1, 16, 8, 128), np.float16)
    tables = np.zeros((64, 4096 // 16), np.int32)
    lens = np.full(64, 4096, np.int32)
    query = np.zeros((64, 32, 128), np.float16)
    attention.paged_attention(query, cache, cache, tables, lens, 0.1)
    attention.paged_attention(query, cache, cache, tables, lens, 0.1, partition_size=512)
    attention.paged_attention(query[:8], cache, cache, tables[:8], lens[:8], 0.1)  # small
    attention.paged_attention(query[:, :8], cache, cache, tables, lens, 0.1)  # multi-head
    assert calls == [("v6", None), ("v6", 512), ("v6", None), ("v6", None)]
    assert attention.fast_version(np.float16, 32, 8, 128, 16) == "v6"
    assert attention.fast_version(np.float16, 32, 32, 128, 16) == "v6"
    assert attention.fast_version(np.float16, 32, 8, 128, 16, small_grid=True) == "v6"
    assert attention.fast_version(np.float16, 32, 8, 128, 8) == "v4"  # blocks of 8 tokens


def test_choose_launch_keeps_runs_whole_and_grids_full() -> None:
    """Every pick is a shape ``supports`` takes. A batch whose (sequence, kv head) pairs fill
    the GPU's 132 x 8 warp places in one wave gets one: one partition a sequence, each pair
    walked by as many warps as fit, blocks of 8 warps over neighbouring kv heads. Other big
    batches get one partition a sequence of up to 8 warps of 1,024 tokens, each with tokens to
    walk, in blocks of 1, 2, 4 or 8 warps, and 8 from 4,096 tokens on; a small one runs shorter
    (so more warps) down to 256."""
    cases = ((1, 32768), (8, 16384), (64, 4096), (256, 1024), (3, 17), (1, 1), (200, 3000))
    for seqs, context in (*cases, (100, 5000)):
        for kv_heads in (8, 32, 3):
            partition, warps, heads = attention_v6.choose_launch(seqs, kv_heads, context, 16)
            reason = supports(np.float16, 4 * kv_heads, kv_heads, 128, 16, partition, warps, heads)
            assert reason is None
    assert attention_v6.choose_launch(64, 8, 4096, 16) == (4096, 8, 4)  # 1,024 warps
    assert attention_v6.choose_launch(128, 8, 2048, 16) == (2048, 8, 8)
    assert attention_v6.choose_launch(32, 8, 8192, 16) == (8192, 8, 2)
    assert attention_v6.choose_launch(32, 32, 8192, 16) == (8192, 8, 8)
    assert attention_v6.choose_launch(96, 11, 4000, 16) == (4000, 1, 1)  # 11: a prime
    assert attention_v6.choose_launch(256, 8, 1024, 16) == (1024, 1, 1)  # 2,048 pairs
    assert attention_v6.choose_launch(64, 32, 4096, 16) == (4096, 8, 1)  # 8 warps of 512
    assert attention_v6.choose_launch(64, 32, 4095, 16) == (4096, 4, 1)  # under 8 x 512
    assert attention_v6.choose_launch(100, 8, 5000, 16) == (5120, 8, 1)  # 8 warps of 640
    assert attention_v6.choose_launch(200, 8, 3000, 16) == (3008, 4, 1)  # 4 of 752, not 3
    assert attention_v6.choose_launch(8, 8, 16384, 16) == (4096, 8, 1)  # half the places
    assert attention_v6.choose_launch(1, 8, 32768, 16) == (2048, 8, 1)
    assert attention_v6.one_wave(8, 32, 16384, 16) is None  # a partition too long


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((np.float32, 4, 1, 64, 16, 16), "float16"),
        ((np.float16, 16, 1, 64, 16, 16), "at most 8"),
        ((np.float16, 4, 1, 32, 16, 16), "multiple of 64"),
        ((np.float16, 4, 1, 64, 8, 16), "whole 16-token tiles"),
        ((np.float16, 4, 1, 64, 16, 24), "multiple of 1 x block_size"),
        ((np.float16, 8, 2, 64, 16, 48, 4, 2), "multiple of 2 x block_size"),
        ((np.float16, 8, 2, 64, 16, 32, 4, 2), None),
        ((np.float16, 8, 2, 64, 16, 32, 2, 4), "must divide both warps = 2"),
        ((np.float16, 12, 3, 64, 16, 32, 2, 2), "and num_kv_heads = 3"),
    ],
)
def test_supports_says_why_not(shape: tuple, reason: str | None) -> None:
    if reason is None:
        assert supports(*shape) is None
    else:
        assert reason in supports(*shape)


def test_a_shape_it_cannot_serve_is_refused_before_anything_runs() -> None:
    rng = np.random.default_rng(1)
    shape = (2, 16, 1, 32)
    args = (
        rng.standard_normal((1, 2, 32)).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        rng.standard_normal(shape).astype(np.float16),
        np.array([[1, 0]], np.int32),
        np.array([20], np.int32),
        0.25,
    )
    a = attention.prepare_attention(*args, out=cuda.to_device(np.full((1, 2, 32), 7, np.float16)))
    with pytest.raises(InvalidRequest, match="multiple of 64"):
        attention_v6.launch_v6(a, 32)
    with pytest.raises(InvalidRequest, match="warps must be >= 1 and <= 16, got 17"):
        attention_v6.launch_v6(a, 32, 17)
    assert (a.out.copy_to_host() == 7).all()
