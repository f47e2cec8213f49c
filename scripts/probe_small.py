"""Where the time of a batch too small to fill the GPU goes: 1 x 32k, 32 query heads over 8
kv heads, the batch of ``minipaged bench attention`` furthest below the copy bandwidth (73% on
an H100, 65% on an H200).

    python3 scripts/probe_small.py [read] [split] [ring] [merge] [stages]

1. ``read``: the fastest plain read of this batch's K and V (``probe_read.plain_read``), and
   SDPA on a contiguous cache.
2. ``split``: version 5 as ``paged_attention`` runs it, its partition kernel alone and its
   merge alone.
3. ``ring``: version 5's copies alone (``tune_tail.ring_probe``, no arithmetic) on partitions
   of 128, 256 and 512 tokens, 3 to 6 buffers: does moving the data in one short wave take
   the partition kernel's time, or does the arithmetic?
4. ``merge``: ``merge_partitions`` as ``paged_attention`` calls it, the merge kernel's direct
   form with as many loads as a thread needs (``direct_merge``), and version 2's reduction, on
   several block sizes and splits, for the small batches ``choose_launch`` sends to a merge
   kernel.
5. ``stages``: the partition kernel alone with shallower and deeper rings, on partitions of
   128, 256 and 512 tokens.
6. ``warps``: blocks of several warps, each warp a run of the partition with its own ring,
   combined in shared memory: the partition kernel alone, merging in the kernel, and followed
   by the merge kernel, on the small batches and two larger ones.

Every attention variant is compared with version 2's output first (``tune_tail.Checked``).
GPU only; about a minute on an H200.
"""

from __future__ import annotations

import itertools
import math
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_read import plain_read  # noqa: E402
from tune_tail import Checked, ring_launch, ring_probe, ring_shared, timed, us_and_share  # noqa: E402

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import attention_v3, attention_v5  # noqa: E402

warnings.filterwarnings("ignore", message=".*under-utilization")

SHAPE = gpu.AttentionShape(1, 32768, 32, 8)
MERGE_SHAPES = (SHAPE, gpu.AttentionShape(1, 32768, 32, 32), gpu.AttentionShape(8, 16384, 32, 8))
WARP = attention_v5.WARP


