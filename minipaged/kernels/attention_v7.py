"""Paged decode attention, version 7: whole rows of the cache land in shared memory by bulk
copies, and each lane reads its pieces of them back in version 6's order.

Version 6 holds the loads in flight in registers: at 255 registers a thread, two tiles of 16
tokens a warp, and an SM runs 8 warps. That is fewer bytes in flight than the memory system
needs to run at full speed, and the compiler spills if asked for more. Here the bytes in
flight live in shared memory instead. A thread block serves ``heads`` neighbouring kv heads of
one sequence; in a block of the cache their rows lie side by side, so each token's rows of
those heads are one run of ``heads x head_dim x 2`` bytes (2 KB for 8 heads of 128). One lane
starts a bulk copy of such a run (``cp.async.bulk``, sm_90, the Tensor Memory Accelerator's
one-dimensional copy), which lands 128-byte aligned and counts its bytes towards the buffer's
``mbarrier``. Measured on an H200 (docs/benchmarks.md, "How fast the cache can be read"), a
ring of such buffers moved the 64 x 4096 cache as fast as PyTorch's SDPA reads it.

A buffer ("stage") holds ``runs`` consecutive blocks of the cache, K then V, for the block's
kv heads; warp ``w`` takes block ``w // heads`` of each stage for kv head ``w % heads``, so all
warps are busy with every stage. The ring has ``stages`` buffers: while the warps work through
one, the copies of the next ``stages - 1`` are in flight. One barrier a stage says that every
warp is done with the buffer the copies are about to overwrite.

Reading back, lane ``(g, t)`` loads the same 16-byte pieces version 6 loads from memory (K
pieces ``t + 4 i`` of tokens ``g`` and ``g + 8``, V pieces ``g + 8 u`` of tokens ``2t, 2t + 1,
2t + 8, 2t + 9``), so the tensor-core products, the online softmax and the end of a run are
version 6's own. Rows 128-byte aligned lie in the same banks, so these reads meet 2-way (K) and
4-way (V) bank conflicts; shared memory reads about ten times faster than an SM's share of the
memory bandwidth, which leaves room for that.

In Numba's CUDA simulator the lane that would start a bulk copy copies the words itself, the
``mbarrier`` waits are no-ops, and the block's barriers order everything.
"""

from __future__ import annotations

import functools
from typing import Any

from numba import config, cuda, float32, int32, uint32, uint64

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention as v2
from minipaged.kernels import attention_v5 as v5
from minipaged.kernels import attention_v6 as v6
from minipaged.kernels import validate as v

WARP = v5.WARP
TILE = v5.TILE
PIECE = v6.PIECE
NEG_INF = v6.NEG_INF
INLINE = v6.INLINE
SWAP = v6.SWAP
POSTED = v6.POSTED
ALIGN = 1024  # bytes: where the ring starts (bulk copies land fastest on aligned runs)
STAGES = 3  # buffers in the ring


