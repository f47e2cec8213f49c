"""Time paged attention version 5 under several ring depths, partition sizes and reductions.

    python3 scripts/tune_attention_v5.py

For each variant and each decode batch: the median milliseconds (CUDA events, as in
``minipaged bench``) and the achieved share of the device-to-device copy bandwidth; version 4 on
its defaults comes first, for comparison. Every variant's output is compared with version 2's
first: one that disagrees is reported, not timed. Then the registers and local memory of the
compiled kernels. This is how the defaults in ``minipaged/kernels/attention_v5.py`` and the
partition size ``paged_attention`` picks were chosen.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import attention, attention_v4, attention_v5  # noqa: E402

warnings.filterwarnings("ignore", message=".*under-utilization")
SHAPES = [
    gpu.AttentionShape(64, 4096, 32, 8),
    gpu.AttentionShape(1, 32768, 32, 8),
    gpu.AttentionShape(8, 16384, 32, 8),
    gpu.AttentionShape(256, 1024, 32, 8),
    gpu.AttentionShape(64, 4096, 32, 32),
    gpu.AttentionShape(1, 32768, 32, 32),
]
# (name, partition size, stages, merge threads: None for version 2's reduction)
VARIANTS = [
    ("512, 3 stages", 512, 3, None),
    ("512, 2 stages", 512, 2, None),
    ("512, 4 stages", 512, 4, None),
    ("1024, 3 stages", 1024, 3, None),
    ("512, 3 stages, merge 256", 512, 3, 256),
    ("512, 4 stages, merge 256", 512, 4, 256),
    ("256, 3 stages, merge 256", 256, 3, 256),
    ("256, 4 stages, merge 256", 256, 4, 256),
    ("128, 3 stages, merge 256", 128, 3, 256),
    ("128, 4 stages, merge 256", 128, 4, 256),
    ("256, 4 stages, merge 512", 256, 4, 512),
]


def main() -> None:
    timing = gpu.Timing()
    copy_gbs = gpu.copy_bandwidth(timing)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    names = [f"{s.seqs}x{s.context} {s.heads}/{s.kv_heads}" for s in SHAPES]
    print(f"{'variant':>26} " + " ".join(f"{n:>20}" for n in names), flush=True)
    inputs = [gpu.attention_inputs(s, seed=i) for i, s in enumerate(SHAPES)]
    expected = []
    for a in inputs:
        attention.launch_v2(a)
        expected.append(a.out.copy_to_host().astype(np.float64))

    def row(name, launch) -> None:  # noqa: ANN001
        cells = []
        for shape, a, want in zip(SHAPES, inputs, expected, strict=True):
            try:
                launch(a)
            except Exception as e:  # a variant this shape does not allow
                cells.append(f"{type(e).__name__:>20}")
                continue
            err = float(np.abs(a.out.copy_to_host() - want).max())
            if not err < 1e-2:
                cells.append(f"{'WRONG ' + format(err, '.1e'):>20}")
                continue
            ms = gpu.time_ms(lambda a=a: launch(a), timing)
            share = shape.kv_bytes() / ms / 1e6 / copy_gbs
            cells.append(f"{ms:8.3f} ms {100 * share:5.1f}%")
        print(f"{name:>26} " + " ".join(cells), flush=True)

    row("v4 (512)", lambda a: attention_v4.launch_v4(a, 512))
    for name, part, stages, merge in VARIANTS:
        row(name, lambda a, p=part, s=stages, m=merge: attention_v5.launch_v5(a, p, s, m))
    for group in (1, 4):
        for stages in (2, 3, 4, 6):
            kernel = attention_v5.make_kernel(group, 128, 16, stages)
            try:
                regs = kernel.get_regs_per_thread()
                local = kernel.get_local_mem_per_thread()
                print(f"v5 group {group}, {stages} stages: {regs} registers, {local} B local")
            except Exception as e:  # not compiled for this group and depth, or no such query
                print(f"v5 group {group}, {stages} stages: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
