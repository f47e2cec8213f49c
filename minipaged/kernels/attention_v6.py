"""Paged decode attention, version 6: the cache goes straight from memory into the tensor cores'
registers, with no shared memory in between.

Version 5 lands each block of the cache in a ring of shared-memory buffers (``cp.async``) and
reads it back with ``ldmatrix``. Measured on an H200 (docs/benchmarks.md, "How fast the cache
can be read"), no ring that lands the cache where ``ldmatrix`` can read it without bank
conflicts moved it faster than 0.93x the speed at which PyTorch's SDPA reads a contiguous
cache, before any arithmetic; a plain read, each thread holding several 16-byte loads in
flight, matched SDPA. So this version reads the cache the plain way: each lane loads 16 bytes
at a time into its own registers, and the values are already where ``mma.sync`` wants them.

That works because a product does not care in which order it sums. ``S = Q K^T`` sums over the
head's dimensions: any permutation of them, applied to Q and K alike, gives the same logits. So
instead of the dimensions ``mma``'s fragment maps name, lane ``(g, t)`` takes for token ``g``
the 16-byte pieces ``t, t + 4, t + 8, ...`` of its K row, as they lie in memory, and gives each
piece's four registers to two ``k`` steps of the product; its query registers are the same
pieces of query head ``g``. The 4 lanes of a row group then read 64 contiguous bytes of a row:
whole 32-byte sectors, one request.

``O^T = V^T P^T`` sums over tokens, and its rows (V's dimensions) can be renamed too. In the
A fragment of ``V^T`` a register holds two tokens' values of one dimension, but a load brings
one token's 8 consecutive dimensions. Lane ``(g, t)`` loads pieces ``g, g + 8, ...`` of tokens
``2t, 2t + 1, 2t + 8, 2t + 9`` (8 lanes read 128 contiguous bytes of a row), and each 32-bit
word of those pieces, two dimensions of one token, is a row pair of one m tile: word ``j`` of
tokens ``2t`` and ``2t + 1`` gives A's register 0 (their low halves, row ``g``) and register 1
(their high halves, row ``g + 8``) of m tile ``j``. Two integer operations a register, no
shared memory.

The logits' C fragment (head ``g``, tokens ``2t, 2t + 1`` and ``2t + 8, 2t + 9``) is exactly
the B fragment of ``P^T`` those tokens need, so the probabilities never leave their lanes
either (FlashAttention 2 uses the same coincidence). The softmax is online (Milakov and
Gimelshein, 2018): a running maximum per head, and the sums so far rescaled when it grows.
A lane keeps its own share of a head's exp sum, since all 4 lanes of a row group rescale by the
same factor; they are added up once, at the end.

While a tile of 16 tokens is multiplied, the next tile's loads are in flight. The run's even
tiles land in one set of registers and its odd tiles in another, and the two take turns: as
soon as the even set's tile is folded in, its registers take the loads of the tile after the
odd one, whether or not the odd tile has arrived yet. (Copying the next set into the current
one after each tile, the plain way to write it, costs 64 moves a tile, and no load of the tile
after next can start until the next tile has landed: written so, the kernel needed the lines
of the tile two ahead prefetched into L2 and was still 3 to 4% slower, docs/benchmarks.md;
taking turns, a prefetch only slows it down.) Two sets are all a warp can hold: at 255
registers a thread an SM runs 8 warps, and forcing more makes the compiler spill (measured in
docs/benchmarks.md). A thread block is ``warps`` warps over ``heads`` neighbouring kv heads
(so that its warps read neighbouring rows of the cache at once); each walks its own run of
its kv head's partition and the runs of a kv head are combined in shared memory at the end,
as version 5 does (or, where a thread has several outputs to combine, with the runs' weights
worked out once a head: ``make_combine_runs``); sequences of several partitions then go
through version 5's merge kernel.

Slots of the last block past the sequence's end may hold NaN: their K rows are not loaded
(their logits are set to minus infinity) and their V rows are loaded as zeros, so that a zero
probability never meets a NaN.

In Numba's CUDA simulator ``_load16`` reads four words, and the exchanges between lanes that
use warp shuffles on a GPU go through shared memory (``_lane_value``); the product is version
5's ``_mma``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import config, cuda, float32, int32, int64, uint32

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention as v2
from minipaged.kernels import attention_v3 as v3
from minipaged.kernels import attention_v5 as v5
from minipaged.kernels import validate as v

WARP = v5.WARP
TILE = v5.TILE  # tokens a step: the N of the logits' product, the K of V's
MAX_GROUP = v5.MAX_GROUP
PIECE = 8  # float16 values of one 16-byte load
MAX_WARPS = v5.MAX_WARPS
NEG_INF = v3.NEG_INF
INLINE = v3.INLINE
SWAP = 32 if config.ENABLE_CUDASIM else 0  # the simulator's floats a warp for _lane_value
POSTED = v5.POSTED  # the simulator's words a warp for _mma
LO, HI = uint32(0xFFFF), uint32(0xFFFF0000)
TUNING = ("lazy", "lockstep", "unmasked")  # make_walk's tuning choices, all on in launch_v6
CHOICES = (*TUNING, "early", "lean", "padded")  # the choices launch_v6 takes (TUNING: made)


if config.ENABLE_CUDASIM:

    def _make_load16(hint: str = "") -> Any:
        """Simulator: a load of the 4 words ``words[at:at + 4]`` (``hint`` means nothing)."""
        return _load16

    def _load16(words, at):  # noqa: ANN001, ANN202
        """Simulator: the 4 words ``words[at:at + 4]``."""
        return (
            uint32(words[at]),
            uint32(words[at + 1]),
            uint32(words[at + 2]),
            uint32(words[at + 3]),
        )

    @cuda.jit(device=True)
    def _lane_value(x, src, swap):
        """Simulator ``shfl_sync``: ``x`` of lane ``src`` of this warp, for every lane (every
        lane must call it); the lanes meet in ``swap``, ``SWAP`` floats for each warp of the
        block."""
        lane = cuda.threadIdx.x % WARP
        mine = swap[(cuda.threadIdx.x - lane) :][:WARP]
        mine[lane] = x
        v5._syncwarp()
        y = mine[src]
        v5._syncwarp()
        return y

    @cuda.jit(device=True)
    def _any_lane(x, swap):
        """Simulator ``any_sync``: whether ``x`` holds in any lane of this warp."""
        lane = cuda.threadIdx.x % WARP
        mine = swap[(cuda.threadIdx.x - lane) :][:WARP]
        mine[lane] = float32(1.0) if x else float32(0.0)
        v5._syncwarp()
        y = False
        for i in range(WARP):
            y = y or mine[i] != float32(0.0)
        v5._syncwarp()
        return y

    @cuda.jit(device=True)
    def _run_barrier(barrier, threads):
        """Simulator: nothing (the warps of a run group keeping pace changes no result)."""

else:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    _I32 = ir.IntType(32)

    @functools.cache
    def _make_load16(hint: str = "") -> Any:
        """``ld.global.nc{hint}.v4.u32``: the 16 bytes at ``words[at:at + 4]`` (``at`` a
        multiple of 4 words on a 16-byte aligned array) in one load, through the read-only
        path; ``hint`` a cache qualifier such as ``.L1::no_allocate``."""

        @intrinsic
        def load16(typingctx, words, at):  # noqa: ANN001, ANN202
            sig = types.UniTuple(types.uint32, 4)(words, types.int64)

            def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
                data = context.make_array(sig.args[0])(context, builder, args[0]).data
                addr = builder.ptrtoint(builder.gep(data, [args[1]]), ir.IntType(64))
                fn = ir.FunctionType(ir.LiteralStructType([_I32] * 4), [ir.IntType(64)])
                d = builder.asm(
                    fn, f"ld.global.nc{hint}.v4.u32 {{$0, $1, $2, $3}}, [$4];",
                    "=r,=r,=r,=r,l", [addr], False,
                )  # fmt: skip
                values = [builder.extract_value(d, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, values)

            return sig, codegen

        return load16

    @cuda.jit(device=True, **INLINE)
    def _lane_value(x, src, swap):
        """``x`` of lane ``src`` of this warp (a warp shuffle; every lane must call it)."""
        return cuda.shfl_sync(0xFFFFFFFF, x, src)

    @cuda.jit(device=True, **INLINE)
    def _any_lane(x, swap):
        """Whether ``x`` holds in any lane of this warp (a vote; every lane must call it)."""
        return cuda.any_sync(0xFFFFFFFF, x)

    @intrinsic
    def _run_barrier(typingctx, barrier, threads):  # noqa: ANN001, ANN202
        """``bar.sync barrier, threads``: the ``threads`` threads (whole warps) that name
        hardware barrier ``barrier`` (1 to 15; 0 is ``syncthreads``') wait for each other."""
        sig = types.void(types.int32, types.int32)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(ir.VoidType(), [_I32, _I32])
            builder.asm(fn, "bar.sync $0, $1;", "r,r", list(args), True)
            return context.get_dummy_value()

        return sig, codegen


@cuda.jit(device=True, **INLINE)
def _lows(a, b):
    """The low halves of ``a`` and ``b`` as one register, ``a``'s low: two tokens' values of
    one dimension, from two words of two tokens' rows."""
    return uint32((a & LO) | (b << uint32(16)))


@cuda.jit(device=True, **INLINE)
def _highs(a, b):
    """The high halves of ``a`` and ``b`` as one register, ``a``'s low."""
    return uint32((a >> uint32(16)) | (b & HI))


def shared_bytes(
    group: int, head_dim: int, block_size: int, sub: int, warps: int, heads: int = 1,
    padded: bool = False,
) -> int:  # fmt: skip
    """Dynamic shared memory of a block of ``warps`` warps over ``heads`` kv heads, walking
    ``sub`` tokens each: each warp's block numbers, then (several runs a kv head) each warp's
    run, ``run_layout``'s slot, for the block's combine, then the simulator's meeting places.
    ``padded``: the tuning choice (``make_end``'s)."""
    ids = warps * -(-(sub // block_size) // 4) * 4
    padded = pads_runs(group, head_dim, warps, heads, padded)
    runs = warps * run_layout(group, head_dim, padded)[1] if warps > heads else 0
    return 4 * (ids + runs + warps * (SWAP + POSTED))


def run_layout(group: int, head_dim: int, padded: bool = False) -> tuple[int, int]:
    """``(stride, slot)``: the words from one query head's outputs to the next in a warp's run
    in shared memory, and the run's words, ``[outputs (head-major) | maxima | exp sums]``.

    Unpadded, a run is ``head_dim`` words a head. ``padded`` (a tuning choice), a head takes
    the first ``stride >= head_dim + head_dim // 32`` with ``stride % 4 == 1``, and each 32
    dimensions skip a word (``run_at``), so that ``write_run``'s stores do not meet in a bank.
    Why: lane ``(g, t)`` stores dimension ``8 g + ...`` of heads ``2 t`` and ``2 t + 1``, and
    with a stride of 128 words all 32 lanes of a store fall in 4 of the 32 banks (8 g mod 32),
    8 to a bank for 8 query heads a kv head. Padded, a store's bank is ``2 t stride + 8 (g %
    4) + g // 4`` plus the same for every lane (mod 32): ``2 t stride = 2 t`` mod 8, so its low
    3 bits name ``t`` and ``g // 4``, and then its top 2 bits ``g % 4``: every lane has a bank
    of its own."""
    stride = head_dim
    if padded:
        stride += head_dim // WARP
        stride += (1 - stride) % 4
    return stride, group * stride + 2 * group


def run_at(head: int, dim: int, stride: int, skew: int) -> int:
    """Where dimension ``dim`` of query head ``head`` lies in a warp's run (``run_layout``'s
    ``stride``; ``skew`` 1 where padded: a word skipped every 32 dimensions, else 0)."""
    return head * stride + dim + (dim >> 5) * skew


_run_at = cuda.jit(device=True, **INLINE)(run_at)


def acc_output(lane: int, n: int) -> tuple[int, int]:
    """``(head, dim)``: the query head and dimension whose output lane ``lane``'s accumulator
    ``acc[n]`` sums. It is register ``n % 4`` of the C fragment of m tile ``j = n // 4`` of
    ``O^T = V^T P^T``: head ``2 t`` or ``2 t + 1`` (its column), and row ``g`` or ``g + 8`` of
    the tile, which ``read_tile`` filled with word ``j % 4`` (low or high half) of V's piece
    ``g + 8 (j // 4)`` (``write_run`` and the tests share it)."""
    g, t = lane >> 2, lane & 3
    j, i = n >> 2, n & 3
    return 2 * t + (i & 1), PIECE * (g + 8 * (j >> 2)) + 2 * (j & 3) + (i >> 1)


_acc_output = cuda.jit(device=True, **INLINE)(acc_output)


def lean_offsets(head_dim: int, stride: int, skew: int) -> tuple[int, ...]:
    """Where accumulator ``n`` of a lane goes in its warp's run, counted from where its
    accumulator 0 goes (``run_at`` of ``acc_output``): the same for every lane, since a
    lane's head and dimension are its own ``2 t`` and ``8 g`` plus a part that depends on
    ``n`` alone (``8 g`` plus the rest stays within the first 64 dimensions' skew: ``(8 g +
    r) >> 5 == g >> 2`` for ``r < 8``). ``make_write_run``'s lean stores take them as
    constants."""
    out = []
    for n in range(4 * (head_dim // 16)):
        head, dim = acc_output(0, n)
        out.append(run_at(head, dim, stride, skew))
    return tuple(out)


@cuda.jit(device=True, **INLINE)
def fetch_ids(ids, table, start, end, shift, lane):  # noqa: ANN001, ANN201
    """Copy the cache blocks of tokens ``start`` to ``end - 1`` (``start`` on a block boundary,
    blocks of ``1 << shift`` tokens) from the sequence's ``table`` into this warp's ``ids``
    in shared memory, each lane every 32nd, and wait until the warp's are all in: a walk looks
    up one a tile there, where holding them in registers would leave fewer for the cache
    (versions 6 and 8 and the probes that take version 6 apart share it)."""
    first = start >> shift
    for i in range(lane, ((end - 1) >> shift) - first + 1, WARP):
        ids[i] = table[first + i]
    v5._syncwarp()


@cuda.jit(device=True, **INLINE)
def fetch_run_ids(ids, table, first, count, lane):  # noqa: ANN001, ANN201
    """``fetch_ids`` for version 6's tuning choice ``early``: blocks ``first`` to ``first +
    count - 1`` of the sequence's ``table`` into ``ids``, with 32-bit unsigned indices, whose
    loop and addresses take fewer instructions than Numba's 64-bit signed ones (the loads
    of the table wait on them)."""
    i = lane
    while i < count:
        ids[i] = table[first + i]
        i += uint32(WARP)
    v5._syncwarp()


@functools.cache
def make_load_query(group: int, head_dim: int, wide: bool = False) -> Any:
    """The device function that loads lane ``(g, t)``'s query registers: pieces ``t + 4 i`` of
    query head ``g`` of the kv head, in the order its K words come (zeros for ``g >= group``;
    versions 6 to 8 share it). ``wide`` (version 6's tuning choice ``early``): each piece in
    one 16-byte load, as the cache's, instead of four words, each its own load whose index
    Numba tests for being negative: fewer instructions before a warp's first tile."""
    k_pieces = head_dim // PIECE // 4
    load16 = _make_load16()

    @cuda.jit(device=True, **INLINE)
    def load_query(q, query_words, seq, num_heads, kv_head, g, t):
        lit = g < group
        q_at = ((seq * num_heads + kv_head * group + (g if lit else 0)) * head_dim) // 2
        for i in range(k_pieces):
            if wide:
                if lit:
                    w0, w1, w2, w3 = load16(query_words, q_at + 4 * (t + 4 * i))
                else:
                    w0, w1, w2, w3 = uint32(0), uint32(0), uint32(0), uint32(0)
                q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3] = w0, w1, w2, w3
            else:
                for w in range(4):
                    q[4 * i + w] = query_words[q_at + 4 * (t + 4 * i) + w] if lit else uint32(0)

    return load_query


@functools.cache
def make_read_tile(head_dim: int, load: Any, masked: bool = True) -> Any:
    """The device function that fills lane ``(g, t)``'s registers with a tile of 16 tokens:
    K pieces ``t + 4 i`` of tokens ``g`` and ``g + 8``, V pieces ``g + 8 u`` of tokens ``2t,
    2t + 1, 2t + 8, 2t + 9`` (the order ``make_consume`` folds them in), each 16 bytes by
    ``load(words, at)``; the words of tokens past ``end`` are zeros (no load). The tile's
    first K row starts at ``k_words[k_at]`` and its first V row at ``v_words[v_at]``, the
    next rows ``stride`` words on: version 6 reads the cache in global memory, version 7 a
    copy of it in shared memory. ``masked`` False: the caller knows every token of the tile
    is before ``end``, and no load is tested."""
    k_pieces = head_dim // PIECE // 4
    v_pieces = head_dim // PIECE // 8

    @cuda.jit(device=True, **INLINE)
    def read_tile(k_regs, v_regs, k_words, k_at, v_words, v_at, stride, t0, end, g, t):
        for r in range(2):
            tok = g + 8 * r
            for i in range(k_pieces):
                o = 4 * (r * k_pieces + i)
                if not masked or t0 + tok < end:
                    w0, w1, w2, w3 = load(k_words, k_at + tok * stride + PIECE // 2 * (t + 4 * i))
                else:
                    w0, w1, w2, w3 = uint32(0), uint32(0), uint32(0), uint32(0)
                k_regs[o], k_regs[o + 1], k_regs[o + 2], k_regs[o + 3] = w0, w1, w2, w3
        for r in range(4):
            tok = 2 * t + (r & 1) + 8 * (r >> 1)
            for u in range(v_pieces):
                o = 4 * (r * v_pieces + u)
                if not masked or t0 + tok < end:
                    w0, w1, w2, w3 = load(v_words, v_at + tok * stride + PIECE // 2 * (g + 8 * u))
                else:
                    w0, w1, w2, w3 = uint32(0), uint32(0), uint32(0), uint32(0)
                v_regs[o], v_regs[o + 1], v_regs[o + 2], v_regs[o + 3] = w0, w1, w2, w3

    return read_tile


@functools.cache
def make_consume(group: int, head_dim: int, lazy: bool = False) -> Any:
    """The device function that folds one tile of 16 tokens, already in a lane's registers as
    ``load_tile`` leaves them, into its heads' running softmax and sums (versions 6 and 7
    share it). ``lazy`` (a tuning choice): the sums are rescaled only when some head's
    maximum grew in the warp (after the first tiles it seldom does), instead of multiplied
    by 1 at every tile."""
    k_pieces = head_dim // PIECE // 4
    v_pieces = head_dim // PIECE // 8
    tiles_m = head_dim // 16

    @cuda.jit(device=True, **INLINE)
    def consume(k_regs, v_regs, q, acc, s, p, t0, end, top, total, scale, lane, t, swap, posted):
        """Fold the tile from ``t0`` (its words in ``k_regs`` and ``v_regs``) into head
        ``g``'s running maximum ``top``, this lane's share ``total`` of its exp sum and the
        accumulators ``acc``; returns the new ``(top, total)``."""
        # logits of head g, tokens 2t, 2t + 1 (s[0:2]) and 2t + 8, 2t + 9 (s[4:6])
        for i in range(8):
            s[i] = float32(0.0)
        for i in range(k_pieces):
            for h in range(2):
                w = 4 * i + 2 * h
                a0, a2 = q[w], q[w + 1]
                for r in range(2):
                    o = 4 * r
                    b0, b1 = k_regs[o * k_pieces + w], k_regs[o * k_pieces + w + 1]
                    s[o], s[o + 1], s[o + 2], s[o + 3] = v5._mma(
                        a0, uint32(0), a2, uint32(0), b0, b1,
                        s[o], s[o + 1], s[o + 2], s[o + 3], posted,
                    )  # fmt: skip
        step = NEG_INF
        for i in range(4):
            tok = t0 + 2 * t + (i & 1) + 8 * (i >> 1)
            x = s[(i & 1) + 4 * (i >> 1)] * scale
            p[i] = x if tok < end else NEG_INF
            step = max(step, p[i])
        step = max(step, _lane_value(step, lane ^ 1, swap))
        step = max(step, _lane_value(step, lane ^ 2, swap))
        new_top = max(top, step)
        alpha = math.exp(top - new_top)
        top = new_top
        total *= alpha
        for i in range(4):
            p[i] = v5._round_f16(math.exp(p[i] - top))  # as the product sees it
            total += p[i]
        b0 = v5._pack_f16(p[0], p[1])
        b1 = v5._pack_f16(p[2], p[3])
        # rescale the sums of heads 2t and 2t + 1, then add this tile's
        alpha0 = _lane_value(alpha, 8 * t, swap)
        alpha1 = _lane_value(alpha, 8 * t + 4, swap)
        if lazy:
            if _any_lane(alpha0 != float32(1.0) or alpha1 != float32(1.0), swap):
                for j in range(tiles_m):
                    acc[4 * j] *= alpha0
                    acc[4 * j + 1] *= alpha1
                    acc[4 * j + 2] *= alpha0
                    acc[4 * j + 3] *= alpha1
            alpha0 = alpha1 = float32(1.0)
        for j in range(tiles_m):
            u, w = j >> 2, j & 3
            x0 = v_regs[4 * (0 * v_pieces + u) + w]
            x1 = v_regs[4 * (1 * v_pieces + u) + w]
            x2 = v_regs[4 * (2 * v_pieces + u) + w]
            x3 = v_regs[4 * (3 * v_pieces + u) + w]
            o = 4 * j
            acc[o], acc[o + 1], acc[o + 2], acc[o + 3] = v5._mma(
                _lows(x0, x1), _highs(x0, x1), _lows(x2, x3), _highs(x2, x3), b0, b1,
                acc[o] * alpha0, acc[o + 1] * alpha1, acc[o + 2] * alpha0,
                acc[o + 3] * alpha1, posted,
            )  # fmt: skip
        return top, total

    return consume


@functools.cache
def make_write_run(
    group: int, head_dim: int, several: bool, weighed: bool = False, padded: bool = False,
    lean: bool = False,
) -> Any:  # fmt: skip
    """The device function that ends a warp's run: its exp sums added up over each row group's
    4 lanes, then its output (the sums divided out), maxima and sums written where they go:
    with ``several`` runs a kv head, into the warp's slot ``run`` as ``[output (head-major) |
    maxima | sums]`` for ``combine_warps``; else, for a sequence of one partition (``alone``),
    the output itself, or the partition's partial result (versions 6 and 7 share it).
    ``weighed`` (with ``several``): the output is left as its sums, not divided, for
    ``make_combine_runs``, which weighs all runs alike; ``padded`` (with ``weighed``): in
    ``run_layout``'s padded slot. ``lean`` (with ``several``, a tuning choice): each store
    at a constant distance from the lane's first output (``lean_offsets``), so that the
    compiler makes each one instruction, not a branch and its address worked out, and
    (unweighed) each output multiplied by its head's inverse sum, not divided by the sum."""
    tiles_m = head_dim // 16
    stride, _ = run_layout(group, head_dim, padded)
    skew = 1 if padded else 0
    outputs = group * stride
    lean = lean and several
    offsets = lean_offsets(head_dim, stride, skew)

    @cuda.jit(device=True, **INLINE)
    def write_run(
        out, partial_out, max_logits, exp_sums, acc, top, total, run, seq, kv_head, part, alone,
        lane, swap,
    ):  # fmt: skip
        g = lane >> 2
        t = lane & 3
        total += _lane_value(total, lane ^ 1, swap)
        total += _lane_value(total, lane ^ 2, swap)
        # heads 2t and 2t + 1: their maxima and sums live in row groups 2t and 2t + 1
        tops = (_lane_value(top, 8 * t, swap), _lane_value(top, 8 * t + 4, swap))
        sums = (_lane_value(total, 8 * t, swap), _lane_value(total, 8 * t + 4, swap))
        if lean:
            head, dim = _acc_output(lane, 0)
            mine = run[uint32(_run_at(head, dim, stride, skew)) :]
            lit = (2 * t < group, 2 * t + 1 < group)
            scales = (float32(1.0) / sums[0], float32(1.0) / sums[1])  # (unused if weighed)
            for n in range(4 * tiles_m):
                if lit[n & 1]:
                    mine[offsets[n]] = acc[n] if weighed else acc[n] * scales[n & 1]
        else:
            for j in range(tiles_m):
                for i in range(4):
                    head, dim = _acc_output(lane, 4 * j + i)
                    if head < group:
                        x = acc[4 * j + i] if several and weighed else acc[4 * j + i] / sums[i & 1]
                        if several:
                            run[_run_at(head, dim, stride, skew)] = x
                        elif alone:
                            out[seq, kv_head * group + head, dim] = x
                        else:
                            partial_out[seq, kv_head * group + head, part, dim] = x
        if g == 0:
            for i in range(2):
                head = 2 * t + i
                if head < group:
                    if several:
                        run[outputs + head] = tops[i]
                        run[outputs + group + head] = sums[i]
                    elif not alone:
                        max_logits[seq, kv_head * group + head, part] = tops[i]
                        exp_sums[seq, kv_head * group + head, part] = sums[i]

    return write_run


def combines_with_weights(group: int, head_dim: int, warps: int, heads: int) -> bool:
    """Whether a block of ``warps`` warps over ``heads`` kv heads combines its runs with
    ``make_combine_runs`` (else ``v5.make_combine_warps``): where a kv head has several runs
    and a thread has more than one output to combine.

    Why: a block's combine comes after its slowest warp, so its latency is the kernel's.
    Measured on an H100 (docs/benchmarks.md), ``make_combine_runs`` took 0.2 to 0.5% off
    version 6's time with 4 to 16 outputs a thread (32 or 64 query heads over 8 kv heads), 0.1%
    with 2 (8 over 8); with one or none (32 over 32, blocks of 8 warps over one kv head) its
    second barrier, and the one thread that works out all 8 runs' weights, made it 0.1%
    slower."""
    return warps > heads and heads * group * head_dim > warps * WARP


def pads_runs(group: int, head_dim: int, warps: int, heads: int, padded: bool) -> bool:
    """Whether a block's runs lie in ``run_layout``'s padded slots: with the tuning choice
    ``padded``, where they are combined with weights (``make_combine_runs`` reads either
    layout; ``v5.make_combine_warps`` only the plain one)."""
    return padded and combines_with_weights(group, head_dim, warps, heads)


@functools.cache
def make_combine_runs(
    group: int, head_dim: int, warps: int, heads: int, padded: bool = False, lean: bool = False
) -> Any:
    """The device function that combines the runs of a block's ``warps`` warps over ``heads``
    kv heads (warp ``w`` walked a run of kv head ``w % heads``), as ``v5.make_combine_warps``'
    does, from runs that ``make_write_run(..., weighed=True)`` left undivided.

    Each output of a (kv head, query head) is its runs' sums weighed alike: run ``r`` by
    ``exp(m_r - M) / L`` (``M`` the runs' largest maximum, ``L`` the sum of their exp sums
    ``l_r exp(m_r - M)``). ``combine_warps`` works them out again for each of the head's
    ``head_dim`` outputs, with a division each, after each run divided its own outputs by its
    exp sum; here one thread a head works them out once, into the slots of the maxima, and
    after a barrier every output is a few multiply-adds (``combines_with_weights`` says
    where that is faster). ``padded``: the runs in ``run_layout``'s padded slots. ``lean`` (a
    tuning choice): an output's place worked out in 32-bit unsigned integers, not Numba's
    64-bit signed ones, whose divisions by constants need a correction for negative numbers
    and whose indices a test for them, and no test whether a thread has an output where all
    have the same number."""
    threads = warps * WARP
    runs = warps // heads
    outputs = group * head_dim
    stride, _ = run_layout(group, head_dim, padded)
    skew = 1 if padded else 0
    tops = group * stride  # where a run's maxima start
    rounds = -(-heads * outputs // threads)  # outputs a thread, at most (a constant)
    every = lean and heads * outputs % threads == 0  # every thread has ``rounds`` outputs
    word = uint32 if lean else int64

    @cuda.jit(device=True, **INLINE)
    def combine_runs(out, partial_out, max_logits, exp_sums, slots, slot, seq, kv_head, part,
                     alone):  # fmt: skip
        """After a barrier: warp ``w``'s run at ``slots[w * slot:]`` as ``[sums (head-major)
        | maxima | exp sums]`` (``run_layout``'s); writes what ``combine_warps`` writes (a run
        past the sequence's end left maximum minus infinity: weight 0)."""
        i = cuda.threadIdx.x
        if i < heads * group:
            k = word(i) // word(group)  # the block's kv head k, query head h
            h = word(i) - k * word(group)
            top = NEG_INF
            for r in range(runs):
                top = max(top, slots[(word(r * heads) + k) * word(slot) + word(tops) + h])
            total = float32(0.0)
            for r in range(runs):
                at = (word(r * heads) + k) * word(slot) + word(tops) + h
                e = math.exp(slots[at] - top)
                slots[at] = e
                total += slots[at + word(group)] * e
            inverse = float32(1.0) / total
            for r in range(runs):
                slots[(word(r * heads) + k) * word(slot) + word(tops) + h] *= inverse
            if not alone:
                head = word(kv_head) * word(group) + k * word(group) + h
                max_logits[word(seq), head, word(part)] = top
                exp_sums[word(seq), head, word(part)] = total
        cuda.syncthreads()
        for n in range(rounds):
            o = word(i) + word(n * threads)
            if every or o < word(heads * outputs):
                k = o // word(outputs)
                rest = o - k * word(outputs)  # query head h's dimension d, head-major
                h = rest // word(head_dim)
                d = rest - h * word(head_dim)
                x = float32(0.0)
                here = _run_at(h, d, word(stride), word(skew))
                for r in range(runs):
                    at = (word(r * heads) + k) * word(slot)
                    x += slots[at + word(tops) + h] * slots[at + here]
                head = word(kv_head) * word(group) + k * word(group) + h
                if alone:
                    out[word(seq), head, d] = x
                else:
                    partial_out[word(seq), head, word(part), d] = x

    return combine_runs


def make_end(
    group: int, head_dim: int, warps: int, heads: int, padded: bool = False, lean: bool = False
) -> tuple[Any, Any, int]:
    """``(write_run, combine_warps, slot)``: the device functions that end a warp's run and
    combine a block's runs, and the words of a run in shared memory: ``make_combine_runs``
    with runs left undivided where ``combines_with_weights`` (in padded slots with
    ``padded``, a tuning choice), else ``v5.make_combine_warps`` with runs divided by their
    own exp sums (version 6's kernel and ``scripts/probe_tail.py`` share them). ``lean``, a
    tuning choice: ``make_combine_runs``' and ``make_write_run``'s."""
    weights = combines_with_weights(group, head_dim, warps, heads)
    padded = pads_runs(group, head_dim, warps, heads, padded)
    if weights:
        combine = make_combine_runs(group, head_dim, warps, heads, padded, lean)
    else:
        combine = v5.make_combine_warps(group, head_dim, warps, heads)
    write_run = make_write_run(group, head_dim, warps > heads, weights, padded, lean)
    return write_run, combine, run_layout(group, head_dim, padded)[1]


@functools.cache
def make_load_tile(head_dim: int, block_size: int, load: Any, unmasked: bool = False) -> Any:
    """The device function that starts the loads of one tile of a run: ``read_tile``'s pieces
    of the 16 tokens from ``t0``, found through the run's block numbers ``ids`` (``ids[0]``
    holds token ``start``, on a block boundary). ``unmasked`` (a tuning choice): a whole tile
    (all before ``end``) is loaded without a test a load, a tile that ends past ``end``
    with them: one test a tile instead of one a row."""
    shift = block_size.bit_length() - 1
    read_tile = make_read_tile(head_dim, load)
    read_whole = make_read_tile(head_dim, load, False)

    @cuda.jit(device=True, **INLINE)
    def load_tile(k_regs, v_regs, key_words, value_words, ids, t0, start, end, base, head, g, t):
        """``base``: words from one token's row to the next; ``head``: the kv head's first
        word in a row."""
        at = ((ids[(t0 - start) >> shift] << shift) + (t0 & (block_size - 1))) * base + head
        if unmasked and t0 + TILE <= end:
            read_whole(k_regs, v_regs, key_words, at, value_words, at, base, t0, end, g, t)
        else:
            read_tile(k_regs, v_regs, key_words, at, value_words, at, base, t0, end, g, t)

    return load_tile


@functools.cache
def make_walk(
    group: int, head_dim: int, block_size: int, load: Any, tuning: tuple[str, ...] = (),
    heads: int = 1,
) -> Any:  # fmt: skip
    """The device function that walks tokens ``start`` to ``end - 1`` of one sequence for one
    kv head (``start`` on a block boundary, ``ids`` the cache blocks from there on) and leaves
    head ``g``'s running maximum, this lane's share of its exp sum and its accumulators
    ``acc``, by ``load`` from memory (versions 6 and 8 share it).

    The even tiles land in ``k_even`` and ``v_even``, the odd ones in ``k_odd`` and ``v_odd``,
    and the two sets take turns: while one tile is folded in, the loads of the other are in
    flight (the module's docstring says why not the plain way).

    ``tuning``, choices described in docs/benchmarks.md (``launch_v6`` makes all three;
    together they took 0.3 to 0.5% off its time on an H100, and 23% off its instructions):
    ``"unmasked"`` (``make_load_tile``'s), ``"lazy"`` (``make_consume``'s) and
    ``"lockstep"``: the ``heads`` warps of a block that walk the same run (of neighbouring kv
    heads: neighbouring bytes of the same rows, and as many tiles) wait for each other at
    every pair of tiles, so that they read those rows together."""
    acc_size = 4 * (head_dim // 16)
    load_tile = make_load_tile(head_dim, block_size, load, "unmasked" in tuning)
    consume = make_consume(group, head_dim, "lazy" in tuning)
    lockstep = "lockstep" in tuning and heads > 1
    run_threads = heads * WARP

    @cuda.jit(device=True, **INLINE)
    def walk(
        k_even, v_even, k_odd, v_odd, q, acc, s, p, key_words, value_words, ids, start, end,
        base, head, scale, lane, swap, posted,
    ):  # fmt: skip
        """Returns ``(top, total)``: head ``g``'s maximum logit (the same in its row group's
        4 lanes) and this lane's share of its exp sum; ``acc`` holds its sums, unscaled."""
        g = lane >> 2
        t = lane & 3
        for i in range(acc_size):
            acc[i] = float32(0.0)
        top = NEG_INF
        total = float32(0.0)
        load_tile(k_even, v_even, key_words, value_words, ids, start, start, end, base, head, g, t)
        for t0 in range(start, end, 2 * TILE):  # an even tile, then an odd one
            if lockstep:
                _run_barrier(int32(1 + cuda.threadIdx.x // run_threads), int32(run_threads))
            t1 = t0 + TILE
            if t1 < end:
                load_tile(
                    k_odd, v_odd, key_words, value_words, ids, t1, start, end, base, head, g, t
                )
            top, total = consume(
                k_even, v_even, q, acc, s, p, t0, end, top, total, scale, lane, t, swap, posted
            )
            if t1 < end:
                if t1 + TILE < end:
                    load_tile(
                        k_even, v_even, key_words, value_words, ids, t1 + TILE, start, end,
                        base, head, g, t,
                    )  # fmt: skip
                top, total = consume(
                    k_odd, v_odd, q, acc, s, p, t1, end, top, total, scale, lane, t, swap,
                    posted,
                )  # fmt: skip
        return top, total

    return walk


@functools.cache
def make_kernel(
    group: int,
    head_dim: int,
    block_size: int,
    warps: int = 1,
    min_blocks: int = 0,
    hint: str = "",
    heads: int = 1,
    tuning: tuple[str, ...] = (),
) -> Any:
    """The partition kernel for ``group`` query heads per kv head, float16 rows of ``head_dim``
    values (a multiple of 64), blocks of ``block_size`` tokens (whole tiles) and ``warps``
    warps a block over ``heads`` consecutive kv heads: warp ``w`` walks run ``w // heads``, of
    ``partition_size * heads // warps`` tokens, of kv head ``w % heads``. ``min_blocks``:
    blocks an SM must hold at once (so the compiler keeps to that many registers a thread; 0:
    its own choice); ``hint``: a cache qualifier for the loads of the cache; ``tuning``:
    ``make_walk``'s, ``"padded"`` and ``"lean"``, ``make_end``'s, and ``"early"``: each warp
    reads its run's block numbers before its sequence's length has come, as far as the table
    goes (so up to a run's worth past the sequence's last block), and not after, and loads
    its query 16 bytes at a time (``make_load_query``'s ``wide``): a launch's first loads of
    the cache wait on one round trip to memory fewer, and on fewer instructions."""
    _load16 = _make_load16(hint)
    threads = warps * WARP
    bounds = (threads, min_blocks) if min_blocks else threads
    pieces = head_dim // PIECE  # 16-byte pieces of a row
    k_pieces = pieces // 4  # K pieces a lane loads of each of its 2 tokens: t, t + 4, ...
    v_pieces = pieces // 8  # V pieces a lane loads of each of its 4 tokens: g, g + 8, ...
    row = head_dim // 2  # words of a row
    k_words = 2 * 4 * k_pieces  # a lane's words of a tile, of K and of V alike
    v_words = 4 * 4 * v_pieces
    tiles_m = head_dim // 16  # m tiles of V^T: a word of V per tile and token
    q_words = 4 * k_pieces
    acc_size = 4 * tiles_m
    shift = block_size.bit_length() - 1
    runs = warps // heads  # runs of a kv head, each combine_warps' to merge
    # a warp's run for combine_warps: [output | maxima | sums], its maxima from ``tops`` on
    write_run, combine_warps, slot = make_end(
        group, head_dim, warps, heads, "padded" in tuning, "lean" in tuning
    )
    tops = slot - 2 * group
    early = "early" in tuning
    load_query = make_load_query(group, head_dim, early)
    walk = make_walk(group, head_dim, block_size, _load16, tuning, heads)

    @cuda.jit(**({} if config.ENABLE_CUDASIM else {"launch_bounds": bounds}))
    def paged_attention_v6_kernel(
        out,
        partial_out,
        max_logits,
        exp_sums,
        query_words,
        key_words,
        value_words,
        block_tables,
        seq_lens,
        scale,
        partition_size,
    ):
        """Grid ``(num_kv_heads // heads, num_seqs, num_partitions)``, ``warps`` warps a block;
        writes what version 2's partition kernel writes for the ``group`` query heads of kv
        heads ``heads * blockIdx.x`` on, or for a sequence of one partition its output."""
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        block_head = cuda.blockIdx.x * heads  # the block's first kv head
        kv_head = block_head + warp % heads
        seq_len = seq_lens[seq]
        if early:  # the run's block numbers, as far as the table goes, while the length comes
            tid = uint32(cuda.threadIdx.x)  # (unsigned: warp and lane without corrections)
            blocks = uint32(partition_size >> shift) // uint32(runs)  # a run's
            first = (uint32(part) * uint32(runs) + tid // uint32(WARP * heads)) * blocks
            width = uint32(block_tables.shape[1])
            words = (blocks + uint32(3)) & ~uint32(3)  # id_words, below
            fetch_run_ids(
                cuda.shared.array(0, int32)[tid // uint32(WARP) * words :], block_tables[seq],
                first, min(blocks, width - first) if first < width else uint32(0),
                tid % uint32(WARP),
            )  # fmt: skip
        if part * partition_size >= seq_len:
            return
        alone = cuda.gridDim.z == 1  # one partition a sequence: no merge, the output itself
        sub = partition_size // runs
        start = part * partition_size + warp // heads * sub
        end = min(start + sub, seq_len)
        num_heads = partial_out.shape[1]
        kv_heads = num_heads // group
        base = kv_heads * row  # words from one token's row to the next
        g = lane >> 2
        t = lane & 3

        # [ids | runs (several warps) | swap | posted], each warp's share of each in turn
        id_words = -(-(sub >> shift) // 4) * 4
        runs_at = warps * id_words
        swap_at = runs_at + (warps * slot if runs > 1 else 0)
        smem = cuda.shared.array(0, float32)
        ids = cuda.shared.array(0, int32)[warp * id_words : (warp + 1) * id_words]
        swap = smem[swap_at : swap_at + warps * SWAP]  # (the simulator's)
        posted = cuda.shared.array(0, uint32)[swap_at + warps * SWAP :]  # (the simulator's)

        if start < seq_len:
            if not early:
                fetch_ids(ids, block_tables[seq], start, end, shift, lane)
            q = cuda.local.array(q_words, uint32)
            load_query(q, query_words, seq, num_heads, kv_head, g, t)
            k_even = cuda.local.array(k_words, uint32)
            v_even = cuda.local.array(v_words, uint32)
            k_odd = cuda.local.array(k_words, uint32)
            v_odd = cuda.local.array(v_words, uint32)
            acc = cuda.local.array(acc_size, float32)
            s = cuda.local.array(8, float32)
            p = cuda.local.array(4, float32)
            top, total = walk(
                k_even, v_even, k_odd, v_odd, q, acc, s, p, key_words, value_words, ids, start,
                end, base, kv_head * row, scale, lane, swap, posted,
            )  # fmt: skip
            run = smem[runs_at + warp * slot : runs_at + (warp + 1) * slot]
            write_run(
                out, partial_out, max_logits, exp_sums, acc, top, total, run, seq, kv_head,
                part, alone, lane, swap,
            )  # fmt: skip
        elif runs > 1:  # a run past the sequence's end weighs nothing
            run = smem[runs_at + warp * slot : runs_at + (warp + 1) * slot]
            for i in range(lane, slot, WARP):
                run[i] = NEG_INF if tops <= i < tops + group else float32(0.0)
        if runs > 1:
            cuda.syncthreads()
            combine_warps(
                out, partial_out, max_logits, exp_sums, smem[runs_at:], slot, seq,
                block_head, part, alone,
            )  # fmt: skip

    return paged_attention_v6_kernel


# --- host side -----------------------------------------------------------------------------------


def supports(
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    partition_size: int,
    warps: int = 1,
    heads: int = 1,
    padded: bool = False,
) -> str | None:
    """None when version 6 can run this shape, else the reason it cannot: float16, at most 8
    query heads per kv head, head_dim a multiple of 64 (each of a row group's 8 row groups
    loads whole 16-byte pieces of V), blocks of whole 16-token tiles, ``warps`` (1 to
    ``MAX_WARPS``) a whole number of runs of each of ``heads`` kv heads, which divide the kv
    heads, partitions of whole blocks for each run, shared memory within the 48 KB a launch
    gets by default, or ``v5.OPT_IN_SHARED_BYTES`` for several warps (``padded``: with the
    tuning choice's padded runs)."""
    reason = runs_reason(
        6, dtype, num_heads, num_kv_heads, head_dim, block_size, partition_size, warps, heads
    )
    if reason:
        return reason
    runs = warps // heads
    group = num_heads // num_kv_heads
    need = shared_bytes(group, head_dim, block_size, partition_size // runs, warps, heads, padded)
    limit = v2.SHARED_BYTES if warps == 1 else v5.OPT_IN_SHARED_BYTES
    if need > limit:
        return f"{need} bytes of shared memory per thread block, more than {limit}"
    return None


def runs_reason(
    version: int,
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    partition_size: int,
    warps: int,
    heads: int,
) -> str | None:
    """The refusals versions 6 and 7 share: ``v5.tensor_core_reason``'s (rows of a multiple of
    64), then ``heads`` kv heads a block dividing the warps and the kv heads, and partitions
    of whole blocks for each of a kv head's ``warps // heads`` runs; None if none applies."""
    reason = v5.tensor_core_reason(
        version, dtype, num_heads, num_kv_heads, head_dim, 64, block_size, warps
    )
    if reason:
        return reason
    if heads < 1 or warps % heads or num_kv_heads % heads:
        return (
            f"heads = {heads} kv heads a block must divide both warps = {warps} and "
            f"num_kv_heads = {num_kv_heads}"
        )
    runs = warps // heads
    if partition_size % (runs * block_size):
        return (
            f"partition_size = {partition_size} is not a multiple of {runs} x block_size = "
            f"{runs * block_size} (each of {runs} runs of a kv head walks whole blocks)"
        )
    return None


RUN_TOKENS = 1024  # tokens a warp walks, at most, when the batch takes several waves
MIN_RUN_TOKENS = 256  # and at least, however few blocks the grid has
SHARED_RUN_TOKENS = 512  # a sequence with that many for LAUNCH_WARPS warps gets them all
LAUNCH_WARPS = 8  # warps a block, at most
SM_WARPS = 8  # warps an SM holds at 255 registers a thread
ONE_WAVE_FILL = 0.9  # share of the GPU's warp places a one-wave launch must fill


def choose_launch(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int
) -> tuple[int, int, int]:
    """``(partition_size, warps, heads)`` for a batch: ``one_wave``'s launch where there is
    one, else ``several_waves``'."""
    return one_wave(num_seqs, num_kv_heads, max_seq_len, block_size) or several_waves(
        num_seqs, num_kv_heads, max_seq_len, block_size
    )


def several_waves(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int
) -> tuple[int, int, int]:
    """``(partition_size, warps, 1)``: blocks of up to ``LAUNCH_WARPS`` warps over one kv
    head, each walking up to ``RUN_TOKENS`` tokens, shorter runs (down to ``MIN_RUN_TOKENS``)
    while the grid has fewer warps than the GPU has SMs times ``SM_WARPS``.

    So a sequence of up to 8,192 tokens is one partition whose warps all have tokens to walk:
    no merge, and no warp holding an SM's registers for nothing. On an H100 (docs/
    benchmarks.md) that was the fastest launch of one kv head a block, or within 1% of it, from
    32 x 8k to 256 x 1k; blocks with idle warps (a partition longer than the sequence) lost 10
    to 20%, since at 255 registers a thread an SM holds only ``SM_WARPS`` warps. For the same
    reason a block has 1, 2, 4 or 8 warps, the runs shared out evenly: an SM holds one block
    of 5 warps, and at 100 x 5000 (32/8) 5 warps of 1,024 tokens were 9% slower than 8 of 640.
    And a sequence of at least 4,096 tokens is shared by all ``LAUNCH_WARPS`` warps, each
    walking at least ``SHARED_RUN_TOKENS``: at 64 x 4096 with 32 kv heads, 8 warps of 512
    tokens ran 0.5 to 0.6% faster than 4 of 1,024 on three H100s (for 32/8, at 160 x 4096,
    0.3% slower)."""
    sub = max(block_size, min(RUN_TOKENS, -(-max_seq_len // block_size) * block_size))
    while num_seqs * num_kv_heads * -(
        -max_seq_len // sub
    ) < SM_WARPS * v5.multiprocessors() and sub // 2 >= max(MIN_RUN_TOKENS, block_size):
        sub //= 2
    runs = max(1, -(-max_seq_len // sub))
    if runs >= LAUNCH_WARPS:  # several partitions of LAUNCH_WARPS runs
        return LAUNCH_WARPS * sub, LAUNCH_WARPS, 1
    warps = 1 << (runs - 1).bit_length()  # a power of two: blocks fill an SM's places
    if max_seq_len >= LAUNCH_WARPS * SHARED_RUN_TOKENS:
        warps = LAUNCH_WARPS
    if warps > runs:  # the runs shared out evenly, in whole blocks of the cache
        sub = -(-max_seq_len // (warps * block_size)) * block_size
    return warps * sub, warps, 1


def one_wave(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int
) -> tuple[int, int, int] | None:
    """``(partition_size, warps, heads)`` of a launch whose warps all run at once and fill at
    least ``ONE_WAVE_FILL`` of the GPU's places for them, each (sequence, kv head) walked by the
    most runs (up to ``LAUNCH_WARPS``) that still fit, in one partition; None where there is no
    such launch (too many pairs, too few, or a partition longer than launches take).

    Why: a launch of several waves ends with a wave that does not fill the GPU, and at the
    start of each wave every warp waits for its first loads with nothing else to do. On an
    H100 (docs/benchmarks.md) 64 x 4096 (grouped, 512 pairs) ran 1.2% faster as 1,024 warps of
    2,048 tokens in one wave than as 2,048 warps of 1,024 tokens in two. A block holds the
    runs of ``heads`` neighbouring kv heads, so that its warps read neighbouring rows of the
    cache together."""
    places = SM_WARPS * v5.multiprocessors()
    pairs = num_seqs * num_kv_heads
    runs = min(LAUNCH_WARPS, places // pairs) if pairs else 0
    if runs < 1 or pairs * runs < ONE_WAVE_FILL * places:
        return None
    sub = -(-max_seq_len // (runs * block_size)) * block_size  # whole blocks a run
    if runs * sub > v2.V1_MAX_CONTEXT:
        return None
    heads = LAUNCH_WARPS // runs
    while num_kv_heads % heads:
        heads //= 2
    return runs * sub, runs * heads, heads


def words(a: v2.AttentionArgs) -> tuple[Any, Any, Any]:
    """The query, key cache and value cache as flat 32-bit words (two float16 values each),
    as versions 6 to 8 load them: 16 bytes, 4 words, at a time."""
    return tuple(x.reshape(x.size).view(np.uint32) for x in (a.query, a.key_cache, a.value_cache))


def kernel_args(a: v2.AttentionArgs, partition_size: int) -> tuple[Any, ...]:
    """The partition kernel's arguments (versions 6 and 7 take the same): the output, the
    partition workspace, the query and both caches as 32-bit words, the tables, lengths,
    scale and partition size."""
    partial_out, max_logits, exp_sums = a.workspace(partition_size)
    return (
        a.out,
        partial_out,
        max_logits,
        exp_sums,
        *words(a),
        a.block_tables,
        a.seq_lens,
        a.scale,
        partition_size,
    )


def launch_v6(
    a: v2.AttentionArgs,
    partition_size: int | None = None,
    warps: int = 1,
    heads: int = 1,
    min_blocks: int = 0,
    hint: str = "",
    tuning: tuple[str, ...] = TUNING,
) -> None:
    """Launch version 6 on checked inputs: the partition kernel, then (for sequences of several
    partitions) version 5's merge kernel. ``partition_size`` None: ``choose_launch``'s pick
    (and its warps and heads). ``min_blocks``, ``hint`` and ``tuning``: tuning choices, as
    ``make_kernel`` takes them (``tuning=()``: the plain walk, none of them; ``CHOICES`` the
    choices it knows, ``TUNING`` the ones it makes)."""
    num_seqs, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    if partition_size is None:
        partition_size, warps, heads = choose_launch(num_seqs, kv_heads, a.max_seq_len, block_size)
    partition_size = v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    warps = v.check_int("warps", warps, 1, MAX_WARPS)
    heads = v.check_int("heads", heads, 1, MAX_WARPS)
    unknown = set(tuning) - set(CHOICES)
    if unknown:
        raise InvalidRequest(f"unknown tuning choices {sorted(unknown)}; known: {CHOICES}")
    padded = "padded" in tuning
    reason = supports(
        a.key_cache.dtype, num_heads, kv_heads, head_dim, block_size, partition_size, warps,
        heads, padded,
    )  # fmt: skip
    if reason:
        raise InvalidRequest(reason)
    v5.check_aligned(a, query="early" in tuning)  # (early loads the query 16 bytes at once)
    group = num_heads // kv_heads
    parts = -(-a.max_seq_len // partition_size)
    runs = warps // heads
    shared = shared_bytes(group, head_dim, block_size, partition_size // runs, warps, heads, padded)
    kernel = make_kernel(
        group, head_dim, block_size, warps, min_blocks, hint, heads, tuple(sorted(tuning))
    )
    args = kernel_args(a, partition_size)
    v5.allow_shared(kernel, args, shared)
    kernel[(kv_heads // heads, num_seqs, parts), warps * WARP, 0, shared](*args)
    if parts > 1:
        v5.merge_partitions(a, partition_size, v5.MERGE_THREADS)


def paged_attention_v6(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    partition_size: int | None = None,
    out: Any = None,
    warps: int = 1,
    heads: int = 1,
) -> Any:
    """Version 6 (the cache loaded straight into the tensor cores' registers). Arguments as
    for ``paged_attention``, and ``launch_v6``'s; ``InvalidRequest`` for a shape ``supports``
    refuses."""
    if partition_size is not None:
        v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    a = v2.prepare_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, out)
    launch_v6(a, partition_size, warps, heads)
    return a.result()
