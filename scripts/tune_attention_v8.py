"""Version 8's launches (equal runs of the batch's cache, one for every warp place of the GPU)
beside SDPA and version 6 as ``paged_attention`` launches it, all in one run.

    python3 scripts/tune_attention_v8.py [batch ...]

``batch``: ``SEQSxCONTEXT/KV`` such as ``64x4096/8``; by default every benchmark batch of at
least 64 x 4096 tokens, then ``66x4096/8`` (version 6's grid fills all 132 SMs of an H100
there: does its time grow with the batch, or stay?) and ``mixed`` (64 sequences of 1 to 8,192
tokens, 4,096 on average, as a server's batch is: no SDPA on a contiguous cache for that);
``mixed/F`` draws the lengths from ``(1 - F) * 4096`` to ``(1 + F) * 4096`` instead (``F``
from 0 to 1; ``mixed`` is ``mixed/1``), to find where the spread of lengths starts to favour
version 8.
For each batch: SDPA on a contiguous cache, version 6 (``choose_launch``'s pick), then version
8 with each launch of ``LAUNCHES``, each checked against version 2's output. Every figure is
``minipaged bench``'s median of CUDA-event timings, with its share of the copy bandwidth
measured in the same run. Also prints each compiled kernel's registers and local memory a
thread.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from numba import cuda
from tune_attention_v7 import _sdpa

from minipaged.bench import gpu
from minipaged.kernels import attention, attention_v6, attention_v8

# (warps, kv heads a block, waves of the GPU, merged by the last warp); the first is
# choose_launch's for 8 kv heads; 0 waves: a run for each sequence (no run crosses one)
LAUNCHES = (
    (8, 8, 1, True), (8, 8, 1, False), (8, 4, 1, True), (8, 4, 1, False), (4, 4, 1, True),
    (8, 8, 0, True),
)  # fmt: skip


def main() -> None:
    wanted = sys.argv[1:]
    timing = gpu.Timing()
    copy = gpu.copy_bandwidth(timing)
    print(f"{gpu.device_name()}; copy {copy:.0f} GB/s", flush=True)
    shapes = [s for s in gpu.attention_shapes() if s.seqs * s.context >= 64 * 4096]
    shapes.append(gpu.AttentionShape(66, 4096))
    for i, shape in enumerate(shapes):
        name = f"{shape.seqs}x{shape.context}/{shape.kv_heads}"
        if wanted and name not in wanted:
            continue
        tune(shape, gpu.attention_inputs(shape, seed=100 + i), copy, timing)
    spreads = [float(w.partition("/")[2] or 1) for w in wanted if w.startswith("mixed")]
    for spread in spreads if wanted else [1.0]:
        shape = gpu.AttentionShape(64, 4096)
        tune(shape, mixed_inputs(shape, seed=7, spread=spread), copy, timing, sdpa=False)
    for key, kernel in _compiled():
        for compiled in kernel.overloads.values():
            print(f"v8 {key}: {compiled.regs_per_thread} registers, "
                  f"{compiled.local_mem_per_thread} bytes of local memory")  # fmt: skip


def mixed_inputs(
    shape: gpu.AttentionShape, seed: int, spread: float = 1.0
) -> attention.AttentionArgs:
    """``shape.seqs`` sequences of ``(1 - spread) * shape.context`` (at least 1) to ``(1 +
    spread) * shape.context`` tokens (uniform), on shuffled blocks."""
    if not 0 <= spread <= 1:
        sys.exit(f"mixed/{spread}: the spread must be from 0 to 1")
    rng = np.random.default_rng(seed)
    low = max(1, round((1 - spread) * shape.context))
    lens = rng.integers(low, round((1 + spread) * shape.context) + 1, shape.seqs)
    lens = lens.astype(np.int32)
    per_seq = -(-2 * shape.context // shape.block_size)
    num_blocks = shape.seqs * per_seq
    cache_shape = (num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
    return attention.prepare_attention(
        gpu.device_random((shape.seqs, shape.heads, shape.head_dim), shape.dtype, seed),
        gpu.device_random(cache_shape, shape.dtype, seed + 1),
        gpu.device_random(cache_shape, shape.dtype, seed + 2),
        rng.permutation(num_blocks).reshape(shape.seqs, per_seq).astype(np.int32),
        lens,
        shape.head_dim**-0.5,
    )


def tune(
    shape: gpu.AttentionShape,
    a: attention.AttentionArgs,
    copy: float,
    timing: Any,
    sdpa: bool = True,
) -> None:
    """One batch: SDPA, version 6's pick, version 8's launches."""
    attention.launch_v2(a)
    want = cuda.device_array_like(a.out)
    want.copy_to_device(a.out)
    read = shape.kv_bytes() * int(a.host_seq_lens.sum()) / (shape.seqs * shape.context)

    def report(name: str, launch: Any) -> float:
        a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))
        launch()
        diff = gpu.max_difference(a.out, want)
        ms = gpu.time_ms(launch, timing)
        share = read / ms / 1e6 / copy
        print(f"  {name:34s} {1e3 * ms:8.1f} us  {100 * share:5.1f}%  |diff| {diff:.1e}",
              flush=True)  # fmt: skip
        return ms

    if sdpa:
        sdpa_ms = _sdpa(shape, copy, timing, 34)
    else:
        lens = a.host_seq_lens
        print(f"{shape.seqs} sequences of {lens.min()} to {lens.max()} tokens "
              f"({int(lens.sum())} in all), {shape.heads}/{shape.kv_heads}")  # fmt: skip
        sdpa_ms = None
    pick = attention_v6.choose_launch(shape.seqs, shape.kv_heads, a.max_seq_len, 16)
    best = ("v6", report(f"v6 {pick}", lambda: attention_v6.launch_v6(a)))
    for warps, heads, waves, merge in LAUNCHES:
        if shape.kv_heads % heads:
            continue
        blocks = waves * attention_v8.wave(shape.kv_heads, warps, heads)
        if not waves:
            blocks = -(-shape.seqs // (warps // heads))
        name = f"v8 {warps} warps over {heads}, {blocks} blocks{'' if merge else ', merge kernel'}"
        try:
            ms = report(
                name,
                lambda w=warps, h=heads, b=blocks, m=merge: attention_v8.launch_v8(a, w, h, b, m),
            )
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: {type(e).__name__}: {e}", flush=True)
            continue
        if ms < best[1]:
            best = (name, ms)
    if sdpa_ms:
        print(f"  best: {best[0]}: {sdpa_ms / best[1]:.3f}x SDPA", flush=True)


def _compiled() -> list[tuple[tuple[int | bool, ...], Any]]:
    """The version 8 kernels this run compiled, with ``make_kernel``'s arguments."""
    kernels = []
    for warps, heads, _, merge in LAUNCHES:
        for group in (1, 4):
            key = (group, 128, 16, warps, heads, merge)
            kernel = attention_v8.make_kernel(*key)
            if kernel.overloads and (key, kernel) not in kernels:
                kernels.append((key, kernel))
    return kernels


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
