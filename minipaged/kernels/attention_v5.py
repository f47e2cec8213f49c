"""Paged decode attention, version 5: the products run on tensor cores.

Version 4 brought the cache into shared memory fast enough; what limits it with grouped-query
attention is instruction issue (docs/benchmarks.md). Every K or V value is widened from float16
and then takes ``group`` scalar multiply-adds, one per query head that shares it, and a thread
block of 64 threads spends most of its cycles issuing them.

A tensor core does a whole small matrix product in one warp-wide instruction. PTX's
``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` takes a 16 x 16 float16 matrix A, a
16 x 8 float16 matrix B and a 16 x 8 float32 matrix C, spread over the 32 lanes of a warp, and
returns ``D = A @ B + C`` in float32 (products of float16 values are exact in float32). Each
lane holds 8 values of A, 4 of B and 4 of C and D, in the places ``fragment_a``, ``fragment_b``
and ``fragment_c`` give: lane ``l`` is in row group ``g = l // 4`` at position ``t = l % 4``.

Decode attention is two such products per block of 16 tokens, for one kv head:

* **logits**: ``S[token, head] = K[token, :] . Q[head, :]``: A is 16 tokens' K rows
  (16 dimensions at a time), B is the group's queries, one column per query head (up to 8:
  grouped-query attention fills the columns that plain multi-head attention leaves empty).
* **weighted sum of V**: ``O[head, dim] += P[head, token] V[token, dim]``, computed transposed:
  A is V transposed (16 dimensions by 16 tokens), B the probabilities ``P`` of the same 16
  tokens, one column per head.

Both A's come out of the ring with ``ldmatrix``, which loads four 8 x 8 float16 matrices into
the warp's registers in exactly A's fragment layout, each lane naming one 16-byte row: one
instruction where the lanes would otherwise load 8 values each (for V, two tokens' values of
one dimension, 16-bit loads to be packed in pairs). ``ldmatrix.trans`` delivers each matrix
transposed, which is how V's rows become the columns of A.

So per 16 tokens and 128 dimensions a warp issues 16 ``mma`` instructions where version 4 issues
8,192 multiply-adds for 4 heads. The probabilities go into the product as float16 (as vLLM's and
FlashAttention's kernels do); the sums of the softmax are taken over the same rounded values,
so each output is still a weighted mean of V rows.

The rest is version 4's: the ring of shared-memory buffers fed by ``cp.async``
(``attention_v4.make_ring``), logits in shared memory, the softmax within the partition, version
2's reduction. A thread block is one warp: the whole block's work is the warp's products. New
here: K's blocks and then V's are one stream through the ring (``fetch_item``), so V's first
blocks land while the softmax is computed; the partition's block numbers are read into shared
memory once, so a turn of the ring starts its copies without a round trip to global memory;
the logits' products alternate between two accumulators, so consecutive ``mma``s do not wait
for each other; and a batch too small to fill the GPU gets shorter partitions or a merge kernel
that combines many of them quickly (``choose_launch``, ``merge_partitions_kernel``).

One more care: slots of the sequence's last block that lie past its end hold whatever was there
before, possibly NaN. A zero probability times NaN is NaN, so those V rows are zeroed in the
ring before the product (K rows need nothing: a garbage K row spoils only its own logit, which
is never used).

Numba's CUDA simulator runs no PTX: there ``_mma`` gathers the warp's fragments through shared
memory and multiplies them with NumPy, following the same fragment maps, and ``_ldsm`` gathers
the lanes' row addresses the same way and hands each lane what ``ldmatrix`` would.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any

import numpy as np
from numba import config, cuda, float32, int32, uint16, uint32, uint64

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention as v2
from minipaged.kernels import attention_v3 as v3
from minipaged.kernels import attention_v4 as v4
from minipaged.kernels import validate as v

WARP = 32  # a thread block is one warp
STAGES = 3
TILE = 16  # tokens of one product (the M of m16n8k16); blocks hold whole tiles
MAX_GROUP = 8  # query heads per kv head: the N of m16n8k16
PAD_WORDS = 2  # 8-byte words after each ring row: the 8 rows of a fragment load hit 8 bank sets
POSTED = 6 * WARP if config.ENABLE_CUDASIM else 0  # the simulator's meeting place for _mma
NEG_INF = v3.NEG_INF
INLINE = v3.INLINE


# --- where a lane's values sit in the matrices ---------------------------------------------------


def fragment_a(lane: int, i: int) -> tuple[int, int]:
    """(row, column) in the 16 x 16 A of value ``i`` (0..7) of ``lane``: register ``i // 2``,
    its low half for even ``i``. Registers 0 and 2 hold row ``g``, 1 and 3 row ``g + 8``;
    registers 2 and 3 hold the right half of the columns."""
    g, t = lane >> 2, lane & 3
    reg, half = i >> 1, i & 1
    return g + 8 * (reg & 1), 2 * t + half + 8 * (reg >> 1)


def fragment_b(lane: int, i: int) -> tuple[int, int]:
    """(row, column) in the 16 x 8 B of value ``i`` (0..3) of ``lane``: column ``g``, two rows
    per register, register 1 eight rows further."""
    g, t = lane >> 2, lane & 3
    reg, half = i >> 1, i & 1
    return 2 * t + half + 8 * reg, g


def fragment_c(lane: int, i: int) -> tuple[int, int]:
    """(row, column) in the 16 x 8 C and D of value ``i`` (0..3) of ``lane``."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (i >> 1), 2 * t + (i & 1)


def fragment_picture(which: str) -> str:
    """The lane holding each value of matrix ``which`` ("a", "b" or "c"), row by row: the maps
    above as a picture (docs/kernels.md shows them)."""
    fragment, rows, cols, per_lane = {
        "a": (fragment_a, 16, 16, 8),
        "b": (fragment_b, 16, 8, 4),
        "c": (fragment_c, 16, 8, 4),
    }[which]
    lanes = np.zeros((rows, cols), int)
    for lane in range(WARP):
        for i in range(per_lane):
            lanes[fragment(lane, i)] = lane
    return "\n".join(" ".join(f"{x:2d}" for x in row) for row in lanes)


_A_MAP = np.array([[fragment_a(lane, i) for i in range(8)] for lane in range(WARP)])
_B_MAP = np.array([[fragment_b(lane, i) for i in range(4)] for lane in range(WARP)])


# --- the product and the packing of halves -------------------------------------------------------

