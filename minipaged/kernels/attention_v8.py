"""Paged decode attention, version 8: version 6's warps, with the batch's work cut into equal
runs, one for every warp the GPU holds at once.

Version 6 gives each (sequence, kv head) pair a whole number of warps. At 64 x 4096 with 8 kv
heads that is 512 pairs of 2 warps each: 128 blocks of 8 warps, on an H100 of 132 SMs that hold
one such block each. Four SMs sit idle, and under Nsight Compute version 6 kept DRAM at 87.4% of
its peak where SDPA kept it at 90.9% (docs/benchmarks.md): per busy SM, the same. The batch's
work cannot be dealt to 132 SMs in whole pairs; it can in blocks of the cache.

So the host plans the launch first (``plan``). For ``heads`` neighbouring kv heads, the
batch's blocks of the cache, sequence after sequence, form one stream, and the stream is cut
into ``runs`` runs of equal length (to one block): run ``r`` takes blocks ``r * B // runs`` to
``(r + 1) * B // runs - 1`` of ``B``. A run may end in the middle of a sequence and the next
one take it up, so it is a list of segments, each a stretch of one sequence. A warp walks each
segment of its run as version 6 walks its run (the same device function) and writes the
segment's partial result, its output with its maximum logit and exp sum, as version 2's
partitions do; the pieces of a sequence are numbered in stream order. The warp that finishes
the last piece of a (sequence, kv head) merges its pieces into the output right away: each warp
counts its finished piece with an atomic add, after a fence that makes its partial result
visible to the whole GPU, and the one that counts last knows that every piece is in memory
(version 5 merges its partitions the same way). A sequence that fits in one run is one piece,
and its warp writes the output itself.

This is the decomposition Osama et al. call Stream-K (PPoPP 2023) for matrix products, and the
load-balanced plan that FlashInfer (Ye et al., MLSys 2025) makes on the host before a batch's
decode attention: the plan depends only on the lengths, which the host knows, and costs the
kernel nothing.

What it costs: each run starts its loads cold at each segment (a run spans two sequences or
so), each piece is a partial result written and read once more (4 query heads of 128 floats),
and the last warp of a pair merges them, a few loads deep.

What it showed on an H100 (docs/benchmarks.md): the idle SMs were not version 6's problem.
Given 66 sequences, which fill all 132 SMs, version 6 took 2.9% longer for 3.1% more work;
the memory system sets its pace. Where version 8 helps is a batch of mixed lengths, where
version 6's warps of short sequences wait for the long ones: 3.1 to 3.9% faster there with
version 6's three tuning choices in its walk (1.9 to 2.1% without). On equal lengths it is
slower (5.5 to 6.1% for 32/8, 0.4 to 0.7% for 32/32): version 6 takes all 255 registers a
thread, and whatever version 8 holds through a walk on top of it, ptxas spills (104 bytes a
thread for 32/8 with the choices, 48 to 128 without), with the run's segments read from
global memory or from shared.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import config, cuda, float32, int32, uint32

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention as v2
from minipaged.kernels import attention_v5 as v5
from minipaged.kernels import attention_v6 as v6
from minipaged.kernels import validate as v

WARP = v6.WARP
PIECE = v6.PIECE
MAX_GROUP = v6.MAX_GROUP
NEG_INF = v6.NEG_INF
INLINE = v6.INLINE
SWAP = v6.SWAP
POSTED = v6.POSTED
SEGMENT = 5  # int32 fields of a segment: sequence (-1: no more), first token, end, piece, pieces


@functools.cache
def make_merge_pieces(group: int, head_dim: int) -> Any:
    """The device function that counts a warp's finished piece of a (sequence, kv head) and,
    if it is the last of the ``n`` pieces to finish, merges them into the output."""
    per_lane = group * head_dim // WARP  # outputs a lane merges (head_dim: a multiple of 64)

    @cuda.jit(device=True, **INLINE)
    def merge_if_last(out, partial_out, max_logits, exp_sums, counters, flag, seq, kv_head, n):
        """The pieces' outputs weighed by ``l_p exp(m_p - M)`` as version 2's reduction weighs
        its partitions; sets the counter back to 0 for the next launch. ``flag``: one int32 of
        shared memory, the warp's own."""
        lane = cuda.threadIdx.x % WARP
        cuda.threadfence()  # this lane's share of the piece, seen by every SM
        v5._syncwarp()
        if lane == 0:
            flag[0] = cuda.atomic.add(counters, (seq, kv_head), 1)
        v5._syncwarp()
        last = flag[0] == n - 1
        v5._syncwarp()  # every lane has read the flag before the next piece writes it
        if not last:
            return
        cuda.threadfence()
        first = kv_head * group
        tops = cuda.local.array(MAX_GROUP, float32)
        sums = cuda.local.array(MAX_GROUP, float32)
        weights = cuda.local.array(MAX_GROUP, float32)
        acc = cuda.local.array(per_lane, float32)
        for h in range(group):
            tops[h] = NEG_INF
            sums[h] = float32(0.0)
        for p in range(n):
            for h in range(group):
                tops[h] = max(tops[h], max_logits[seq, first + h, p])
        for j in range(per_lane):
            acc[j] = float32(0.0)
        for p in range(n):
            for h in range(group):
                weights[h] = exp_sums[seq, first + h, p] * math.exp(
                    max_logits[seq, first + h, p] - tops[h]
                )
                sums[h] += weights[h]
            for j in range(per_lane):  # output o = lane + 32 j is head (32 j) // head_dim's
                h = WARP * j // head_dim
                d = lane + WARP * j - h * head_dim
                acc[j] += weights[h] * partial_out[seq, first + h, p, d]
        for j in range(per_lane):
            h = WARP * j // head_dim
            out[seq, first + h, lane + WARP * j - h * head_dim] = acc[j] / sums[h]
        if lane == 0:
            counters[seq, kv_head] = 0

    return merge_if_last


