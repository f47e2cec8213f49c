"""Paged decode attention, version 3: what it takes to run near the memory bandwidth.

Decode attention does almost no arithmetic per byte: every K and V element is read once and used
in a couple of multiply-adds. So its speed is how fast it reads the cache, and version 3 changes
only how the reads are made. The maths, the partitions and the reduction kernel are version 2's
(``attention.py``), and the result is the same to float32 rounding.

What changes, each for a reason measured on an H100 (docs/benchmarks.md):

1. **One thread block per kv head, not per query head.** With grouped-query attention,
   ``group = num_heads // num_kv_heads`` query heads read the same K and V. Versions 0 to 2 give
   each query head its own block, so every K/V byte is fetched ``group`` times. Here one block
   serves the whole group: grid ``(num_kv_heads, num_seqs, num_partitions)``.
2. **8-byte loads.** The wrapper hands the kernel the caches viewed as ``uint64`` words (4
   float16 or 2 float32 values each, same memory), and ``unpack`` splits a word into floats in
   registers. A warp then fetches 256 bytes per load instruction instead of 64, so far fewer
   instructions keep the same number of bytes in flight.
3. **Coalesced K reads.** For the logits, ``lanes`` neighbouring threads (a *token group*) read
   one K row together, ``words_per_lane`` words each, so every load instruction of a warp covers
   whole 32-byte sectors. Their partial dot products are summed with warp shuffles
   (``cuda.shfl_xor_sync``), ``log2(lanes)`` steps in registers.
4. **More loads in flight.** Each thread fetches several tokens' K words (and V words) before
   using any of them, so their latencies overlap (``Tuning``).
5. **Block by block, no division.** Both phases walk a partition one physical block at a time,
   reading the block table once per block; the next row is one addition away. The block size
   is a constant of the compiled kernel (a power of two), so a token's block is a shift, and
   indices are unsigned, which spares every array access Numba's check for a negative index.

Numba's CUDA simulator has no warp shuffles, so there ``_group_sum`` uses shared memory instead,
and ``unpack`` uses NumPy; the kernel is otherwise the same code. The shapes that version 3
serves are in ``supports``; ``paged_attention`` falls back to version 1 or 2 for the others.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import config, cuda, float32, uint64

from minipaged.errors import InvalidRequest
from minipaged.kernels import attention as v2
from minipaged.kernels import validate as v

MAX_GROUP = 8  # query heads per kv head; more would not fit in registers
PARTITION_SIZE = 512
THREADS = 32 if config.ENABLE_CUDASIM else 128
NEG_INF = np.float32(-np.inf)
INLINE = {} if config.ENABLE_CUDASIM else {"forceinline": True}  # the simulator has no such option


# --- words to floats ------------------------------------------------------------------------------

if config.ENABLE_CUDASIM:

    def _f16x4(word):  # noqa: ANN001, ANN202 (the simulator calls it with a NumPy scalar)
        return tuple(np.array([word], np.uint64).view(np.float16).astype(np.float32))

    def _f32x2(word):  # noqa: ANN001, ANN202
        return tuple(np.array([word], np.uint64).view(np.float32))

else:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    def _bits_to_floats(count: int, element: ir.Type):  # noqa: ANN202
        """An intrinsic reinterpreting a uint64 as ``count`` floats of type ``element`` and
        widening them to float32: one register move and, for halves, one ``cvt`` each."""

        @intrinsic
        def unpack(typingctx, word):  # noqa: ANN001, ANN202
            sig = types.UniTuple(types.float32, count)(types.uint64)

            def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
                vector = builder.bitcast(args[0], ir.VectorType(element, count))
                values = []
                for i in range(count):
                    x = builder.extract_element(vector, ir.Constant(ir.IntType(32), i))
                    values.append(
                        x if element == ir.FloatType() else builder.fpext(x, ir.FloatType())
                    )
                return context.make_tuple(builder, sig.return_type, values)

            return sig, codegen

        return unpack

    _f16x4 = _bits_to_floats(4, ir.HalfType())
    _f32x2 = _bits_to_floats(2, ir.FloatType())


# --- sums over a token group ---------------------------------------------------------------------

if config.ENABLE_CUDASIM:

    @cuda.jit(device=True)
    def _group_sum(value, scratch, lanes):
        """Sum of ``value`` over the ``lanes`` threads of this thread's token group, returned to
        all of them. Simulator path: through shared memory (every thread of the block calls it)."""
        tid = cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()
        first = tid - tid % lanes
        total = float32(0.0)
        for i in range(lanes):
            total += scratch[first + i]
        cuda.syncthreads()
        return total

else:

    @cuda.jit(device=True)
    def _group_sum(value, scratch, lanes):
        """Sum of ``value`` over the ``lanes`` threads of this thread's token group, returned to
        all of them: butterfly exchanges ``i <-> i ^ offset`` stay inside aligned groups of
        ``lanes`` (a power of two dividing 32). Every lane of the warp must call it."""
        offset = lanes // 2
        while offset > 0:
            value += cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
            offset //= 2
        return value


@cuda.jit(device=True)
def _block_reduce(red, local, group, take_max):
    """Per query head ``g < group``: the maximum (or sum) of ``local[g]`` over the thread block,
    by a tree in shared memory (``red`` holds ``group * blockDim.x`` floats). Writes the results
    back into ``local`` for every thread."""
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    for g in range(group):
        red[g * threads + tid] = local[g]
    cuda.syncthreads()
    stride = threads // 2
    while stride > 0:
        if tid < stride:
            for g in range(group):
                a = red[g * threads + tid]
                b = red[g * threads + tid + stride]
                red[g * threads + tid] = max(a, b) if take_max else a + b
        cuda.syncthreads()
        stride //= 2
    for g in range(group):
        local[g] = red[g * threads]
    cuda.syncthreads()  # everyone has read the results before red is reused


# --- the kernel, specialised per shape -----------------------------------------------------------


@dataclass(frozen=True)
class Tuning:
    """How version 3 spreads the work over threads (constants of the compiled kernel).

    ``words_per_lane``: 8-byte words of a K row one thread loads per token (so a token group
    has ``words / words_per_lane`` threads); ``tokens_per_step``: tokens whose K a thread loads
    before using any; ``v_words_per_lane`` and ``v_tokens_per_step``: the same for V rows."""

    words_per_lane: int = 4
    tokens_per_step: int = 2
    v_words_per_lane: int = 2
    v_tokens_per_step: int = 4
    max_registers: int | None = None  # a cap for the compiler: more blocks fit on an SM


TUNING = Tuning()


def default_tuning(group: int) -> Tuning:
    """The tuning measured fastest on an H100 (``scripts/tune_attention.py``, docs/benchmarks.md).

    With several query heads per kv head, each thread keeps ``group`` copies of its slice of the
    query and of the sums in registers; loading one token's K per step instead of two then leaves
    room for more warps."""
    return TUNING if group == 1 else Tuning(tokens_per_step=1)


@functools.cache
def make_kernel(
    group: int, elems: int, words: int, block_size: int, tuning: Tuning = TUNING
) -> Any:
    """The partition kernel for ``group`` query heads per kv head, K/V rows of ``words`` 8-byte
    words of ``elems`` values each, and blocks of ``block_size`` tokens.

    These become constants of the compiled code: the per-thread arrays below get fixed sizes and
    live in registers, loops over a block's rows have known lengths, and finding a token's block
    is a shift instead of a division (which would cost dozens of instructions).

    Both phases walk the partition block by block rather than token by token: the block table
    is read once per block and a row is found by one addition, where a per-token lookup cost
    about as many instructions as the arithmetic of the attention itself (measured: 178
    instructions per token and kv head with the lookup per token, for 32 query heads over 8)."""
    wpl, tps = tuning.words_per_lane, tuning.tokens_per_step
    vwpl, vtps = tuning.v_words_per_lane, tuning.v_tokens_per_step
    lanes = words // wpl  # threads of a token group (one K row)
    team = words // vwpl  # threads that read one V row
    head_dim = words * elems
    row = wpl * elems  # values of a K row that one thread multiplies
    unpack = _f16x4 if elems == 4 else _f32x2
    # sizes of the per-thread arrays, named here: Numba needs them as constants
    q_size, k_size, acc_size = group * row, tps * wpl, group * vwpl * elems
    v_size = vtps * vwpl
    shift = block_size.bit_length() - 1  # a power of two: lb = t >> shift is t's block

    @cuda.jit(device=True, **INLINE)
    def row_start(table, lb, row_words, offset):
        """Index in a flat cache of word ``offset`` of row 0 of logical block ``lb``. Unsigned:
        an unsigned index spares every array access its check for a negative index."""
        return uint64((table[lb] << shift) * row_words + offset)

    options = {} if tuning.max_registers is None else {"max_registers": tuning.max_registers}

    @cuda.jit(**options)
    def paged_attention_v3_kernel(
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
        kernel writes, for the ``group`` query heads of kv head ``blockIdx.x``. The caches come
        flat: the row of (block, r, kv head) starts at word ``((block * block_size + r) *
        num_kv_heads + kv head) * words``."""
        kv_head = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        seq_len = seq_lens[seq]
        start = part * partition_size
        if start >= seq_len:  # past this sequence's end: the whole block leaves together
            return
        end = min(start + partition_size, seq_len)
        row_words = query.shape[1] // group * words  # words from one token's row to the next
        table = block_tables[seq]

        # shared memory: logits [group, partition] (later the teams' sums) | red [group, threads]
        smem = cuda.shared.array(0, float32)
        red = smem[: group * threads]
        logits = smem[group * threads :]

        # 1. logits. Token group `tgroup` takes the partition's blocks tgroup, tgroup +
        # num_tgroups, ...: the table is read once per block, and a row is one add further.
        slot = tid % lanes  # this thread's place in its token group
        tgroup = tid // lanes
        num_tgroups = threads // lanes
        k_offset = kv_head * words + slot  # this thread's first word within a token's row
        q = cuda.local.array(q_size, float32)
        for g in range(group):
            for j in range(wpl):
                for e in range(elems):
                    d = (j * lanes + slot) * elems + e
                    q[g * row + j * elems + e] = float32(query[seq, kv_head * group + g, d]) * scale
        k_words = cuda.local.array(k_size, uint64)
        k = cuda.local.array(row, float32)
        stat = cuda.local.array(group, float32)  # running maximum, later sum, per query head
        for g in range(group):
            stat[g] = NEG_INF
        first_block = start >> shift  # partitions start on a block boundary
        last_block = (end - 1) >> shift
        rounds = (last_block - first_block + num_tgroups) // num_tgroups  # same for every thread
        for rnd in range(rounds):
            lb = first_block + rnd * num_tgroups + tgroup
            base = row_start(table, lb, row_words, k_offset) if lb <= last_block else uint64(0)
            for r0 in range(0, block_size, tps):
                for u in range(tps):  # issue every load of this step first
                    t = (lb << shift) + r0 + u
                    for j in range(wpl):
                        if r0 + u < block_size and lb <= last_block and t < end:
                            at = base + uint64((r0 + u) * row_words + j * lanes)
                            k_words[u * wpl + j] = key_words[at]
                        else:  # every lane stays in step for the shuffles; discarded below
                            k_words[u * wpl + j] = 0
                for u in range(tps):
                    t = (lb << shift) + r0 + u
                    for j in range(wpl):
                        values = unpack(k_words[u * wpl + j])
                        for e in range(elems):
                            k[j * elems + e] = values[e]
                    for g in range(group):
                        dot = float32(0.0)
                        for i in range(row):
                            dot += q[g * row + i] * k[i]
                        dot = _group_sum(dot, red, lanes)
                        if r0 + u < block_size and lb <= last_block and t < end:
                            stat[g] = max(stat[g], dot)
                            if slot == 0:
                                logits[g * partition_size + t - start] = dot
        _block_reduce(red, stat, group, True)  # stat = maximum logit per head
        m = cuda.local.array(group, float32)
        for g in range(group):
            m[g] = stat[g]
            stat[g] = float32(0.0)
        for i in range(tid, end - start, threads):
            for g in range(group):
                x = math.exp(logits[g * partition_size + i] - m[g])
                logits[g * partition_size + i] = x
                stat[g] += x
        _block_reduce(red, stat, group, False)  # stat = sum of exponentials; logits published

        # 2. weighted sum of V: `team` threads read one V row, v_words_per_lane words each
        lane = tid % team
        teams = threads // team
        my_team = tid // team
        v_offset = kv_head * words + lane
        acc = cuda.local.array(acc_size, float32)
        for i in range(acc_size):
            acc[i] = float32(0.0)
        v_words = cuda.local.array(v_size, uint64)
        for lb in range(first_block + my_team, last_block + 1, teams):  # whole blocks per team
            base = row_start(table, lb, row_words, v_offset)
            for r0 in range(0, block_size, vtps):
                for u in range(vtps):
                    t = (lb << shift) + r0 + u
                    if r0 + u < block_size and t < end:
                        for j in range(vwpl):
                            at = base + uint64((r0 + u) * row_words + j * team)
                            v_words[u * vwpl + j] = value_words[at]
                for u in range(vtps):
                    t = (lb << shift) + r0 + u
                    if r0 + u < block_size and t < end:
                        for j in range(vwpl):
                            values = unpack(v_words[u * vwpl + j])
                            for g in range(group):
                                p = logits[g * partition_size + t - start]
                                for e in range(elems):
                                    acc[(g * vwpl + j) * elems + e] += p * values[e]
        cuda.syncthreads()  # every thread is done with the logits: reuse them for the sums
        sums = logits
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

    return paged_attention_v3_kernel


