"""Version 6's launches on the benchmark's decode batches, beside version 5 (as
``paged_attention`` launches it), version 4 and SDPA, all in one run.

    python3 scripts/tune_attention_v6.py [quick | small | versions | heads]

For each batch of ``minipaged bench attention``: version 6 with 1, 2, 4 and 8 warps a block,
each warp walking 256 to 2,048 tokens (the partitions follow), checked against version 2's
output; then ``choose_launch``'s pick and ``paged_attention``'s. ``quick``: only the batches
of at least 64 x 4096 tokens, where the goal is SDPA's speed, with ``QUICK_LAUNCHES``, and
``VARIED_LAUNCHES`` with every variant of ``VARIANTS`` (register budget, cache qualifier);
``small``: the other batches, with ``SMALL_LAUNCHES``; ``versions``: every batch, with no
sweep (SDPA, versions 5 and 4, and version 6 as ``choose_launch`` picks; where that is
``one_wave``'s launch, also the same wave with fewer kv heads a block, and ``several_waves``'
launch); ``heads``: the batches of at least 64 x 4096 tokens with ``HEADS_LAUNCHES``, blocks
over several kv heads (whose warps read neighbouring rows of the cache at once). Every figure is
``minipaged bench``'s median of CUDA-event timings, with its share of the copy bandwidth
measured in the same run. Also prints each compiled kernel's registers and local memory a
thread (local memory would mean the registers spilled).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from numba import cuda

from minipaged.bench import gpu
from minipaged.kernels import attention, attention_v4, attention_v5, attention_v6

WARPS = (1, 2, 4, 8)
RUNS = (256, 512, 1024, 2048)
# (warps an SM must hold (0: the compiler's choice of registers), the loads' cache qualifier);
# the first is the one tried on every launch
VARIANTS = ((0, ""), (12, ""), (0, ".L2::128B"), (0, ".L2::256B"), (0, ".L1::no_allocate"))
QUICK_LAUNCHES = ((2, 2048), (4, 512), (4, 1024), (8, 512), (8, 1024))
VARIED_LAUNCHES = ((4, 1024),)  # the launches each variant is tried on
# (warps, tokens a warp walks, kv heads a block)
HEADS_LAUNCHES = (
    (4, 1024, 1), (8, 512, 1), (8, 1024, 2), (8, 512, 2), (4, 1024, 2), (8, 2048, 4),
    (8, 1024, 4), (4, 1024, 4), (4, 2048, 4), (8, 1024, 8), (8, 512, 8), (8, 256, 8),
)  # fmt: skip
SMALL_LAUNCHES = tuple((w, r) for w in (1, 2, 4, 8) for r in (256, 512, 1024))


def main() -> None:
    quick = "quick" in sys.argv[1:]
    small = "small" in sys.argv[1:]
    versions = "versions" in sys.argv[1:]
    heads = "heads" in sys.argv[1:]
    quick = quick or heads
    timing = gpu.Timing()
    copy = gpu.copy_bandwidth(timing)
    print(f"{gpu.device_name()}; copy {copy:.0f} GB/s", flush=True)
    shapes = gpu.attention_shapes()
    if quick:
        shapes = [s for s in shapes if s.seqs * s.context >= 64 * 4096]  # the SDPA goal's
    if small:
        shapes = [s for s in shapes if s.seqs * s.context < 64 * 4096]
    for i, shape in enumerate(shapes):
        a = gpu.attention_inputs(shape, seed=100 + i)
        tune(shape, a, copy, timing, quick, small, versions, heads)
    for name, info in _kernels():
        print(name, info)


def tune(
    shape: gpu.AttentionShape,
    a: attention.AttentionArgs,
    copy: float,
    timing: gpu.Timing,
    quick: bool = False,
    small: bool = False,
    versions: bool = False,
    heads: bool = False,
) -> None:
    """One batch: SDPA, version 5 (and 4 for 32/32), version 6's launches and its pick."""
    attention.launch_v2(a)
    want = cuda.device_array_like(a.out)
    want.copy_to_device(a.out)

    def report(name: str, launch: Any) -> float:
        launch()
        diff = gpu.max_difference(a.out, want)
        ms = gpu.time_ms(launch, timing)
        share = shape.kv_bytes() / ms / 1e6 / copy
        print(
            f"  {name:34s} {1e3 * ms:8.1f} us  {100 * share:5.1f}%  |diff| {diff:.1e}", flush=True
        )
        return ms

    print(f"{shape.seqs} x {shape.context}, {shape.heads}/{shape.kv_heads}", flush=True)
    sdpa = gpu.sdpa_ms(shape, timing)
    if sdpa:
        share = shape.kv_bytes() / sdpa / 1e6 / copy
        print(f"  {'SDPA (contiguous cache)':34s} {1e3 * sdpa:8.1f} us  {100 * share:5.1f}%")
    report("v5 as paged_attention runs it", lambda: attention_v5.launch_chosen(a))
    if shape.heads == shape.kv_heads:
        report("v4", lambda: attention_v4.launch_v4(a))
    best = None
    if quick:
        launches = [(w, r, 1, *VARIANTS[0]) for w, r in QUICK_LAUNCHES]
        launches += [(w, r, 1, *x) for w, r in VARIED_LAUNCHES for x in VARIANTS[1:]]
    else:
        runs = SMALL_LAUNCHES if small else [(w, r) for w in WARPS for r in RUNS]
        launches = [(w, r, 1, *VARIANTS[0]) for w, r in runs]
    if heads:
        launches = [(w, r, h, *VARIANTS[0]) for w, r, h in HEADS_LAUNCHES]
    if versions:
        launches = []
    for warps, run, kv, occ, hint in launches:
        partition = warps // kv * run
        if partition > 2 * shape.context and run > 256:
            continue
        name = f"v6 {warps} x {run} over {kv}, {occ or '-'} warps/SM {hint}"
        try:
            ms = report(
                name,
                lambda p=partition, w=warps, b=occ // warps, h=hint, k=kv: attention_v6.launch_v6(
                    a, p, w, k, b, h
                ),
            )
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: {type(e).__name__}: {e}", flush=True)
            continue
        if best is None or ms < best[0]:
            best = (ms, name)
    pick = attention_v6.choose_launch(shape.seqs, shape.kv_heads, shape.context, 16)
    report(f"v6 choose_launch {pick}", lambda: attention_v6.launch_v6(a))
    one = attention_v6.one_wave(shape.seqs, shape.kv_heads, shape.context, 16)
    if one:  # the same wave with fewer kv heads a block, and the launch it replaced
        partition, warps, kv = one
        while kv > 1:
            warps, kv = warps // 2, kv // 2
            report(
                f"v6 one wave ({partition}, {warps}, {kv})",
                lambda w=warps, k=kv: attention_v6.launch_v6(a, partition, w, k),
            )
        several = attention_v6.several_waves(shape.seqs, shape.kv_heads, shape.context, 16)
        report(f"v6 several waves {several}", lambda: attention_v6.launch_v6(a, *several))
    picked = attention.fast_version(
        shape.dtype, shape.heads, shape.kv_heads, shape.head_dim, shape.block_size,
        small_grid=attention_v5.small_grid(shape.seqs, shape.kv_heads, shape.context),
    )  # fmt: skip
    report(f"paged_attention ({picked})", lambda: attention.paged_attention(
        a.query, a.key_cache, a.value_cache, a.block_tables, a.seq_lens, a.scale, out=a.out
    ))  # fmt: skip
    if best and sdpa:
        print(f"  best v6: {best[1]}: {sdpa / best[0]:.3f}x SDPA", flush=True)


def _kernels() -> list[tuple[str, str]]:
    """Registers and local memory a thread of each compiled version 6 kernel (local memory
    would mean the registers spilled)."""
    rows = []
    for key in _compiled():
        kernel = attention_v6.make_kernel(*key)
        for compiled in kernel.overloads.values():
            regs = compiled.regs_per_thread
            local = compiled.local_mem_per_thread
            rows.append((f"v6 {key} (group, head_dim, block, warps, min blocks, hint, heads)",
                         f"{regs} registers, {local} bytes of local memory"))  # fmt: skip
    return rows


def _compiled() -> list[tuple[Any, ...]]:
    """The version 6 kernels this run compiled, as ``make_kernel``'s arguments."""
    seen = []
    for group in (1, 4):
        for warps in WARPS:
            for occ, hint in VARIANTS:
                for heads in (1, 2, 4, 8):
                    key = (group, 128, 16, warps, occ // warps, hint, heads)
                    if attention_v6.make_kernel(*key).overloads:
                        seen.append(key)
    return seen


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
