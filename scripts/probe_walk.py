"""Where does version 6's time go beyond SDPA's: its arithmetic, its loads, or the paging?

    python3 scripts/probe_walk.py [--no-loads] [batch ...]

``batch``: ``SEQSxCONTEXT/KV`` such as ``64x4096/8`` (default ``64x4096/8`` and
``64x4096/32``). For each batch, all in one run, each a median of CUDA-event timings
(``minipaged bench``'s) with its share of the copy bandwidth measured in the same run:

1. SDPA on a contiguous cache, and version 6 at ``choose_launch``'s launch, on the benchmark's
   shuffled block tables and on tables that hold each sequence's blocks in order (a contiguous
   cache read through a block table), as ``launch_v6`` makes it (all of ``make_walk``'s
   tuning choices); on the shuffled tables also with none of them and with each alone.
2. (Not with ``--no-loads``.) Version 6's loads alone: the same grid, warps and tokens a warp,
   the same 16-byte loads of the same pieces into registers (version 6's own
   ``make_load_tile``), the sets of registers taking turns as version 6's do, but each tile
   only XORed into one word instead of multiplied: with 2 sets (version 6's loads in flight)
   and with 3 (one tile more in flight a warp, registers that version 6 does not have). Their
   registers (166 to 244 a thread) leave an SM 8 warps, as version 6's do. Each also once
   with 150 KB of shared memory a block (which takes that much from the L1 cache), and with 2
   sets, shuffled tables, after each tile a chain of 64, 128 or 256 dependent integer
   multiply-adds, standing for the latency of the arithmetic.

If the loads alone, 2 sets, take version 6's time, the loads are its limit; if they take
SDPA's, the arithmetic between them is; if 3 sets are faster than 2, more bytes in flight
would help; the chains say how much a tile's latency alone costs. Runs in the simulator too
(a tiny batch), to check the probe itself.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np
from numba import config, cuda, int32, uint32

from minipaged.bench import gpu
from minipaged.kernels import attention, attention_v5, attention_v6

WARP = attention_v6.WARP
TILE = attention_v6.TILE
ONE_BLOCK_AN_SM = 150 * 1024  # shared memory a block asks for, so that an SM holds one
LOADS = ((2, 0), (3, 0), (2, 64), (2, 128), (2, 256))  # loads alone: (sets, delay)
VARIANTS = (attention_v6.TUNING, (), *((x,) for x in attention_v6.TUNING))  # version 6's


@functools.cache
def make_fold(head_dim: int, delay: int = 0) -> Any:
    """The device function that XORs a lane's words of a tile (``k``, then ``v``) into ``x``
    instead of folding them into the softmax, then runs a chain of ``delay`` dependent integer
    multiply-adds (about 4 cycles each), standing for the latency of version 6's arithmetic
    (``probe_tail.py`` uses it too)."""
    k_words = 2 * 4 * (head_dim // 8 // 4)
    v_words = 4 * 4 * (head_dim // 8 // 8)

    @cuda.jit(device=True, **attention_v6.INLINE)
    def fold(k, v, x):  # noqa: ANN001, ANN202
        for i in range(k_words):
            x ^= k[i]
        for i in range(v_words):
            x ^= v[i]
        for _ in range(delay):
            x = x * x + uint32(1)
        return x

    return fold


@functools.cache
def loads_only(
    head_dim: int, block_size: int, warps: int, heads: int, sets: int, delay: int = 0
) -> Any:
    """Version 6's partition kernel with each tile XORed into one word instead of folded into
    the softmax: ``sets`` (2 or 3) sets of registers take turns. ``delay``: after each tile, a
    chain of that many dependent integer multiply-adds (about 4 cycles each) stands for the
    latency of version 6's arithmetic."""
    start_tile = attention_v6.make_load_tile(head_dim, block_size, attention_v6._make_load16(""))
    k_words = 2 * 4 * (head_dim // 8 // 4)
    v_words = 4 * 4 * (head_dim // 8 // 8)
    runs = warps // heads
    shift = block_size.bit_length() - 1
    row = head_dim // 2
    step = sets * TILE
    fold = make_fold(head_dim, delay)

    @cuda.jit(**({} if config.ENABLE_CUDASIM else {"launch_bounds": warps * WARP}))
    def kernel(sink, keys, values, block_tables, seq_lens, partition_size, kv_heads, id_words):  # noqa: ANN001, ANN202
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        kv_head = cuda.blockIdx.x * heads + warp % heads
        seq_len = seq_lens[seq]
        sub = partition_size // runs
        start = part * partition_size + warp // heads * sub
        end = min(start + sub, seq_len)
        ids = cuda.shared.array(0, int32)[warp * id_words : (warp + 1) * id_words]
        x = uint32(0)
        if start < seq_len:
            attention_v6.fetch_ids(ids, block_tables[seq], start, end, shift, lane)
            base = kv_heads * row
            head = kv_head * row
            g = lane >> 2
            t = lane & 3
            k0 = cuda.local.array(k_words, uint32)
            v0 = cuda.local.array(v_words, uint32)
            k1 = cuda.local.array(k_words, uint32)
            v1 = cuda.local.array(v_words, uint32)
            k2 = cuda.local.array(k_words, uint32)
            v2 = cuda.local.array(v_words, uint32)
            start_tile(k0, v0, keys, values, ids, start, start, end, base, head, g, t)
            if start + TILE < end:
                start_tile(k1, v1, keys, values, ids, start + TILE, start, end, base, head, g, t)
            if sets == 3 and start + 2 * TILE < end:
                start_tile(
                    k2, v2, keys, values, ids, start + 2 * TILE, start, end, base, head, g, t
                )
            for t0 in range(start, end, step):
                x = fold(k0, v0, x)
                if t0 + step < end:
                    start_tile(k0, v0, keys, values, ids, t0 + step, start, end, base, head, g, t)
                t1 = t0 + TILE
                if t1 < end:
                    x = fold(k1, v1, x)
                    if t1 + step < end:
                        start_tile(
                            k1, v1, keys, values, ids, t1 + step, start, end, base, head, g, t
                        )
                t2 = t1 + TILE
                if sets == 3 and t2 < end:
                    x = fold(k2, v2, x)
                    if t2 + step < end:
                        start_tile(
                            k2, v2, keys, values, ids, t2 + step, start, end, base, head, g, t
                        )
        block = (seq * cuda.gridDim.z + part) * cuda.gridDim.x + cuda.blockIdx.x
        sink[block * warps * WARP + cuda.threadIdx.x] = x

    return kernel


def in_order(a: attention.AttentionArgs) -> attention.AttentionArgs:
    """The same batch with each sequence's blocks in order, ``0, 1, 2, ...`` on from its
    first: the cache read as a contiguous one would be."""
    seqs, per_seq = a.block_tables.shape
    tables = np.arange(seqs * per_seq, dtype=np.int32).reshape(seqs, per_seq)
    return attention.prepare_attention(
        a.query, a.key_cache, a.value_cache, tables, a.host_seq_lens, a.scale
    )


def probe(shape: gpu.AttentionShape, copy: float, timing: Any, loads: bool = True) -> None:
    """One batch: section 1, then (``loads``) section 2, on both kinds of tables."""
    print(f"{shape.seqs} x {shape.context}, {shape.heads}/{shape.kv_heads}", flush=True)
    nbytes = shape.kv_bytes()

    def show(name: str, ms: float | None) -> None:
        if ms:
            print(f"  {name:52s} {1e3 * ms:8.1f} us  {100 * nbytes / ms / 1e6 / copy:5.1f}%",
                  flush=True)  # fmt: skip

    partition, warps, heads = attention_v6.choose_launch(
        shape.seqs, shape.kv_heads, shape.context, shape.block_size
    )
    show("SDPA (contiguous cache)", gpu.sdpa_ms(shape, timing))
    shuffled = gpu.attention_inputs(shape, seed=3)
    batches = (("shuffled", shuffled), ("in order", in_order(shuffled)))
    for name, a in batches:
        attention.launch_v2(a)
        want = a.out.copy_to_host()
        for tuning in VARIANTS if name == "shuffled" else VARIANTS[:1]:

            def launch_v6(a=a, tuning=tuning) -> None:
                attention_v6.launch_v6(a, tuning=tuning)

            a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))
            launch_v6()
            diff = float(np.max(np.abs(a.out.copy_to_host().astype(np.float32) - want)))
            variant = _variant(tuning)
            show(f"v6{variant}, tables {name} (|diff| {diff:.1e})",
                 gpu.time_ms(launch_v6, timing))  # fmt: skip
    if not config.ENABLE_CUDASIM:
        group = shape.heads // shape.kv_heads
        for tuning in VARIANTS:
            kernel = attention_v6.make_kernel(
                group, shape.head_dim, shape.block_size, warps, 0, "", heads, tuple(sorted(tuning))
            )
            for compiled in kernel.overloads.values():
                print(f"  v6{_variant(tuning) or ', as launched'}: {_registers(compiled)}")
    if not loads:
        return
    runs = warps // heads
    parts = -(-shape.context // partition)
    id_words = -(-(partition // runs // shape.block_size) // 4) * 4
    grid = (shape.kv_heads // heads, shape.seqs, parts)
    sink = cuda.device_array(int(np.prod(grid)) * warps * WARP, np.uint32)
    folded: dict[str, np.ndarray] = {}  # each lane's XOR, the same whatever the sets
    for sets, delay in LOADS:
        kernel = loads_only(shape.head_dim, shape.block_size, warps, heads, sets, delay)
        for one in (False, True) if delay == 0 else (False,):
            shared = max(4 * warps * id_words, ONE_BLOCK_AN_SM if one else 0)
            for name, a in batches if delay == 0 else batches[:1]:
                keys, values = attention_v6.words(a)[1:]
                args = (sink, keys, values, a.block_tables, a.seq_lens, partition,
                        shape.kv_heads, id_words)  # fmt: skip
                attention_v5.allow_shared(kernel, args, shared)

                def launch(k=kernel, args=args, shared=shared) -> None:
                    k[grid, warps * WARP, 0, shared](*args)

                launch()
                same = ""
                if not delay:
                    got = folded.setdefault(name, sink.copy_to_host())
                    same = "" if np.array_equal(got, sink.copy_to_host()) else ", WORDS DIFFER"
                shared_memory = ", 150 KB shared" if one else ""
                show(f"loads alone, {sets} sets{shared_memory}, {delay} IMADs a tile, {name}{same}",
                     gpu.time_ms(launch, timing))  # fmt: skip
    if not config.ENABLE_CUDASIM:
        for sets, delay in LOADS:
            kernel = loads_only(shape.head_dim, 16, warps, heads, sets, delay)
            for compiled in kernel.overloads.values():
                print(f"  loads alone, {sets} sets, {delay} IMADs: {_registers(compiled)}")


def _variant(tuning: tuple[str, ...]) -> str:
    """How a line names version 6 with these tuning choices ("": as ``launch_v6`` makes it)."""
    if tuple(sorted(tuning)) == attention_v6.TUNING:
        return ""
    return ", " + ("+".join(tuning) or "no tuning choices")


def _registers(compiled: Any) -> str:
    return (
        f"{compiled.regs_per_thread} registers, "
        f"{compiled.local_mem_per_thread} bytes of local memory a thread"
    )


def main() -> None:
    loads = "--no-loads" not in sys.argv[1:]
    wanted = [x for x in sys.argv[1:] if x != "--no-loads"] or ["64x4096/8", "64x4096/32"]
    timing = gpu.Timing(0, 1, 1) if config.ENABLE_CUDASIM else gpu.Timing()
    copy = gpu.copy_bandwidth(timing, 1 << 12 if config.ENABLE_CUDASIM else 1 << 30)
    print(f"{gpu.device_name()}; copy {copy:.0f} GB/s", flush=True)
    for name in wanted:
        probe(gpu.batch_shape(name), copy, timing, loads)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