# --- host side -----------------------------------------------------------------------------------


def supports(
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    tuning: Tuning = TUNING,
    partition_size: int = PARTITION_SIZE,
) -> str | None:
    """None when version 3 can run this shape, else the reason it cannot.

    A K row must split into token groups of a power-of-two number of threads dividing a warp,
    ``tuning.words_per_lane`` words each (with the default tuning: head_dim 16, 32, 64, 128 or
    256 for float16, 8 to 128 for float32), a block serves at most ``MAX_GROUP`` query heads,
    the block size is a power of two, and the logits of a partition fit in the shared memory a
    launch gets by default."""
    if block_size & (block_size - 1):
        return f"block_size = {block_size} is not a power of two"
    itemsize = np.dtype(dtype).itemsize
    words, rest = divmod(head_dim * itemsize, 8)
    lanes = words // tuning.words_per_lane
    if (
        rest
        or words % tuning.words_per_lane
        or words % tuning.v_words_per_lane
        or lanes & (lanes - 1)
        or lanes > 32
    ):
        return (
            f"head_dim = {head_dim} ({np.dtype(dtype).name}) does not split into token groups "
            f"of {tuning.words_per_lane} 8-byte words per thread and a power of two threads up "
            "to 32"
        )
    if num_heads // num_kv_heads > MAX_GROUP:
        return (
            f"{num_heads // num_kv_heads} query heads per kv head is more than version 3's "
            f"{MAX_GROUP}"
        )
    need = shared_bytes(
        num_heads // num_kv_heads,
        head_dim,
        words // tuning.v_words_per_lane,
        partition_size,
        THREADS,
    )
    if need > v2.SHARED_BYTES:
        return (
            f"partition_size = {partition_size} needs {need} bytes of shared memory per thread "
            f"block, more than {v2.SHARED_BYTES}"
        )
    return None


