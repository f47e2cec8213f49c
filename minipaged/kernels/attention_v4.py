"""Paged decode attention, version 4: the cache reaches shared memory by asynchronous copies.

Version 3 reads K and V into registers. With grouped-query attention its threads also keep
``group`` copies of their query slice and of their sums in registers, so only 4 blocks of 128
threads fit on an SM, each warp has about 1 KB of K in flight, and warps spend most cycles
waiting for loads (the profile is in docs/benchmarks.md). More loads in flight would need more
registers, which would cost more warps.

Version 4 takes the registers out of the loads. Since Ampere a thread can ask the memory system
to copy 16 bytes from global into shared memory (``cp.async``) and go on without waiting; the
bytes hold no register while they travel. So the thread block keeps a *ring* of ``stages``
buffers, each one physical block's K rows (later V rows) for its kv head, and works like this::

    copy blocks 0 .. stages-2 into the ring                  (each copy is one "group")
    for each block b of the partition:
        wait until block b's copies have landed               (cp.async.wait_group)
        syncthreads                                           (everyone's copies are visible;
                                                               everyone is done with block b-1)
        start copying block b + stages - 1 into b-1's buffer
        compute with block b from shared memory

While the block computes on one buffer, the next ``stages - 1`` blocks are on their way. The
maths (logits, softmax within the partition, weighted sum of V, version 2's reduction) and the
way threads split a K row (token groups, shuffles) are version 3's; only where the words come
from changes.

Numba has no API for ``cp.async``, so ``_copy16``, ``_commit`` and ``_wait`` are intrinsics
that emit one line of PTX each. Numba's CUDA simulator runs no PTX: there the copy is a plain
copy and waiting does nothing, which is a correct (if synchronous) reading of the same program.
The copies need 16-byte aligned rows: ``supports`` names the shapes version 4 serves.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import config, cuda, float32, uint64

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention as v2
from minipaged.kernels import attention_v3 as v3
from minipaged.kernels import validate as v

STAGES = 3  # ring buffers: blocks in flight + the one being read
THREADS = 32 if config.ENABLE_CUDASIM else 64
WORDS_PER_LANE = 4  # 8-byte words of a K row per thread, as version 3
V_WORDS_PER_LANE = 2  # the same for a V row
NEG_INF = v3.NEG_INF
INLINE = v3.INLINE


# --- asynchronous copies --------------------------------------------------------------------------

if config.ENABLE_CUDASIM:

    def _copy16(ring, at, words, src):  # noqa: ANN001, ANN202
        """Simulator: copy the two words ``words[src:src + 2]`` to ``ring[at:at + 2]`` now."""
        ring[at] = words[src]
        ring[at + 1] = words[src + 1]

    def _commit():  # noqa: ANN202
        """Simulator: every copy has already landed."""

    def _wait_for(pending):  # noqa: ANN001, ANN202
        """Simulator: nothing to wait for."""
        return lambda: None

else:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    _I64 = ir.IntType(64)

    def _asm(builder: Any, text: str, args: list[Any]) -> None:
        """One volatile PTX statement taking ``args`` as 64-bit registers; it may touch memory,
        so the compiler moves no load or store across it."""
        fn = ir.FunctionType(ir.VoidType(), [_I64] * len(args))
        constraints = ",".join(["l"] * len(args) + ["~{memory}"])
        builder.asm(fn, text, constraints, args, True)

    @intrinsic
    def _copy16(typingctx, ring, at, words, src):  # noqa: ANN001, ANN202
        """``cp.async`` of 16 bytes, ``words[src:src + 2]`` to ``ring[at:at + 2]``: starts the
        copy and returns at once. ``.cg`` caches it in L2 only: each byte is read once."""
        sig = types.void(ring, types.uint64, words, types.uint64)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            ring_ty, _, words_ty, _ = sig.args
            dst = context.make_array(ring_ty)(context, builder, args[0]).data
            src_ = context.make_array(words_ty)(context, builder, args[2]).data
            dst = builder.ptrtoint(builder.gep(dst, [args[1]]), _I64)
            src_ = builder.ptrtoint(builder.gep(src_, [args[3]]), _I64)
            _asm(
                builder,
                "{ .reg .u64 s, g; cvta.to.shared.u64 s, $0; cvta.to.global.u64 g, $1; "
                "cp.async.cg.shared.global [s], [g], 16; }",
                [dst, src_],
            )
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _commit(typingctx):  # noqa: ANN001, ANN202
        """Close the group of copies this thread started since the last commit."""

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            _asm(builder, "cp.async.commit_group;", [])
            return context.get_dummy_value()

        return types.void(), codegen

    @functools.cache
    def _wait_for(pending: int) -> Any:
        """An intrinsic waiting until at most ``pending`` of this thread's groups are still in
        flight (PTX wants the number written into the instruction)."""

        @intrinsic
        def wait(typingctx):  # noqa: ANN001, ANN202
            def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
                _asm(builder, f"cp.async.wait_group {pending};", [])
                return context.get_dummy_value()

            return types.void(), codegen

        return wait


# --- sums over a token group ---------------------------------------------------------------------

if config.ENABLE_CUDASIM:

    @cuda.jit(device=True)
    def _exchange(value, offset, scratch):
        """The ``value`` of lane ``lane ^ offset``. Simulator path: through shared memory (every
        thread of the block calls it)."""
        tid = cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()
        other = scratch[tid ^ offset]
        cuda.syncthreads()
        return other

else:

    @cuda.jit(device=True)
    def _exchange(value, offset, scratch):
        """The ``value`` of lane ``lane ^ offset``, by a warp shuffle (every lane calls it)."""
        return cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)


# --- the kernel -----------------------------------------------------------------------------------


def _ring_row(words: int) -> int:
    """Words from one row of a ring buffer to the next: the K row plus padding, so that the two
    rows one half-warp reads fall in different shared-memory banks. Padding of ``lanes`` words
    shifts a row by what its token group reads at once; at least 2 keeps rows 16-byte aligned."""
    return words + max(words // WORDS_PER_LANE, 2)


def shared_bytes(
    group: int,
    words: int,
    elems: int,
    block_size: int,
    partition_size: int,
    threads: int,
    stages: int,
) -> int:
    """Dynamic shared memory of one thread block: ``[ring | logits | red]``, or the teams' sums
    at the end, which overwrite all three."""
    ring = 2 * stages * block_size * _ring_row(words)  # in floats
    teams = threads // (words // V_WORDS_PER_LANE)
    sums = teams * group * words * elems
    return 4 * max(ring + group * (partition_size + threads), sums)


@functools.cache
def make_ring(block_size: int, words: int, ring_row: int, threads: int, stages: int) -> Any:
    """Device functions ``(fetch, advance, copy_offsets)`` that keep a ring of ``stages``
    buffers, each one physical block's rows (``words`` 8-byte words of one kv head each, stored
    ``ring_row`` words apart) filled by ``threads`` threads: a thread block, or (version 5 with
    several warps a block) each group of ``threads`` consecutive threads its own ring. Versions
    4 and 5 share them."""
    shift = block_size.bit_length() - 1
    buffer = block_size * ring_row  # words of one ring buffer
    chunks = block_size * words // 2  # 16-byte copies per block
    turns = -(-chunks // threads)  # copies per thread and block, at most
    half = words // 2  # 16-byte chunks per row
    half_shift = half.bit_length() - 1
    rows_per_turn = threads // half  # rows one turn of copies covers (threads: a multiple of half)
    buffer_words, ring_words = np.uint64(buffer), np.uint64(stages * buffer)

    @cuda.jit(device=True, **INLINE)
    def copy_offsets(row_words, head_offset):
        """``(to_ring, to_cache)``: where this thread's first 16-byte piece of a block goes in a
        ring buffer and comes from in the block (in words; ``head_offset`` is the kv head's first
        word in a row of ``row_words`` words)."""
        tid = cuda.threadIdx.x % threads
        piece = 2 * (tid & (half - 1))
        to_ring = uint64((tid >> half_shift) * ring_row + piece)
        to_cache = uint64(tid >> half_shift) * row_words + uint64(head_offset + piece)
        return to_ring, to_cache

    @cuda.jit(device=True, **INLINE)
    def fetch(ring, at, cache, table, lb, row_words, to_ring, to_cache, live):
        """Start copying logical block ``lb``'s rows (this kv head's part of each) into the ring
        buffer that starts at word ``at``. This thread's first 16-byte piece goes from word
        ``to_cache`` of the block to word ``to_ring`` of the buffer; each next one is
        ``rows_per_turn`` rows further. Close them as one group; ``live`` False: an empty
        group, so that every iteration commits one and the counting in ``wait`` stays simple."""
        if live:
            first = uint64(table[lb] << shift) * row_words + to_cache
            for i in range(turns):
                if chunks % threads == 0 or cuda.threadIdx.x % threads + i * threads < chunks:
                    _copy16(
                        ring,
                        at + to_ring + uint64(i * rows_per_turn * ring_row),
                        cache,
                        first + uint64(i * rows_per_turn) * row_words,
                    )
        _commit()

    @cuda.jit(device=True, **INLINE)
    def advance(at):
        """The next ring buffer after the one at word ``at`` (unsigned: no division)."""
        at += buffer_words
        return at if at < ring_words else uint64(0)

    return fetch, advance, copy_offsets


@functools.cache
def make_kernel(
    group: int,
    elems: int,
    words: int,
    block_size: int,
    threads: int,
    stages: int = STAGES,
    max_registers: int | None = None,
) -> Any:
    """The partition kernel for ``group`` query heads per kv head, K/V rows of ``words`` 8-byte
    words of ``elems`` values each, blocks of ``block_size`` tokens, ``threads`` per block and a
    ring of ``stages`` buffers. All of them are constants of the compiled code, so every loop
    below has a known number of turns. ``max_registers`` caps the compiler (more blocks per SM)."""
    wpl, vwpl = WORDS_PER_LANE, V_WORDS_PER_LANE
    lanes = words // wpl  # threads of a token group (one K row)
    team = words // vwpl  # threads that read one V row
    head_dim = words * elems
    row = wpl * elems  # values of a K row that one thread multiplies
    unpack = v3._f16x4 if elems == 4 else v3._f32x2
    _block_reduce = v3._block_reduce
    q_size, acc_size = group * row, group * vwpl * elems
    shift = block_size.bit_length() - 1
    ring_row = _ring_row(words)
    buffer = block_size * ring_row  # words of one ring buffer
    ring_floats = 2 * stages * buffer
    num_tgroups = threads // lanes
    teams = threads // team
    wait = _wait_for(stages - 2)
    # summing the heads' partial dot products over a token group: while a thread has several
    # heads' sums, each exchange halves them (it keeps one half, its partner the other), so
    # after `halvings` exchanges it owns `owned` heads; the last exchanges sum single values
    halvings = (min(group, lanes).bit_length() - 1) if group & (group - 1) == 0 else 0
    owned = group >> halvings
    twins = lanes >> halvings  # lanes that end up owning the same heads

    @cuda.jit(device=True, **INLINE)
    def share_sums(dots, scratch, slot):
        """Sum ``dots[g]`` (this lane's part of head g's dot product) over the token group; on
        return ``dots[:owned]`` are the whole dot products of heads ``first .. first + owned - 1``,
        and ``first`` is returned. With 4 heads over 8 lanes: 4 exchanges instead of 12."""
        first = 0
        count = group
        offset = lanes // 2
        for _ in range(halvings):
            kept = count // 2
            upper = (slot & offset) != 0  # keep the upper half, hand the lower to the partner
            for i in range(kept):
                lo = dots[i]
                hi = dots[i + kept]
                dots[i] = (hi if upper else lo) + _exchange(lo if upper else hi, offset, scratch)
            if upper:
                first += kept
            count = kept
            offset //= 2
        while offset > 0:
            for i in range(owned):
                dots[i] += _exchange(dots[i], offset, scratch)
            offset //= 2
        return first

    fetch, advance, copy_offsets = make_ring(block_size, words, ring_row, threads, stages)

    options = {} if max_registers is None else {"max_registers": max_registers}

    @cuda.jit(**options)
    def paged_attention_v4_kernel(
        partial_out,
        max_logits,
        exp_sums,
        query,
        key_words,
        value_words,
        block_tables,
        seq_lens,
        scale,
        partition_size,
    ):
        """Grid ``(num_kv_heads, num_seqs, num_partitions)``; writes what version 2's partition
        kernel writes, for the ``group`` query heads of kv head ``blockIdx.x``."""
        kv_head = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        seq_len = seq_lens[seq]
        start = part * partition_size
        if start >= seq_len:
            return
        end = min(start + partition_size, seq_len)
        row_words = uint64(query.shape[1] // group * words)
        table = block_tables[seq]
        head_offset = kv_head * words

        # shared memory: ring [stages, block_size, ring_row] words | logits [partition, group]
        # | red [group, threads]; the teams' sums at the end overwrite ring and logits
        ring = cuda.shared.array(0, uint64)
        smem = cuda.shared.array(0, float32)
        logits = smem[ring_floats : ring_floats + group * partition_size]
        red = smem[ring_floats + group * partition_size :]

        first_block = start >> shift
        blocks = ((end - 1) >> shift) - first_block + 1
        to_ring, to_cache = copy_offsets(row_words, head_offset)
        write_at = uint64(0)
        for b in range(stages - 1):  # the first blocks of K on their way
            fetch(
                ring,
                write_at,
                key_words,
                table,
                first_block + b,
                row_words,
                to_ring,
                to_cache,
                b < blocks,
            )
            write_at = advance(write_at)

        # 1. logits: token group `tgroup` takes rows tgroup, tgroup + num_tgroups, ... of each
        # block, `lanes` threads per row, `wpl` words each (interleaved, as in version 3)
        slot = tid % lanes
        tgroup = tid // lanes
        q = cuda.local.array(q_size, float32)
        for g in range(group):
            for j in range(wpl):
                for e in range(elems):
                    d = (j * lanes + slot) * elems + e
                    q[g * row + j * elems + e] = float32(query[seq, kv_head * group + g, d]) * scale
        k = cuda.local.array(row, float32)
        dots = cuda.local.array(group, float32)
        top = cuda.local.array(owned, float32)  # largest logit of each head this lane owns
        for i in range(owned):
            top[i] = NEG_INF
        writer = slot % twins == 0  # one of the twins stores the logits
        first = 0
        here = uint64(0)  # the buffer read now
        for b in range(blocks):
            wait()
            cuda.syncthreads()
            ahead = b + stages - 1
            fetch(
                ring,
                write_at,
                key_words,
                table,
                first_block + ahead,
                row_words,
                to_ring,
                to_cache,
                ahead < blocks,
            )
            write_at = advance(write_at)
            t0 = (first_block + b) << shift
            for r0 in range(0, block_size, num_tgroups):
                r = r0 + tgroup
                live = r < block_size and t0 + r < end
                at = here + uint64(r * ring_row + slot if r < block_size else 0)
                for j in range(wpl):
                    values = unpack(ring[at + uint64(j * lanes)])
                    for e in range(elems):
                        k[j * elems + e] = values[e]
                for g in range(group):
                    dot = float32(0.0)
                    for i in range(row):
                        dot += q[g * row + i] * k[i]
                    dots[g] = dot
                first = share_sums(dots, red, slot)
                if live:
                    at_logit = uint64((t0 + r - start) * group + first)
                    for i in range(owned):
                        top[i] = max(top[i], dots[i])
                        if writer:
                            logits[at_logit + uint64(i)] = dots[i]
            here = advance(here)
        stat = cuda.local.array(group, float32)  # per head: the maximum, later the sum
        for g in range(group):
            stat[g] = NEG_INF
            for i in range(owned):
                if g == first + i:
                    stat[g] = top[i]
        _block_reduce(red, stat, group, True)  # also: everyone is done with the ring
        write_at = uint64(0)
        for b in range(stages - 1):  # V on its way while the softmax is computed
            fetch(
                ring,
                write_at,
                value_words,
                table,
                first_block + b,
                row_words,
                to_ring,
                to_cache,
                b < blocks,
            )
            write_at = advance(write_at)
        m = cuda.local.array(group, float32)
        for g in range(group):
            m[g] = stat[g]
            stat[g] = float32(0.0)
        for i in range(tid, end - start, threads):
            for g in range(group):
                x = math.exp(logits[i * group + g] - m[g])
                logits[i * group + g] = x
                stat[g] += x
        _block_reduce(red, stat, group, False)

        # 2. weighted sum of V: `team` threads read one V row, vwpl words each
        lane = tid % team
        my_team = tid // team
        acc = cuda.local.array(acc_size, float32)
        for i in range(acc_size):
            acc[i] = float32(0.0)
        here = uint64(0)
        for b in range(blocks):
            wait()
            cuda.syncthreads()
            ahead = b + stages - 1
            fetch(
                ring,
                write_at,
                value_words,
                table,
                first_block + ahead,
                row_words,
                to_ring,
                to_cache,
                ahead < blocks,
            )
            write_at = advance(write_at)
            t0 = (first_block + b) << shift
            for r in range(my_team, block_size, teams):
                if t0 + r < end:
                    at = here + uint64(r * ring_row + lane)
                    for j in range(vwpl):
                        values = unpack(ring[at + uint64(j * team)])
                        for g in range(group):
                            p = logits[uint64((t0 + r - start) * group + g)]
                            for e in range(elems):
                                acc[(g * vwpl + j) * elems + e] += p * values[e]
            here = advance(here)
        cuda.syncthreads()  # everyone is done with ring and logits: reuse them for the sums
        sums = smem
        for g in range(group):
            for j in range(vwpl):
                for e in range(elems):
                    d = (j * team + lane) * elems + e
                    sums[(my_team * group + g) * head_dim + d] = acc[(g * vwpl + j) * elems + e]
        cuda.syncthreads()
        for i in range(tid, group * head_dim, threads):
            g = i // head_dim
            total = float32(0.0)
            for tm in range(teams):
                total += sums[tm * group * head_dim + i]
            partial_out[seq, kv_head * group + g, part, i % head_dim] = total / stat[g]
        if tid < group:
            max_logits[seq, kv_head * group + tid, part] = m[tid]
            exp_sums[seq, kv_head * group + tid, part] = stat[tid]

    return paged_attention_v4_kernel


# --- host side -----------------------------------------------------------------------------------


def supports(
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    partition_size: int = v3.PARTITION_SIZE,
    threads: int = THREADS,
    stages: int = STAGES,
) -> str | None:
    """None when version 4 can run this shape, else the reason it cannot: what version 3 needs,
    plus rows that split into 16-byte copies, partitions of whole blocks, at least 2 stages, and
    shared memory within the 48 KB a launch gets by default."""
    reason = v3.supports(dtype, num_heads, num_kv_heads, head_dim, block_size)
    if reason:
        return reason
    itemsize = np.dtype(dtype).itemsize
    words = head_dim * itemsize // 8
    if words % 2:
        return f"a K row of {head_dim * itemsize} bytes is not a whole number of 16-byte copies"
    if partition_size % block_size:
        return (
            f"partition_size = {partition_size} is not a multiple of block_size = {block_size} "
            "(version 4 walks partitions block by block)"
        )
    if threads % (words // 2):
        return (
            f"threads = {threads} is not a multiple of {words // 2}, the 16-byte pieces of a row "
            "(each turn of copies covers whole rows)"
        )
    if stages < 2:
        return f"stages = {stages}: the ring needs at least 2 buffers"
    need = shared_bytes(
        num_heads // num_kv_heads,
        words,
        8 // itemsize,
        block_size,
        partition_size,
        threads,
        stages,
    )
    if need > v2.SHARED_BYTES:
        return f"{need} bytes of shared memory per thread block, more than {v2.SHARED_BYTES}"
    return None


def launch_v4(
    a: v2.AttentionArgs,
    partition_size: int = v3.PARTITION_SIZE,
    threads: int | None = None,
    stages: int = STAGES,
    max_registers: int | None = None,
) -> None:
    """Launch version 4 (its partition kernel, then version 2's reduction) on checked inputs."""
    num_seqs, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    partition_size = v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    threads = v.check_int("threads", THREADS if threads is None else threads, 1, 1024)
    dtype = a.key_cache.dtype
    reason = supports(
        dtype, num_heads, kv_heads, head_dim, block_size, partition_size, threads, stages
    )
    if reason:
        raise InvalidRequest(reason)
    elems = 8 // np.dtype(dtype).itemsize
    words = head_dim // elems
    team = words // V_WORDS_PER_LANE
    if (threads % 32 and not config.ENABLE_CUDASIM) or threads % team:
        raise InvalidRequest(
            f"threads = {threads} must be a multiple of 32 and of {team} (the threads reading "
            "one V row)"
        )
    for name, cache in (("key_cache", a.key_cache), ("value_cache", a.value_cache)):
        address = _address(cache)
        if address % 16:
            raise InvalidRequest(f"{name} starts at {address:#x}, not on a 16-byte boundary")
    group = num_heads // kv_heads
    partial_out, max_logits, exp_sums = a.workspace(partition_size)
    parts = partial_out.shape[2]
    shared = shared_bytes(group, words, elems, block_size, partition_size, threads, stages)
    kernel = make_kernel(group, elems, words, block_size, threads, stages, max_registers)
    kernel[(kv_heads, num_seqs, parts), threads, 0, shared](
        partial_out,
        max_logits,
        exp_sums,
        a.query,
        v3._flat_words(a.key_cache),
        v3._flat_words(a.value_cache),
        a.block_tables,
        a.seq_lens,
        a.scale,
        partition_size,
    )
    v2.reduce_partitions(a, partition_size)


def _address(array: Any) -> int:
    """Where ``array``'s data starts on the device (0 in the simulator, which copies nothing
    asynchronously)."""
    if config.ENABLE_CUDASIM:
        return 0
    return int(array.__cuda_array_interface__["data"][0])


def paged_attention_v4(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    partition_size: int = v3.PARTITION_SIZE,
    out: Any = None,
    threads: int | None = None,
) -> Any:
    """Version 4 (version 3 fed by asynchronous copies through a ring in shared memory).
    Arguments as for ``paged_attention``; ``InvalidRequest`` for a shape ``supports`` refuses."""
    v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    a = v2.prepare_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, out)
    launch_v4(a, partition_size, threads)
    return a.result()
