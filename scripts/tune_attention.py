"""Time paged attention version 3 under several ``Tuning``s, thread counts and partition sizes.

    python3 scripts/tune_attention.py

For each variant and each decode batch, the median milliseconds (CUDA events, as in
``minipaged bench``) and the achieved share of the device-to-device copy bandwidth. Every
variant's output is compared with version 2's first: a variant that disagrees is reported, not
timed. This is how the defaults in ``minipaged/kernels/attention_v3.py`` were chosen.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import attention  # noqa: E402
from minipaged.kernels.attention_v3 import Tuning, launch_v3  # noqa: E402

warnings.filterwarnings("ignore", message=".*under-utilization")
SHAPES = [
    gpu.AttentionShape(64, 4096, 32, 8),
    gpu.AttentionShape(1, 32768, 32, 8),
    gpu.AttentionShape(64, 4096, 32, 32),
    gpu.AttentionShape(256, 1024, 32, 32),
]
# (name, tuning, threads, partition size)
VARIANTS = [
    ("default (per group)", None, 128, 512),
    ("k 4 x 2, v 2 x 4", Tuning(4, 2, 2, 4), 128, 512),
    ("k 4 x 1, v 2 x 4", Tuning(4, 1, 2, 4), 128, 512),
    ("k 4 x 1, <= 128 registers", Tuning(4, 1, 2, 4, 128), 128, 512),
    ("k 4 x 1, <= 96 registers", Tuning(4, 1, 2, 4, 96), 128, 512),
    ("k 4 x 1, <= 80 registers", Tuning(4, 1, 2, 4, 80), 128, 512),
    ("k 4 x 1, v 2 x 2", Tuning(4, 1, 2, 2), 128, 512),
    ("k 4 x 1, 64 threads", Tuning(4, 1, 2, 4), 64, 512),
    ("k 4 x 1, partition 1024", Tuning(4, 1, 2, 4), 128, 1024),
    ("k 4 x 2, partition 1024", Tuning(4, 2, 2, 4), 128, 1024),
    ("k 4 x 1, partition 256", Tuning(4, 1, 2, 4), 128, 256),
]


def main() -> None:
    timing = gpu.Timing()
    copy_gbs = gpu.copy_bandwidth(timing)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    names = [f"{s.seqs}x{s.context} {s.heads}/{s.kv_heads}" for s in SHAPES]
    print(f"{'variant':>26} " + " ".join(f"{n:>22}" for n in names), flush=True)
    inputs = [gpu.attention_inputs(s, seed=i) for i, s in enumerate(SHAPES)]
    expected = []
    for a in inputs:
        attention.launch_v2(a)
        expected.append(a.out.copy_to_host().astype(np.float64))
    for name, tuning, threads, part in VARIANTS:
        cells = []
        for shape, a, want in zip(SHAPES, inputs, expected, strict=True):
            launch_v3(a, part, threads, tuning)
            err = float(np.abs(a.out.copy_to_host() - want).max())
            if not err < 1e-2:
                cells.append(f"{'WRONG ' + format(err, '.1e'):>22}")
                continue
            ms = gpu.time_ms(lambda a=a, p=part, t=threads, u=tuning: launch_v3(a, p, t, u), timing)
            share = shape.kv_bytes() / ms / 1e6 / copy_gbs
            cells.append(f"{ms:9.3f} ms {100 * share:5.1f}%  ")
        print(f"{name:>26} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
