"""Time copy_blocks against variants of itself and against a plain copy of the same bytes.

    python3 scripts/tune_copies.py

For 64 to 4,096 block copies (blocks of 16 tokens x 8 kv heads x 128, float16, K and V of one
layer): ``cache_ops.launch_copy_blocks`` as it is; a loads-first kernel copying 1, 2, 4 or 8
words of K and as many of V per thread, with 128 or 256 threads; and a device-to-device copy of
the same number of bytes in one piece, which is what a copy of that size can reach at best. Also
the time of an empty launch, the floor under every small copy. Timings as in ``minipaged
bench`` (CUDA events, median; inputs cycle through disjoint sets so they are not in L2).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import cuda, uint64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import cache_ops  # noqa: E402


def loads_first(words: int) -> Any:
    """A copy_blocks kernel whose threads copy ``words`` words of K and of V, loads first."""

    @cuda.jit
    def kernel(key, value, mapping):
        pair = cuda.blockIdx.x
        src, dst = mapping[pair, 0], mapping[pair, 1]
        size = key.shape[2]
        step = cuda.blockDim.x
        first = cuda.blockIdx.z * words * step + cuda.threadIdx.x
        k = cuda.local.array(words, uint64)
        v = cuda.local.array(words, uint64)
        for j in range(words):
            i = min(first + j * step, size - 1)
            k[j] = key[cuda.blockIdx.y, src, i]
            v[j] = value[cuda.blockIdx.y, src, i]
        for j in range(words):
            i = first + j * step
            if i < size:
                key[cuda.blockIdx.y, dst, i] = k[j]
                value[cuda.blockIdx.y, dst, i] = v[j]

    return kernel


def plain(buffers: Any) -> None:
    """One device-to-device copy between the next pair of buffers."""
    src, dst = next(buffers)
    dst.copy_to_device(src, stream=cuda.default_stream())


@cuda.jit
def empty(x):
    if cuda.grid(1) == 1 << 40:  # never: the kernel does nothing, but is not optimised away
        x[0] = 1


def cell(name: str, launch: Callable[[], None], nbytes: int, gbs: float, timing: Any) -> str:
    """``name``, microseconds per ``launch`` and its share of ``gbs`` for ``nbytes`` moved."""
    launch()
    ms = gpu.time_ms(launch, timing)
    return f"{name} {1000 * ms:.1f} us {100 * nbytes / ms / 1e6 / gbs:.0f}%"


def main() -> None:
    timing = gpu.Timing()
    copy_gbs = gpu.copy_bandwidth(timing)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    dummy = cuda.device_array(1, np.int64)
    for grid, threads in ((1, 32), (4096, 128)):
        ms = gpu.time_ms(lambda g=grid, t=threads: empty[g, t](dummy), timing)
        print(f"empty launch, {grid} x {threads} threads: {1000 * ms:.2f} us", flush=True)
    shape = gpu.CacheShape()
    rng = np.random.default_rng(7)
    k, v = gpu.device_caches(shape)
    kw, vw = cache_ops.as_words(k), cache_ops.as_words(v)
    size = kw.shape[2]
    for n in (64, 256, 1024, 4096):
        maps = gpu.pair_sets(rng, shape.num_blocks, n)
        nbytes = 2 * 2 * n * shape.block_bytes  # K and V, read and written
        turn = itertools.cycle(maps)
        cells = [
            cell(
                "copy_blocks",
                lambda turn=turn: cache_ops.launch_copy_blocks(k, v, next(turn)),
                nbytes,
                copy_gbs,
                timing,
            )
        ]
        for words in (1, 2, 4, 8):
            kernel = loads_first(words)
            for threads in (128, 256):
                grid = (n, 1, -(-size // (words * threads)))
                turn = itertools.cycle(maps)
                cells.append(
                    cell(
                        f"{words} words x {threads}",
                        lambda kernel=kernel, grid=grid, t=threads, turn=turn: kernel[grid, t](
                            kw, vw, next(turn)
                        ),
                        nbytes,
                        copy_gbs,
                        timing,
                    )
                )
        count = nbytes // 2 // 8  # words read, K and V together, in one piece
        buffers = [
            (gpu.device_random((count,), np.uint64, 50 + i), cuda.device_array(count, np.uint64))
            for i in range(max(1, min(gpu.ROTATE, gpu.ROTATE_BYTES // nbytes)))
        ]
        turn = itertools.cycle(buffers)
        cells.append(cell("plain copy", lambda turn=turn: plain(turn), nbytes, copy_gbs, timing))
        print(f"{n} blocks: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
