"""Version 7's launches (the cache through shared memory by bulk copies) on the benchmark's
decode batches of at least 64 x 4096 tokens, beside SDPA and version 6 as ``paged_attention``
launches it, all in one run.

    python3 scripts/tune_attention_v7.py [parts] [batch ...]

``batch``: ``SEQSxCONTEXT/KV`` such as ``64x4096/8`` to run only those. For each batch: SDPA on
a contiguous cache, version 6 (``choose_launch``'s pick), then version 7 with each launch of
``LAUNCHES`` that ``supports`` takes, each checked against version 2's output. With ``parts``,
version 7 with each launch of ``PARTS`` instead, whole, reading the ring but folding nothing,
and the copies alone (``make_kernel``'s ``fold`` and ``read_back``): where its time goes,
the copies' share beside the ring of ``probe_read.py`` in the same grid. Every figure is
``minipaged bench``'s median of CUDA-event timings, with its share of the copy bandwidth
measured in the same run. Also prints each compiled kernel's registers and local memory a
thread.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from numba import cuda

from minipaged.bench import gpu
from minipaged.kernels import attention, attention_v6, attention_v7

# (warps, kv heads a block, stages, partitions a sequence)
LAUNCHES = (
    (8, 4, 3, 1), (8, 4, 2, 1), (8, 8, 3, 2), (8, 8, 3, 1), (8, 2, 3, 1),
    (4, 2, 3, 1), (4, 4, 3, 1), (4, 2, 2, 1), (4, 4, 2, 2), (2, 2, 3, 1), (2, 1, 3, 1),
)  # fmt: skip
# as LAUNCHES; the first is version 6's pick at 64 x 4096, 32/8
PARTS = ((8, 4, 3, 1), (2, 1, 3, 1), (4, 2, 2, 1))


def main() -> None:
    wanted = sys.argv[1:]
    parts = "parts" in wanted
    wanted = [w for w in wanted if w != "parts"]
    timing = gpu.Timing()
    copy = gpu.copy_bandwidth(timing)
    print(f"{gpu.device_name()}; copy {copy:.0f} GB/s", flush=True)
    for i, shape in enumerate(gpu.attention_shapes()):
        name = f"{shape.seqs}x{shape.context}/{shape.kv_heads}"
        if shape.seqs * shape.context < 64 * 4096 or (wanted and name not in wanted):
            continue
        a = gpu.attention_inputs(shape, seed=100 + i)
        (time_parts if parts else tune)(shape, a, copy, timing)
    for key, kernel in _compiled():
        for compiled in kernel.overloads.values():
            print(f"v7 {key}: {compiled.regs_per_thread} registers, "
                  f"{compiled.local_mem_per_thread} bytes of local memory")  # fmt: skip


def tune(shape: gpu.AttentionShape, a: attention.AttentionArgs, copy: float, timing: Any) -> None:
    """One batch: SDPA, version 6's pick, version 7's launches."""
    attention.launch_v2(a)
    want = cuda.device_array_like(a.out)
    want.copy_to_device(a.out)

    def report(name: str, launch: Any) -> float:
        a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))
        launch()
        diff = gpu.max_difference(a.out, want)
        ms = gpu.time_ms(launch, timing)
        share = shape.kv_bytes() / ms / 1e6 / copy
        print(f"  {name:34s} {1e3 * ms:8.1f} us  {100 * share:5.1f}%  |diff| {diff:.1e}",
              flush=True)  # fmt: skip
        return ms

    sdpa = _sdpa(shape, copy, timing, 34)
    pick = attention_v6.choose_launch(shape.seqs, shape.kv_heads, shape.context, 16)
    best = ("v6", report(f"v6 {pick}", lambda: attention_v6.launch_v6(a)))
    for warps, heads, stages, parts in LAUNCHES:
        partition, name = _v7_launch(shape, warps, heads, stages, parts)
        if not partition:
            continue
        try:
            ms = report(
                name,
                lambda p=partition, w=warps, h=heads, s=stages: attention_v7.launch_v7(
                    a, p, w, h, s
                ),
            )
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: {type(e).__name__}: {e}", flush=True)
            continue
        if ms < best[1]:
            best = (name, ms)
    if sdpa:
        print(f"  best: {best[0]}: {sdpa / best[1]:.3f}x SDPA", flush=True)


def time_parts(
    shape: gpu.AttentionShape, a: attention.AttentionArgs, copy: float, timing: Any
) -> None:
    """One batch: SDPA, version 6's pick, then each launch of ``PARTS`` whole, with its folds
    left out, and with the copies alone."""

    def report(name: str, launch: Any) -> None:
        ms = gpu.time_ms(launch, timing)
        share = shape.kv_bytes() / ms / 1e6 / copy
        print(f"  {name:44s} {1e3 * ms:8.1f} us  {100 * share:5.1f}%", flush=True)

    _sdpa(shape, copy, timing, 44)
    report("v6", lambda: attention_v6.launch_v6(a))
    for warps, heads, stages, parts in PARTS:
        partition, name = _v7_launch(shape, warps, heads, stages, parts)
        if not partition:
            continue
        for what, read_back, fold in (("", True, True), (", no folds", True, False),
                                      (", copies alone", False, False)):  # fmt: skip
            report(
                name + what,
                lambda p=partition, w=warps, h=heads, s=stages, r=read_back, f=fold: (
                    attention_v7.launch_v7(a, p, w, h, s, read_back=r, fold=f)
                ),
            )


def _sdpa(shape: gpu.AttentionShape, copy: float, timing: Any, width: int) -> float | None:
    """Print the batch's name, then time and print SDPA on a contiguous cache (None without
    torch)."""
    print(f"{shape.seqs} x {shape.context}, {shape.heads}/{shape.kv_heads}", flush=True)
    sdpa = gpu.sdpa_ms(shape, timing)
    if sdpa:
        share = shape.kv_bytes() / sdpa / 1e6 / copy
        print(f"  {'SDPA (contiguous cache)':{width}s} {1e3 * sdpa:8.1f} us  {100 * share:5.1f}%")
    return sdpa


def _v7_launch(
    shape: gpu.AttentionShape, warps: int, heads: int, stages: int, parts: int
) -> tuple[int, str]:
    """The partition size (whole stages, ``parts`` a sequence) and name of a launch of version
    7; partition 0 (and the reason printed) where ``supports`` refuses it."""
    whole = warps // heads * shape.block_size  # a stage's tokens
    partition = -(-shape.context // (parts * whole)) * whole
    reason = attention_v7.supports(
        shape.dtype, shape.heads, shape.kv_heads, shape.head_dim, shape.block_size,
        partition, warps, heads, stages,
    )  # fmt: skip
    name = f"v7 {partition}, {warps} warps over {heads}, {stages} stages"
    if reason:
        print(f"  {name}: {reason}")
        return 0, name
    return partition, name


def _compiled() -> list[tuple[tuple[int, ...], Any]]:
    """The version 7 kernels this run compiled, with ``make_kernel``'s arguments."""
    seen = []
    for group in (1, 4):
        for warps, heads, stages, _ in LAUNCHES:
            key = (group, 128, 16, warps, heads, stages, True, True)
            kernel = attention_v7.make_kernel(*key)
            if kernel.overloads and (key, kernel) not in seen:
                seen.append((key, kernel))
    return seen


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
