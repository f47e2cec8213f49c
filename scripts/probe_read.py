"""How fast can the decode batch's cache be read at all, and does Hopper's bulk copy read it
faster than version 5's ``cp.async`` ring? (64 x 4096, 32 query heads over 8 kv heads.)

    python3 scripts/probe_read.py [read] [torch] [bulk] [tma]

1. A plain read of the K and V caches in one launch: a grid-stride loop in which each thread
   starts ``unroll`` 16-byte loads of K and as many of V before it uses any, for 1, 2, 4 and 8
   of them, on grids of 4 to 32 blocks an SM. (``tune_tail.py streams`` read K and V in two
   launches with one load in flight a thread.)
2. PyTorch's own reduction kernels reading the same bytes (``torch.sum`` of K, then of V), and
   SDPA on a contiguous cache of the same shape.
3. Version 5's ring alone (``tune_tail.ring_probe``: its ``cp.async`` copies, no arithmetic).
4. The same ring fed by ``cp.async.bulk`` (the Tensor Memory Accelerator's one-dimensional
   copy, sm_90): one lane starts a whole run of bytes, which lands in shared memory and
   completes the ring buffer's ``mbarrier``. On minipaged's layout ``[block, token, head,
   dim]`` a kv head's part of a block is 16 runs of 256 bytes (16 copies, one a lane); read as
   if the cache were head-major, ``[block, head, token, dim]``, it is one run of 4 KB (one
   copy); a thread block of 8 warps can take all 8 heads of a block, 32 KB, in one. Padded
   and aligned landings are compared.
5. The same ring fed by TMA tensor copies that swizzle the rows as they land (checked on one
   box), so that rows 128 bytes apart meet no bank conflicts: boxes of one head's 16 tokens by
   64 dimensions, or all of a thread block's heads at once.

Every figure is a median of CUDA-event timings (``minipaged bench``'s ``time_ms``) with its
share of the device-to-device copy bandwidth measured in the same run. Sections 4 and 5 need a
GPU of compute capability 9.0; the whole script takes about 80 s on an H200.
"""

from __future__ import annotations

import functools
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from numba import cuda, int32, uint32, uint64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_tail import _wide_access, ring_launch, ring_probe, ring_shared, timed, us_and_share  # noqa: E402

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import attention_v3, attention_v5  # noqa: E402

warnings.filterwarnings("ignore", message=".*under-utilization")

SHAPE = gpu.AttentionShape(64, 4096, 32, 8)
PARTITION = 512
WARP = attention_v5.WARP


@functools.cache
def _ptx() -> dict[str, Any]:
    """The PTX statements the probes need, as Numba intrinsics: version 7's bulk copy and the
    ``mbarrier`` it completes, and a tensor copy."""
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    from minipaged.kernels import attention_v7 as v7

    @intrinsic
    def tensor_copy5(typingctx, ring, at, tmap, x, y, z, w, v, bars, i):  # noqa: ANN001, ANN202
        """Start the tensor map's box at coordinates ``(x, y, z, w, v)`` (innermost first) on
        its way to word ``at`` of a shared array (1024-byte aligned, for the swizzle); its
        landing counts towards ``bars[i]``."""
        i32 = types.int32
        sig = types.void(ring, types.uint64, tmap, i32, i32, i32, i32, i32, bars, types.uint64)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            dst = v7._address(context, builder, sig.args[0], args[0], args[1])
            start = ir.Constant(ir.IntType(64), 0)
            desc = v7._address(context, builder, sig.args[2], args[2], start)
            bar = v7._address(context, builder, sig.args[8], args[8], args[9])
            v7._statement(
                builder,
                "{ .reg .u64 d, b; cvta.to.shared.u64 d, $0; cvta.to.shared.u64 b, $7; "
                "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
                "[d], [$1, {$2, $3, $4, $5, $6}], [b]; }",
                [dst, desc, *args[3:8], bar],
                "llrrrrrl",
            )
            return context.get_dummy_value()

        return sig, codegen

    return dict(
        bar_init=v7._bar_init,
        expect=v7._expect,
        bulk=v7._bulk,
        landed=v7._landed,
        fence_async=v7._fence_async,
        tensor_copy5=tensor_copy5,
        shared_at=v7._shared_at,
    )