def direct_merge(a: Any, partition_size: int, threads: int, splits: int) -> None:
    """Merge ``a``'s partitions with ``make_merge_kernel``'s direct form given as many loads
    as every thread needs (a power of two), even where ``merge_partitions`` would cap them at
    ``merge_loads`` and take the rounds of its other form."""
    num_seqs, num_heads, head_dim = a.shape
    partial_out, max_logits, exp_sums = a.workspace(partition_size)
    dims = head_dim // splits
    slices = threads // dims
    loads = 1 << max(0, math.ceil(math.log2(-(-partial_out.shape[2] // slices))))
    shared = attention_v5.merge_shared_bytes(threads, dims)
    kernel = attention_v5.make_merge_kernel(loads, None, True)
    kernel[(num_heads, num_seqs, splits), threads, 0, shared](
        a.out, partial_out, max_logits, exp_sums, a.seq_lens, partition_size
    )


# (threads, splits) of the merge, each by merge_partitions and by direct_merge; and
# (None, None): version 2's reduction
MERGE_V5 = attention_v5.merge_partitions
MERGE_VARIANTS = [(None, None)] + [(t, k) for t in (256, 512, 1024) for k in (1, 2, 4, 8)]
# (warps, tokens a warp, buffers) of blocks of several warps
WARP_VARIANTS = [(4, 256, 4), (8, 256, 4), (8, 256, 3), (8, 128, 2), (16, 128, 2), (16, 256, 2),
                 (8, 512, 3), (4, 512, 4), (8, 512, 2)]  # fmt: skip
WARP_SHAPES = MERGE_SHAPES + (
    gpu.AttentionShape(32, 8192, 32, 8),
    gpu.AttentionShape(64, 4096, 32, 8),
)


def main() -> None:
    timing = gpu.Timing()
    copy_gbs = gpu.copy_bandwidth(timing)
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    print(f"{gpu.device_name()}, {sms} SMs; copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    which = set(sys.argv[1:]) or {"read", "split", "ring", "merge", "stages", "warps"}
    shape = SHAPE
    nbytes = shape.kv_bytes()
    c = Checked(shape, 4)
    a = c.a
    keys = attention_v3._flat_words(a.key_cache)
    values = attention_v3._flat_words(a.value_cache)
    group = shape.heads // shape.kv_heads
    chosen = attention_v5.choose_launch(1, shape.kv_heads, shape.context, 16, group, 128)
    part, stages, threads, warps = chosen
    print(f"32/8 1 x 32k, {nbytes / 1e6:.0f} MB; choose_launch: {chosen}")

    if "read" in which:
        print("\n## 1. the plain read, and SDPA")
        for per_sm, t in ((4, 256), (8, 256), (16, 256)):
            blocks = per_sm * sms
            out = cuda.device_array(blocks * t, np.uint64)
            kernel = plain_read(4)
            launch = lambda k=kernel, b=blocks, t=t, o=out: k[b, t](keys, values, o)  # noqa: E731
            cell = timed(launch, nbytes, timing, copy_gbs)
            print(f"plain read, 8 loads a thread, {blocks} x {t}: {cell}")
        try:
            sdpa = gpu.sdpa_ms(shape, timing)
            print("SDPA:", "no torch" if sdpa is None else us_and_share(sdpa, nbytes, copy_gbs))
        except Exception:
            traceback.print_exc()

    if "split" in which:
        print("\n## 2. version 5, its partition kernel, its merge")
        full = lambda a: attention_v5.launch_v5(a, *chosen)  # noqa: E731
        print(f"version 5 as chosen: {c.time(full, timing, copy_gbs)}")
        alone = lambda a=a: attention_v5.launch_partitions(a, part, stages, False, warps)  # noqa: E731
        print(f"partition kernel alone: {timed(alone, nbytes, timing, copy_gbs)}")
        kernel_threads = threads or attention_v5.MERGE_THREADS  # (merged in the kernel: its kernel)
        merge = lambda a=a: attention_v5.merge_partitions(a, part, kernel_threads)  # noqa: E731
        print(f"merge kernel alone: {timed(merge, nbytes, timing, copy_gbs)}", flush=True)

    if "ring" in which:
        print("\n## 3. the ring alone (no arithmetic)")
        kv, words = shape.kv_heads, shape.head_dim // 4
        for partition in (128, 256, 512):
            parts = -(-shape.context // partition)
            out = cuda.device_array((1, kv, parts, WARP), np.uint64)
            for n in (3, 4, 6):
                kernel = ring_probe(16, words, n)
                shared = ring_shared(n, words, partition)
                args = (out, keys, values, a.block_tables, a.seq_lens, partition,
                        np.uint64(kv * words), words, 1)  # fmt: skip
                launch = ring_launch(kernel, (kv, 1, parts), WARP, shared, args)
                cell = timed(launch, nbytes, timing, copy_gbs)
                print(f"ring alone, {partition} tokens ({kv * parts} blocks), {n} buffers: {cell}",
                      flush=True)  # fmt: skip

    if "merge" in which:
        print("\n## 4. the merge alone")
        for s in MERGE_SHAPES:
            try:
                m = c if s == shape else Checked(s, 4)
                g = s.heads // s.kv_heads
                p, n, _, w = attention_v5.choose_launch(s.seqs, s.kv_heads, s.context, 16, g, 128)
                name = f"{s.heads}/{s.kv_heads} {s.seqs} x {s.context}, {p} tokens"
                for (t, splits), kind in itertools.product(MERGE_VARIANTS, ("kernel", "direct")):
                    if t is None and kind == "direct":
                        continue
                    if t is None:
                        label = "version 2's reduction"
                        merge = lambda a, p=p: attention_v5.merge_partitions(a, p, None)  # noqa: E731
                    elif kind == "kernel":
                        label = f"merge_partitions_kernel, {t} threads, {splits} splits"
                        merge = lambda a, p=p, t=t, k=splits: MERGE_V5(a, p, t, k)  # noqa: E731
                    else:
                        label = f"direct, uncapped loads, {t} threads, {splits} splits"
                        merge = lambda a, p=p, t=t, k=splits: direct_merge(a, p, t, k)  # noqa: E731
                    both = lambda a, p=p, n=n, w=w, merge=merge: (  # noqa: E731
                        attention_v5.launch_partitions(a, p, n, False, w),
                        merge(a),
                    )
                    check = m.time(both, timing, copy_gbs)
                    if "WRONG" in check or "Error" in check:
                        print(f"{name}, {label}: {check}")
                        continue
                    ms = gpu.time_ms(lambda merge=merge, a=m.a: merge(a), timing)
                    print(f"{name}, {label}: {1000 * ms:.1f} us alone; with the partitions "
                          f"{check}", flush=True)  # fmt: skip
                if m is not c:
                    del m
            except Exception:
                traceback.print_exc()

    if "stages" in which:
        print("\n## 5. the partition kernel alone, shallower and deeper rings")
        for partition in (128, 256, 512):
            for n in (2, 3, 4, 5, 6, 8):
                if attention_v5.supports(np.float16, 32, 8, 128, 16, partition, n):
                    continue
                alone = lambda a=a, p=partition, n=n: attention_v5.launch_partitions(a, p, n, False)  # noqa: E731
                shared = attention_v5.shared_bytes(group, 128, 16, partition, n)
                print(f"partition kernel, {partition} tokens, {n} buffers ({shared} B): "
                      f"{timed(alone, nbytes, timing, copy_gbs)}", flush=True)  # fmt: skip

    if "warps" in which:
        print("\n## 6. blocks of several warps")
        for s in WARP_SHAPES:
            try:
                warp_section(c if s == shape else Checked(s, 4), timing, copy_gbs)
            except Exception:
                traceback.print_exc()


def warp_section(m: Checked, timing: gpu.Timing, copy_gbs: float) -> None:
    """``WARP_VARIANTS`` on one batch, after version 5 as ``paged_attention`` runs it."""
    s = m.shape
    g = s.heads // s.kv_heads
    chosen = attention_v5.choose_launch(s.seqs, s.kv_heads, s.context, 16, g, 128)
    name = f"{s.heads}/{s.kv_heads} {s.seqs} x {s.context}"

    def as_chosen(a: Any) -> None:
        attention_v5.launch_v5(a, *chosen)

    print(f"{name}, as chosen {chosen}: {m.time(as_chosen, timing, copy_gbs)}")
    for warps, sub, n in WARP_VARIANTS:
        partition = warps * sub
        parts = -(-s.context // partition)
        label = f"{name}, {warps} warps x {sub} tokens, {n} buffers ({parts} partitions)"
        if attention_v5.supports(np.float16, s.heads, s.kv_heads, 128, 16, partition, n, warps):
            print(f"{label}: not supported")
            continue

        def alone(a: Any = m.a, p: int = partition, n: int = n, w: int = warps) -> None:
            attention_v5.launch_partitions(a, p, n, False, w)

        try:
            cells = [f"alone {timed(alone, s.kv_bytes(), timing, copy_gbs)}"]
        except Exception as e:  # noqa: BLE001  (a launch the GPU refuses: say so, go on)
            cells = [f"alone {type(e).__name__}: {e}"]
        for merge, what in ((attention_v5.IN_KERNEL, "in kernel"), (256, "merge kernel")):

            def launch(
                a: Any, p: int = partition, n: int = n, w: int = warps, k: int = merge
            ) -> None:
                attention_v5.launch_v5(a, p, n, k, w)

            cells.append(f"{what} {m.time(launch, timing, copy_gbs)}")
        print(f"{label}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
