"""Version 6's launches on the benchmark's decode batches, beside version 5 (as
``paged_attention`` launches it), version 4 and SDPA, all in one run.

    python3 scripts/tune_attention_v6.py [quick]

For each batch of ``minipaged bench attention`` (``quick``: those of at least 64 x 4096
tokens, where the goal is SDPA's speed):
version 6 with 1, 2, 4 and 8 warps a block, each warp walking 256 to 2,048 tokens (the
partitions follow), checked against version 2's output; then ``choose_launch``'s pick. Every
figure is ``minipaged bench``'s median of CUDA-event timings, with its share of the copy
bandwidth measured in the same run. Also prints each compiled kernel's registers and local
memory a thread (local memory would mean the registers spilled).
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


def main() -> None:
    quick = "quick" in sys.argv[1:]
    timing = gpu.Timing()
    copy = gpu.copy_bandwidth(timing)
    print(f"{gpu.device_name()}; copy {copy:.0f} GB/s", flush=True)
    shapes = gpu.attention_shapes()
    if quick:
        shapes = [s for s in shapes if s.seqs * s.context >= 64 * 4096]  # the SDPA goal's
    for i, shape in enumerate(shapes):
        tune(shape, gpu.attention_inputs(shape, seed=100 + i), copy, timing)
    for name, info in _kernels():
        print(name, info)


def tune(
    shape: gpu.AttentionShape, a: attention.AttentionArgs, copy: float, timing: gpu.Timing
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
    for warps in WARPS:
        for run in RUNS:
            if warps * run > 2 * shape.context and run > 256:
                continue
            try:
                ms = report(
                    f"v6 {warps} warps x {run} tokens",
                    lambda p=warps * run, w=warps: attention_v6.launch_v6(a, p, w),
                )
            except Exception as e:  # noqa: BLE001
                print(f"  v6 {warps} x {run}: {type(e).__name__}: {e}", flush=True)
                continue
            if best is None or ms < best[0]:
                best = (ms, warps, run)
    pick = attention_v6.choose_launch(shape.seqs, shape.kv_heads, shape.context, 16)
    report(f"v6 choose_launch {pick}", lambda: attention_v6.launch_v6(a))
    if best and sdpa:
        print(f"  best v6: {best[1]} warps x {best[2]}: {sdpa / best[0]:.3f}x SDPA", flush=True)


def _kernels() -> list[tuple[str, str]]:
    """Registers and local memory a thread of each compiled version 6 kernel."""
    rows = []
    for (group, head_dim, _, warps), kernel in _compiled().items():
        for sig in kernel.overloads:
            regs = kernel.get_regs_per_thread(sig)
            local = kernel.get_local_mem_per_thread(sig)
            rows.append((f"v6 group {group} head_dim {head_dim} warps {warps}",
                         f"{regs} registers, {local} bytes of local memory"))  # fmt: skip
    return rows


def _compiled() -> dict:
    seen = {}
    for group in (1, 4):
        for warps in WARPS:
            kernel = attention_v6.make_kernel(group, 128, 16, warps)
            if kernel.overloads:
                seen[(group, 128, 16, warps)] = kernel
    return seen


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
