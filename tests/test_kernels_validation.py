"""The kernel wrappers refuse bad input BEFORE launching anything, with a typed error naming the
offending value, and leave every argument exactly as it was.

Each case starts from valid arguments and breaks one thing. The kernels are replaced by objects
that fail the test if launched, and every array argument is compared with a snapshot afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from numba import cuda

from minipaged.errors import InvalidBlockTable, InvalidRequest
from minipaged.kernels import (
    attention,
    cache_ops,
    copy_blocks,
    paged_attention,
    paged_attention_naive,
    paged_attention_v1,
    paged_attention_v2,
    reshape_and_cache,
    swap_blocks,
)


class NoLaunch:
    """Stands in for a kernel: launching it fails the test."""

    def __getitem__(self, config: object) -> None:
        raise AssertionError("a kernel was launched despite invalid input")


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (attention, cache_ops):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, NoLaunch())


def snapshot(args: dict[str, Any]) -> dict[str, Any]:
    """Host copies of every array among the arguments (lists of arrays included)."""

    def copy(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return x.copy()
        if getattr(x, "__cuda_ndarray__", False):
            return x.copy_to_host()
        if isinstance(x, list):
            return [copy(item) for item in x]
        return x

    return {name: copy(x) for name, x in args.items()}


def assert_unchanged(args: dict[str, Any], before: dict[str, Any]) -> None:
    after = snapshot(args)
    for name, old in before.items():
        new = after[name]
        if isinstance(old, np.ndarray):
            np.testing.assert_array_equal(new, old, err_msg=f"{name} changed")
        elif isinstance(old, list):
            for a, b in zip(new, old, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def check_refused(
    fn: Callable[..., Any], args: dict[str, Any], error: type[Exception], words: str
) -> None:
    before = snapshot(args)
    with pytest.raises(error) as info:
        fn(**args)
    assert words in str(info.value), f"{words!r} not in {str(info.value)!r}"
    assert_unchanged(args, before)


# --- attention -----------------------------------------------------------------------------------


def attention_args() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "query": rng.standard_normal((2, 4, 8)).astype(np.float32),
        "key_cache": rng.standard_normal((6, 4, 2, 8)).astype(np.float32),
        "value_cache": rng.standard_normal((6, 4, 2, 8)).astype(np.float32),
        "block_tables": np.array([[0, 1, -1], [2, 3, 4]], np.int32),
        "seq_lens": np.array([5, 10], np.int32),
        "scale": 0.5,
        "out": np.full((2, 4, 8), np.nan, np.float32),
    }


def _set(**changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda args: args.update({k: f(args) if callable(f) else f for k, f in changes.items()})


ATTENTION_CASES = {
    "query float64": (
        _set(query=lambda a: a["query"].astype(np.float64)),
        InvalidRequest,
        "float64",
    ),
    "query int32": (_set(query=lambda a: a["query"].astype(np.int32)), InvalidRequest, "int32"),
    "query list": (_set(query=lambda a: a["query"].tolist()), InvalidRequest, "list"),
    "query 2-D": (_set(query=lambda a: a["query"].reshape(2, 32)), InvalidRequest, "(2, 32)"),
    "no sequences": (_set(query=np.zeros((0, 4, 8), np.float32)), InvalidRequest, "empty"),
    "cache dtypes differ": (
        _set(value_cache=lambda a: a["value_cache"].astype(np.float16)),
        InvalidRequest,
        "float16",
    ),
    "cache shapes differ": (
        _set(value_cache=np.zeros((7, 4, 2, 8), np.float32)),
        InvalidRequest,
        "(7, 4, 2, 8)",
    ),
    "query dtype differs from cache": (
        _set(query=lambda a: a["query"].astype(np.float16), out=None),
        InvalidRequest,
        "float16",
    ),
    "heads not a multiple of kv heads": (
        _set(query=np.zeros((2, 3, 8), np.float32), out=None),
        InvalidRequest,
        "num_heads = 3",
    ),
    "head_dim differs": (
        _set(query=np.zeros((2, 4, 4), np.float32), out=None),
        InvalidRequest,
        "4 != 8",
    ),
    "head_dim too large": (
        _set(
            query=np.zeros((2, 2, 264), np.float32),
            key_cache=np.zeros((6, 4, 2, 264), np.float32),
            value_cache=np.zeros((6, 4, 2, 264), np.float32),
            out=None,
        ),
        InvalidRequest,
        "264",
    ),
    "block_tables float": (
        _set(block_tables=lambda a: a["block_tables"].astype(np.float64)),
        InvalidRequest,
        "float64",
    ),
    "block_tables 1-D": (_set(block_tables=np.array([0, 1, 2])), InvalidRequest, "dimensions"),
    "block_tables ragged": (_set(block_tables=[[0, 1], [2]]), InvalidRequest, "rectangular"),
    "block_tables too many rows": (
        _set(block_tables=np.zeros((3, 3), np.int32)),
        InvalidRequest,
        "2 != 3",
    ),
    "block id beyond int32": (
        _set(block_tables=np.array([[0, 1, 2**40], [2, 3, 4]])),
        InvalidRequest,
        "int32",
    ),
    "device block_tables int64": (
        _set(block_tables=lambda a: cuda.to_device(a["block_tables"].astype(np.int64))),
        InvalidRequest,
        "int64",
    ),
    "seq_lens too long": (_set(seq_lens=np.array([5, 10, 1], np.int32)), InvalidRequest, "3"),
    "block id past the cache": (
        _set(block_tables=np.array([[0, 1, -1], [2, 3, 6]], np.int32)),
        InvalidBlockTable,
        "block_tables[1, 2] = 6",
    ),
    "negative block id in use": (
        _set(block_tables=np.array([[0, -1, -1], [2, 3, 4]], np.int32)),
        InvalidBlockTable,
        "block_tables[0, 1] = -1",
    ),
    "length not covered by the table": (
        _set(seq_lens=np.array([5, 13], np.int32)),
        InvalidBlockTable,
        "13 tokens",
    ),
    "empty sequence": (_set(seq_lens=np.array([0, 10], np.int32)), InvalidRequest, "length 0"),
    "negative length": (_set(seq_lens=np.array([5, -2], np.int32)), InvalidRequest, "length -2"),
    "scale nan": (_set(scale=float("nan")), InvalidRequest, "nan"),
    "scale string": (_set(scale="0.5"), InvalidRequest, "'0.5'"),
    "scale bool": (_set(scale=True), InvalidRequest, "True"),
    "scale beyond float32": (_set(scale=1e39), InvalidRequest, "1e+39"),
    "threads not a power of two": (_set(threads=12), InvalidRequest, "12"),
    "threads below head_dim": (_set(threads=4), InvalidRequest, "got 4"),
    "out wrong shape": (_set(out=np.zeros((2, 4, 4), np.float32)), InvalidRequest, "(2, 4, 4)"),
    "out wrong dtype": (_set(out=np.zeros((2, 4, 8), np.float16)), InvalidRequest, "float16"),
    "non-contiguous device cache": (
        _set(
            key_cache=lambda a: cuda.to_device(np.repeat(a["key_cache"], 2, axis=1))[:, ::2],
            value_cache=lambda a: cuda.to_device(np.repeat(a["value_cache"], 2, axis=1))[:, ::2],
        ),
        InvalidRequest,
        "C-contiguous",
    ),
}

VERSIONS = {
    "dispatch": paged_attention,
    "naive": paged_attention_naive,
    "v1": paged_attention_v1,
    "v2": paged_attention_v2,
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_refuses(version: str, case: str, no_launch: None) -> None:
    change, error, words = ATTENTION_CASES[case]
    args = attention_args()
    change(args)
    check_refused(VERSIONS[version], args, error, words)


@pytest.mark.parametrize("version", ["dispatch", "v2"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, attention.V1_MAX_CONTEXT + 1])
def test_attention_refuses_partition_size(version: str, bad: object, no_launch: None) -> None:
    args = attention_args()
    args["partition_size"] = bad
    check_refused(VERSIONS[version], args, InvalidRequest, repr(bad))


def test_v1_refuses_a_context_beyond_shared_memory(no_launch: None) -> None:
    n = attention.V1_MAX_CONTEXT + 1
    args = {
        "query": np.zeros((1, 1, 4), np.float32),
        "key_cache": np.zeros((1, n, 1, 4), np.float32),
        "value_cache": np.zeros((1, n, 1, 4), np.float32),
        "block_tables": np.array([[0]], np.int32),
        "seq_lens": np.array([n], np.int32),
        "scale": 1.0,
    }
    check_refused(paged_attention_v1, args, InvalidRequest, str(n))


def test_table_entries_past_a_sequence_are_never_checked() -> None:
    """Only the first ceil(len / block_size) entries of a row are block ids; the rest is padding
    and may hold anything."""
    args = attention_args()
    args["block_tables"] = np.array([[0, 1, 99999], [2, 3, 4]], np.int32)
    out = paged_attention(**args, threads=8)
    assert np.isfinite(out).all()


# --- reshape_and_cache ---------------------------------------------------------------------------


def cache_args() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "key": rng.standard_normal((3, 2, 8)).astype(np.float32),
        "value": rng.standard_normal((3, 2, 8)).astype(np.float32),
        "key_cache": np.full((4, 4, 2, 8), np.nan, np.float32),
        "value_cache": np.full((4, 4, 2, 8), np.nan, np.float32),
        "slot_mapping": np.array([0, 5, -1], np.int64),
    }


CACHE_CASES = {
    "slot past the cache": (
        _set(slot_mapping=np.array([0, 16, -1])),
        InvalidBlockTable,
        "slot_mapping[1] = 16",
    ),
    "slot written twice": (_set(slot_mapping=[7, 7, -1]), InvalidBlockTable, "slot 7"),
    "one slot too few": (_set(slot_mapping=[0, 5]), InvalidRequest, "3 != 2"),
    "slots float": (_set(slot_mapping=np.array([0.0, 5.0, -1.0])), InvalidRequest, "float64"),
    "device slots int32": (
        _set(slot_mapping=lambda a: cuda.to_device(a["slot_mapping"].astype(np.int32))),
        InvalidRequest,
        "int32",
    ),
    "key float16": (_set(key=lambda a: a["key"].astype(np.float16)), InvalidRequest, "float16"),
    "value shape differs": (
        _set(value=np.zeros((3, 2, 4), np.float32)),
        InvalidRequest,
        "(3, 2, 4)",
    ),
    "key heads differ from cache": (
        _set(key=np.zeros((3, 1, 8), np.float32), value=np.zeros((3, 1, 8), np.float32)),
        InvalidRequest,
        "(1, 8)",
    ),
    "cache dtypes differ": (
        _set(value_cache=lambda a: a["value_cache"].astype(np.float16)),
        InvalidRequest,
        "float16",
    ),
    "non-contiguous device cache": (
        _set(
            key_cache=lambda a: cuda.to_device(np.repeat(a["key_cache"], 2, axis=1))[:, ::2],
            value_cache=lambda a: cuda.to_device(np.repeat(a["value_cache"], 2, axis=1))[:, ::2],
        ),
        InvalidRequest,
        "C-contiguous",
    ),
    "threads zero": (_set(threads=0), InvalidRequest, "got 0"),
}


@pytest.mark.parametrize("case", CACHE_CASES)
def test_reshape_and_cache_refuses(case: str, no_launch: None) -> None:
    change, error, words = CACHE_CASES[case]
    args = cache_args()
    change(args)
    check_refused(reshape_and_cache, args, error, words)


def test_no_tokens_launch_nothing(no_launch: None) -> None:
    args = cache_args()
    args.update(key=args["key"][:0], value=args["value"][:0], slot_mapping=[])
    before = snapshot(args)
    reshape_and_cache(**args)
    assert_unchanged(args, before)


# --- copy_blocks ---------------------------------------------------------------------------------


def copy_args() -> dict[str, Any]:
    rng = np.random.default_rng(2)
    return {
        "key_caches": rng.standard_normal((2, 6, 2, 1, 4)).astype(np.float32),
        "value_caches": rng.standard_normal((2, 6, 2, 1, 4)).astype(np.float32),
        "block_mapping": [[0, 3], [1, 4]],
    }


COPY_CASES = {
    "source past the cache": (_set(block_mapping=[[6, 3]]), InvalidBlockTable, "source block 6"),
    "negative destination": (
        _set(block_mapping=[[0, -1]]),
        InvalidBlockTable,
        "destination block -1",
    ),
    "destination twice": (
        _set(block_mapping=[[0, 3], [1, 3]]),
        InvalidBlockTable,
        "destination block 3",
    ),
    "chain of copies": (_set(block_mapping=[[0, 3], [3, 4]]), InvalidBlockTable, "block 3 is both"),
    "copy onto itself": (_set(block_mapping=[[2, 2]]), InvalidBlockTable, "block 2 is both"),
    "triples": (_set(block_mapping=[[0, 3, 1]]), InvalidRequest, "(1, 3)"),
    "float mapping": (_set(block_mapping=[[0.0, 3.0]]), InvalidRequest, "float64"),
    "ragged mapping": (_set(block_mapping=[[0, 3], [1]]), InvalidRequest, "rectangular"),
    "layers differ": (
        _set(value_caches=np.zeros((3, 6, 2, 1, 4), np.float32)),
        InvalidRequest,
        "2 != 3",
    ),
    "layer shapes differ": (
        _set(
            key_caches=lambda a: [a["key_caches"][0], np.zeros((6, 2, 1, 8), np.float32)],
            value_caches=lambda a: list(a["value_caches"]),
        ),
        InvalidRequest,
        "key_caches[1]",
    ),
    "stacked and list": (
        _set(value_caches=lambda a: list(a["value_caches"])),
        InvalidRequest,
        "both",
    ),
    "4-D array": (
        _set(key_caches=lambda a: a["key_caches"][0], value_caches=lambda a: a["value_caches"][0]),
        InvalidRequest,
        "(6, 2, 1, 4)",
    ),
    "empty lists": (_set(key_caches=[], value_caches=[]), InvalidRequest, "empty"),
    "float64 caches": (
        _set(
            key_caches=lambda a: a["key_caches"].astype(np.float64),
            value_caches=lambda a: a["value_caches"].astype(np.float64),
        ),
        InvalidRequest,
        "float64",
    ),
}


@pytest.mark.parametrize("case", COPY_CASES)
def test_copy_blocks_refuses(case: str, no_launch: None) -> None:
    change, error, words = COPY_CASES[case]
    args = copy_args()
    change(args)
    check_refused(copy_blocks, args, error, words)


def test_empty_mapping_launches_nothing(no_launch: None) -> None:
    args = copy_args()
    args["block_mapping"] = []
    before = snapshot(args)
    copy_blocks(**args)
    assert_unchanged(args, before)


# --- swap_blocks ---------------------------------------------------------------------------------


def swap_args() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    dst = cuda.pinned_array((4, 2, 1, 4), dtype=np.float32)
    dst[...] = np.nan
    return {
        "src": cuda.to_device(rng.standard_normal((6, 2, 1, 4)).astype(np.float32)),
        "dst": dst,
        "block_mapping": [[0, 1], [5, 2]],
    }


_shared = np.zeros((6, 2, 1, 4), np.float32)

SWAP_CASES = {
    "source past the cache": (_set(block_mapping=[[6, 1]]), InvalidBlockTable, "source block 6"),
    "destination past the cache": (
        _set(block_mapping=[[0, 4]]),
        InvalidBlockTable,
        "destination block 4",
    ),
    "destination twice": (
        _set(block_mapping=[[0, 1], [2, 1]]),
        InvalidBlockTable,
        "destination block 1",
    ),
    "dtypes differ": (_set(dst=np.zeros((4, 2, 1, 4), np.float16)), InvalidRequest, "float16"),
    "block shapes differ": (
        _set(dst=np.zeros((4, 2, 1, 8), np.float32)),
        InvalidRequest,
        "(2, 1, 8)",
    ),
    "overlapping views": (_set(src=_shared[:4], dst=_shared[2:]), InvalidRequest, "overlap"),
    "chain within one cache": (
        _set(src=_shared, dst=_shared, block_mapping=[[0, 1], [1, 2]]),
        InvalidBlockTable,
        "block 1 is both",
    ),
    "non-contiguous host array": (
        _set(dst=np.zeros((4, 2, 1, 8), np.float32)[..., ::2]),
        InvalidRequest,
        "C-contiguous",
    ),
    "list": (_set(src=lambda a: a["src"].copy_to_host().tolist()), InvalidRequest, "list"),
    "threads zero": (_set(threads=0), InvalidRequest, "got 0"),
}


@pytest.mark.parametrize("case", SWAP_CASES)
def test_swap_blocks_refuses(case: str, no_launch: None) -> None:
    change, error, words = SWAP_CASES[case]
    args = swap_args()
    change(args)
    check_refused(swap_blocks, args, error, words)
