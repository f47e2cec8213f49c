"""GPU benchmarks: the kernels against the device's own copy bandwidth, and against PyTorch.

Every figure is the median over ``samples`` timings, each taken with CUDA events around
``reps`` back-to-back launches after ``warmup`` untimed ones. Launching a Numba kernel costs the
host tens of microseconds, longer than a small kernel runs, so the events would time the host:
before each timing a one-thread ``_hold`` kernel keeps the GPU busy while the host queues all the
launches, which then run back to back.

Bandwidth counts the bytes a kernel must move at least once: for attention the K and V of every
context token plus query and output (each K/V byte read once, however many query heads share
it); for the copies, every byte read and every byte written. The yardstick is a large
device-to-device copy measured in the same run, counting bytes read plus bytes written, which is
what the memory can sustain in practice.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import config, cuda

from minipaged.kernels import (
    attention,
    attention_v3,
    attention_v4,
    attention_v5,
    attention_v6,
    cache_ops,
)

SIMULATED = bool(config.ENABLE_CUDASIM)
ROTATE = 8  # input sets a small copy benchmark cycles through
ROTATE_BYTES = 256 << 20  # ... as long as they stay within this much memory (L2: 50 MB on H100)


@dataclass
class Timing:
    """How many times to run: warm-up launches, launches per timed sample, samples."""

    warmup: int = 5
    reps: int = 10
    samples: int = 15


# --- timing --------------------------------------------------------------------------------------


@cuda.jit
def _hold(microseconds):
    """Sleep on the GPU for about ``microseconds`` (one thread)."""
    for _ in range(microseconds):
        cuda.nanosleep(1000)


@cuda.jit
def _fill(flat, seed):
    """Pseudo-random values in [-1, 1) from a hash of the index: fills gigabytes without the
    host, and never zeros (zeros hide unwritten outputs and can run faster than real data)."""
    i = cuda.grid(1)
    if i < flat.shape[0]:
        x = (i * 2654435761 + seed * 40503) & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) & 0xFFFF
        flat[i] = (x + 0.5) / 32768.0 - 1.0


def device_random(shape: tuple[int, ...], dtype: Any, seed: int) -> Any:
    """A device array of ``shape`` filled with pseudo-random values in [-1, 1)."""
    array = cuda.device_array(shape, dtype=dtype)
    flat = array.reshape(array.size)
    _fill[-(-array.size // 256), 256](flat, seed)
    return array


def time_ms(launch: Callable[[], Any], timing: Timing) -> float:
    """Median milliseconds per call of ``launch``, which queues GPU work on the default stream."""
    if timing.warmup:
        launch()  # a first call may compile: its host time says nothing of a launch's
    host = time.perf_counter()
    for _ in range(timing.warmup - 1):
        launch()
    host = (time.perf_counter() - host) / max(1, timing.warmup - 1)  # host seconds per launch
    cuda.synchronize()
    times = []
    for _ in range(timing.samples):
        if SIMULATED:  # the simulator's events measure nothing: time the host instead
            t0 = time.perf_counter()
            for _ in range(timing.reps):
                launch()
            times.append((time.perf_counter() - t0) * 1e3 / timing.reps)
            continue
        start, end = cuda.event(), cuda.event()
        # hold the GPU for twice the host's time to queue the launches, and at least 0.2 ms
        _hold[1, 1](int(2e6 * host * timing.reps) + 200)
        start.record()
        for _ in range(timing.reps):
            launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / timing.reps)
    return statistics.median(times)


def copy_bandwidth(timing: Timing, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of ``nbytes``, counting bytes read plus bytes written."""
    src = device_random((nbytes // 8,), np.uint64, 11)
    dst = cuda.device_array_like(src)
    stream = cuda.default_stream()
    ms = time_ms(lambda: dst.copy_to_device(src, stream=stream), timing)
    return 2 * nbytes / ms / 1e6


# --- paged attention ------------------------------------------------------------------------------


@dataclass
class AttentionShape:
    """A decode batch: ``seqs`` sequences of ``context`` tokens each."""

    seqs: int
    context: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: Any = np.float16

    def kv_bytes(self) -> int:
        """Bytes an attention kernel must move: K and V of every token, plus query and output."""
        item = np.dtype(self.dtype).itemsize
        kv = 2 * self.seqs * self.context * self.kv_heads * self.head_dim * item
        return kv + 2 * self.seqs * self.heads * self.head_dim * item


def attention_inputs(shape: AttentionShape, seed: int) -> attention.AttentionArgs:
    """Device inputs for one batch: every sequence on its own shuffled blocks (a paged cache
    after a while of serving), checked once by ``prepare_attention``."""
    rng = np.random.default_rng(seed)
    per_seq = -(-shape.context // shape.block_size)
    num_blocks = shape.seqs * per_seq
    cache_shape = (num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
    return attention.prepare_attention(
        device_random((shape.seqs, shape.heads, shape.head_dim), shape.dtype, seed),
        device_random(cache_shape, shape.dtype, seed + 1),
        device_random(cache_shape, shape.dtype, seed + 2),
        rng.permutation(num_blocks).reshape(shape.seqs, per_seq).astype(np.int32),
        np.full(shape.seqs, shape.context, np.int32),
        shape.head_dim**-0.5,
    )


def sdpa_ms(shape: AttentionShape, timing: Timing) -> float | None:
    """Milliseconds of ``torch.nn.functional.scaled_dot_product_attention`` for the same decode
    batch on a contiguous cache ``[seqs, kv_heads, context, head_dim]``; None without torch or
    without a GPU. This is what a user without paging would call."""
    if SIMULATED:
        return None
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[
        np.dtype(shape.dtype)
    ]
    q = torch.randn(shape.seqs, shape.heads, 1, shape.head_dim, dtype=dtype, device="cuda")
    kv = (shape.seqs, shape.kv_heads, shape.context, shape.head_dim)
    k = torch.randn(kv, dtype=dtype, device="cuda")
    v = torch.randn(kv, dtype=dtype, device="cuda")
    gqa = shape.heads != shape.kv_heads
    return time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), timing)


def max_difference(a: Any, b: Any) -> float:
    """Largest absolute difference of two device outputs (a cheap cross-check of versions)."""
    return float(np.abs(a.copy_to_host().astype(np.float64) - b.copy_to_host()).max())


def bench_attention(
    shapes: Iterable[AttentionShape],
    copy_gbs: float,
    timing: Timing,
    partition_size: int = attention_v3.PARTITION_SIZE,
    with_torch: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """For each shape: milliseconds of versions 2 to 6 (those that serve it) and of SDPA, the
    achieved bandwidth of each as a share of ``copy_gbs``, the largest differences of versions
    3 to 6 from version 2, and the version ``paged_attention`` picks. Versions 2 to 4 run on
    ``partition_size``; versions 5 and 6 on their own ``choose_launch``'s pick."""
    rows = []
    for i, shape in enumerate(shapes):
        if progress:
            progress(
                f"attention {shape.seqs} x {shape.context}, {shape.heads}/{shape.kv_heads} heads"
            )
        a = attention_inputs(shape, seed=100 + i)
        row: dict[str, Any] = {
            "seqs": shape.seqs,
            "context": shape.context,
            "heads": shape.heads,
            "kv_heads": shape.kv_heads,
            "bytes": shape.kv_bytes(),
        }
        attention.launch_v2(a, partition_size)
        v2_out = cuda.device_array_like(a.out)
        v2_out.copy_to_device(a.out)
        row["v2_ms"] = time_ms(lambda a=a: attention.launch_v2(a, partition_size), timing)
        args = (shape.dtype, shape.heads, shape.kv_heads, shape.head_dim, shape.block_size)
        if attention_v3.supports(*args, partition_size=partition_size) is None:
            attention_v3.launch_v3(a, partition_size)
            row["v3_vs_v2"] = max_difference(a.out, v2_out)
            row["v3_ms"] = time_ms(lambda a=a: attention_v3.launch_v3(a, partition_size), timing)
        if attention_v4.supports(*args, partition_size) is None:
            attention_v4.launch_v4(a, partition_size)
            row["v4_vs_v2"] = max_difference(a.out, v2_out)
            row["v4_ms"] = time_ms(lambda a=a: attention_v4.launch_v4(a, partition_size), timing)
        if attention_v5.supports(*args, partition_size) is None:
            how = attention_v5.choose_launch(
                shape.seqs,
                shape.kv_heads,
                shape.context,
                shape.block_size,
                shape.heads // shape.kv_heads,
                shape.head_dim,
            )  # as paged_attention launches it: its own partition size for small batches
            attention_v5.launch_v5(a, *how)
            row["v5_vs_v2"] = max_difference(a.out, v2_out)
            row["v5_ms"] = time_ms(lambda a=a, how=how: attention_v5.launch_v5(a, *how), timing)
            row["v5_partition"], row["v5_warps"] = how[0], how[3]
        if attention_v6.supports(*args, shape.block_size) is None:
            how6 = attention_v6.choose_launch(
                shape.seqs, shape.kv_heads, shape.context, shape.block_size
            )  # as paged_attention launches it
            attention_v6.launch_v6(a, *how6)
            row["v6_vs_v2"] = max_difference(a.out, v2_out)
            row["v6_ms"] = time_ms(lambda a=a, h=how6: attention_v6.launch_v6(a, *h), timing)
            row["v6_partition"], row["v6_warps"], row["v6_heads"] = how6
        small = attention_v5.small_grid(shape.seqs, shape.kv_heads, shape.context)
        row["picked"] = attention.fast_version(*args, small_grid=small)
        del a, v2_out
        if with_torch:
            row["sdpa_ms"] = sdpa_ms(shape, timing)
        for name in ("v2", "v3", "v4", "v5", "v6", "sdpa"):
            ms = row.get(f"{name}_ms")
            if ms:
                row[f"{name}_share"] = row["bytes"] / ms / 1e6 / copy_gbs
        rows.append(row)
    return rows


# --- copy-blocks and reshape-and-cache ------------------------------------------------------------


@dataclass
class CacheShape:
    """A cache of ``num_blocks`` blocks of ``block_size`` tokens, in each of ``layers`` layers
    (copy_blocks copies a pair in every layer in one launch, as an engine calls it)."""

    num_blocks: int = 8192
    block_size: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    dtype: Any = np.float16
    counts: tuple[int, ...] = field(default=(1, 4, 16, 64, 256, 1024, 4096))
    layers: int = 1

    @property
    def block_elems(self) -> int:
        return self.block_size * self.kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.block_elems * np.dtype(self.dtype).itemsize


def device_caches(shape: CacheShape) -> tuple[Any, Any]:
    """Random K and V caches ``[layers, num_blocks, block_elems]`` on the device, the same
    values every time (seeds 21 and 22), for the copy benchmarks and tuning scripts."""
    cache = (shape.layers, shape.num_blocks, shape.block_elems)
    return device_random(cache, shape.dtype, 21), device_random(cache, shape.dtype, 22)


def pair_sets(rng: np.random.Generator, num_blocks: int, n: int) -> list[Any]:
    """Up to ``ROTATE`` disjoint sets of ``n`` ``(src, dst)`` pairs of distinct blocks, as int64
    device arrays. A copy benchmark uses them in turn, so that a small copy does not find its
    blocks still in the L2 cache from the previous run (the sets together exceed it)."""
    ids = rng.permutation(num_blocks)
    sets = max(1, min(ROTATE, num_blocks // (2 * n)))
    return [
        cuda.to_device(
            np.stack(
                [ids[2 * n * i : 2 * n * i + n], ids[2 * n * i + n : 2 * n * (i + 1)]], 1
            ).astype(np.int64)
        )
        for i in range(sets)
    ]


def bench_copy_blocks(
    shape: CacheShape,
    copy_gbs: float,
    timing: Timing,
    threads: tuple[int, ...] = (cache_ops.THREADS,),
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Milliseconds and share of the copy bandwidth of ``copy_blocks`` for each count of
    ``(src, dst)`` pairs (distinct random blocks; K and V of ``shape.layers`` layers, all in
    one launch), per thread count."""
    rng = np.random.default_rng(7)
    k, v = device_caches(shape)
    rows = []
    for n in shape.counts:
        if progress:
            progress(f"copy_blocks {n} blocks")
        mappings = pair_sets(rng, shape.num_blocks, n)
        nbytes = 2 * 2 * n * shape.block_bytes * shape.layers  # K and V; read and written
        row: dict[str, Any] = {
            "blocks": n,
            "layers": shape.layers,
            "bytes": nbytes,
            "rotated_sets": len(mappings),
        }
        for t in threads:
            turn = itertools.cycle(mappings)
            ms = time_ms(
                lambda t=t, turn=turn: cache_ops.launch_copy_blocks(k, v, next(turn), t), timing
            )
            row[f"ms@{t}"] = ms
            row[f"share@{t}"] = nbytes / ms / 1e6 / copy_gbs
        rows.append(row)
    return rows


def bench_reshape_and_cache(
    shape: CacheShape,
    copy_gbs: float,
    timing: Timing,
    threads: tuple[int, ...] = (cache_ops.THREADS,),
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Milliseconds and share of the copy bandwidth of ``reshape_and_cache`` writing the K and V
    of ``n * block_size`` new tokens into random distinct slots, for each ``n`` in counts."""
    rng = np.random.default_rng(8)
    row_elems = shape.kv_heads * shape.head_dim
    slots_total = shape.num_blocks * shape.block_size
    k_cache = device_random((slots_total, row_elems), shape.dtype, 31)
    v_cache = device_random((slots_total, row_elems), shape.dtype, 32)
    rows = []
    for n in shape.counts:
        tokens = n * shape.block_size
        if progress:
            progress(f"reshape_and_cache {tokens} tokens")
        nbytes = 2 * 2 * tokens * row_elems * np.dtype(shape.dtype).itemsize
        # as for copy_blocks: inputs used in turn, together larger than the L2 cache
        inputs = []
        for i in range(max(1, min(ROTATE, ROTATE_BYTES // nbytes))):
            key = device_random((tokens, row_elems), shape.dtype, 33 + 2 * i)
            value = device_random((tokens, row_elems), shape.dtype, 34 + 2 * i)
            slots = cuda.to_device(rng.permutation(slots_total)[:tokens].astype(np.int64))
            inputs.append((key, value, slots))
        row: dict[str, Any] = {
            "blocks": n,
            "tokens": tokens,
            "bytes": nbytes,
            "rotated_sets": len(inputs),
        }
        for t in threads:
            turn = itertools.cycle(inputs)

            def launch(t: int = t, turn: Any = turn) -> None:
                key, value, slots = next(turn)
                cache_ops.launch_reshape_and_cache(key, value, k_cache, v_cache, slots, t)

            ms = time_ms(launch, timing)
            row[f"ms@{t}"] = ms
            row[f"share@{t}"] = nbytes / ms / 1e6 / copy_gbs
        rows.append(row)
    return rows


# --- the whole set --------------------------------------------------------------------------------

# Batch x context, from one long sequence to many short ones (issue: 1 x 32k to 256 x 1k).
DECODE_BATCHES = ((1, 32768), (8, 16384), (32, 8192), (64, 4096), (128, 2048), (256, 1024))
HEADS = ((32, 8), (32, 32))  # (query heads, kv heads): grouped-query and multi-head


def batch_shape(name: str) -> AttentionShape:
    """The decode batch ``SEQSxCONTEXT/KV`` names, such as ``64x4096/8``: 32 query heads over
    ``KV`` kv heads, the benchmark's other sizes (the probe and tuning scripts' batches);
    ``SEQSxCONTEXT/HEADS:KV``, such as ``64x4096/8:8``, names the query heads too."""
    try:
        seqs_context, kv = name.split("/")
        seqs, context = map(int, seqs_context.split("x"))
        heads, _, kv = kv.rpartition(":")
        return AttentionShape(seqs, context, int(heads or 32), int(kv))
    except ValueError:
        raise ValueError(
            f"a batch is SEQSxCONTEXT/KV or SEQSxCONTEXT/HEADS:KV, such as 64x4096/8, not {name!r}"
        ) from None


def attention_shapes(quick: bool = False) -> list[AttentionShape]:
    """The benchmark's decode batches; ``quick`` gives tiny ones (the simulator's dry run)."""
    if quick:
        return [AttentionShape(2, 40, 4, 2, 32, 4), AttentionShape(1, 24, 2, 2, 16, 16)]
    return [AttentionShape(s, c, h, kv) for h, kv in HEADS for s, c in DECODE_BATCHES]


def device_name() -> str:
    """The GPU's name, or that of the simulator."""
    if SIMULATED:
        return "Numba CUDA simulator (timings meaningless)"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)