def shared_bytes(group: int, head_dim: int, team: int, partition_size: int, threads: int) -> int:
    """Dynamic shared memory of one thread block: the logits ``[group, partition]``, later the
    teams' sums ``[teams, group, head_dim]``, then ``red [group, threads]``."""
    return 4 * group * (max(partition_size, threads // team * head_dim) + threads)


def launch_v3(
    a: v2.AttentionArgs,
    partition_size: int = PARTITION_SIZE,
    threads: int | None = None,
    tuning: Tuning | None = None,
) -> None:
    """Launch version 3 (its partition kernel, then version 2's reduction) on checked inputs;
    ``tuning`` defaults to ``default_tuning`` for the shape."""
    num_seqs, num_heads, head_dim = a.shape
    num_blocks, block_size, kv_heads, _ = a.key_cache.shape
    if tuning is None:
        tuning = default_tuning(num_heads // kv_heads)
    partition_size = v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    reason = supports(
        a.key_cache.dtype, num_heads, kv_heads, head_dim, block_size, tuning, partition_size
    )
    if reason:
        raise InvalidRequest(reason)
    if partition_size % block_size:
        raise InvalidRequest(
            f"partition_size = {partition_size} must be a multiple of block_size = {block_size} "
            "(version 3 walks partitions block by block)"
        )
    group = num_heads // kv_heads
    elems = 8 // np.dtype(a.key_cache.dtype).itemsize
    words = head_dim // elems
    team = words // tuning.v_words_per_lane
    threads = THREADS if threads is None else threads
    if (threads % 32 and not config.ENABLE_CUDASIM) or threads % team or threads > 1024:
        raise InvalidRequest(
            f"threads = {threads} must be a multiple of 32 and of {team} (the threads reading "
            "one V row), and at most 1024"
        )
    partial_out, max_logits, exp_sums = a.workspace(partition_size)
    parts = partial_out.shape[2]
    shared = shared_bytes(group, head_dim, team, partition_size, threads)
    kernel = make_kernel(group, elems, words, block_size, tuning)
    kernel[(kv_heads, num_seqs, parts), threads, 0, shared](
        partial_out,
        max_logits,
        exp_sums,
        a.query,
        _flat_words(a.key_cache),
        _flat_words(a.value_cache),
        a.block_tables,
        a.seq_lens,
        a.scale,
        partition_size,
    )
    v2.reduce_partitions(a, partition_size)


def _flat_words(cache: Any) -> Any:
    """The same memory as one flat array of 8-byte words."""
    return cache.reshape(cache.size).view(np.uint64)


def paged_attention_v3(
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
    """Version 3 (one block per kv head and partition, 8-byte loads, shuffles). Arguments as for
    ``paged_attention``; ``InvalidRequest`` for a shape ``supports`` refuses."""
    v.check_int("partition_size", partition_size, 1, v2.V1_MAX_CONTEXT)
    a = v2.prepare_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, out)
    launch_v3(a, partition_size, threads)
    return a.result()
