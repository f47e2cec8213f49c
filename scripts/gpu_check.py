"""Check every kernel against its NumPy reference on a real GPU at realistic sizes, then time them.

    python3 scripts/gpu_check.py OUTDIR [--quick]

Writes OUTDIR/gpu_check.json (everything) and OUTDIR/gpu_check.txt (the tables, also printed).
Exits with status 1 if any comparison fails. ``--quick`` runs one small comparison per kernel and
no timings (a smoke test of compilation on the device).

Correctness: the same comparisons as tests/test_kernels.py (outputs poisoned with NaN first;
float32 within 1e-5 and float16 within 1e-2 of the float64 reference, relative to the largest
output), at head_dim 64/128, block sizes 8/16/32, contexts up to 8192, batches up to 256, GQA.

Timings: CUDA events around back-to-back launches of the kernel alone (inputs already validated
and on the device), median of several samples after warm-up. Bandwidth counts the bytes a kernel
must move at least once (for attention: the K and V of every context token, plus query and
output), divided by the time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipaged.kernels import (  # noqa: E402
    attention,
    cache_ops,
    copy_blocks,
    paged_attention,
    paged_attention_naive,
    paged_attention_v1,
    paged_attention_v2,
    paged_attention_v3,
    paged_attention_v4,
    paged_attention_v5,
    reshape_and_cache,
    swap_blocks,
)
from minipaged.kernels import reference as ref  # noqa: E402

LINES: list[str] = []
warnings.filterwarnings("ignore", message=".*under-utilization")  # small checks are small


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


# --- inputs --------------------------------------------------------------------------------------


def make_batch(
    rng, num_seqs, num_heads, kv_heads, head_dim, block_size, max_len, dtype, fixed=False
):
    """Host arrays for one attention batch: lengths in [1, max_len] (one of them max_len, or all
    of them when ``fixed``), each sequence on its own shuffled blocks, tables padded with -1."""
    lens = np.full(num_seqs, max_len) if fixed else rng.integers(1, max_len + 1, num_seqs)
    lens[0] = max_len
    needed = -(-lens // block_size)
    num_blocks = int(needed.sum()) + 3
    ids = rng.permutation(num_blocks)
    tables = np.full((num_seqs, int(needed.max())), -1, np.int32)
    start = 0
    for s, n in enumerate(needed):
        tables[s, :n] = ids[start : start + n]
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return {
        "query": rng.standard_normal((num_seqs, num_heads, head_dim), np.float32).astype(dtype),
        "key_cache": rng.standard_normal(shape, np.float32).astype(dtype),
        "value_cache": rng.standard_normal(shape, np.float32).astype(dtype),
        "block_tables": tables,
        "seq_lens": lens.astype(np.int32),
        "scale": 1 / np.sqrt(head_dim),
    }


@cuda.jit
def fill_kernel(flat, seed):
    """Pseudo-random values in [-1, 1) from a hash of the index: fills GBs without the host."""
    i = cuda.grid(1)
    if i < flat.shape[0]:
        x = (i * 2654435761 + seed * 40503) & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) & 0xFFFF
        flat[i] = x / 32768.0 - 1.0


def device_random(shape, dtype, seed):
    arr = cuda.device_array(shape, dtype=dtype)
    flat = arr.reshape(arr.size)
    fill_kernel[-(-arr.size // 256), 256](flat, seed)
    return arr


def close(out, expected, dtype) -> tuple[bool, float]:
    """(passes, worst error relative to the largest expected magnitude), with the tests' rule:
    ``|out - expected| <= tol * (|expected| + max(1, max |expected|))``."""
    if np.isnan(out).any():
        return False, float("nan")
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-2
    scale = max(1.0, float(np.abs(expected).max()))
    diff = np.abs(out.astype(np.float64) - expected)
    return bool((diff <= tol * (np.abs(expected) + scale)).all()), float(diff.max() / scale)


# --- correctness ---------------------------------------------------------------------------------

ATTENTION_CONFIGS = [
    # seqs, heads, kv heads, head_dim, block_size, max context, dtype, versions
    (
        8,
        32,
        8,
        128,
        16,
        8192,
        np.float16,
        ("v1", "v2", "v3", "v4", "v5", "dispatch", "v1@256", "v3@256", "v4@128"),
    ),
    # (float32 rows of 512 bytes in blocks of 32: version 4's ring would need 69 KB; it declines)
    (4, 8, 2, 128, 32, 8192, np.float32, ("v1", "v2", "v3", "dispatch", "v1@256", "v2@256")),
    (256, 32, 8, 128, 16, 1024, np.float16, ("v1", "v2", "v3", "v4", "v5", "dispatch")),
    (32, 16, 16, 64, 8, 2048, np.float32, ("v1", "v2", "v3", "v4", "dispatch")),
    (64, 16, 4, 64, 32, 1536, np.float16, ("v1", "v2", "v3", "v4", "v5", "dispatch")),
    (4, 8, 4, 64, 16, 1024, np.float32, ("naive", "v1", "v2", "v3", "v4")),
    (4, 8, 4, 64, 8, 777, np.float16, ("naive", "v1", "v2", "v3", "v4")),
    (16, 64, 8, 128, 16, 4096, np.float16, ("v2", "v3", "v4", "v5", "dispatch")),
    (8, 32, 32, 128, 16, 2048, np.float16, ("v2", "v3", "v4", "v5", "dispatch")),
    (4, 8, 2, 256, 16, 3000, np.float16, ("v2", "v3", "v4", "v5", "dispatch")),
    (3, 4, 1, 32, 16, 33000, np.float16, ("v2", "v3", "v4", "v5", "dispatch")),
]
QUICK_CONFIGS = [
    (2, 4, 2, 64, 16, 100, np.float16, ("naive", "v1", "v2", "v3", "v4", "v5", "dispatch"))
]
TINY_CONFIGS = [(2, 4, 2, 16, 4, 10, np.float16, ("naive", "v1", "v2", "v3", "v4", "dispatch"))]
TIMING = {"reps": 5, "samples": 15, "warmup": 2}  # the simulator dry run uses 1, 1, 0


def check_attention(configs, results, rng) -> None:
    say("== attention vs reference (NaN-poisoned outputs) ==")
    say(
        f"{'seqs':>5} {'heads':>5} {'kv':>3} {'dim':>4} {'bs':>3} {'ctx':>5} {'dtype':>8} "
        f"{'version':>8} {'worst err':>10} ok"
    )
    for seqs, heads, kv, dim, bs, ctx, dtype, versions in configs:
        b = make_batch(rng, seqs, heads, kv, dim, bs, ctx, dtype)
        expected = ref.paged_attention_ref(
            b["query"].astype(np.float64),
            b["key_cache"],
            b["value_cache"],
            b["block_tables"],
            b["seq_lens"],
            b["scale"],
        )
        on_device = {k: cuda.to_device(x) if isinstance(x, np.ndarray) else x for k, x in b.items()}
        for version in versions:
            out = cuda.to_device(np.full(b["query"].shape, np.nan, dtype))
            kind, _, threads = version.partition("@")  # "v1@256": v1 with 256 threads
            fn = {
                "naive": paged_attention_naive,
                "v1": paged_attention_v1,
                "v2": paged_attention_v2,
                "v3": paged_attention_v3,
                "v4": paged_attention_v4,
                "v5": lambda threads, **kw: paged_attention_v5(**kw),  # one warp a block
                "dispatch": paged_attention,
            }[kind]
            fn(**on_device, out=out, threads=int(threads) if threads else None)
            ok, worst = close(out.copy_to_host(), expected, dtype)
            name = np.dtype(dtype).name
            say(
                f"{seqs:5d} {heads:5d} {kv:3d} {dim:4d} {bs:3d} {ctx:5d} {name:>8} "
                f"{version:>8} {worst:10.2e} {'PASS' if ok else 'FAIL'}"
            )
            results.append(
                {
                    "kernel": f"paged_attention_{version}",
                    "seqs": seqs,
                    "heads": heads,
                    "kv_heads": kv,
                    "head_dim": dim,
                    "block_size": bs,
                    "max_context": ctx,
                    "dtype": name,
                    "worst_error": worst,
                    "ok": ok,
                }
            )


def check_cache_ops(results, rng, quick: bool) -> None:
    say("== cache kernels vs reference (bit-exact) ==")
    blocks, bs, kv, dim = (64, 16, 2, 64) if quick else (2048, 16, 8, 128)
    for dtype in (np.float16, np.float32):
        name = np.dtype(dtype).name
        # reshape_and_cache: a prefill batch with padding slots, into a NaN cache
        tokens = 100 if quick else 4096
        slots = rng.permutation(blocks * bs)[:tokens].astype(np.int64)
        slots[rng.random(tokens) < 0.05] = -1
        key = rng.standard_normal((tokens, kv, dim), np.float32).astype(dtype)
        value = rng.standard_normal((tokens, kv, dim), np.float32).astype(dtype)
        kc = np.full((blocks, bs, kv, dim), np.nan, dtype)
        vc = kc.copy()
        d_kc, d_vc = cuda.to_device(kc), cuda.to_device(vc)
        reshape_and_cache(
            cuda.to_device(key), cuda.to_device(value), d_kc, d_vc, cuda.to_device(slots)
        )
        ref.reshape_and_cache_ref(key, value, kc, vc, slots)
        ok = np.array_equal(d_kc.copy_to_host(), kc, equal_nan=True) and np.array_equal(
            d_vc.copy_to_host(), vc, equal_nan=True
        )
        report(
            results, "reshape_and_cache", f"{tokens} tokens into {blocks}x{bs}x{kv}x{dim}", name, ok
        )

        # copy_blocks: stacked layers, pairs from a shuffled pool (dsts never sources)
        layers, pairs = (2, 8) if quick else (4, 256)
        shape = (layers, blocks, bs, kv, dim)
        keys = rng.standard_normal(shape, np.float32).astype(dtype)
        values = rng.standard_normal(shape, np.float32).astype(dtype)
        pool = rng.permutation(blocks)
        mapping = np.stack([rng.choice(pool[pairs:], pairs), pool[:pairs]], axis=1)
        d_k, d_v = cuda.to_device(keys), cuda.to_device(values)
        copy_blocks(d_k, d_v, cuda.to_device(mapping.astype(np.int64)))
        expect_k, expect_v = list(keys), list(values)
        ref.copy_blocks_ref(expect_k, expect_v, mapping)
        ok = np.array_equal(d_k.copy_to_host(), np.stack(expect_k)) and np.array_equal(
            d_v.copy_to_host(), np.stack(expect_v)
        )
        report(results, "copy_blocks", f"{pairs} pairs x {layers} layers", name, ok)

        # swap_blocks: device -> pinned host -> device -> device; a mapping of many runs (staged
        # through one buffer) and one of two runs (one DMA per run)
        src = rng.standard_normal((blocks, bs, kv, dim), np.float32).astype(dtype)
        n = blocks // 4
        half = n // 2
        run = np.stack([np.arange(half) + 1, np.arange(half)], axis=1)  # one run of pairs
        srcs = rng.permutation(np.arange(half + 1, blocks))[: n - half]  # then scattered ones
        dsts = rng.permutation(np.arange(half, blocks // 2))[: n - half]
        scattered = np.concatenate([run, np.stack([srcs, dsts], axis=1)])
        two_runs = np.concatenate([run, run[: half // 2] + [half + 1, half]])
        for label, mapping in (("scattered", scattered), ("in 2 runs", two_runs)):
            ok = check_swap(src, mapping, blocks // 2)
            report(results, "swap_blocks", f"{len(mapping)} blocks {label} d2h h2d d2d", name, ok)


def check_swap(src, mapping, host_blocks) -> bool:
    """device -> pinned host by ``mapping``, back to a NaN device cache by the reverse mapping,
    then device -> device at the same places; each step against the reference."""
    host = cuda.pinned_array((host_blocks, *src.shape[1:]), dtype=src.dtype)
    host[...] = np.nan
    expect = np.array(host)
    ref.swap_blocks_ref(src, expect, mapping)
    swap_blocks(cuda.to_device(src), host, mapping)
    ok = np.array_equal(host, expect, equal_nan=True)
    back = mapping[:, ::-1]
    d_back = cuda.to_device(np.full_like(src, np.nan))
    swap_blocks(host, d_back, back)
    expect_back = np.full_like(src, np.nan)
    ref.swap_blocks_ref(expect, expect_back, back)
    ok = ok and np.array_equal(d_back.copy_to_host(), expect_back, equal_nan=True)
    d_other = cuda.to_device(np.full_like(src, np.nan))
    swap_blocks(d_back, d_other, np.stack([back[:, 1], back[:, 1]], axis=1))
    return ok and np.array_equal(d_other.copy_to_host(), expect_back, equal_nan=True)


def report(results, kernel, what, dtype, ok) -> None:
    say(f"{kernel:>18} {what:>34} {dtype:>8} {'PASS' if ok else 'FAIL'}")
    results.append({"kernel": kernel, "case": what, "dtype": dtype, "ok": bool(ok)})


# --- timings -------------------------------------------------------------------------------------


def gpu_ms(fn, reps: int | None = None, samples: int | None = None) -> float:
    """Median milliseconds per call of ``fn`` (which launches work), from CUDA events around
    ``reps`` back-to-back calls, so the GPU is not left idle between launches."""
    reps = reps or TIMING["reps"]
    samples = samples or TIMING["samples"]
    warmup = TIMING["warmup"]
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = cuda.event(), cuda.event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


class Pool:
    """One big device KV cache (filled on the device) that every timed batch draws blocks from."""

    def __init__(self, num_blocks, block_size, kv_heads, head_dim, dtype):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.key_cache = device_random(shape, dtype, 1)
        self.value_cache = device_random(shape, dtype, 2)
        self.block_size, self.kv_heads, self.head_dim = block_size, kv_heads, head_dim
        self.num_blocks, self.dtype = num_blocks, dtype

    def args(self, rng, num_seqs, num_heads, context):
        per_seq = -(-context // self.block_size)
        ids = rng.permutation(self.num_blocks)[: num_seqs * per_seq]
        tables = ids.reshape(num_seqs, per_seq).astype(np.int32)
        q = rng.standard_normal((num_seqs, num_heads, self.head_dim), np.float32)
        return attention.prepare_attention(
            q.astype(self.dtype),
            self.key_cache,
            self.value_cache,
            tables,
            np.full(num_seqs, context, np.int32),
            1 / np.sqrt(self.head_dim),
        )

    def kv_bytes(self, num_seqs, context, num_heads):
        item = np.dtype(self.dtype).itemsize
        return (
            2 * num_seqs * context * self.kv_heads * self.head_dim * item
            + 2 * num_seqs * num_heads * self.head_dim * item
        )


# Sizes for the timings; "tiny" is a dry run of the script itself in the CUDA simulator.
SIZES = {
    "full": {
        "attention": (32, 8, 128, 16),  # heads, kv heads, head_dim, block_size
        "batches": (1, 8, 64, 256),
        "contexts": (512, 2048, 8192),
        "partition": 512,
        "sweep": ((1, 8192), (8, 4096), (64, 2048), (256, 1024)),
        "versions": (8, 1024),  # seqs, context for naive vs v1 vs v2
        "cache": (16, 8, 128),  # block_size, kv heads, head_dim
        "reshape": (16384, (256, 8192)),  # cache blocks, token counts
        "copy": (8, 4096, 1024),  # layers, blocks, pairs
        "swap": (4096, 1024),  # blocks, pairs
    },
    "tiny": {
        "attention": (4, 2, 16, 4),
        "batches": (1, 2),
        "contexts": (8, 20),
        "partition": 8,
        "sweep": ((1, 20),),
        "versions": (2, 12),
        "cache": (4, 2, 16),
        "reshape": (16, (4, 8)),
        "copy": (2, 16, 4),
        "swap": (16, 4),
    },
}


def time_attention(timings, rng, size) -> None:
    heads, kv, dim, bs = size["attention"]
    dtype, part = np.float16, size["partition"]
    batches, contexts = size["batches"], size["contexts"]
    pool = Pool(max(batches) * max(contexts) // bs, bs, kv, dim, dtype)
    say(
        f"== paged attention: v1 vs v2 (heads {heads}, kv heads {kv}, dim {dim}, block {bs}, "
        f"fp16, {attention.THREADS} threads, partition {part}) =="
    )
    say(
        f"{'seqs':>5} {'ctx':>5} {'blocks':>6} {'v1 ms':>8} {'v2 ms':>8} {'v1 GB/s':>8} "
        f"{'v2 GB/s':>8} {'faster':>6} {'chosen':>6}"
    )
    rows = []
    for seqs in batches:
        for ctx in contexts:
            a = pool.args(rng, seqs, heads, ctx)
            t1 = gpu_ms(lambda a=a: attention.launch_v1(a))
            t2 = gpu_ms(lambda a=a: attention.launch_v2(a, part))
            nbytes = pool.kv_bytes(seqs, ctx, heads)
            chosen = attention.choose_version(ctx, part)
            faster = "v1" if t1 <= t2 else "v2"
            say(
                f"{seqs:5d} {ctx:5d} {seqs * heads:6d} {t1:8.3f} {t2:8.3f} "
                f"{nbytes / t1 / 1e6:8.0f} {nbytes / t2 / 1e6:8.0f} {faster:>6} {chosen:>6}"
            )
            rows.append(
                {
                    "seqs": seqs,
                    "context": ctx,
                    "v1_ms": t1,
                    "v2_ms": t2,
                    "bytes": nbytes,
                    "faster": faster,
                    "chosen": chosen,
                }
            )
    timings["attention_v1_v2"] = rows

    say("== paged attention: threads per block and partition size (ms; v2/threads/partition) ==")
    variants = [
        ("v1", 128, 0),
        ("v1", 256, 0),
        ("v2", 128, 256),
        ("v2", 128, 512),
        ("v2", 256, 512),
        ("v2", 128, 1024),
    ]
    names = [f"{v}/{t}" + (f"/{p}" if p else "") for v, t, p in variants]
    say(f"{'seqs':>5} {'ctx':>5} " + " ".join(f"{n:>11}" for n in names))
    rows = []
    for seqs, ctx in size["sweep"]:
        by_threads = {128: pool.args(rng, seqs, heads, ctx)}
        a = by_threads[128]
        by_threads[256] = attention.prepare_attention(
            a.query,
            pool.key_cache,
            pool.value_cache,
            a.block_tables,
            a.seq_lens,
            float(a.scale),
            threads=256,
        )
        r = {}
        for name, (version, threads, p) in zip(names, variants, strict=True):
            b = by_threads[threads]
            if version == "v1":
                r[name] = gpu_ms(lambda b=b: attention.launch_v1(b))
            else:
                r[name] = gpu_ms(lambda b=b, p=p: attention.launch_v2(b, p))
        say(f"{seqs:5d} {ctx:5d} " + " ".join(f"{r[n]:11.3f}" for n in names))
        rows.append({"seqs": seqs, "context": ctx, **r})
    timings["attention_threads_partitions"] = rows

    seqs, ctx = size["versions"]
    say(f"== naive vs v1 vs v2, and the wrapper's host-side checks ({seqs} seqs, ctx {ctx}) ==")
    a = pool.args(rng, seqs, heads, ctx)
    r = {
        "naive": gpu_ms(lambda: attention.launch_naive(a), reps=1, samples=5),
        "v1": gpu_ms(lambda: attention.launch_v1(a)),
        "v2": gpu_ms(lambda: attention.launch_v2(a, part)),
    }
    args = (a.query, pool.key_cache, pool.value_cache, a.block_tables, a.seq_lens, float(a.scale))
    r["paged_attention wrapper (device arrays)"] = gpu_ms(
        lambda: paged_attention(*args, partition_size=part, out=a.out)
    )
    t0 = time.perf_counter()
    for _ in range(20):
        attention.prepare_attention(*args, out=a.out)
    r["host checks + staging only (wall clock)"] = (time.perf_counter() - t0) / 20 * 1e3
    for k, val in r.items():
        say(f"  {k:>40}: {val:9.3f} ms")
    timings["attention_versions"] = {"seqs": seqs, "context": ctx, **r}


def time_cache_ops(timings, rng, size) -> None:
    bs, kv, dim = size["cache"]
    dtype = np.float16
    block_bytes = bs * kv * dim * 2
    say(
        f"== reshape_and_cache, copy_blocks, swap_blocks (block {bs} x {kv} heads x {dim}, fp16) =="
    )
    rows = {}
    blocks, token_counts = size["reshape"]
    kc = device_random((blocks, bs, kv, dim), dtype, 3)
    vc = device_random((blocks, bs, kv, dim), dtype, 4)
    row = kv * dim
    flat_k, flat_v = kc.reshape(blocks * bs, row), vc.reshape(blocks * bs, row)
    for tokens in token_counts:
        k2 = device_random((tokens, kv, dim), dtype, 5).reshape(tokens, row)
        v2 = device_random((tokens, kv, dim), dtype, 6).reshape(tokens, row)
        slots = cuda.to_device(rng.permutation(blocks * bs)[:tokens].astype(np.int64))
        launch = cache_ops.reshape_and_cache_kernel[tokens, cache_ops.THREADS]
        ms = gpu_ms(lambda k2=k2, v2=v2, s=slots, f=launch: f(k2, v2, flat_k, flat_v, s))
        rows[f"reshape_and_cache {tokens} tokens"] = (ms, 2 * 2 * tokens * row * 2)  # K,V; r+w

    layers, blocks, pairs = size["copy"]
    elems = bs * kv * dim
    k3 = device_random((layers, blocks, bs, kv, dim), dtype, 7).reshape(layers, blocks, elems)
    v3 = device_random((layers, blocks, bs, kv, dim), dtype, 8).reshape(layers, blocks, elems)
    pool = rng.permutation(blocks)
    mapping = cuda.to_device(np.stack([pool[pairs : 2 * pairs], pool[:pairs]], 1).astype(np.int64))
    launch = cache_ops.copy_blocks_kernel[(pairs, layers), cache_ops.THREADS]
    ms = gpu_ms(lambda: launch(k3, v3, mapping))
    rows[f"copy_blocks {pairs} pairs x {layers} layers"] = (
        ms,
        2 * 2 * layers * pairs * block_bytes,
    )

    blocks, n = size["swap"]
    d_cache = device_random((blocks, bs, kv, dim), dtype, 9)
    pinned = cuda.pinned_array((blocks, bs, kv, dim), dtype=dtype)
    pageable = np.empty((blocks, bs, kv, dim), dtype=dtype)
    runs = np.stack([np.arange(n), np.arange(n)], 1)
    scattered = np.stack([rng.permutation(blocks)[:n], rng.permutation(blocks)[:n]], 1)
    d_other = device_random((blocks, bs, kv, dim), dtype, 10)
    for label, host in (("pinned", pinned), ("pageable", pageable), ("device", d_other)):
        for kind, m in (("one run", runs), ("scattered", scattered)):
            for direction in ("d2h", "h2d") if label != "device" else ("d2d",):
                src, dst = (d_cache, host) if direction != "h2d" else (host, d_cache)
                swap_blocks(src, dst, m)
                t = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    swap_blocks(src, dst, m)
                    t.append(time.perf_counter() - t0)
                ms = statistics.median(t) * 1e3
                rows[f"swap_blocks {n} blocks {direction} {label} {kind}"] = (ms, n * block_bytes)
    for k, (ms, nbytes) in rows.items():
        say(f"  {k:>48}: {ms:9.3f} ms {nbytes / ms / 1e6:9.1f} GB/s")
    timings["cache_ops"] = {k: {"ms": ms, "bytes": b} for k, (ms, b) in rows.items()}


def environment() -> dict:
    import importlib.metadata
    import subprocess

    dev = cuda.get_current_device()
    env = {"device": str(getattr(dev, "name", "?"))}
    for key, get in (
        ("compute_capability", lambda: list(dev.compute_capability)),
        ("multiprocessors", lambda: dev.MULTIPROCESSOR_COUNT),
        ("cuda_runtime", lambda: list(cuda.runtime.get_version())),
        (
            "nvidia_smi",
            lambda: subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip(),
        ),
    ):
        try:
            env[key] = get()
        except Exception as e:  # a report, not a requirement
            env[key] = f"unavailable ({type(e).__name__})"
    for package in ("numba", "numba-cuda", "numpy"):
        env[package] = importlib.metadata.version(package)
    env["python"] = platform.python_version()
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="small checks only, no timings")
    parser.add_argument("--tiny", action="store_true", help="tiny timings (simulator dry run)")
    parser.add_argument(
        "--checks-only", action="store_true", help="no timings (see minipaged bench)"
    )
    opts = parser.parse_args()
    opts.outdir.mkdir(parents=True, exist_ok=True)
    env = environment()
    say(f"environment: {json.dumps(env)}")
    rng = np.random.default_rng(0)
    results: list[dict] = []
    timings: dict = {}
    t0 = time.perf_counter()
    if opts.tiny:
        TIMING.update(reps=1, samples=1, warmup=0)
    configs = TINY_CONFIGS if opts.tiny else QUICK_CONFIGS if opts.quick else ATTENTION_CONFIGS
    check_attention(configs, results, rng)
    check_cache_ops(results, rng, opts.quick or opts.tiny)
    say(f"(checks took {time.perf_counter() - t0:.1f} s, compilation included)")
    if not (opts.quick or opts.checks_only):
        size = SIZES["tiny" if opts.tiny else "full"]
        time_attention(timings, rng, size)
        time_cache_ops(timings, rng, size)
    failed = [r for r in results if not r["ok"]]
    say(f"{len(results) - len(failed)} of {len(results)} comparisons passed")
    (opts.outdir / "gpu_check.json").write_text(
        json.dumps({"environment": env, "correctness": results, "timings": timings}, indent=1)
    )
    (opts.outdir / "gpu_check.txt").write_text("\n".join(LINES) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
