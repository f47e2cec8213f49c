"""Time paged attention version 5 under several ring depths, partition sizes and reductions.

    python3 scripts/tune_attention_v5.py          # one-warp blocks, on six batches
    python3 scripts/tune_attention_v5.py warps    # blocks of several warps, on the bench's batches

For each variant and each decode batch: the median milliseconds (CUDA events, as in
``minipaged bench``) and the achieved share of the device-to-device copy bandwidth; version 4 on
its defaults and version 5 as ``paged_attention`` runs it (``choose_launch``) come first, for
comparison. Every variant's output is compared with version 2's first: one that disagrees is
reported, not timed. Then the registers and local memory of the compiled kernels. This is how
the defaults in ``minipaged/kernels/attention_v5.py`` and the launches ``choose_launch`` picks
were chosen.

``warps`` runs blocks of 4, 8 and 16 warps (and one), each warp walking 128 to 1,024 tokens,
merged in the kernel, on all twelve batches of ``minipaged bench attention`` (minutes on an
H200, most of them compiling).
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
# (warps, tokens a warp, stages) of blocks of several warps, all merged in the kernel, the
# likeliest first (a run cut short still has them); one warp of 1,024 tokens too, which gives
# 256 x 1k one partition a sequence
WARP_VARIANTS = [
    (8, 256, 4), (4, 512, 4), (8, 512, 3), (8, 128, 4), (4, 256, 4), (4, 128, 4), (1, 1024, 3),
    (8, 256, 3), (4, 512, 3), (4, 256, 3), (8, 128, 3), (4, 128, 3), (8, 512, 4), (16, 128, 2),
    (16, 256, 2), (8, 1024, 2),
]  # fmt: skip


def main() -> None:
    timing = gpu.Timing()
    copy_gbs = gpu.copy_bandwidth(timing)
    print(f"{gpu.device_name()}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    several = "warps" in sys.argv[1:]
    shapes = gpu.attention_shapes() if several else SHAPES
    names = [f"{s.seqs}x{s.context} {s.heads}/{s.kv_heads}" for s in shapes]
    print(f"{'variant':>26} " + " ".join(f"{n:>20}" for n in names), flush=True)
    inputs = [gpu.attention_inputs(s, seed=i) for i, s in enumerate(shapes)]
    expected = []
    for a in inputs:
        attention.launch_v2(a)
        expected.append(a.out.copy_to_host().astype(np.float64))

    def row(name, launch) -> None:  # noqa: ANN001
        cells = []
        for shape, a, want in zip(shapes, inputs, expected, strict=True):
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
    row("v5 as chosen", attention_v5.launch_chosen)
    if several:
        for w, sub, n in WARP_VARIANTS:

            def launch(a: attention.AttentionArgs, w: int = w, sub: int = sub, n: int = n) -> None:
                attention_v5.launch_v5(a, w * sub, n, attention_v5.IN_KERNEL, w)

            row(f"{w} warps x {sub}, {n} stages", launch)
        kernels = [(g, n, True, w) for g in (1, 4) for w, _, n in WARP_VARIANTS]
    else:
        for name, part, stages, merge in VARIANTS:
            row(name, lambda a, p=part, s=stages, m=merge: attention_v5.launch_v5(a, p, s, m))
        kernels = [(g, n, False, 1) for g in (1, 4) for n in (2, 3, 4, 6)]
    for group, stages, merges, warps in dict.fromkeys(kernels):
        kernel = attention_v5.make_kernel(group, 128, 16, stages, merges, warps)
        what = f"v5 group {group}, {warps} warps, {stages} stages"
        try:
            regs, local = kernel.get_regs_per_thread(), kernel.get_local_mem_per_thread()
            if isinstance(regs, dict):  # one entry a compiled signature: the distinct values
                regs, local = sorted(set(regs.values())), sorted(set(local.values()))
            print(f"{what}: {regs} registers, {local} B local")
        except Exception as e:  # not compiled for this group and depth, or no such query
            print(f"{what}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
