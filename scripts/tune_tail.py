"""Time what the last, partly filled wave of thread blocks costs, and what the merge and the
copies gain from grids that fill the GPU.

    python3 scripts/tune_tail.py [attention] [merge] [copy] [ceiling] [in-order] [in-kernel]
                                 [streams]

1. How many one-warp blocks of attention version 5 an SM holds (the driver's occupancy query),
   so how many blocks make one wave.
2. Version 5 on the defaults for 32 query heads over 8 kv heads, context 4,096, batches of 16 to
   128 sequences: time per sequence against the number of waves the grid is. If the last wave
   cost nothing extra, the time per sequence would be flat.
3. Partition sizes that are not powers of two, at 64 x 4096: fewer or more blocks, so the grid
   ends nearer a whole number of waves.
4. The merge alone (version 2's reduction, or ``merge_partitions_kernel`` with a head's
   dimensions split over several blocks), small and large batches.
5. copy_blocks with 16-byte loads and stores, and over a grid capped at a few blocks per SM,
   each block walking several pieces.
6. Version 5's copies alone, without its arithmetic, on minipaged's cache layout and on a
   head-major one: the ceiling of its data movement; and the same on block tables that hold
   each sequence's blocks in order (a contiguous cache, as SDPA reads it).
7. Merging in the partition kernel (``IN_KERNEL``) against the merge launches, on every batch
   of ``minipaged bench attention``.
8. (``streams``, only when named) The device's read bandwidth (the cache read once, nothing
   written), and the ring alone with blocks of more warps, more buffers, longer partitions.

Every attention variant is compared with version 2's output first; one that disagrees is
reported, not timed. Timings as in ``minipaged bench`` (CUDA events, median).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import cuda, int32, uint64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import attention, attention_v3, attention_v4, attention_v5, cache_ops  # noqa: E402

warnings.filterwarnings("ignore", message=".*under-utilization")


def blocks_per_sm(kernel: Any, threads: int, shared: int) -> int:
    """The driver's count of blocks of ``kernel`` (launched once already) that fit on one SM;
    if the query fails, what 228 KB of shared memory an SM (1 KB of it reserved per block)
    allows."""
    try:
        compiled = next(iter(kernel.overloads.values()))
        got = cuda.current_context().get_active_blocks_per_multiprocessor(
            compiled._codelibrary.get_cufunc(), threads, shared
        )
        return int(got[-1] if isinstance(got, tuple) else got)
    except Exception as e:  # an older or newer numba-cuda: estimate
        print(f"(occupancy query failed: {type(e).__name__}: {e}; estimating)")
        return min(32, 228 * 1024 // (shared + 1024))


class Checked:
    """Inputs of one attention batch and version 2's output for them."""

    def __init__(self, shape: gpu.AttentionShape, seed: int) -> None:
        self.shape = shape
        self.a = gpu.attention_inputs(shape, seed)
        attention.launch_v2(self.a)
        self.want = self.a.out.copy_to_host().astype(np.float64)

    def time(self, launch: Callable[[Any], None], timing: gpu.Timing, copy_gbs: float) -> str:
        try:
            launch(self.a)
        except Exception as e:  # a variant this shape does not allow
            return f"{type(e).__name__}: {e}"
        err = float(np.abs(self.a.out.copy_to_host() - self.want).max())
        if not err < 1e-2:
            return f"WRONG (max abs error {err:.1e})"
        ms = gpu.time_ms(lambda: launch(self.a), timing)
        share = self.shape.kv_bytes() / ms / 1e6 / copy_gbs
        return f"{1000 * ms:8.1f} us {100 * share:5.1f}%"


def attention_sections(timing: gpu.Timing, copy_gbs: float, sms: int) -> None:
    if "merge" not in sys.argv[1:]:
        waves_and_partitions(timing, copy_gbs, sms)
    merge_section(timing, copy_gbs)