if config.ENABLE_CUDASIM:
    _warp_barriers: dict[tuple[int, ...], threading.Barrier] = {}
    _warp_barriers_lock = threading.Lock()

    @cuda.jit(device=True)
    def _syncwarp():
        """Simulator ``__syncwarp``: the 32 threads of this thread's warp meet, and no others.
        The simulator has only ``syncthreads``, which meets every live thread of the block: a
        block of several warps, each with its own ring, would pair one warp's barriers with
        another's."""
        b = cuda.blockIdx
        key = (b.x, b.y, b.z, cuda.threadIdx.x // WARP)
        with _warp_barriers_lock:
            barrier = _warp_barriers.setdefault(key, threading.Barrier(WARP))
        barrier.wait()

    def _warp_posts(posted):  # noqa: ANN001, ANN202
        """Simulator: this thread's lane and its warp's ``6 * WARP`` words of ``posted``, where
        the lanes of one warp meet to exchange registers."""
        lane = cuda.threadIdx.x % WARP
        return lane, posted[(cuda.threadIdx.x - lane) * 6 :][: 6 * WARP]

    @cuda.jit(device=True)
    def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, posted):
        """Simulator: every lane posts its registers in ``posted`` (shared memory, ``6 * WARP``
        words a warp), then each computes its four values of ``A @ B + C`` from everyone's.
        Every lane of the warp calls it, as on the GPU."""
        lane, mine = _warp_posts(posted)
        mine[6 * lane : 6 * lane + 6] = (a0, a1, a2, a3, b0, b1)
        _syncwarp()
        halves = mine.copy().view(np.float16).astype(np.float64).reshape(WARP, 12)
        _syncwarp()
        a = np.zeros((16, 16))
        b = np.zeros((16, 8))
        a[_A_MAP[:, :, 0], _A_MAP[:, :, 1]] = halves[:, :8]
        b[_B_MAP[:, :, 0], _B_MAP[:, :, 1]] = halves[:, 8:]
        d = []
        for i, c in enumerate((c0, c1, c2, c3)):
            row, col = fragment_c(lane, i)
            d.append(np.float32(c + np.float32(a[row] @ b[:, col])))
        return d[0], d[1], d[2], d[3]

    def _ldsm_lanes(at, posted):  # noqa: ANN001, ANN202
        """Simulator: every lane posts its row address, then reads everyone's."""
        lane, mine = _warp_posts(posted)
        mine[6 * lane] = at
        _syncwarp()
        rows = mine[::6].copy()
        _syncwarp()
        return lane >> 2, lane & 3, rows

    def _halves(lo, hi):  # noqa: ANN001, ANN202
        return np.uint32(lo) | (np.uint32(hi) << np.uint32(16))

    @cuda.jit(device=True)
    def _ldsm(ring16, at, posted):
        """Simulator ``ldmatrix.x4``: lanes ``8 j`` to ``8 j + 7`` name the 8 rows (8 values
        from ``at`` each) of matrix ``j``; register ``j`` of lane ``(g, t)`` gets values
        ``2 t`` and ``2 t + 1`` of that matrix's row ``g``."""
        g, t, rows = _ldsm_lanes(at, posted)
        return tuple(
            _halves(ring16[rows[8 * j + g] + 2 * t], ring16[rows[8 * j + g] + 2 * t + 1])
            for j in range(4)
        )

    @cuda.jit(device=True)
    def _ldsm_t(ring16, at, posted):
        """Simulator ``ldmatrix.x4.trans``: the same rows, each matrix delivered transposed:
        register ``j`` of lane ``(g, t)`` gets value ``g`` of rows ``2 t`` and ``2 t + 1``."""
        g, t, rows = _ldsm_lanes(at, posted)
        return tuple(
            _halves(ring16[rows[8 * j + 2 * t] + g], ring16[rows[8 * j + 2 * t + 1] + g])
            for j in range(4)
        )

    def _pack_f16(lo, hi):  # noqa: ANN001, ANN202
        """Simulator: two floats as one register of two float16 halves (``lo`` in the low one)."""
        return np.array([lo, hi], np.float16).view(np.uint32)[0]

    def _round_f16(x):  # noqa: ANN001, ANN202
        """Simulator: ``x`` rounded to the nearest float16."""
        return np.float32(np.float16(x))

else:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    _F32, _I32, _F16 = ir.FloatType(), ir.IntType(32), ir.HalfType()

    @cuda.jit(device=True, **INLINE)
    def _syncwarp():
        """The warp's lanes meet; their shared-memory writes before it are seen after it."""
        cuda.syncwarp()

    @intrinsic
    def _mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, posted):  # noqa: ANN001, ANN202
        """``D = A @ B + C`` for the warp: one ``mma.sync`` (every lane must call it).
        ``posted`` is the simulator's; here the registers meet inside the tensor core."""
        floats = [types.float32] * 4
        sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + floats + [posted]))

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(ir.LiteralStructType([_F32] * 4), [_I32] * 6 + [_F32] * 4)
            d = builder.asm(
                fn,
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                ",".join(["=f"] * 4 + ["r"] * 6 + ["f"] * 4),
                args[:10],
                True,
            )
            values = [builder.extract_value(d, i) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, values)

        return sig, codegen

    def _make_ldsm(trans: bool) -> Any:
        """``ldmatrix.sync.aligned.m8n8.x4`` (``.trans`` if ``trans``) from shared memory."""
        suffix = ".trans" if trans else ""

        @intrinsic
        def ldsm(typingctx, ring16, at, posted):  # noqa: ANN001, ANN202
            """Four 8 x 8 float16 matrices from shared memory into the warp's registers, in
            the A fragment's layout: lanes ``8 j`` to ``8 j + 7`` give the addresses of matrix
            ``j``'s 8 rows (``ring16[at:at + 8]`` for this lane). Every lane must call it."""
            sig = types.UniTuple(types.uint32, 4)(ring16, types.uint64, posted)

            def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
                data = context.make_array(sig.args[0])(context, builder, args[0]).data
                row = builder.ptrtoint(builder.gep(data, [args[1]]), ir.IntType(64))
                fn = ir.FunctionType(ir.LiteralStructType([_I32] * 4), [ir.IntType(64)])
                d = builder.asm(
                    fn,
                    "{ .reg .u64 s; cvta.to.shared.u64 s, $4; "
                    f"ldmatrix.sync.aligned.m8n8.x4{suffix}.shared.b16 "
                    "{$0, $1, $2, $3}, [s]; }",
                    "=r,=r,=r,=r,l,~{memory}",
                    [row],
                    True,
                )
                values = [builder.extract_value(d, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, values)

            return sig, codegen

        return ldsm

    _ldsm, _ldsm_t = _make_ldsm(False), _make_ldsm(True)

    @intrinsic
    def _pack_f16(typingctx, lo, hi):  # noqa: ANN001, ANN202
        """Two floats rounded to float16 and packed into one register, ``lo`` in the low half."""
        sig = types.uint32(types.float32, types.float32)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            pair = ir.Constant(ir.VectorType(_F16, 2), None)
            for i, x in enumerate(args):
                pair = builder.insert_element(pair, builder.fptrunc(x, _F16), ir.Constant(_I32, i))
            return builder.bitcast(pair, _I32)

        return sig, codegen

    @intrinsic
    def _round_f16(typingctx, x):  # noqa: ANN001, ANN202
        """``x`` rounded to the nearest float16 (and widened back)."""
        sig = types.float32(types.float32)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return builder.fpext(builder.fptrunc(args[0], _F16), _F32)

        return sig, codegen


# --- the kernel -----------------------------------------------------------------------------------


def warp_words(group: int, head_dim: int, block_size: int, sub: int, stages: int) -> int:
    """32-bit words of one warp's shared memory, ``[ring | logits | red | ids]``, for a warp
    that walks ``sub`` tokens."""
    ring = 2 * stages * block_size * (head_dim // 4 + PAD_WORDS)
    return ring + group * (sub + WARP) + sub // block_size


def shared_bytes(
    group: int, head_dim: int, block_size: int, partition_size: int, stages: int, warps: int = 1
) -> int:
    """Dynamic shared memory of one thread block: each of its ``warps`` warps' ``[ring |
    logits | red | ids]`` (``warp_words``, on 16-byte boundaries), then the simulator's
    ``posted``."""
    words = warp_words(group, head_dim, block_size, partition_size // warps, stages)
    stride = words if warps == 1 else -(-words // 4) * 4
    return 4 * warps * (stride + POSTED)


def merge_scratch_floats(
    group: int, head_dim: int, block_size: int, partition_size: int, stages: int, warps: int = 1
) -> int:
    """Floats of shared memory a block merging its group in the kernel may use as scratch
    (``merge_if_last``): its first warp's ring, logits and red, all spent by then."""
    return warp_words(group, head_dim, block_size, partition_size // warps, stages) - (
        partition_size // warps // block_size
    )


@functools.cache
def make_combine_warps(group: int, head_dim: int, warps: int, heads: int = 1) -> Any:
    """The device function that combines the runs of a block's ``warps`` warps over ``heads``
    consecutive kv heads, each of ``group`` query heads of ``head_dim`` values: warp ``w``
    walks a run of kv head ``w % heads`` (versions 5 and 6 share it)."""
    threads = warps * WARP
    runs = warps // heads  # runs of each kv head
    outputs = group * head_dim

    @cuda.jit(device=True, **INLINE)
    def combine_warps(
        out, partial_out, max_logits, exp_sums, slots, stride, seq, kv_head, part, alone
    ):
        """After a barrier: the block's runs, warp ``w``'s at ``slots[w * stride:]`` as
        ``[output (head-major) | maxima | exp sums]``, into the partition's partial result of
        kv heads ``kv_head`` to ``kv_head + heads - 1``, as a merge of partitions does it: with
        ``M`` the largest maximum, run ``w`` weighs ``l_w exp(m_w - M)``. A warp whose run lies
        past the sequence's end left weight 0. With ``alone`` (the sequence's only partition)
        the result is the output itself."""
        for o in range(cuda.threadIdx.x, heads * outputs, threads):
            k = o // outputs  # the block's kv head k: warps k, k + heads, ... walked it
            rest = o - k * outputs  # query head h's dimension d, head-major
            h = rest // head_dim
            d = rest - h * head_dim
            top = NEG_INF
            for r in range(runs):
                top = max(top, slots[(r * heads + k) * stride + outputs + h])
            total = float32(0.0)
            acc = float32(0.0)
            for r in range(runs):
                at = (r * heads + k) * stride
                weight = slots[at + outputs + group + h] * math.exp(slots[at + outputs + h] - top)
                total += weight
                acc += weight * slots[at + rest]
            head = (kv_head + k) * group + h
            if alone:
                out[seq, head, d] = acc / total
                continue
            partial_out[seq, head, part, d] = acc / total
            if d == 0:
                max_logits[seq, head, part] = top
                exp_sums[seq, head, part] = total

    return combine_warps


@functools.cache
def make_kernel(
    group: int,
    head_dim: int,
    block_size: int,
    stages: int = STAGES,
    merges: bool = False,
    warps: int = 1,
) -> Any:
    """The partition kernel for ``group`` query heads per kv head, float16 rows of ``head_dim``
    values, blocks of ``block_size`` tokens, a ring of ``stages`` buffers and ``warps`` warps a
    thread block, all constants of the compiled code; with ``merges``, the last block of each
    (sequence, kv head) to finish also merges its partitions into the output
    (``merge_if_last``).

    With several warps a block, a partition is cut into ``warps`` runs of tokens, one a warp,
    each warp with its own ring, logits and barriers (``__syncwarp``): the warps of a block do
    not wait for each other until the end, where they combine their runs in shared memory
    (``combine_warps``) into the one partial result of the partition. Why: a small batch cut
    into many one-warp partitions needs a merge of many partitions after them, a launch of its
    own (docs/benchmarks.md: 6.5 us of 50 at 1 x 32k); a block of 8 warps has 8 times fewer
    partitions to merge, and 8 times the threads to merge them with, so the last block of a
    group can merge them in the kernel."""
    threads = warps * WARP
    words = head_dim // 4  # 8-byte words of a row
    ring_row = words + PAD_WORDS  # ring row, in 8-byte words
    row32, row16 = 2 * ring_row, 4 * ring_row  # the same in 32- and 16-bit units
    chunks = head_dim // 16  # k steps of the logits' product, m tiles of V's
    q_regs, acc_size = 2 * chunks, 4 * chunks  # (local array sizes must be plain constants)
    tiles = block_size // TILE
    shift = block_size.bit_length() - 1
    ring_floats = 2 * stages * block_size * ring_row
    fetch, advance, copy_offsets = v4.make_ring(block_size, words, ring_row, WARP, stages)
    outputs = group * head_dim  # values of a partition's partial output, over its heads
    slot = outputs + 2 * group  # a warp's run in combine_warps: [output | maxima | sums]

    if warps == 1:  # one warp is the whole block: version 5 as it was first measured

        @cuda.jit(device=True, **INLINE)
        def ring_sync():
            cuda.syncthreads()

    else:
        ring_sync = _syncwarp

    @cuda.jit(device=True, **INLINE)
    def warp_reduce(red, local, take_max):
        """Per query head ``h < group``: the maximum (or sum) of ``local[h]`` over the warp's
        lanes, by a tree in the warp's ``red`` (``group * WARP`` floats); the result is back
        in ``local`` for every lane."""
        lane = cuda.threadIdx.x % WARP
        for h in range(group):
            red[h * WARP + lane] = local[h]
        ring_sync()
        stride = WARP // 2
        while stride > 0:
            if lane < stride:
                for h in range(group):
                    a = red[h * WARP + lane]
                    b = red[h * WARP + lane + stride]
                    red[h * WARP + lane] = max(a, b) if take_max else a + b
            ring_sync()
            stride //= 2
        for h in range(group):
            local[h] = red[h * WARP]
        ring_sync()  # every lane has read the results before red is reused

    @cuda.jit(device=True, **INLINE)
    def fetch_item(
        ring,
        at,
        key_words,
        value_words,
        ids,
        blocks,
        j,
        row_words,
        to_ring,
        to_cache,
    ):
        """Start copying item ``j`` of the warp's one stream through its ring: its K blocks,
        then its V blocks (an empty group past them). One stream, not two: the last turns of
        the logits already fetch V's first blocks, so the ring never runs dry between the two
        products."""
        if j < blocks:
            fetch(ring, at, key_words, ids, j, row_words, to_ring, to_cache, True)
        else:
            j -= blocks
            fetch(ring, at, value_words, ids, j, row_words, to_ring, to_cache, j < blocks)

    wait = v4._wait_for(stages - 2)

    @cuda.jit(device=True, **INLINE)
    def turn(
        ring,
        at,
        key_words,
        value_words,
        ids,
        blocks,
        j,
        row_words,
        to_ring,
        to_cache,
    ):
        """One turn of the ring, before computing with the block in the oldest buffer: wait
        until its copies have landed, meet at a barrier (everyone's copies are visible, and
        everyone is done with the buffer before it), start item ``j`` into that freed buffer
        at word ``at``; returns where the next item goes."""
        wait()
        ring_sync()
        fetch_item(ring, at, key_words, value_words, ids, blocks, j, row_words, to_ring, to_cache)
        return advance(at)

    combine_warps = make_combine_warps(group, head_dim, warps)

    per_thread = -(-outputs // threads)  # outputs of a group one thread merges
    unroll = min(MERGE_LOADS, max(MERGE_UNROLL, 64 // per_thread))

    @cuda.jit(device=True, **INLINE)
    def merge_if_last(
        out, partial_out, max_logits, exp_sums, counters, scratch, flag, seq, kv_head, parts
    ):
        """Count this block as done with its (sequence, kv head); the last of the ``parts``
        blocks to arrive merges the group's partitions into ``out`` as version 2's reduction
        does (the same sums in the same order), and sets the counter back to 0 for the next
        launch. ``scratch``: at least ``2 * group * parts`` floats of shared memory.

        Why here and not in a second kernel: at 64 x 4096 version 2's reduction took 18 of
        version 5's 301 us, mostly waiting: a launch of its own, and a thread per dimension
        walking the partitions one dependent load after another. Here one block in ``parts``
        does it, without a launch, loading ``unroll`` partitions' partial outputs (just
        written, so likely still in L2) before adding any. One warp for a whole group is slow
        for many partitions, though; a block of several warps merges with all its threads,
        and has several times fewer partitions to merge (``choose_launch``).

        The handshake is the classic one: every block's writes are made visible to the whole
        GPU (``threadfence``) before it counts itself, so the block that sees ``parts - 1`` as
        the old count knows every partial result of its group is in memory."""
        tid = cuda.threadIdx.x
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            flag[0] = cuda.atomic.add(counters, (seq, kv_head), 1)
        cuda.syncthreads()
        if flag[0] != parts - 1:
            return
        cuda.threadfence()
        n = group * parts
        first = kv_head * group
        for i in range(tid, n, threads):  # scratch: [maxima | exp sums, then weights]
            h = i // parts
            scratch[i] = max_logits[seq, first + h, i - h * parts]
            scratch[n + i] = exp_sums[seq, first + h, i - h * parts]
        cuda.syncthreads()
        for i in range(tid, n, threads):  # weight of a partition: l_p exp(m_p - M)
            h = i // parts
            top = NEG_INF
            for p in range(parts):
                top = max(top, scratch[h * parts + p])
            scratch[n + i] *= math.exp(scratch[i] - top)
        cuda.syncthreads()
        acc = cuda.local.array(per_thread, float32)
        for k in range(per_thread):
            acc[k] = float32(0.0)
        # unroll partitions' per_thread loads at once; past the last partition, or the last
        # output, the loads repeat it (in bounds, no branch to wait on) and weigh 0
        for p0 in range(0, parts, unroll):
            for u in range(unroll):
                p = min(p0 + u, parts - 1)
                for k in range(per_thread):
                    o = min(tid + threads * k, outputs - 1)
                    h = o // head_dim
                    w = scratch[n + h * parts + p] if p0 + u < parts else float32(0.0)
                    acc[k] += w * partial_out[seq, first + h, p, o - h * head_dim]
        for k in range(per_thread):
            o = tid + threads * k
            if o < outputs:
                h = o // head_dim
                total = float32(0.0)
                for p in range(parts):
                    total += scratch[n + h * parts + p]
                out[seq, first + h, o - h * head_dim] = acc[k] / total
        if tid == 0:
            counters[seq, kv_head] = 0

    @cuda.jit(**({} if warps == 1 or config.ENABLE_CUDASIM else {"launch_bounds": threads}))
    def paged_attention_v5_kernel(
        out,
        counters,
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
        """Grid ``(num_kv_heads, num_seqs, num_partitions)``, ``warps`` warps a block; writes
        what version 2's partition kernel writes, for the ``group`` query heads of kv head
        ``blockIdx.x``, and with ``merges`` the output too (``counters``: int32
        ``[num_seqs, num_kv_heads]``, zero before and after the launch; a sequence of one
        partition gets its output and no partial result); without, ``out`` and ``counters``
        are not touched."""
        kv_head = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        seq_len = seq_lens[seq]
        if part * partition_size >= seq_len:
            return
        parts = (seq_len + partition_size - 1) // partition_size
        # merging in the kernel, a sequence of one partition needs no merge: its block writes
        # the output itself, and neither counts nor waits (at 64 x 4096 on one 4,096-token
        # partition of 8 warps the handshake alone cost 15 us of 299)
        alone = merges and parts == 1
        sub = partition_size // warps  # tokens of one warp's run
        start = part * partition_size + warp * sub
        end = min(start + sub, seq_len)
        num_heads = partial_out.shape[1]
        row_words = uint64(num_heads // group * words)
        table = block_tables[seq]

        # this warp's [ring | logits | red | ids], seen in 8-, 4- and 2-byte units
        mine = ring_floats + group * (sub + WARP) + (sub >> shift)
        stride = mine if warps == 1 else (mine + 3) // 4 * 4  # 16-byte boundaries
        base = warp * stride
        smem = cuda.shared.array(0, float32)
        ring = cuda.shared.array(0, uint64)[base // 2 : base // 2 + ring_floats // 2]
        ring32 = cuda.shared.array(0, uint32)[base : base + ring_floats]
        ring16 = cuda.shared.array(0, uint16)[2 * base : 2 * (base + ring_floats)]
        logits_at = base + ring_floats
        logits = smem[logits_at : logits_at + group * sub]  # [token, head]
        red = smem[logits_at + group * sub : logits_at + group * (sub + WARP)]
        ids_at = logits_at + group * (sub + WARP)
        ids = cuda.shared.array(0, int32)[ids_at : ids_at + (sub >> shift)]
        posted = cuda.shared.array(0, uint32)[warps * stride :]  # (the simulator's)

        if start < seq_len:
            first_block = start >> shift
            blocks = ((end - 1) >> shift) - first_block + 1
            # the run's physical block numbers, read once: a turn of the ring then starts its
            # copies without waiting for a load from global memory
            for i in range(lane, blocks, WARP):
                ids[i] = table[first_block + i]
            ring_sync()
            to_ring, to_cache = copy_offsets(row_words, kv_head * words)
            write_at = uint64(0)
            for j in range(stages - 1):  # the first blocks of K on their way
                fetch_item(
                    ring,
                    write_at,
                    key_words,
                    value_words,
                    ids,
                    blocks,
                    j,
                    row_words,
                    to_ring,
                    to_cache,
                )
                write_at = advance(write_at)

            # this lane's place in the fragments: row group g, position t
            g = lane >> 2
            t = lane & 3
            lit = g < group  # lanes of row groups past the heads hold zeros of B
            # the row this lane names to ldmatrix, in 16-bit units from a tile's first value:
            # matrix j = lane // 8 is rows 8 (j % 2) and columns 8 (j // 2) of K's tile (tokens
            # x dimensions), and of V's transposed tile rows 8 (j // 2), columns 8 (j % 2)
            k_lane = uint64(((lane & 7) + 8 * ((lane >> 3) & 1)) * row16 + 8 * (lane >> 4))
            v_lane = uint64(((lane & 7) + 8 * (lane >> 4)) * row16 + 8 * ((lane >> 3) & 1))

            # B of the logits: query head g's values 16 c + 2 t, + 1 and 16 c + 8 + 2 t, + 1
            qb = cuda.local.array(q_regs, uint32)
            q_head = seq * num_heads + kv_head * group + (g if lit else 0)
            q_at = uint64((q_head * head_dim) // 2)
            for c in range(chunks):
                for h in range(2):
                    qb[2 * c + h] = query_words[q_at + uint64(8 * c + 4 * h + t)] if lit else 0

            # 1. logits, 16 tokens at a time; lane (g, t) gets tokens g and g + 8, heads 2t, 2t+1
            s = cuda.local.array(8, float32)
            top = cuda.local.array(2, float32)  # largest logit of heads 2t and 2t + 1
            top[0] = NEG_INF
            top[1] = NEG_INF
            here = uint64(0)
            for b in range(blocks):
                write_at = turn(
                    ring,
                    write_at,
                    key_words,
                    value_words,
                    ids,
                    blocks,
                    b + stages - 1,
                    row_words,
                    to_ring,
                    to_cache,
                )
                t0 = (first_block + b) << shift
                here16 = uint64(4) * here
                for tile in range(tiles):
                    for i in range(8):
                        s[i] = float32(0.0)
                    at = here16 + uint64(tile * TILE * row16) + k_lane
                    for c in range(chunks):  # two chains (s[0:4], s[4:8]), so they overlap
                        a0, a1, a2, a3 = _ldsm(ring16, at + uint64(16 * c), posted)
                        o = 4 * (c & 1)
                        q0, q1 = qb[2 * c], qb[2 * c + 1]
                        s[o], s[o + 1], s[o + 2], s[o + 3] = _mma(
                            a0, a1, a2, a3, q0, q1, s[o], s[o + 1], s[o + 2], s[o + 3], posted
                        )  # fmt: skip
                    for i in range(4):
                        s[i] += s[4 + i]
                    for i in range(4):
                        token = t0 + tile * TILE + g + 8 * (i >> 1)
                        head = 2 * t + (i & 1)
                        if token < end and head < group:
                            x = s[i] * scale
                            logits[uint64((token - start) * group + head)] = x
                            top[i & 1] = max(top[i & 1], x)
                here = advance(here)
            stat = cuda.local.array(group, float32)  # per head: the maximum, later the sum
            for h in range(group):
                stat[h] = top[0] if h == 2 * t else (top[1] if h == 2 * t + 1 else NEG_INF)
            warp_reduce(red, stat, True)  # (V's first blocks are landing meanwhile)
            m = cuda.local.array(group, float32)
            for h in range(group):
                m[h] = stat[h]
                stat[h] = float32(0.0)
            for i in range(lane, end - start, WARP):
                for h in range(group):
                    x = _round_f16(math.exp(logits[i * group + h] - m[h]))  # as the product sees it
                    logits[i * group + h] = x
                    stat[h] += x
            warp_reduce(red, stat, False)

            # 2. weighted sum of V: lane (g, t) adds up dimensions 16 c + g and 16 c + g + 8 of
            # heads 2t and 2t + 1
            acc = cuda.local.array(acc_size, float32)
            for i in range(acc_size):
                acc[i] = float32(0.0)
            for b in range(blocks):  # the ring goes on where the logits left it
                write_at = turn(
                    ring,
                    write_at,
                    key_words,
                    value_words,
                    ids,
                    blocks,
                    blocks + b + stages - 1,
                    row_words,
                    to_ring,
                    to_cache,
                )
                t0 = (first_block + b) << shift
                here32 = here + here
                here16 = here32 + here32
                if end - t0 < block_size:  # the sequence's last block: zero rows past its end
                    past = here32 + uint64((end - t0) * row32)
                    for i in range(lane, (block_size - (end - t0)) * row32, WARP):
                        ring32[past + uint64(i)] = 0
                    ring_sync()
                for tile in range(tiles):
                    # B: probabilities of head g for tokens 2t, 2t + 1 and 2t + 8, 2t + 9
                    p = cuda.local.array(4, float32)
                    for i in range(4):
                        token = t0 + tile * TILE + 2 * t + (i & 1) + 8 * (i >> 1)
                        ok = lit and token < end
                        p[i] = logits[uint64((token - start) * group + g)] if ok else float32(0.0)
                    b0 = _pack_f16(p[0], p[1])
                    b1 = _pack_f16(p[2], p[3])
                    at = here16 + uint64(tile * TILE * row16) + v_lane
                    for c in range(chunks):
                        a0, a1, a2, a3 = _ldsm_t(ring16, at + uint64(16 * c), posted)
                        acc[4 * c], acc[4 * c + 1], acc[4 * c + 2], acc[4 * c + 3] = _mma(
                            a0,
                            a1,
                            a2,
                            a3,
                            b0,
                            b1,
                            acc[4 * c],
                            acc[4 * c + 1],
                            acc[4 * c + 2],
                            acc[4 * c + 3],
                            posted,
                        )
                here = advance(here)
            inv = cuda.local.array(2, float32)  # 1 / sum of heads 2t and 2t + 1
            for h in range(group):
                if h == 2 * t:
                    inv[0] = float32(1.0) / stat[h]
                if h == 2 * t + 1:
                    inv[1] = float32(1.0) / stat[h]
            # the run's result: for one warp, the partition's, in global memory (the output
            # itself if it is the sequence's only partition); for several, in the warp's slot
            # (its ring, spent) for combine_warps
            run = smem[base : base + slot]
            for c in range(chunks):
                for i in range(4):
                    head = 2 * t + (i & 1)
                    if head < group:
                        dim = 16 * c + g + 8 * (i >> 1)
                        x = acc[4 * c + i] * inv[i & 1]
                        if warps > 1:
                            run[head * head_dim + dim] = x
                        elif alone:
                            out[seq, kv_head * group + head, dim] = x
                        else:
                            partial_out[seq, kv_head * group + head, part, dim] = x
            for h in range(group):  # (constant indices keep m and stat in registers)
                if lane == h:
                    if warps > 1:
                        run[outputs + h] = m[h]
                        run[outputs + group + h] = stat[h]
                    elif not alone:
                        max_logits[seq, kv_head * group + h, part] = m[h]
                        exp_sums[seq, kv_head * group + h, part] = stat[h]
        elif warps > 1:  # a run past the sequence's end weighs nothing
            run = smem[base : base + slot]
            for i in range(lane, slot, WARP):
                run[i] = NEG_INF if outputs <= i < outputs + group else float32(0.0)
        if warps > 1:
            cuda.syncthreads()
            combine_warps(
                out, partial_out, max_logits, exp_sums, smem, stride, seq, kv_head, part, alone
            )
        if merges and not alone:  # the rings and logits are spent: the first warp's are scratch
            flag = cuda.shared.array(0, int32)[ring_floats + group * (sub + WARP) :]
            merge_if_last(
                out, partial_out, max_logits, exp_sums, counters, smem, flag, seq, kv_head, parts
            )

    return paged_attention_v5_kernel


# --- merging many partitions ----------------------------------------------------------------------

MERGE_UNROLL = 4  # partitions whose partial outputs merge_if_last loads before adding any
MERGE_BLOCKS = 128  # a merge grid is split over head dimensions up to this many blocks
MERGE_MIN_DIMS = 32  # and no further than this many dimensions a block
MERGE_LOADS = 16  # at most this many partitions' values in flight a thread
MERGE_BLOCK_LOADS = 4096  # and at most this many a block, so its registers fit an SM


def merge_loads(threads: int) -> int:
    """Partitions whose values a thread of a ``threads``-thread merge block loads at once:
    ``MERGE_LOADS``, fewer for larger blocks, whose registers would not fit an SM's 65,536
    (ptxas: 127 registers a thread at 16 loads, 96 at 8, 80 at 4)."""
    return max(1, min(MERGE_LOADS, MERGE_BLOCK_LOADS // threads))


def merge_shared_bytes(threads: int, dims: int) -> int:
    """Dynamic shared memory of one block of ``merge_partitions_kernel``: for ``threads``
    threads merging ``dims`` dimensions, ``[red | sums | weight sums]`` in float32."""
    slices = max(1, threads // dims)
    return 4 * (threads + slices * dims + slices)


@cuda.jit(device=True, **INLINE)
def _merge_slices(out, accs, weights, seq, head, first_dim, dims, slices):
    """The merge's last step, after a barrier: dimension ``first_dim + d`` of the output is the
    sum of its ``slices`` slices' weighted sums ``accs[k * dims + d]`` over the sum of their
    weights ``weights[k]``; the block's first ``dims`` threads (and more, a block narrower than
    ``dims``) write it."""
    for d in range(cuda.threadIdx.x, dims, cuda.blockDim.x):
        total = float32(0.0)
        acc = float32(0.0)
        for k in range(slices):
            total += weights[k]
            acc += accs[k * dims + d]
        out[seq, head, first_dim + d] = acc / total


@functools.cache
def make_merge_kernel(
    loads: int = MERGE_LOADS, threads: int | None = None, direct: bool = False
) -> Any:
    """``merge_partitions_kernel`` with up to ``loads`` partitions' values in flight a thread
    (a constant of the compiled code: the size of its local arrays); with ``threads``, for
    blocks of at most that many threads, which the compiler then fits in an SM's registers
    (1,024 threads: 64 registers each). ``direct``: the form for launches where every
    thread's partitions fit its registers (``blockDim.x >= dims`` and at most ``loads *
    slices`` partitions), with no code for more: on an H200 that form took 6.3 us at 1 x 32k
    where one that could also take more rounds took 7.9 (docs/benchmarks.md)."""
    bounds = {} if config.ENABLE_CUDASIM or threads is None else {"launch_bounds": threads}

    @cuda.jit(**bounds)
    def merge_direct(out, partial_out, max_logits, exp_sums, seq_lens, partition_size):
        """``merge_partitions_kernel`` when every thread's partitions fit its registers."""
        head = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        dims = out.shape[2] // cuda.gridDim.z
        first_dim = cuda.blockIdx.z * dims
        parts = (seq_lens[seq] + partition_size - 1) // partition_size
        slices = threads // dims
        pairs = slices * dims
        shared = cuda.shared.array(0, float32)
        red = shared[:threads]
        accs = shared[threads : threads + pairs]
        weights = shared[threads + pairs : threads + pairs + slices]
        s = tid // dims
        d = first_dim + tid % dims
        m = cuda.local.array(loads, float32)
        ell = cuda.local.array(loads, float32)
        o = cuda.local.array(loads, float32)
        local = NEG_INF
        if tid < pairs:
            for u in range(loads):  # past the last partition: the last again, unused
                q = min(s + u * slices, parts - 1)
                m[u] = max_logits[seq, head, q]
                ell[u] = exp_sums[seq, head, q]
                o[u] = partial_out[seq, head, q, d]
            for u in range(loads):
                if s + u * slices < parts:
                    local = max(local, m[u])
        top = v2._block_max(red, local)
        if tid < pairs:
            acc = float32(0.0)
            weight = float32(0.0)
            for u in range(loads):
                if s + u * slices < parts:
                    w = ell[u] * math.exp(m[u] - top)
                    acc += w * o[u]
                    weight += w
            accs[tid] = acc
            if tid % dims == 0:
                weights[s] = weight
        cuda.syncthreads()
        _merge_slices(out, accs, weights, seq, head, first_dim, dims, slices)

    @cuda.jit(**bounds)
    def merge_partitions_kernel(out, partial_out, max_logits, exp_sums, seq_lens, partition_size):
        """Version 2's reduction for many partitions. Grid ``(num_heads, num_seqs, splits)``:
        block ``(head, seq, z)`` combines dimensions ``z * dims`` to ``(z + 1) * dims - 1`` of
        that head, ``dims = head_dim // splits``; ``blockDim.x`` a power of two; dynamic
        shared memory: ``merge_shared_bytes``.

        Version 2's reduction gives each thread one dimension and walks every partition for
        it, one dependent load after another. That is cheap for a few partitions; a long
        context cut into many (a small batch needs many to fill the GPU) makes it a long
        chain. Here ``slices = blockDim.x // dims`` threads share each dimension, slice ``k``
        taking partitions ``k``, ``k + slices``, ...; each (slice, dimension) pair is one
        thread's. When every thread's partitions fit its ``loads`` registers, the ``direct``
        form (``merge_direct``) loads all their maxima, exp sums and partial outputs before
        it uses any: the block waits on memory once, then finds the largest maximum ``M``
        among the values it holds, and sums ``l_p exp(m_p - M) o_p`` and ``l_p exp(m_p - M)``
        from registers. This form takes any number: it first finds ``M`` from the maxima
        alone, then loads ``loads`` partitions at a time. The same sum as version 2's, in
        another order. Why the split over dimensions: a small
        batch is few heads times few sequences, so one block per head leaves most SMs idle."""
        head = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        dims = out.shape[2] // cuda.gridDim.z
        first_dim = cuda.blockIdx.z * dims
        parts = (seq_lens[seq] + partition_size - 1) // partition_size
        slices = max(1, threads // dims)
        pairs = slices * dims  # (slice, dimension) pairs: thread tid takes tid, + threads, ...
        step = loads * slices  # partitions of one round of loads
        shared = cuda.shared.array(0, float32)
        red = shared[:threads]
        accs = shared[threads : threads + pairs]
        weights = shared[threads + pairs : threads + pairs + slices]
        m = cuda.local.array(loads, float32)
        ell = cuda.local.array(loads, float32)
        o = cuda.local.array(loads, float32)
        local = NEG_INF
        for p in range(tid, parts, threads):
            local = max(local, max_logits[seq, head, p])
        top = v2._block_max(red, local)
        for i in range(tid, pairs, threads):
            d = first_dim + i % dims
            acc = float32(0.0)
            weight = float32(0.0)
            for first in range(i // dims, parts, step):
                for u in range(loads):  # past the last partition: the last again, unused
                    q = min(first + u * slices, parts - 1)
                    m[u] = max_logits[seq, head, q]
                    ell[u] = exp_sums[seq, head, q]
                    o[u] = partial_out[seq, head, q, d]
                for u in range(loads):
                    if first + u * slices < parts:
                        w = ell[u] * math.exp(m[u] - top)
                        acc += w * o[u]
                        weight += w
            accs[i] = acc
            if i % dims == 0:
                weights[i // dims] = weight
        cuda.syncthreads()
        _merge_slices(out, accs, weights, seq, head, first_dim, dims, slices)

    return merge_direct if direct else merge_partitions_kernel


merge_partitions_kernel = make_merge_kernel()


def merge_splits(head_dim: int, pairs: int) -> int:
    """How many merge blocks share one head, for ``pairs`` (head, sequence) pairs: double it
    while the grid stays within ``MERGE_BLOCKS`` blocks and each block keeps at least
    ``MERGE_MIN_DIMS`` dimensions. Measured on an H200 (docs/benchmarks.md, the merge that
    waits on memory once): at 1 x 32k (32 pairs) 4 blocks a head took 6.3 us against 13.1 us
    for one; at 8 x 16k (256 pairs) one block a head was the fastest, 7.6 us, and 4 took
    11.5: every block reads its head's maxima again, so splitting pays only while the grid is
    too small to fill the GPU."""
    splits = 1
    while (
        2 * splits * pairs <= MERGE_BLOCKS
        and head_dim % (2 * splits) == 0
        and head_dim // (2 * splits) >= MERGE_MIN_DIMS
    ):
        splits *= 2
    return splits


def merge_partitions(
    a: v2.AttentionArgs, partition_size: int, threads: int | None, splits: int | None = None
) -> None:
    """Combine the partitions in ``a``'s workspace into ``a.out``: with
    ``merge_partitions_kernel`` on ``threads`` threads and ``splits`` blocks a head (None:
    ``merge_splits``'s choice; it must divide head_dim), or with version 2's reduction when
    ``threads`` is None."""
    if threads is None:
        v2.reduce_partitions(a, partition_size)
        return
    merge_buffers(a, a.workspace(partition_size), a.seq_lens, partition_size, threads, splits)


def merge_buffers(
    a: v2.AttentionArgs,
    buffers: tuple[Any, Any, Any],
    lens: Any,
    partition_size: int,
    threads: int,
    splits: int | None = None,
) -> None:
    """``merge_partitions`` with ``merge_partitions_kernel`` for partial results in
    ``buffers`` (``partial_out, max_logits, exp_sums``), ``ceil(lens[s] / partition_size)``
    of them for sequence ``s``."""
    num_seqs, num_heads, head_dim = a.shape
    partial_out, max_logits, exp_sums = buffers
    if splits is None:
        splits = merge_splits(head_dim, num_heads * num_seqs)
    if splits < 1 or head_dim % splits:
        raise InvalidRequest(f"splits = {splits} does not divide head_dim = {head_dim}")
    shared = merge_shared_bytes(threads, head_dim // splits)
    loads = merge_loads(threads)
    dims = head_dim // splits
    direct = threads >= dims and partial_out.shape[2] <= loads * (threads // dims)
    kernel = make_merge_kernel(loads, threads, direct)
    kernel[(num_heads, num_seqs, splits), threads, 0, shared](
        a.out, partial_out, max_logits, exp_sums, lens, partition_size
    )


# --- host side -----------------------------------------------------------------------------------


MAX_WARPS = 16  # warps a thread block (512 threads: at most 128 registers each)
OPT_IN_SHARED_BYTES = 227 * 1024  # the most an H100's or H200's block may ask for


def tensor_core_reason(
    version: int,
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dims: int,
    block_size: int,
    warps: int,
) -> str | None:
    """The refusals versions 5 and 6 share, or None: float16 (the tensor cores' input here), at
    most ``MAX_GROUP`` query heads per kv head (the product's 8 columns), head_dim a multiple
    of ``dims`` up to ``MAX_HEAD_DIM``, blocks of whole 16-token tiles (a power of two, so a
    token's block is a shift away), 1 to ``MAX_WARPS`` warps a block."""
    if np.dtype(dtype) != np.float16:
        return f"dtype {np.dtype(dtype)}: version {version} multiplies float16 on tensor cores"
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return (
            f"{num_heads} query heads over {num_kv_heads} kv heads: version {version} serves "
            f"groups of at most {MAX_GROUP} query heads per kv head"
        )
    if head_dim % dims or head_dim > v2.MAX_HEAD_DIM:
        return f"head_dim = {head_dim} is not a multiple of {dims} up to {v2.MAX_HEAD_DIM}"
    if block_size % TILE or block_size & (block_size - 1):
        return f"block_size = {block_size} is not a power of two holding whole {TILE}-token tiles"
    if not 1 <= warps <= MAX_WARPS:
        return f"warps = {warps}: a thread block of version {version} has 1 to {MAX_WARPS} warps"
    return None


def supports(
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    partition_size: int = v3.PARTITION_SIZE,
    stages: int = STAGES,
    warps: int = 1,
) -> str | None:
    """None when version 5 can run this shape, else the reason it cannot: float16 (the tensor
    cores' input here), at most 8 query heads per kv head (the product's 8 columns), head_dim a
    multiple of 16 and blocks of whole 16-token tiles (its other two sides), partitions of
    whole blocks for each of 1 to ``MAX_WARPS`` warps, at least 2 stages; shared memory within
    the 48 KB a launch gets by default for a one-warp block (more would only leave fewer of
    them on an SM), within ``OPT_IN_SHARED_BYTES`` for a block of several warps, which asks
    the driver for it (``allow_shared``)."""
    reason = tensor_core_reason(5, dtype, num_heads, num_kv_heads, head_dim, 16, block_size, warps)
    if reason:
        return reason
    if partition_size % (warps * block_size):
        return (
            f"partition_size = {partition_size} is not a multiple of block_size = {block_size} "
            "(version 5 walks partitions block by block)"
            if warps == 1
            else f"partition_size = {partition_size} is not a multiple of {warps} x block_size = "
            f"{warps * block_size} (each of {warps} warps walks whole blocks)"
        )
    if stages < 2:
        return f"stages = {stages}: the ring needs at least 2 buffers"
    group = num_heads // num_kv_heads
    need = shared_bytes(group, head_dim, block_size, partition_size, stages, warps)
    limit = v2.SHARED_BYTES if warps == 1 else OPT_IN_SHARED_BYTES
    if need > limit:
        return f"{need} bytes of shared memory per thread block, more than {limit}"
    return None


SMALL_GRID = 4096  # thread blocks (at 512-token partitions) below which a batch is "small"
SM_SHARED_BYTES = 228 * 1024  # shared memory of one SM of an H100 or H200
SM_THREADS = 2048  # threads one SM holds
BLOCK_RESERVED_BYTES = 1024  # what the hardware keeps of it for every resident block
IN_KERNEL = 0  # merge_threads for "no merge launch: the partition kernel merges its groups"
MERGE_THREADS = 32 if config.ENABLE_CUDASIM else 256  # where the kernel cannot merge its groups
LAUNCH_WARPS = 8  # warps a block as choose_launch launches it; half as many for contexts
SHORT_CONTEXT = 2048  # up to this many tokens
RUN_TOKENS = 512  # tokens one warp walks, at most
MIN_RUN_TOKENS = 256  # and at least, however few blocks the grid has


def default_blocks(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Thread blocks of a batch's grid at the default 512-token partitions."""
    return num_seqs * num_kv_heads * -(-max_seq_len // v3.PARTITION_SIZE)


def small_grid(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> bool:
    """Whether a batch has fewer than ``SMALL_GRID`` thread blocks at 512-token partitions."""
    return default_blocks(num_seqs, num_kv_heads, max_seq_len) < SMALL_GRID


@functools.cache
def multiprocessors() -> int:
    """SMs of the current GPU (132, an H100's or H200's, in the simulator)."""
    return 132 if config.ENABLE_CUDASIM else cuda.get_current_device().MULTIPROCESSOR_COUNT


def blocks_per_sm(shared: int, warps: int = 1) -> int:
    """Thread blocks of ``warps`` warps, each taking ``shared`` bytes of shared memory, that
    one SM holds at once: shared memory or threads, whichever runs out first."""
    by_shared = SM_SHARED_BYTES // (shared + BLOCK_RESERVED_BYTES)
    return max(1, min(32, SM_THREADS // (warps * WARP), by_shared))


def choose_launch(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int, group: int, head_dim: int
) -> tuple[int, int, int | None, int]:
    """``(partition_size, stages, merge_threads, warps)``, as ``launch_v5`` takes them, for a
    batch with ``group`` query heads per kv head.

    Blocks of ``LAUNCH_WARPS`` warps (half as many for contexts up to ``SHORT_CONTEXT``, and
    fewer still where the context holds fewer runs of ``MIN_RUN_TOKENS``), each warp walking up
    to ``RUN_TOKENS`` tokens: a sequence of up to 4,096 tokens is then one partition, with
    nothing to merge, and a longer one is cut into 4,096-token partitions that the kernel
    merges itself (``IN_KERNEL``). A grid of fewer blocks than half the GPU's SMs gets shorter
    runs, halved down to ``MIN_RUN_TOKENS``, so that it reaches more SMs. The ring has 4
    buffers, or 3 where that lets more blocks share an SM.

    Why, measured on an H200 on the twelve batches of ``minipaged bench attention``
    (``scripts/tune_attention_v5.py warps``, docs/benchmarks.md, 2026-12-05): with 32 query
    heads over 8 kv heads this was the fastest of 16 launches of 1 to 16 warps on every batch,
    and 1.00x to 1.11x as fast as the one-warp launches before it: 1 x 32k 65% of the copy
    bandwidth (8 warps of 256 tokens; 512-token runs leave 64 blocks, 59%), 8 x 16k and 32 x
    8k 83.5 and 87%, and 64 x 4096 to 256 x 1k 89 to 90%, one partition a sequence (the
    one-warp blocks: 81 to 85%); 256 x 1k took 3 buffers (3 blocks an SM instead of 2: 89.7%
    against 87.8%). With one query head per kv head (the small batches ``paged_attention``
    gives version 5) it matched them.

    Where shared memory is short (larger heads or blocks), fewer buffers (2 at the least), then
    fewer warps; where the partitions are too many to merge in the kernel, the merge kernel.
    Where even one warp cannot run, the defaults of ``launch_v5``, which then says why."""
    heads = group * num_kv_heads
    run_blocks = -(-RUN_TOKENS // block_size)  # a warp walks whole blocks
    warps = LAUNCH_WARPS if max_seq_len > SHORT_CONTEXT else LAUNCH_WARPS // 2
    runs = -(-max_seq_len // MIN_RUN_TOKENS)  # no warp with nothing to walk in a short context
    warps = min(warps, 1 << (runs - 1).bit_length())
    while warps >= 1:
        sub = block_size * min(run_blocks, -(-max_seq_len // (warps * block_size)))
        while (
            num_seqs * num_kv_heads * -(-max_seq_len // (warps * sub)) * 2 < multiprocessors()
            and sub // 2 >= MIN_RUN_TOKENS
            and sub // 2 % block_size == 0
        ):
            sub //= 2
        partition = warps * sub
        shape = (np.float16, heads, num_kv_heads, head_dim, block_size, partition)
        fits = [n for n in (4, 3) if supports(*shape, n, warps) is None]
        fits = fits or [n for n in (2,) if supports(*shape, n, warps) is None]
        if fits:

            def per_sm(n: int, partition: int = partition, warps: int = warps) -> int:
                nbytes = shared_bytes(group, head_dim, block_size, partition, n, warps)
                return blocks_per_sm(nbytes - 4 * warps * POSTED, warps)  # (as on a GPU)

            stages = max(fits, key=lambda n: (per_sm(n), n))
            parts = -(-max_seq_len // partition)
            room = merge_scratch_floats(group, head_dim, block_size, partition, stages, warps)
            merge = IN_KERNEL if 2 * group * parts <= room else MERGE_THREADS
            return partition, stages, merge, warps
        warps //= 2
    return v3.PARTITION_SIZE, STAGES, None, 1


_allowed: dict[tuple[Any, ...], int] = {}  # (kernel, types) -> the largest grant so far


def allow_shared(kernel: Any, args: tuple[Any, ...], nbytes: int) -> None:
    """Let ``kernel`` (compiled for ``args``' types) take ``nbytes`` of dynamic shared memory:
    more than 48 KB needs the driver's permission. The permission is a ceiling that a later,
    smaller grant would lower, so it only ever rises: each compiled kernel keeps the largest
    it was given. Nothing to ask in the simulator."""
    if config.ENABLE_CUDASIM or nbytes <= v2.SHARED_BYTES:
        return
    from numba import typeof
    from numba.cuda.cudadrv import driver

    sig = tuple(typeof(x) for x in args)
    if _allowed.get((kernel, sig), 0) >= nbytes:
        return
    cufunc = kernel.compile(sig)._codelibrary.get_cufunc()
    attr = driver.binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)
    _allowed[kernel, sig] = nbytes


def check_aligned(a: v2.AttentionArgs, query: bool = False) -> None:
    """``InvalidRequest`` unless both caches (and with ``query`` the query) start on a 16-byte
    boundary, as 16-byte copies and loads of them need (versions 5 to 8)."""
    arrays = [("key_cache", a.key_cache), ("value_cache", a.value_cache)]
    for name, array in arrays + ([("query", a.query)] if query else []):
        address = v4._address(array)
        if address % 16:
            raise InvalidRequest(f"{name} starts at {address:#x}, not on a 16-byte boundary")


def launch_partitions(
    a: v2.AttentionArgs, partition_size: int, stages: int, merges: bool, warps: int = 1
) -> None:
    """Launch version 5's partition kernel alone on inputs ``launch_v5`` has checked: the
    partial results in ``a``'s workspace, and with ``merges`` the output too. (Apart from
    ``launch_v5``, for timing the partition kernel without its merge.)"""
    num_seqs, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    parts = -(-a.max_seq_len // partition_size)
    group = num_heads // kv_heads
    partial_out, max_logits, exp_sums = a.workspace(partition_size)
    shared = shared_bytes(group, head_dim, block_size, partition_size, stages, warps)
    kernel = make_kernel(group, head_dim, block_size, stages, merges, warps)
    args = (
        a.out,
        a.counters(kv_heads),
        partial_out,
        max_logits,
        exp_sums,
        a.query.reshape(a.query.size).view(np.uint32),
        v3._flat_words(a.key_cache),
        v3._flat_words(a.value_cache),
        a.block_tables,
        a.seq_lens,
        a.scale,
        partition_size,
    )
    allow_shared(kernel, args, shared)
    kernel[(kv_heads, num_seqs, parts), warps * WARP, 0, shared](*args)


def launch_v5(
    a: v2.AttentionArgs,
    partition_size: int = v3.PARTITION_SIZE,
    stages: int = STAGES,
    merge_threads: int | None = None,
    warps: int = 1,
) -> None:
    """Launch version 5 on checked inputs: its partition kernel with ``warps`` warps a block,
    then ``merge_partitions`` (``merge_threads`` None: version 2's reduction); with
    ``merge_threads = IN_KERNEL`` the partition kernel merges too, and there is no second
    launch. That needs ``2 * group`` floats a partition in the block's spent shared memory
    (``merge_scratch_floats``)."""
    _, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    partition_size = v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    stages = v.check_int("stages", stages, 1, 16)
    warps = v.check_int("warps", warps, 1, MAX_WARPS)
    if merge_threads is not None:
        merge_threads = v.check_int("merge_threads", merge_threads, IN_KERNEL, 1024)
        if merge_threads & (merge_threads - 1):
            raise InvalidRequest(f"merge_threads must be a power of two, got {merge_threads}")
    reason = supports(
        a.key_cache.dtype, num_heads, kv_heads, head_dim, block_size, partition_size, stages, warps
    )
    if reason:
        raise InvalidRequest(reason)
    in_kernel = merge_threads == IN_KERNEL
    parts = -(-a.max_seq_len // partition_size)
    group = num_heads // kv_heads
    room = merge_scratch_floats(group, head_dim, block_size, partition_size, stages, warps)
    if in_kernel and 2 * group * parts > room:
        raise InvalidRequest(
            f"{parts} partitions of {partition_size} tokens: merging in the kernel keeps 2 "
            f"floats a partition and head in {room} floats of spent shared memory, so at most "
            f"{room // (2 * group)} partitions"
        )
    check_aligned(a)
    launch_partitions(a, partition_size, stages, in_kernel, warps)
    if not in_kernel:
        merge_partitions(a, partition_size, merge_threads)


def launch_chosen(a: v2.AttentionArgs) -> None:
    """Launch version 5 on checked inputs as ``paged_attention`` does when given no partition
    size: with ``choose_launch``'s pick for ``a``'s batch."""
    num_seqs, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    group = num_heads // kv_heads
    launch_v5(a, *choose_launch(num_seqs, kv_heads, a.max_seq_len, block_size, group, head_dim))


def paged_attention_v5(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    partition_size: int = v3.PARTITION_SIZE,
    out: Any = None,
    stages: int = STAGES,
    merge_threads: int | None = None,
    warps: int = 1,
) -> Any:
    """Version 5 (version 4's ring, products on tensor cores). Arguments as for
    ``paged_attention``, and ``launch_v5``'s; ``InvalidRequest`` for a shape ``supports``
    refuses."""
    v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    a = v2.prepare_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, out)
    launch_v5(a, partition_size, stages, merge_threads, warps)
    return a.result()