@functools.cache
def plain_read(unroll: int) -> Any:
    """Each thread reads ``unroll`` 16-byte pieces of K and as many of V (a grid-stride apart)
    before it folds any of them in: ``2 * unroll`` loads in flight a thread."""
    load16, _ = _wide_access()
    slots = 4 * unroll  # words in flight a thread

    @cuda.jit
    def kernel(keys, values, out):
        tid = cuda.grid(1)
        step = uint64(2 * cuda.gridsize(1))
        n = uint64(keys.size)
        got = cuda.local.array(slots, uint64)
        seen = uint64(0)
        i = uint64(2 * tid)
        while i + uint64(unroll - 1) * step < n:
            for u in range(unroll):
                k0, k1 = load16(keys, i + uint64(u) * step)
                v0, v1 = load16(values, i + uint64(u) * step)
                got[4 * u], got[4 * u + 1], got[4 * u + 2], got[4 * u + 3] = k0, k1, v0, v1
            for u in range(slots):
                seen ^= got[u]
            i += uint64(unroll) * step
        while i < n:
            lo, hi = load16(keys, i)
            seen ^= lo ^ hi
            lo, hi = load16(values, i)
            seen ^= lo ^ hi
            i += step
        out[tid] = seen

    return kernel


def ring_kernel(issue: Any, stages: int, warps: int, buffer: int, word_of: Any) -> tuple[Any, int]:
    """Version 5's ring alone, the skeleton every feed below shares: K's blocks then V's
    through ``stages`` buffers of ``buffer`` words, each waited for on its ``mbarrier`` (item
    ``j`` lands in buffer ``j % stages``, in phase ``(j // stages) % 2``), each landed buffer
    folded once: thread ``(warp, lane)`` folds its word ``word_of(warp, lane)``. The grid is
    ``(kv_heads // warps, seqs, parts)`` of ``warps`` warps, one a kv head; every warp is done
    with a buffer before it is refilled.

    ``issue(n, ring, first, bars, k, v, ids, blocks, p0, p1, p2)`` starts item ``n`` into its
    buffer (``first``: the word where the buffers start, 1024-byte aligned; ``ids``: the
    partition's block numbers times ``id_scale``; ``k``, ``v``, ``p0`` to ``p2``: the kernel's
    arguments, passed on). Returns the kernel and its shared memory in bytes."""
    p = _ptx()
    bar_init, landed, shared_at = p["bar_init"], p["landed"], p["shared_at"]
    block_size = SHAPE.block_size
    ids_words = PARTITION // block_size // 2
    head_words = ids_words + stages  # block numbers, barriers; the buffers after, aligned
    shift = block_size.bit_length() - 1
    threads = warps * WARP

    @cuda.jit
    def kernel(out, k, v, tables, lens, p0, p1, p2, id_scale):
        seq, part = cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        warp, lane = tid // WARP, tid % WARP
        start = part * PARTITION
        if start >= lens[seq]:
            return
        end = min(start + PARTITION, lens[seq])
        ring = cuda.shared.array(0, uint64)
        ids = cuda.shared.array(0, int32)[: 2 * ids_words]
        bars = ring[ids_words:head_words]
        first = head_words + ((1024 - (shared_at(ring) + 8 * head_words) % 1024) % 1024) // 8
        first_block = start >> shift
        blocks = ((end - 1) >> shift) - first_block + 1
        for i in range(tid, blocks, threads):
            ids[i] = tables[seq, first_block + i] * id_scale
        if tid == 0:
            for s in range(stages):
                bar_init(bars, uint64(s))
        cuda.syncthreads()
        items = 2 * blocks
        for n in range(min(stages - 1, items)):
            issue(n, ring, first, bars, k, v, ids, blocks, p0, p1, p2)
        seen = uint64(0)
        for j in range(items):
            s = j % stages
            while landed(bars, uint64(s), uint32((j // stages) & 1)) == 0:
                pass
            if warps == 1:
                cuda.syncwarp()
            else:
                cuda.syncthreads()
            if j + stages - 1 < items:
                issue(j + stages - 1, ring, first, bars, k, v, ids, blocks, p0, p1, p2)
            seen ^= ring[first + s * buffer + word_of(warp, lane)]
        out[seq, cuda.blockIdx.x * warps + warp, part, lane] = seen

    return kernel, 8 * (head_words + 128 + stages * buffer)


@functools.cache
def bulk_ring(stages: int, runs: int, warps: int = 1, pad: int = 2) -> tuple[Any, int]:
    """The ring fed by bulk copies: each buffer filled by ``runs`` copies of one run of bytes
    each. Its arguments ``p0`` to ``p2`` are the words between blocks (block numbers times
    ``id_scale``), between runs and between kv heads.

    With one warp, a buffer holds one kv head's part of a block (4 KB), as version 5's does;
    with ``warps == kv_heads`` it holds the whole block, every head of it (32 KB), and warp
    ``w`` reads head ``w``'s part. ``pad`` 8-byte words follow each run in the buffer (version 5
    pads 2, so that its ``ldmatrix`` loads meet no bank conflicts; 16 keeps every run 128-byte
    aligned)."""
    p = _ptx()
    expect, bulk, fence_async = p["expect"], p["bulk"], p["fence_async"]
    words = SHAPE.head_dim // 4
    item_words = warps * SHAPE.block_size * words
    run_words = item_words // runs
    ring_row = run_words + pad

    @cuda.jit(device=True)
    def issue(n, ring, first, bars, keys, values, ids, blocks, block_words, row_words, heads):
        b = n % stages
        cache = keys if n < blocks else values
        lb = n if n < blocks else n - blocks
        tid = cuda.threadIdx.x
        if tid == 0:
            expect(bars, uint64(b), uint32(8 * item_words))
        if tid < runs:
            fence_async()
            head = uint64(cuda.blockIdx.x) * heads
            src = uint64(ids[lb]) * block_words + head + uint64(tid) * row_words
            bulk(ring, uint64(first + b * runs * ring_row + tid * ring_row), cache, src,
                 uint32(8 * run_words), bars, uint64(b))  # fmt: skip

    @cuda.jit(device=True)
    def word_of(warp, lane):
        return warp * words + lane

    return ring_kernel(issue, stages, warps, runs * ring_row, word_of)


def allow_shared(kernel: Any, args: tuple, nbytes: int) -> None:
    """Let ``kernel`` (compiled for ``args``) take ``nbytes`` of dynamic shared memory: more
    than 48 KB needs the driver's permission."""
    from numba import typeof
    from numba.cuda.cudadrv import driver

    compiled = kernel.compile(tuple(typeof(x) for x in args))
    cufunc = compiled._codelibrary.get_cufunc()
    attr = driver.binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)


def encode(cache: Any, dims: list[int], strides: list[int], box: list[int]) -> Any:
    """A TMA tensor map of the float16 ``cache`` in device memory: a tensor of ``dims``
    (innermost first; the first is contiguous) with ``strides`` in bytes for the others, read in
    boxes of ``box`` elements, swizzled by 128 bytes on landing (the 16-byte piece ``c`` of
    128-byte row ``r`` of the box goes to piece ``c ^ (r % 8)``), so that the row loads of a
    fragment meet no bank conflicts without padding."""
    import ctypes

    from cuda.bindings import driver as d

    err, tmap = d.cuTensorMapEncodeTiled(
        d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        len(dims),
        cache.device_ctypes_pointer.value,
        [d.cuuint64_t(n) for n in dims],
        [d.cuuint64_t(n) for n in strides],
        [d.cuuint32_t(n) for n in box],
        [d.cuuint32_t(1)] * len(dims),
        d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != d.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled: {err}")
    raw = ctypes.string_at(tmap.getPtr(), 128)
    return cuda.to_device(np.frombuffer(raw, np.uint8).copy())


def block_map(cache: Any, heads_per_box: int, halves_per_box: int = 2) -> Any:
    """Boxes of ``heads_per_box`` heads' part of a block of a cache ``[block, token, head,
    dim]``, read as ``[block, head, half, token, 64 dims]``: each head's half of the dimensions
    lands as 16 consecutive token rows of 128 bytes, so that the swizzle spreads the tokens of a
    fragment over the banks. A box holds both halves (4 KB a head) or one (2 KB)."""
    blocks, block_size, heads, dim = cache.shape
    row = 2 * dim
    return encode(
        cache,
        [64, block_size, 2, heads, blocks],
        [heads * row, 128, row, block_size * heads * row],
        [64, block_size, halves_per_box, heads_per_box, 1],
    )


@functools.cache
def tma_ring(stages: int, heads: int, copies: int = 1) -> tuple[Any, int]:
    """The ring fed by TMA tensor copies of ``block_map`` boxes, ``copies`` a block (1: all
    the thread block's ``heads`` and both halves of the dimensions at once; 2: one half each,
    one head), started by the first threads. Its arguments ``k`` and ``v`` are the maps."""
    p = _ptx()
    expect, fence_async, tensor_copy5 = p["expect"], p["fence_async"], p["tensor_copy5"]
    buffer = 512 * heads  # words

    @cuda.jit(device=True)
    def issue(n, ring, first, bars, kmap, vmap, ids, blocks, p0, p1, p2):
        b = n % stages
        lb = n if n < blocks else n - blocks
        tid = cuda.threadIdx.x
        if tid == 0:
            expect(bars, uint64(b), uint32(8 * buffer))
        if tid < copies:
            fence_async()
            tmap = kmap if n < blocks else vmap
            head = int32(cuda.blockIdx.x * heads)
            at = uint64(first + b * buffer + tid * (buffer // copies))
            tensor_copy5(ring, at, tmap, int32(0), int32(0), int32(tid), head, int32(ids[lb]),
                         bars, uint64(b))  # fmt: skip

    @cuda.jit(device=True)
    def word_of(warp, lane):
        # token 0's rows (rows 0 and 16 of the warp's 4 KB) are not swizzled
        return warp * 512 + lane % 16 + 256 * (lane // 16)

    return ring_kernel(issue, stages, heads, buffer, word_of)


@functools.cache
def tma_dump() -> Any:
    """One box (16 tokens x 64 dimensions of one head, 2 KB) through a tensor map into shared
    memory and straight out to ``out`` (256 words), to see where the swizzle put each piece."""
    p = _ptx()
    bar_init, expect, landed, tensor_copy5, shared_at = (
        p["bar_init"], p["expect"], p["landed"], p["tensor_copy5"], p["shared_at"]
    )  # fmt: skip

    @cuda.jit
    def kernel(out, kmap, block, head):
        ring = cuda.shared.array(0, uint64)
        lane = cuda.threadIdx.x
        first = 1 + ((1024 - (shared_at(ring) + 8) % 1024) % 1024) // 8
        bars = ring[0:1]
        if lane == 0:
            bar_init(bars, uint64(0))
            expect(bars, uint64(0), uint32(2048))
            tensor_copy5(ring, uint64(first), kmap, int32(0), int32(0), int32(0), int32(head),
                         int32(block), bars, uint64(0))  # fmt: skip
        while landed(bars, uint64(0), uint32(0)) == 0:
            pass
        for i in range(lane, 256, WARP):
            out[i] = ring[first + i]

    return kernel


def swizzled(rows: np.ndarray) -> np.ndarray:
    """Where a 128-byte swizzle puts 16-byte pieces: piece ``c`` of row ``r`` at ``c ^ (r % 8)``
    (``rows``: 16-byte pieces as ``[row, piece, ...]``)."""
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            out[r, c ^ (r % 8)] = rows[r, c]
    return out


def main() -> None:
    timing = gpu.Timing()
    copy_gbs = gpu.copy_bandwidth(timing)
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    print(f"{gpu.device_name()}, {sms} SMs; copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    a = gpu.attention_inputs(SHAPE, 4)
    keys = attention_v3._flat_words(a.key_cache)
    values = attention_v3._flat_words(a.value_cache)
    nbytes = SHAPE.kv_bytes()
    seqs, kv, words = SHAPE.seqs, SHAPE.kv_heads, SHAPE.head_dim // 4
    parts = -(-SHAPE.context // PARTITION)

    which = set(sys.argv[1:]) or {"read", "torch", "bulk", "tma"}
    print(f"\n## 1. plain read of K and V in one launch ({nbytes / 1e6:.0f} MB)")
    for unroll in (1, 2, 4, 8) if "read" in which else ():
        for per_sm, threads in ((4, 256), (8, 256), (16, 256), (32, 128)):
            blocks = per_sm * sms
            out = cuda.device_array(blocks * threads, np.uint64)
            kernel = plain_read(unroll)
            launch = lambda k=kernel, b=blocks, t=threads, o=out: k[b, t](keys, values, o)  # noqa: E731
            cell = timed(launch, nbytes, timing, copy_gbs)
            print(f"{2 * unroll} loads a thread, {blocks} x {threads}: {cell}", flush=True)

    print("\n## 2. PyTorch")
    try:
        if "torch" not in which:
            raise ImportError("not asked for")
        import torch

        tk = torch.as_tensor(a.key_cache, device="cuda")
        tv = torch.as_tensor(a.value_cache, device="cuda")
        cell = timed(lambda: (tk.sum(), tv.sum()), nbytes, timing, copy_gbs)
        print(f"torch.sum of K, then of V: {cell}")
        sdpa = us_and_share(gpu.sdpa_ms(SHAPE, timing), nbytes, copy_gbs)
        print(f"SDPA, contiguous cache: {sdpa}")
    except ImportError as e:
        print(f"skipped: {e}")
    except Exception:
        traceback.print_exc()

    print("\n## 3. version 5 and its ring alone")
    v5 = timed(lambda: attention_v5.launch_v5(a), nbytes, timing, copy_gbs)
    print(f"version 5 as paged_attention runs it: {v5}")
    expected = cuda.device_array((seqs, kv, parts, WARP), np.uint64)
    shared = ring_shared(3, words, PARTITION)
    args = (expected, keys, values, a.block_tables, a.seq_lens, PARTITION,
            np.uint64(kv * words), words, 1)  # fmt: skip
    launch = ring_launch(ring_probe(16, words, 3), (kv, seqs, parts), WARP, shared, args)
    print(f"ring alone, cp.async, 3 buffers: {timed(launch, nbytes, timing, copy_gbs)}", flush=True)

    def ring(kernel: Any, grid: tuple, threads: int, shared: int, args: tuple, check: bool) -> str:
        """Time one ring probe; with ``check``, say whether it folded the words the cp.async
        ring folds (the probes of the cache read as head-major fold others)."""
        if shared > 48 * 1024:
            allow_shared(kernel, args, shared)
        cell = timed(ring_launch(kernel, grid, threads, shared, args), nbytes, timing, copy_gbs)
        if not check:
            return cell
        agree = np.array_equal(out.copy_to_host(), expected.copy_to_host())
        return cell + (", lands what cp.async does" if agree else ", DIFFERS from cp.async")

    print("\n## 4. the ring fed by cp.async.bulk")
    out = cuda.device_array_like(expected)
    block_words = 16 * kv * words
    # (name, warps, runs, pad, (words a block, between runs, between heads), number scale)
    variants = [
        ("one warp a head, 16 x 256 B (minipaged's rows)", 1, 16, 2,
         (block_words, kv * words, words), 1),
        ("one warp a head, 16 x 256 B, runs 128-byte aligned", 1, 16, 16,
         (block_words, kv * words, words), 1),
        ("one warp a head, head-major cache, 1 x 4 KB", 1, 1, 0,
         (16 * words, 0, 16 * words), kv),
        ("one warp a head, head-major cache, 1 x 4 KB, buffers 16 B off", 1, 1, 2,
         (16 * words, 0, 16 * words), kv),
        ("8 warps, all heads, 16 x 2 KB, runs 128-byte aligned", kv, 16, 16,
         (block_words, kv * words, 0), 1),
    ]  # fmt: skip
    for name, warps, runs, pad, strides, scale in variants if "bulk" in which else ():
        for stages in (3, 4):
            try:
                kernel, shared = bulk_ring(stages, runs, warps, pad)
                args = (out, keys, values, a.block_tables, a.seq_lens,
                        *map(np.uint64, strides), scale)  # fmt: skip
                cell = ring(kernel, (kv // warps, seqs, parts), warps * WARP, shared, args,
                            scale == 1)  # fmt: skip
                print(f"bulk, {name}, {stages} buffers, {shared} B: {cell}", flush=True)
            except Exception:
                traceback.print_exc()

    print("\n## 5. the ring fed by TMA tensor copies (128-byte swizzle)")
    if "tma" not in which:
        return
    try:
        kmap = block_map(a.key_cache, 1, 1)
        dump = cuda.device_array(256, np.uint64)
        tma_dump()[1, WARP, 0, 8 * (256 + 1) + 1024](dump, kmap, 5, 3)
        box = np.ascontiguousarray(a.key_cache.copy_to_host()[5, :, 3, :64])
        box = box.view(np.uint64).reshape(16, 8, 2)
        got = dump.copy_to_host().reshape(16, 8, 2)
        print("swizzle: piece c of row r lands at c ^ (r % 8):", np.array_equal(got, swizzled(box)))
    except Exception:
        traceback.print_exc()
    # (warps a thread block, copies a block)
    for heads, copies in ((1, 2), (1, 1), (2, 1), (8, 1)):
        try:
            halves = 2 // copies
            kmap = block_map(a.key_cache, heads, halves)
            vmap = block_map(a.value_cache, heads, halves)
            for stages in (2, 3, 4, 6):
                kernel, shared = tma_ring(stages, heads, copies)
                args = (out, kmap, vmap, a.block_tables, a.seq_lens, *[np.uint64(0)] * 3, 1)
                cell = ring(kernel, (kv // heads, seqs, parts), heads * WARP, shared, args, True)
                size = 4 * heads // copies
                print(f"tma, {heads} warps, {copies} x {size} KB a block, {stages} buffers, "
                      f"{shared} B: {cell}", flush=True)  # fmt: skip
        except Exception:
            traceback.print_exc()


if __name__ == "__main__":
    main()