def waves_and_partitions(timing: gpu.Timing, copy_gbs: float, sms: int) -> None:
    print("\n## 1. one-warp blocks per SM (version 5, group 4, head_dim 128, blocks of 16)")
    probe = Checked(gpu.AttentionShape(4, 1024, 32, 8), 1)
    per_sm = {}
    for partition, stages in ((512, 3), (512, 4), (448, 3), (384, 3), (256, 3), (256, 4)):
        attention_v5.launch_v5(probe.a, partition, stages)
        shared = attention_v5.shared_bytes(4, 128, 16, partition, stages)
        kernel = attention_v5.make_kernel(4, 128, 16, stages)
        per_sm[partition, stages] = n = blocks_per_sm(kernel, attention_v5.WARP, shared)
        print(
            f"partition {partition}, {stages} stages: {shared} B shared, {n} blocks per SM, "
            f"{n * sms} a wave",
            flush=True,
        )

    print("\n## 2. waves: version 5 defaults, 32/8, context 4096 (64 blocks per sequence)")
    wave = per_sm[512, 3] * sms
    for seqs in (8, 16, 20, 21, 32, 40, 41, 42, 48, 60, 62, 64, 80, 82, 83, 96, 123, 124, 128):
        c = Checked(gpu.AttentionShape(seqs, 4096, 32, 8), seqs)
        blocks = seqs * 8 * 8
        cell = c.time(lambda a: attention_v5.launch_v5(a, 512, 3), timing, copy_gbs)
        us = float(cell.split()[0]) if "us" in cell else float("nan")
        print(
            f"{seqs:4d} seqs: {blocks:6d} blocks = {blocks / wave:5.2f} waves: {cell}, "
            f"{us / seqs:6.2f} us per seq",
            flush=True,
        )
        del c

    print("\n## 3. partition sizes at 64 x 4096 (and 32/32)")
    for heads, kv in ((32, 8), (32, 32)):
        c = Checked(gpu.AttentionShape(64, 4096, heads, kv), 3)
        for partition in (512, 480, 448, 416, 384, 352, 336, 320, 288, 256):
            parts = -(-4096 // partition)
            blocks = 64 * kv * parts
            cells = []
            for stages in (3, 4):
                v5 = lambda a, p=partition, s=stages: attention_v5.launch_v5(a, p, s)  # noqa: E731
                cells.append(c.time(v5, timing, copy_gbs))
            if kv == 32:
                v4 = lambda a, p=partition: attention_v4.launch_v4(a, p)  # noqa: E731
                cells.append("v4 " + c.time(v4, timing, copy_gbs))
            waves = blocks / (per_sm.get((partition, 3), per_sm[512, 3]) * sms)
            print(
                f"{heads}/{kv} P={partition:4d}: {parts:2d} parts, {blocks:6d} blocks, "
                f"~{waves:5.2f} waves (3 stages): " + " | ".join(cells),
                flush=True,
            )
        del c


def merge_section(timing: gpu.Timing, copy_gbs: float) -> None:
    print("\n## 4. the merge alone, after one partition launch")
    batches = ((32, 8, 1, 32768), (32, 32, 1, 32768), (32, 8, 8, 16384), (32, 8, 64, 4096),
               (32, 32, 64, 4096), (32, 8, 256, 1024))  # fmt: skip
    for heads, kv, seqs, ctx in batches:
        c = Checked(gpu.AttentionShape(seqs, ctx, heads, kv), 5)
        chosen = attention_v5.choose_launch(seqs, kv, ctx, 16, heads // kv, 128)
        cell = c.time(lambda a, how=chosen: attention_v5.launch_v5(a, *how), timing, copy_gbs)
        print(f"{heads}/{kv} {seqs} x {ctx}, choose_launch {chosen}: {cell}", flush=True)
        p = chosen[0]
        dims = (128, 64, 32, 16) if seqs * heads < 128 else (128,)
        for t, d in [(None, 128), (256, None), *itertools.product((128, 256, 512), dims)]:
            splits = None if d is None else 128 // d
            merge = lambda a, p=p, t=t, n=splits: attention_v5.merge_partitions(a, p, t, n)  # noqa: E731
            cell = c.time(merge, timing, copy_gbs)
            name = f"{t} threads x {d or 'merge_splits'} dims"
            name = "version 2's reduction" if t is None else name
            print(f"  merge alone, {name}: {cell} (share of the whole batch's bytes)", flush=True)
        del c


@functools.cache
def ring_probe(block_size: int, words: int, stages: int, threads: int = attention_v5.WARP) -> Any:
    """Version 5's stream of copies with the arithmetic taken out: grid ``(kv_heads, seqs,
    parts)`` of one warp, the partition's block numbers read into shared memory, K's blocks then
    V's through a ring of ``stages`` buffers by ``cp.async``, each landed buffer touched once.
    What it reaches is the ceiling of version 5's data movement. ``row_words`` is the distance
    between a block's token rows, ``head_stride`` the kv head's offset in a block and
    ``id_scale`` multiplies block numbers: ``(heads * words, words, 1)`` for minipaged's layout
    ``[block, token, head, dim]``, ``(words, block_size * words, heads)`` for a head-major one
    ``[block, head, token, dim]``, where one head's rows of a block are one run of bytes."""
    ring_row = words + attention_v5.PAD_WORDS
    fetch, advance, copy_offsets = attention_v4.make_ring(
        block_size, words, ring_row, threads, stages
    )
    wait = attention_v4._wait_for(stages - 2)
    shift = block_size.bit_length() - 1
    ids_at = 2 * stages * block_size * ring_row  # in 32-bit words

    @cuda.jit
    def kernel(out, keys, values, tables, lens, partition, row_words, head_stride, id_scale):
        kv_head, seq, part = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        lane = cuda.threadIdx.x
        start = part * partition
        if start >= lens[seq]:
            return
        end = min(start + partition, lens[seq])
        ring = cuda.shared.array(0, uint64)
        ids = cuda.shared.array(0, int32)[ids_at : ids_at + (partition >> shift)]
        first = start >> shift
        blocks = ((end - 1) >> shift) - first + 1
        for i in range(lane, blocks, threads):
            ids[i] = tables[seq, first + i] * id_scale
        cuda.syncthreads()
        to_ring, to_cache = copy_offsets(row_words, kv_head * head_stride)
        at = uint64(0)
        for j in range(stages - 1):
            fetch(ring, at, keys, ids, j, row_words, to_ring, to_cache, j < blocks)
            at = advance(at)
        here = uint64(0)
        seen = uint64(0)
        for j in range(2 * blocks):
            wait()
            cuda.syncthreads()
            n = j + stages - 1
            if n < blocks:
                fetch(ring, at, keys, ids, n, row_words, to_ring, to_cache, True)
            else:
                n -= blocks
                fetch(ring, at, values, ids, n, row_words, to_ring, to_cache, n < blocks)
            at = advance(at)
            seen ^= ring[here + uint64(lane)]
            here = advance(here)
        out[seq, kv_head, part, lane] = seen

    return kernel


def timed(launch: Callable[[], Any], nbytes: int, timing: gpu.Timing, copy_gbs: float) -> str:
    """``launch`` run once (it compiles), then timed: its median and the share of the copy
    bandwidth that moving ``nbytes`` in that time is."""
    launch()
    return us_and_share(gpu.time_ms(launch, timing), nbytes, copy_gbs)


def us_and_share(ms: float, nbytes: int, copy_gbs: float) -> str:
    """``ms`` and the share of the copy bandwidth that moving ``nbytes`` in that time is."""
    return f"{1000 * ms:.1f} us {100 * nbytes / ms / 1e6 / copy_gbs:.1f}%"


def ring_shared(stages: int, words: int, partition: int) -> int:
    """The shared memory a ``ring_probe`` kernel needs of its own: its buffers and the
    partition's block numbers."""
    return 8 * stages * 16 * (words + attention_v5.PAD_WORDS) + 4 * (partition // 16)


def ring_launch(
    kernel: Any, grid: tuple[int, ...], threads: int, shared: int, args: tuple
) -> Callable[[], None]:
    """A launch of a ``ring_probe`` kernel, to time."""
    return lambda: kernel[grid, threads, 0, shared](*args)


def ceiling_section(timing: gpu.Timing, copy_gbs: float, sms: int) -> None:
    print("\n## 6. the ring alone (version 5's copies, no arithmetic), two cache layouts")
    for seqs, ctx, heads, kv in ((64, 4096, 32, 8), (32, 8192, 32, 8), (64, 4096, 32, 32)):
        shape = gpu.AttentionShape(seqs, ctx, heads, kv)
        a = gpu.attention_inputs(shape, 4)
        keys = attention_v3._flat_words(a.key_cache)
        values = attention_v3._flat_words(a.value_cache)
        words = shape.head_dim // 4
        group = heads // kv
        for name, launch in (
            ("version 5, 512 tokens, 3 buffers", lambda a=a: attention_v5.launch_v5(a)),
            ("its reduction alone", lambda a=a: attention_v5.merge_partitions(a, 512, None)),
        ):
            cell = timed(launch, shape.kv_bytes(), timing, copy_gbs)
            print(f"{heads}/{kv} {seqs} x {ctx}, {name}: {cell}")
        for stages in (3, 4):
            kernel = ring_probe(16, words, stages)
            parts = -(-ctx // 512)
            out = cuda.device_array((seqs, kv, parts, attention_v5.WARP), np.uint64)
            natural = ring_shared(stages, words, 512)
            as_v5 = attention_v5.shared_bytes(group, shape.head_dim, 16, 512, stages)
            layouts = {
                "[block, token, head, dim]": (kv * words, words, 1),
                "[block, head, token, dim]": (words, 16 * words, kv),
            }
            for name, (row, stride, scale) in layouts.items():
                for shared in (natural, as_v5):
                    args = (out, keys, values, a.block_tables, a.seq_lens, 512,
                            np.uint64(row), stride, scale)  # fmt: skip
                    launch = ring_launch(kernel, (kv, seqs, parts), attention_v5.WARP, shared, args)
                    cell = timed(launch, shape.kv_bytes(), timing, copy_gbs)
                    print(
                        f"{heads}/{kv} {seqs} x {ctx}, {stages} stages, {name}, {shared} B "
                        f"shared: {cell}",
                        flush=True,
                    )
        del a


IN_ORDER_SHAPE = gpu.AttentionShape(64, 4096, 32, 8)


def in_order_section(timing: gpu.Timing, copy_gbs: float, sms: int) -> None:
    shape = IN_ORDER_SHAPE
    seqs, kv, partition = shape.seqs, shape.kv_heads, 512
    print(f"\n## 6b. shuffled against in-order block tables, {seqs} x {shape.context}, 32/{kv}")
    a = gpu.attention_inputs(shape, 4)
    in_order = cuda.to_device(
        np.arange(a.block_tables.size, dtype=np.int32).reshape(a.block_tables.shape)
    )
    keys, values = attention_v3._flat_words(a.key_cache), attention_v3._flat_words(a.value_cache)
    words, parts = shape.head_dim // 4, -(-shape.context // partition)
    kernel = ring_probe(shape.block_size, words, 3)
    out = cuda.device_array((seqs, kv, parts, attention_v5.WARP), np.uint64)
    group = shape.heads // kv
    shared = attention_v5.shared_bytes(group, shape.head_dim, shape.block_size, partition, 3)
    sdpa = gpu.sdpa_ms(shape, timing)
    if sdpa is not None:
        print(f"SDPA: {us_and_share(sdpa, shape.kv_bytes(), copy_gbs)}")
    for name, tables in (("shuffled", a.block_tables), ("in order", in_order)):
        b = dataclasses.replace(a, block_tables=tables)
        args = (out, keys, values, tables, a.seq_lens, partition, np.uint64(kv * words), words, 1)
        for what, launch in (
            ("ring alone", ring_launch(kernel, (kv, seqs, parts), attention_v5.WARP, shared, args)),
            ("version 5, defaults", lambda b=b: attention_v5.launch_v5(b)),
            ("version 5, in-kernel merge",
             lambda b=b: attention_v5.launch_v5(b, partition, 3, attention_v5.IN_KERNEL)),
        ):  # fmt: skip
            cell = timed(launch, shape.kv_bytes(), timing, copy_gbs)
            print(f"{name} tables, {what}: {cell}", flush=True)
    del a


def in_kernel_section(timing: gpu.Timing, copy_gbs: float, sms: int) -> None:
    print("\n## 7. merging in the partition kernel against a merge launch")
    inside = attention_v5.IN_KERNEL
    for shape in gpu.attention_shapes():
        c = Checked(shape, 6)
        kv, group = shape.kv_heads, shape.heads // shape.kv_heads
        chosen = attention_v5.choose_launch(shape.seqs, kv, shape.context, 16, group, 128)
        variants = {f"choose_launch {chosen}": chosen, "512, 3, v2's reduction": (512, 3, None)}
        for partition, stages in ((512, 3), (512, 4)):
            variants[f"{partition}, {stages}, in kernel"] = (partition, stages, inside)
        if chosen[2] is not None and chosen[2] != inside:
            variants[f"{chosen[0]}, {chosen[1]}, in kernel"] = (chosen[0], chosen[1], inside)
        name = f"{shape.heads}/{kv} {shape.seqs} x {shape.context}"
        for what, how in variants.items():
            cell = c.time(lambda a, how=how: attention_v5.launch_v5(a, *how), timing, copy_gbs)
            print(f"{name}, {what}: {cell}", flush=True)
        if kv == shape.heads:
            cell = c.time(lambda a: attention_v4.launch_v4(a, 512), timing, copy_gbs)
            print(f"{name}, version 4: {cell}", flush=True)
        del c


@functools.cache
def read_all() -> Any:
    """Every 16-byte piece of a flat array of 8-byte words read once, grid-stride, and folded
    by XOR into one word a thread: the device's read bandwidth, with nothing written back."""
    load16, _ = _wide_access()

    @cuda.jit
    def kernel(words, out):
        tid = cuda.grid(1)
        step = uint64(2 * cuda.gridsize(1))
        seen = uint64(0)
        i = uint64(2 * tid)
        while i < uint64(words.size):
            lo, hi = load16(words, i)
            seen ^= lo ^ hi
            i += step
        out[tid] = seen

    return kernel


def streams_section(timing: gpu.Timing, copy_gbs: float, sms: int) -> None:
    print("\n## 9. read bandwidth, and the ring alone with more warps, buffers, longer partitions")
    shape = gpu.AttentionShape(64, 4096, 32, 8)
    a = gpu.attention_inputs(shape, 4)
    keys, values = attention_v3._flat_words(a.key_cache), attention_v3._flat_words(a.value_cache)
    nbytes = 8 * (keys.size + values.size)
    for per_sm, threads in ((8, 256), (16, 256), (32, 256), (8, 1024)):
        blocks = per_sm * sms * 256 // threads
        out = cuda.device_array(blocks * threads, np.uint64)
        kernel = read_all()
        launch = lambda k=kernel, b=blocks, t=threads, o=out: (k[b, t](keys, o), k[b, t](values, o))  # noqa: E731
        print(f"read K and V once, {blocks} x {threads}: {timed(launch, nbytes, timing, copy_gbs)}")
    words, kv, seqs = shape.head_dim // 4, shape.kv_heads, shape.seqs
    for threads, stages, partition in itertools.product((32, 64, 128), (3, 6), (512, 1024)):
        parts = -(-shape.context // partition)
        kernel = ring_probe(16, words, stages, threads)
        out = cuda.device_array((seqs, kv, parts, threads), np.uint64)
        shared = ring_shared(stages, words, partition)
        args = (out, keys, values, a.block_tables, a.seq_lens, partition,
                np.uint64(kv * words), words, 1)  # fmt: skip
        launch = ring_launch(kernel, (kv, seqs, parts), threads, shared, args)
        print(
            f"ring alone, {threads} threads, {stages} buffers, {partition} tokens, {shared} B: "
            f"{timed(launch, shape.kv_bytes(), timing, copy_gbs)}",
            flush=True,
        )
    del a


@functools.cache
def strided_copy(words: int) -> Any:
    """copy_blocks on a capped grid: block ``b`` copies pieces ``b``, ``b + gridDim.x``, ... of
    all pairs' pieces; each thread loads ``words`` words of K and of V before storing any."""

    @cuda.jit
    def kernel(key, value, mapping):
        size = key.shape[2]
        step = cuda.blockDim.x
        span = words * step
        per_pair = (size + span - 1) // span
        total = mapping.shape[0] * key.shape[0] * per_pair
        k = cuda.local.array(words, uint64)
        v = cuda.local.array(words, uint64)
        q = cuda.blockIdx.x
        while q < total:
            piece = q % per_pair
            rest = q // per_pair
            pair = rest % mapping.shape[0]
            layer = rest // mapping.shape[0]
            src, dst = mapping[pair, 0], mapping[pair, 1]
            first = piece * span + cuda.threadIdx.x
            for j in range(words):
                i = min(first + j * step, size - 1)
                k[j] = key[layer, src, i]
                v[j] = value[layer, src, i]
            for j in range(words):
                i = first + j * step
                if i < size:
                    key[layer, dst, i] = k[j]
                    value[layer, dst, i] = v[j]
            q += cuda.gridDim.x

    return kernel


@functools.cache
def wide_copy(chunks: int) -> Any:
    """copy_blocks with 16-byte loads and stores (``ld.global.v2.u64`` through inline PTX):
    each thread copies ``chunks`` pieces of 16 bytes of K and of V, loads first. Caches as flat
    word arrays; ``size`` words a block, a multiple of ``2 * chunks * blockDim.x``."""
    load16, store16 = _wide_access()

    @cuda.jit
    def kernel(key, value, mapping, size):
        src = uint64(mapping[cuda.blockIdx.x, 0]) * uint64(size)
        dst = uint64(mapping[cuda.blockIdx.x, 1]) * uint64(size)
        step = uint64(2 * cuda.blockDim.x)
        i = uint64(cuda.blockIdx.z) * step * uint64(chunks) + uint64(2 * cuda.threadIdx.x)
        k0, k1 = load16(key, src + i)
        v0, v1 = load16(value, src + i)
        if chunks == 2:
            k2, k3 = load16(key, src + i + step)
            v2, v3 = load16(value, src + i + step)
        store16(key, dst + i, k0, k1)
        store16(value, dst + i, v0, v1)
        if chunks == 2:
            store16(key, dst + i + step, k2, k3)
            store16(value, dst + i + step, v2, v3)

    return kernel


@functools.cache
def _wide_access() -> tuple[Any, Any]:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    i64 = ir.IntType(64)

    def address(context: Any, builder: Any, ty: Any, array: Any, index: Any) -> Any:
        data = context.make_array(ty)(context, builder, array).data
        return builder.ptrtoint(builder.gep(data, [index]), i64)

    @intrinsic
    def load16(typingctx, words, at):  # noqa: ANN001, ANN202
        sig = types.UniTuple(types.uint64, 2)(words, types.uint64)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(ir.LiteralStructType([i64, i64]), [i64])
            got = builder.asm(
                fn,
                "{ .reg .u64 g; cvta.to.global.u64 g, $2; ld.global.v2.u64 {$0, $1}, [g]; }",
                "=l,=l,l",
                [address(context, builder, sig.args[0], args[0], args[1])],
                True,
            )
            values = [builder.extract_value(got, i) for i in range(2)]
            return context.make_tuple(builder, sig.return_type, values)

        return sig, codegen

    @intrinsic
    def store16(typingctx, words, at, lo, hi):  # noqa: ANN001, ANN202
        sig = types.void(words, types.uint64, types.uint64, types.uint64)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fn = ir.FunctionType(ir.VoidType(), [i64] * 3)
            builder.asm(
                fn,
                "{ .reg .u64 g; cvta.to.global.u64 g, $0; st.global.v2.u64 [g], {$1, $2}; }",
                "l,l,l,~{memory}",
                [address(context, builder, sig.args[0], args[0], args[1]), args[2], args[3]],
                True,
            )
            return context.get_dummy_value()

        return sig, codegen

    return load16, store16


def copy_section(timing: gpu.Timing, copy_gbs: float, sms: int) -> None:
    print("\n## 5. copy_blocks on capped grids (one layer, blocks of 16 x 8 x 128 float16)")
    shape = gpu.CacheShape()
    rng = np.random.default_rng(7)
    k, v = gpu.device_caches(shape)
    kw, vw = cache_ops.as_words(k), cache_ops.as_words(v)
    size = kw.shape[2]
    flat_k, flat_v = kw.reshape(kw.size), vw.reshape(vw.size)  # for the 16-byte kernel
    for n in (256, 1024):
        maps = gpu.pair_sets(rng, shape.num_blocks, n)
        nbytes = 2 * 2 * n * shape.block_bytes
        m = maps[0].copy_to_host()

        def share(ms: float, nbytes: int = nbytes) -> str:
            return f"{1000 * ms:.1f} us {100 * nbytes / ms / 1e6 / copy_gbs:.0f}%"

        turn = itertools.cycle(maps)
        ms = gpu.time_ms(lambda turn=turn: cache_ops.launch_copy_blocks(k, v, next(turn)), timing)
        print(f"{n} blocks, copy_blocks: {share(ms)}", flush=True)

        def checked_time(launch: Callable[[Any], None], m: Any = m, maps: list = maps) -> str:
            """Run ``launch(pairs)`` once on the first mapping and compare both caches with
            NumPy's copy, then time it cycling through the mappings."""
            want_k, want_v = k.copy_to_host(), v.copy_to_host()
            want_k[0, m[:, 1]] = want_k[0, m[:, 0]]
            want_v[0, m[:, 1]] = want_v[0, m[:, 0]]
            launch(maps[0])
            ok = np.array_equal(k.copy_to_host(), want_k)
            ok = ok and np.array_equal(v.copy_to_host(), want_v)
            turn = itertools.cycle(maps)
            ms = gpu.time_ms(lambda: launch(next(turn)), timing)
            return f"{share(ms)}{'' if ok else ' WRONG'}"

        for chunks, threads in itertools.product((1, 2), (128, 256)):
            kernel = wide_copy(chunks)
            grid = (n, 1, size // (2 * chunks * threads))
            cell = checked_time(
                lambda pairs, kernel=kernel, grid=grid, t=threads: kernel[grid, t](
                    flat_k, flat_v, pairs, size
                )
            )
            name = f"16-byte loads, {chunks} x 16 B x {threads} threads, grid {grid}"
            print(f"  {name}: {cell}", flush=True)
        for words, threads, per in itertools.product((2, 8), (128, 256), (8, 0)):
            kernel = strided_copy(words)
            pieces = n * -(-size // (words * threads))
            grid = pieces if per == 0 else min(pieces, per * sms)
            cell = checked_time(
                lambda pairs, kernel=kernel, grid=grid, t=threads: kernel[grid, t](kw, vw, pairs)
            )
            name = f"{words} words x {threads} threads, grid {grid} ({per or 'all'} per SM)"
            print(f"  {name}: {cell}", flush=True)


def main() -> None:
    timing = gpu.Timing()
    copy_gbs = gpu.copy_bandwidth(timing)
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    print(f"{gpu.device_name()}, {sms} SMs; copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    # "merge": only attention's merge section
    which = sys.argv[1:] or ["attention", "copy", "ceiling", "in-order", "in-kernel"]
    which += ["attention"] if "merge" in which else []
    sections = (
        ("attention", attention_sections),
        ("copy", copy_section),
        ("ceiling", ceiling_section),
        ("in-order", in_order_section),
        ("in-kernel", in_kernel_section),
        ("streams", streams_section),
    )
    for name, section in sections:
        if name in which:
            try:
                section(timing, copy_gbs, sms)
            except Exception:  # report and go on: device time is too scarce to stop here
                traceback.print_exc()


if __name__ == "__main__":
    main()