if config.ENABLE_CUDASIM:

    def _shared16(ring, at):  # noqa: ANN001, ANN202
        """Simulator: the 4 words ``ring[at:at + 4]``."""
        return uint32(ring[at]), uint32(ring[at + 1]), uint32(ring[at + 2]), uint32(ring[at + 3])

    def _bar_init(bars, i):  # noqa: ANN001, ANN202
        """Simulator: nothing (the block's barriers order the copies)."""

    def _expect(bars, i, nbytes):  # noqa: ANN001, ANN202
        """Simulator: nothing."""

    def _landed(bars, i, parity):  # noqa: ANN001, ANN202
        """Simulator: every copy has landed when it returns."""
        return 1

    def _fence_async():  # noqa: ANN202
        """Simulator: nothing."""

    def _shared_at(ring):  # noqa: ANN001, ANN202
        """Simulator: any address is aligned."""
        return 0

    def _bulk(ring, at, words, src, nbytes, bars, i):  # noqa: ANN001, ANN202
        """Simulator: copy ``nbytes`` from ``words[src:]`` to ``ring[at:]`` now."""
        for j in range(nbytes // 4):
            ring[at + j] = words[src + j]

else:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    _I32, _I64 = ir.IntType(32), ir.IntType(64)

    def _address(context: Any, builder: Any, ty: Any, array: Any, index: Any) -> Any:
        data = context.make_array(ty)(context, builder, array).data
        return builder.ptrtoint(builder.gep(data, [index]), _I64)

    def _statement(builder: Any, text: str, args: list[Any], kinds: str) -> None:
        fn = ir.FunctionType(ir.VoidType(), [a.type for a in args])
        builder.asm(fn, text, ",".join([*kinds, "~{memory}"]), args, True)

    @intrinsic
    def _shared16(typingctx, ring, at):  # noqa: ANN001, ANN202
        """``ld.shared.v4.u32``: the 16 bytes at ``ring[at:at + 4]`` (shared memory, 16-byte
        aligned) in one load; ordered after the ``mbarrier`` waits (it has side effects)."""
        sig = types.UniTuple(types.uint32, 4)(ring, types.int64)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            addr = _address(context, builder, sig.args[0], args[0], args[1])
            fn = ir.FunctionType(ir.LiteralStructType([_I32] * 4), [_I64])
            d = builder.asm(
                fn, "{ .reg .u64 s; cvta.to.shared.u64 s, $4; "
                "ld.shared.v4.u32 {$0, $1, $2, $3}, [s]; }",
                "=r,=r,=r,=r,l", [addr], True,
            )  # fmt: skip
            values = [builder.extract_value(d, i) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, values)

        return sig, codegen

    @intrinsic
    def _bar_init(typingctx, bars, i):  # noqa: ANN001, ANN202
        """Make ``bars[i]`` (shared memory) an ``mbarrier`` waiting for one arrival a phase."""
        sig = types.void(bars, types.int64)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            _statement(
                builder,
                "{ .reg .u64 s; cvta.to.shared.u64 s, $0; mbarrier.init.shared::cta.b64 [s], 1; "
                "fence.mbarrier_init.release.cluster; }",
                [_address(context, builder, sig.args[0], args[0], args[1])],
                "l",
            )
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _expect(typingctx, bars, i, nbytes):  # noqa: ANN001, ANN202
        """Arrive at ``bars[i]``, which then completes its phase once ``nbytes`` have landed."""
        sig = types.void(bars, types.int64, types.uint32)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            _statement(
                builder,
                "{ .reg .u64 s, st; cvta.to.shared.u64 s, $0; "
                "mbarrier.arrive.expect_tx.shared::cta.b64 st, [s], $1; }",
                [_address(context, builder, sig.args[0], args[0], args[1]), args[2]],
                "lr",
            )
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _landed(typingctx, bars, i, parity):  # noqa: ANN001, ANN202
        """1 once ``bars[i]`` has completed the phase of this parity, else 0 (it may wait a
        little in hardware before saying 0)."""
        sig = types.uint32(bars, types.int64, types.uint32)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(_I32, [_I64, _I32])
            return builder.asm(
                fn,
                "{ .reg .u64 s; .reg .pred p; cvta.to.shared.u64 s, $1; "
                "mbarrier.try_wait.parity.shared::cta.b64 p, [s], $2; selp.u32 $0, 1, 0, p; }",
                "=r,l,r,~{memory}",
                [_address(context, builder, sig.args[0], args[0], args[1]), args[2]],
                True,
            )

        return sig, codegen

    @intrinsic
    def _fence_async(typingctx):  # noqa: ANN001, ANN202
        """Order the block's reads of shared memory (seen through a barrier) before this
        thread's later bulk copies into it."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(ir.VoidType(), [])
            builder.asm(fn, "fence.proxy.async.shared::cta;", "~{memory}", [], True)
            return context.get_dummy_value()

        return types.void(), codegen

    @intrinsic
    def _shared_at(typingctx, ring):  # noqa: ANN001, ANN202
        """The shared-memory address of ``ring[0]``."""
        sig = types.int64(ring)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(_I64, [_I64])
            at = _address(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0))
            return builder.asm(fn, "cvta.to.shared.u64 $0, $1;", "=l,l", [at], False)

        return sig, codegen

    @intrinsic
    def _bulk(typingctx, ring, at, words, src, nbytes, bars, i):  # noqa: ANN001, ANN202
        """Start copying ``nbytes`` from ``words[src:]`` (global memory) to ``ring[at:]``
        (shared); their landing counts towards ``bars[i]``."""
        sig = types.void(ring, types.int64, words, types.int64, types.uint32, bars, types.int64)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            dst = _address(context, builder, sig.args[0], args[0], args[1])
            src_ = _address(context, builder, sig.args[2], args[2], args[3])
            bar = _address(context, builder, sig.args[5], args[5], args[6])
            _statement(
                builder,
                "{ .reg .u64 d, g, b; cvta.to.shared.u64 d, $0; cvta.to.global.u64 g, $1; "
                "cvta.to.shared.u64 b, $3; "
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
                "[d], [g], $2, [b]; }",
                [dst, src_, args[4], bar],
                "llrl",
            )
            return context.get_dummy_value()

        return sig, codegen


def stage_words(head_dim: int, block_size: int, warps: int) -> int:
    """Words of one buffer of the ring: ``warps // heads`` blocks of the cache, each K's and
    V's rows of ``heads`` kv heads, ``warps`` blocks' rows of one kv head in all."""
    return warps * 2 * block_size * head_dim // 2


def shared_bytes(
    group: int, head_dim: int, block_size: int, partition_size: int, warps: int, stages: int
) -> int:
    """Dynamic shared memory of a block: the ring's ``mbarrier``s, the partition's block
    numbers, the simulator's meeting places, room to align the ring, then the ring (which
    afterwards holds each warp's run for ``combine_warps``)."""
    ids = -(-(partition_size // block_size) // 4) * 4
    head = 2 * stages + ids + warps * (SWAP + POSTED)
    ring = max(
        stages * stage_words(head_dim, block_size, warps), warps * (group * head_dim + 2 * group)
    )
    return 4 * (head + ring) + ALIGN


@functools.cache
def make_kernel(
    group: int,
    head_dim: int,
    block_size: int,
    warps: int,
    heads: int,
    stages: int = STAGES,
    read_back: bool = True,
    fold: bool = True,
) -> Any:
    """The partition kernel for ``group`` query heads per kv head, float16 rows of ``head_dim``
    values (a multiple of 64), blocks of ``block_size`` tokens (whole tiles), ``warps`` warps
    a block over ``heads`` consecutive kv heads and a ring of ``stages`` buffers.

    For timing the kernel's parts only (its output is then meaningless): ``fold`` False reads
    each tile from the ring but folds nothing in; ``read_back`` False leaves the ring unread,
    so that only the copies run."""
    threads = warps * WARP
    pieces = head_dim // PIECE
    k_pieces = pieces // 4
    v_pieces = pieces // 8
    row = head_dim // 2  # words of one kv head's row
    wide = heads * row  # words of a token's rows of the block's kv heads: one copy
    k_words = 2 * 4 * k_pieces
    v_words = 4 * 4 * v_pieces
    q_words = 4 * k_pieces
    acc_size = 4 * (head_dim // 16)
    runs = warps // heads  # blocks of the cache a stage: one a run of each kv head
    buffer = stage_words(head_dim, block_size, warps)
    tiles = block_size // TILE
    slot = group * head_dim + 2 * group
    combine_warps = v5.make_combine_warps(group, head_dim, warps, heads)
    load_query = v6.make_load_query(group, head_dim)
    consume = v6.make_consume(group, head_dim)
    write_run = v6.make_write_run(group, head_dim, runs > 1)
    read_tile = v6.make_read_tile(head_dim, _shared16)

    @cuda.jit(device=True, **INLINE)
    def issue(n, ring, first, bars, key_words, value_words, ids, blocks, base, head):
        """Start the copies of stage ``n`` (blocks ``n * runs`` on of the partition's
        ``blocks``, whose numbers are ``ids``) into buffer ``n % stages``; its ``mbarrier``
        completes once all their bytes have landed. ``base``: words from one token's row to
        the next in the cache; ``head``: the block's first kv head's first word in a row."""
        b = n % stages
        here = min(runs, blocks - n * runs)  # blocks of the cache in this stage
        tid = cuda.threadIdx.x
        if tid == 0:
            _expect(bars, b, uint32(4 * here * 2 * block_size * wide))
        for c in range(tid, here * 2 * block_size, threads):
            r = c // (2 * block_size)
            tok = c % block_size
            words = key_words if (c // block_size) % 2 == 0 else value_words
            src = (ids[n * runs + r] * block_size + tok) * base + head
            _fence_async()
            _bulk(ring, first + b * buffer + c * wide, words, src, uint32(4 * wide), bars, b)

    @cuda.jit(**({} if config.ENABLE_CUDASIM else {"launch_bounds": threads}))
    def paged_attention_v7_kernel(
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
        writes what version 6's partition kernel writes."""
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        h = warp % heads
        r = warp // heads
        block_head = cuda.blockIdx.x * heads
        kv_head = block_head + h
        seq_len = seq_lens[seq]
        start = part * partition_size
        if start >= seq_len:
            return
        end = min(start + partition_size, seq_len)
        alone = cuda.gridDim.z == 1
        num_heads = partial_out.shape[1]
        base = num_heads // group * row
        table = block_tables[seq]
        g = lane >> 2
        t = lane & 3

        # [bars (stages x 8 bytes) | ids | swap | posted | (align) | ring]
        id_words = -(-(partition_size // block_size) // 4) * 4
        words = cuda.shared.array(0, uint32)
        bars = cuda.shared.array(0, uint64)[:stages]
        ids = cuda.shared.array(0, int32)[2 * stages : 2 * stages + id_words]
        swap_at = 2 * stages + id_words
        swap = cuda.shared.array(0, float32)[swap_at : swap_at + warps * SWAP]
        posted_at = swap_at + warps * SWAP
        posted = words[posted_at:]
        first = posted_at + warps * POSTED
        first += ((ALIGN - (_shared_at(words) + 4 * first) % ALIGN) % ALIGN) // 4

        first_block = start // block_size
        blocks = (end - 1) // block_size - first_block + 1
        for i in range(tid, blocks, threads):
            ids[i] = table[first_block + i]
        if tid == 0:
            for b in range(stages):
                _bar_init(bars, b)
        cuda.syncthreads()
        items = -(-blocks // runs)
        head = block_head * row
        for n in range(min(stages - 1, items)):
            issue(n, words, first, bars, key_words, value_words, ids, blocks, base, head)

        q = cuda.local.array(q_words, uint32)
        load_query(q, query_words, seq, num_heads, kv_head, g, t)
        k_regs = cuda.local.array(k_words, uint32)
        v_regs = cuda.local.array(v_words, uint32)
        acc = cuda.local.array(acc_size, float32)
        for i in range(acc_size):
            acc[i] = float32(0.0)
        s = cuda.local.array(8, float32)
        p = cuda.local.array(4, float32)
        top = NEG_INF
        total = float32(0.0)
        for n in range(items):
            b = n % stages
            while _landed(bars, b, uint32((n // stages) & 1)) == 0:
                pass
            cuda.syncthreads()  # every warp is done with the buffer the next copies fill
            if n + stages - 1 < items:
                issue(
                    n + stages - 1, words, first, bars, key_words, value_words, ids, blocks,
                    base, head,
                )  # fmt: skip
            mine = n * runs + r
            if mine < blocks and read_back:
                at = first + b * buffer + r * 2 * block_size * wide + h * row
                for j in range(tiles):
                    t0 = start + mine * block_size + j * TILE
                    if t0 < end:
                        k_at = at + j * TILE * wide
                        v_at = k_at + block_size * wide
                        read_tile(k_regs, v_regs, words, k_at, words, v_at, wide, t0, end, g, t)
                        if fold:
                            top, total = consume(
                                k_regs, v_regs, q, acc, s, p, t0, end, top, total, scale,
                                lane, t, swap, posted,
                            )  # fmt: skip
        cuda.syncthreads()  # the ring is free: it holds the runs now
        runs_at = first
        run = cuda.shared.array(0, float32)[runs_at + warp * slot : runs_at + (warp + 1) * slot]
        if r < blocks:
            write_run(
                out, partial_out, max_logits, exp_sums, acc, top, total, run, seq, kv_head,
                part, alone, lane, swap,
            )  # fmt: skip
        else:  # a run with no block of the cache weighs nothing
            for i in range(lane, slot, WARP):
                run[i] = NEG_INF if group * head_dim <= i < slot - group else float32(0.0)
        if runs > 1:
            cuda.syncthreads()
            combine_warps(
                out, partial_out, max_logits, exp_sums,
                cuda.shared.array(0, float32)[runs_at:], slot, seq, block_head, part, alone,
            )  # fmt: skip

    return paged_attention_v7_kernel


# --- host side -----------------------------------------------------------------------------------


def supports(
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    partition_size: int,
    warps: int,
    heads: int,
    stages: int = STAGES,
) -> str | None:
    """None when version 7 can run this shape, else the reason it cannot: version 6's
    refusals, partitions of whole stages, and the ring within ``v5.OPT_IN_SHARED_BYTES``."""
    reason = v6.runs_reason(
        7, dtype, num_heads, num_kv_heads, head_dim, block_size, partition_size, warps, heads
    )
    if reason:
        return reason
    if stages < 2:
        return f"stages = {stages}: the ring needs at least 2 buffers"
    group = num_heads // num_kv_heads
    need = shared_bytes(group, head_dim, block_size, partition_size, warps, stages)
    if need > v5.OPT_IN_SHARED_BYTES:
        return f"{need} bytes of shared memory per thread block, more than {v5.OPT_IN_SHARED_BYTES}"
    return None


def launch_v7(
    a: v2.AttentionArgs,
    partition_size: int,
    warps: int,
    heads: int,
    stages: int = STAGES,
    *,
    read_back: bool = True,
    fold: bool = True,
) -> None:
    """Launch version 7 on checked inputs: the partition kernel, then (for sequences of several
    partitions) version 5's merge kernel. Needs a GPU of compute capability 9.0 or later.
    ``read_back``, ``fold``: as for ``make_kernel``, for timing its parts."""
    num_seqs, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    partition_size = v.check_int("partition_size", partition_size, 1, 1 << 20)
    warps = v.check_int("warps", warps, 1, v5.MAX_WARPS)
    heads = v.check_int("heads", heads, 1, v5.MAX_WARPS)
    stages = v.check_int("stages", stages, 1, 64)
    reason = supports(
        a.key_cache.dtype, num_heads, kv_heads, head_dim, block_size, partition_size, warps,
        heads, stages,
    )  # fmt: skip
    if reason:
        raise InvalidRequest(reason)
    if not config.ENABLE_CUDASIM and cuda.get_current_device().compute_capability < (9, 0):
        raise InvalidRequest("version 7's bulk copies need a GPU of compute capability 9.0")
    v5.check_aligned(a)
    group = num_heads // kv_heads
    parts = -(-a.max_seq_len // partition_size)
    shared = shared_bytes(group, head_dim, block_size, partition_size, warps, stages)
    kernel = make_kernel(group, head_dim, block_size, warps, heads, stages, read_back, fold)
    args = v6.kernel_args(a, partition_size)
    v5.allow_shared(kernel, args, shared)
    kernel[(kv_heads // heads, num_seqs, parts), warps * WARP, 0, shared](*args)
    if parts > 1:
        v5.merge_partitions(a, partition_size, v5.MERGE_THREADS)


def paged_attention_v7(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    partition_size: int,
    warps: int,
    heads: int,
    stages: int = STAGES,
    out: Any = None,
) -> Any:
    """Version 7 (the cache through shared memory by bulk copies). Arguments as for
    ``paged_attention``, and ``launch_v7``'s; ``InvalidRequest`` for a shape ``supports``
    refuses."""
    a = v2.prepare_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, out)
    launch_v7(a, partition_size, warps, heads, stages)
    return a.result()
