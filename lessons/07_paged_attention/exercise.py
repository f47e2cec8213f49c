"""Lesson 07: paged attention, v1 (one thread block per sequence and head), then v2 (the context
cut into partitions that run in parallel, merged by a second kernel).

Fill in the two tasks; check your work with

    minipaged lesson check 07

The host side is the library's (``prepare_attention`` validates and stages everything); the
kernels are yours. Shapes: ``query [num_seqs, num_heads, head_dim]``, caches ``[num_blocks,
block_size, num_kv_heads, head_dim]``, ``block_tables int32 [num_seqs, max_blocks]``,
``seq_lens int32 [num_seqs]``. Query head h reads kv head ``h // (num_heads // num_kv_heads)``.

Building blocks given by the library (read them in ``minipaged/kernels/attention.py``):
``_shared_arrays(head_dim)`` -> ``q, red, logits`` in shared memory; ``_block_max`` and
``_block_sum`` (tree reductions over the thread block); ``_weighted_values(logits, red,
value_cache, table, kv_head, start, end)`` -> thread d's ``sum_t logits[t - start] * v_t[d]``.
Call ``cuda.syncthreads()`` only where every thread of the block reaches it.
"""

from __future__ import annotations

import math  # noqa: F401 (for your tasks)
from typing import Any
from unittest.mock import patch

from numba import cuda, float32  # noqa: F401 (for your tasks)

from minipaged.kernels import attention
from minipaged.kernels.attention import (  # noqa: F401 (for your tasks)
    NEG_INF,
    PARTITION_SIZE,
    _block_max,
    _block_sum,
    _shared_arrays,
    _weighted_values,
)


@cuda.jit(device=True)
def softmax_numerators(q, logits, red, key_cache, table, kv_head, start, end):
    """For the tokens ``start <= t < end`` of one sequence (block table row ``table``): set
    ``logits[t - start] = exp(q . k_t - m)`` with ``m`` the largest ``q . k_t``, and return
    ``(m, sum of those exponentials)``. ``q`` (shared) already holds ``scale * query``.
    Token t's key is ``key_cache[table[t // block_size], t % block_size, kv_head, :]``.
    Thread i handles tokens ``start + i``, ``start + i + blockDim.x``, ...; ``_block_max`` and
    ``_block_sum`` combine the threads' partial results (and their barriers publish logits)."""
    # TODO task 1 (about 20 lines)
    raise NotImplementedError("task 1: softmax_numerators")


@cuda.jit
def paged_attention_v1_kernel(out, query, key_cache, value_cache, block_tables, seq_lens, scale):
    """Grid ``(num_heads, num_seqs)``: thread block (head, seq) computes ``out[seq, head, :]``.
    Load ``scale * query[seq, head]`` into shared ``q`` (then synchronise), get the softmax
    numerators over the whole context, weight the values, and let thread d < head_dim write
    ``out[seq, head, d] = weighted sum / sum of exponentials``."""
    # TODO task 1 (about 14 lines)
    raise NotImplementedError("task 1: paged_attention_v1_kernel")


@cuda.jit
def paged_attention_v2_kernel(
    partial_out,
    max_logits,
    exp_sums,
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    scale,
    partition_size,
):
    """Grid ``(num_heads, num_seqs, max_partitions)``: v1's body over the tokens of partition
    ``p = blockIdx.z`` only (``start = p * partition_size``; a partition starting past the
    sequence's end returns at once, the whole block together). Writes
    ``partial_out[seq, head, p, :]`` (normalised over the partition), and from thread 0
    ``max_logits[seq, head, p] = m`` and ``exp_sums[seq, head, p] = l``."""
    # TODO task 2 (about 22 lines)
    raise NotImplementedError("task 2: paged_attention_v2_kernel")


@cuda.jit
def paged_attention_v2_reduce_kernel(
    out, partial_out, max_logits, exp_sums, seq_lens, partition_size
):
    """Grid ``(num_heads, num_seqs)``: merge the partitions of one sequence. With
    ``M = max_p m_p``, partition p weighs ``w_p = l_p * exp(m_p - M)`` and
    ``out = sum_p w_p * partial_out_p / sum_p w_p``; threads stride over the head dimension.
    Read only the sequence's own partitions: the others hold garbage."""
    # TODO task 2 (about 15 lines)
    raise NotImplementedError("task 2: paged_attention_v2_reduce_kernel")


# ----- given: the library's host side, launching the kernels above ------------------------------


def paged_attention_v1(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    out: Any = None,
    threads: int | None = None,
) -> Any:
    """Version 1 with your kernel (see :func:`minipaged.kernels.paged_attention_v1`)."""
    with patch.object(attention, "paged_attention_v1_kernel", paged_attention_v1_kernel):
        return attention.paged_attention_v1(
            query, key_cache, value_cache, block_tables, seq_lens, scale, out, threads
        )


def paged_attention_v2(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    partition_size: int = PARTITION_SIZE,
    out: Any = None,
    threads: int | None = None,
) -> Any:
    """Version 2 with your kernels (see :func:`minipaged.kernels.paged_attention_v2`)."""
    with (
        patch.object(attention, "paged_attention_v2_kernel", paged_attention_v2_kernel),
        patch.object(
            attention, "paged_attention_v2_reduce_kernel", paged_attention_v2_reduce_kernel
        ),
    ):
        return attention.paged_attention_v2(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            scale,
            partition_size,
            out,
            threads,
        )