@functools.cache
def make_kernel(
    group: int, head_dim: int, block_size: int, warps: int, heads: int, merge: bool = True
) -> Any:
    """The kernel for ``group`` query heads per kv head, float16 rows of ``head_dim`` values
    (a multiple of 64), blocks of ``block_size`` tokens, ``warps`` warps a block over ``heads``
    neighbouring kv heads: warp ``w`` of block ``(x, y)`` walks run ``y * (warps // heads) + w
    // heads`` of ``plan``'s work for kv head ``x * heads + w % heads``. ``merge`` False:
    every piece, a whole sequence's too, is left as a partial result for a merge kernel."""
    _load16 = v6._make_load16("")
    pieces = head_dim // PIECE
    row = head_dim // 2  # words of a row
    k_words = 2 * 4 * (pieces // 4)  # a lane's words of a tile, of K and of V
    v_words = 4 * 4 * (pieces // 8)
    q_words = pieces
    acc_size = 4 * (head_dim // 16)
    shift = block_size.bit_length() - 1
    runs = warps // heads
    load_query = v6.make_load_query(group, head_dim)
    walk = v6.make_walk(group, head_dim, block_size, _load16, v6.TUNING, heads)
    write_run = v6.make_write_run(group, head_dim, False)
    merge_if_last = make_merge_pieces(group, head_dim)

    @cuda.jit(**({} if config.ENABLE_CUDASIM else {"launch_bounds": warps * WARP}))
    def paged_attention_v8_kernel(
        out,
        partial_out,
        max_logits,
        exp_sums,
        counters,
        query_words,
        key_words,
        value_words,
        block_tables,
        work,
        scale,
        id_words,
    ):
        """Grid ``(num_kv_heads // heads, runs // (warps // heads))``. ``work[r, i]``: segment
        ``i`` of run ``r`` (``SEGMENT`` fields); ``id_words``: int32s of shared memory a warp
        for a segment's block numbers. Leaves ``counters`` (int32 ``[num_seqs,
        num_kv_heads]``, zero) zero.

        Version 6 takes 255 registers a thread and no more: the two tiles in flight are 128 of
        them. So nothing of a segment but its bounds is held in a register while its tokens
        are walked: the warp copies its run's segments to shared memory first, and reads a
        segment's sequence, piece and pieces there again after the walk. (ptxas still spills
        on an H100 for 32/8, 104 bytes a thread, as it did with them held: docs/benchmarks.md.)
        The walk makes version 6's three tuning choices, as ``launch_v6`` does."""
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        kv_head = cuda.blockIdx.x * heads + warp % heads
        run = cuda.blockIdx.y * runs + warp // heads
        num_heads = partial_out.shape[1]
        base = num_heads // group * row  # words from one token's row to the next
        g = lane >> 2
        t = lane & 3

        # [ids | flags | segments | swap | posted], each warp's share of each in turn
        segments = work.shape[1]
        flags_at = warps * id_words
        segs_at = flags_at + warps
        seg_words = segments * SEGMENT
        swap_at = segs_at + warps * seg_words
        smem = cuda.shared.array(0, float32)
        ids = cuda.shared.array(0, int32)[warp * id_words : (warp + 1) * id_words]
        flag = cuda.shared.array(0, int32)[flags_at + warp : flags_at + warp + 1]
        mine = cuda.shared.array(0, int32)[segs_at + warp * seg_words :][:seg_words]
        swap = smem[swap_at : swap_at + warps * SWAP]  # (the simulator's)
        posted = cuda.shared.array(0, uint32)[swap_at + warps * SWAP :]  # (the simulator's)

        q = cuda.local.array(q_words, uint32)
        k_even = cuda.local.array(k_words, uint32)
        v_even = cuda.local.array(v_words, uint32)
        k_odd = cuda.local.array(k_words, uint32)
        v_odd = cuda.local.array(v_words, uint32)
        acc = cuda.local.array(acc_size, float32)
        s = cuda.local.array(8, float32)
        p = cuda.local.array(4, float32)
        for j in range(lane, seg_words, WARP):
            mine[j] = work[run, j // SEGMENT, j % SEGMENT]
        for i in range(segments):
            v5._syncwarp()  # the segments are in; the last segment's reads of ids are done
            at = i * SEGMENT
            seq = mine[at]
            if seq < 0:
                break
            start = mine[at + 1]
            end = mine[at + 2]
            v6.fetch_ids(ids, block_tables[seq], start, end, shift, lane)
            load_query(q, query_words, seq, num_heads, kv_head, g, t)
            top, total = walk(
                k_even, v_even, k_odd, v_odd, q, acc, s, p, key_words, value_words, ids, start,
                end, base, kv_head * row, scale, lane, swap, posted,
            )  # fmt: skip
            v5._syncwarp()  # (and the segment is read again, not held through the walk)
            seq = mine[at]
            n = mine[at + 4] if merge else 0
            write_run(
                out, partial_out, max_logits, exp_sums, acc, top, total, swap, seq, kv_head,
                mine[at + 3], n == 1, lane, swap,
            )  # fmt: skip
            if n > 1:
                merge_if_last(
                    out, partial_out, max_logits, exp_sums, counters, flag, seq, kv_head, n
                )

    return paged_attention_v8_kernel


# --- host side -----------------------------------------------------------------------------------


def plan(seq_lens: np.ndarray, block_size: int, runs: int) -> tuple[np.ndarray, np.ndarray]:
    """``(work, pieces)`` for ``runs`` runs over the blocks of the cache that sequences of
    ``seq_lens`` tokens fill, in order: ``work`` int32 ``[runs, segments, SEGMENT]``, segment
    ``i`` of run ``r`` as ``(sequence, first token, end token, piece, the sequence's pieces)``
    (sequence -1 past the run's last segment), ``pieces`` int32 ``[num_seqs]``.

    Invariants (tests/test_attention_v8.py): run ``r`` holds blocks ``r * B // runs`` to ``(r +
    1) * B // runs - 1`` of the ``B`` blocks, so two runs differ by at most one block; every
    token of every sequence is in exactly one segment, each segment starts on a block
    boundary; a sequence's segments are its pieces ``0`` to ``pieces[s] - 1``, in order."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    blocks = -(-lens // block_size)
    cu = np.concatenate([[0], np.cumsum(blocks)])  # the sequences' first blocks, then B
    bounds = np.arange(runs + 1, dtype=np.int64) * int(cu[-1]) // runs
    # the run of a sequence's first block and of its last: the last run starting at or before
    first = np.searchsorted(bounds, cu[:-1], side="right") - 1
    last = np.searchsorted(bounds, cu[1:] - 1, side="right") - 1
    segments: list[list[list[int]]] = [[] for _ in range(runs)]
    pieces = np.zeros(len(lens), dtype=np.int32)
    for s in range(len(lens)):
        for r in range(int(first[s]), int(last[s]) + 1):
            lo = max(bounds[r], cu[s]) - cu[s]
            hi = min(bounds[r + 1], cu[s + 1]) - cu[s]
            if hi > lo:  # (more runs than blocks leaves some runs empty)
                end = min(int(hi) * block_size, int(lens[s]))
                segments[r].append([s, int(lo) * block_size, end, int(pieces[s]), 0])
                pieces[s] += 1
    most = max(1, max(len(x) for x in segments))
    work = np.full((runs, most, SEGMENT), -1, dtype=np.int32)
    for r, x in enumerate(segments):
        for i, segment in enumerate(x):
            segment[4] = pieces[segment[0]]
            work[r, i] = segment
    return work, pieces


def choose_launch(num_kv_heads: int) -> tuple[int, int, int]:
    """``(warps, heads, blocks)``: blocks of 8 warps (an SM holds one at 255 registers a
    thread), each warp its own kv head of up to 8 neighbouring ones and the same run (so a
    block's warps read neighbouring rows of the cache together), one wave of them."""
    heads = v6.LAUNCH_WARPS
    while num_kv_heads % heads:
        heads //= 2
    return v6.LAUNCH_WARPS, heads, wave(num_kv_heads, v6.LAUNCH_WARPS, heads)


def wave(num_kv_heads: int, warps: int, heads: int) -> int:
    """Blocks for each ``heads`` kv heads that fill the GPU's places for warps once, at
    ``v6.SM_WARPS`` warps an SM (255 registers a thread)."""
    places = max(1, v6.SM_WARPS // warps) * v5.multiprocessors()
    return max(1, places // (num_kv_heads // heads))


def shared_bytes(id_words: int, segments: int, warps: int) -> int:
    """Dynamic shared memory of a block: each warp's block numbers, its flag, its run's
    ``segments`` segments, then the simulator's meeting places."""
    return 4 * warps * (id_words + 1 + segments * SEGMENT + SWAP + POSTED)


def supports(
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    warps: int = v6.LAUNCH_WARPS,
    heads: int = 1,
) -> str | None:
    """None when version 8 can run this shape, else the reason it cannot: version 6's (its
    products are version 6's), with ``heads`` kv heads a block dividing ``warps``."""
    runs = warps // heads if heads else 1
    return v6.runs_reason(
        8, dtype, num_heads, num_kv_heads, head_dim, block_size, runs * block_size, warps, heads
    )


def launch_v8(
    a: v2.AttentionArgs,
    warps: int | None = None,
    heads: int = 1,
    blocks: int | None = None,
    merge: bool = True,
) -> None:
    """Launch version 8 on checked inputs: ``blocks`` blocks (a grid's second dimension) for
    each ``heads`` kv heads, of ``warps`` warps. ``warps`` None: ``choose_launch``'s pick (and
    its heads and blocks); ``blocks`` None: one wave of the GPU. The plan is made once per
    ``a`` and launch. ``merge`` False: the pieces are merged by version 5's merge kernel, in a
    launch of its own, instead of by the warp that finishes last."""
    num_seqs, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    if warps is None:
        warps, heads, blocks = choose_launch(kv_heads)
    warps = v.check_int("warps", warps, 1, v6.MAX_WARPS)
    heads = v.check_int("heads", heads, 1, v6.MAX_WARPS)
    reason = supports(a.key_cache.dtype, num_heads, kv_heads, head_dim, block_size, warps, heads)
    if reason:
        raise InvalidRequest(reason)
    if blocks is None:
        blocks = wave(kv_heads, warps, heads)
    blocks = v.check_int("blocks", blocks, 1, 2**16 - 1)
    v5.check_aligned(a)
    runs = blocks * (warps // heads)
    key = ("v8", block_size, runs)
    if key not in a.plans:
        if a.host_seq_lens is None:
            raise InvalidRequest("version 8 plans from the lengths on the host: none were kept")
        work, pieces = plan(a.host_seq_lens, block_size, runs)
        most = int(np.max(work[:, :, 2] - work[:, :, 1]))  # tokens of the longest segment
        most_blocks = -(-most // block_size)
        id_words = -(-most_blocks // 4) * 4
        a.plans[key] = (cuda.to_device(work), cuda.to_device(pieces), int(pieces.max()), id_words)
    work, pieces, parts, id_words = a.plans[key]
    shared = shared_bytes(id_words, work.shape[1], warps)
    if shared > v5.OPT_IN_SHARED_BYTES:
        raise InvalidRequest(
            f"{shared} bytes of shared memory per thread block, more than "
            f"{v5.OPT_IN_SHARED_BYTES}: use more blocks"
        )
    group = num_heads // kv_heads
    partial_out, max_logits, exp_sums = a.buffers(parts)
    kernel = make_kernel(group, head_dim, block_size, warps, heads, merge)
    args = (
        a.out,
        partial_out,
        max_logits,
        exp_sums,
        a.counters(kv_heads),
        *v6.words(a),
        a.block_tables,
        work,
        a.scale,
        id_words,
    )
    v5.allow_shared(kernel, args, shared)
    kernel[(kv_heads // heads, blocks), warps * WARP, 0, shared](*args)
    if not merge:  # sequence s has pieces[s] parts of 1 "token" each
        v5.merge_buffers(a, (partial_out, max_logits, exp_sums), pieces, 1, v5.MERGE_THREADS)


def paged_attention_v8(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    warps: int | None = None,
    heads: int = 1,
    blocks: int | None = None,
    out: Any = None,
    merge: bool = True,
) -> Any:
    """Version 8 (version 6's warps over equal runs of the batch's cache). Arguments as for
    ``paged_attention``, and ``launch_v8``'s; ``InvalidRequest`` for a shape ``supports``
    refuses."""
    a = v2.prepare_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, out)
    launch_v8(a, warps, heads, blocks, merge)
    return a.result()
