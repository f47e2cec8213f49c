"""When do version 6's warps end? The tail of a launch that runs in one wave.

    python3 scripts/probe_tail.py [--kinds=v6,loads,...] [batch ...]

``batch``: ``SEQSxCONTEXT/KV`` such as ``64x4096/8`` (the default); ``--kinds``: which of
the stamped kernels below to run (all by default). At 64 x 4096 every warp of version 6's
launch (``choose_launch``'s) runs at once, and the kernel lasts as long as its slowest warp:
while the last warps finish, fewer loads are in flight than the memory wants. If version 6's
warps end further apart than those of its loads alone (which read the cache in SDPA's time),
that spread is where its time goes; if they end as close together, it is not. (They end
closer together: docs/benchmarks.md, "When version 6's warps end".)

For every warp this probe records the GPU's global timer (nanoseconds) when the warp starts
and when it has walked its run, and the SM it ran on, in kernels that are version 6's:

- ``v6``: version 6's walk as ``launch_v6`` makes it (all of ``make_walk``'s tuning
  choices), without the kernel's last step (``write_run`` and ``combine_warps``);
- ``v6+end``: the same, then that last step, stamped again when the warp has written its
  run, when its block has met at the barrier before the combine, and when the warp has done
  its part of the combine: the whole of version 6's kernel, its output compared with
  ``launch_v6``'s (``v6+end+padded``, ``v6+end+lean`` and ``v6+end+lean+padded``, not run
  by default: with those of ``make_end``'s tuning choices);
- ``loads``: its loads alone, the same loads in the same order into the same two sets of
  registers, each tile only XORed into one word (``probe_walk.make_fold``);
- ``loads+128``: the loads alone with a chain of 128 dependent integer multiply-adds after
  each tile (about as long as version 6's arithmetic a tile).

For each it prints the time of the whole launch (CUDA events, ``minipaged bench``'s median),
beside SDPA and ``launch_v6``, and from the timer of one launch: the span from the first
warp's start to the last one's end, when the warps started and ended (quantiles, in us from
the first start), how long each warp took, how far apart the warps of one block and the last
warps of each SM ended, the share of the span the warp places were busy, and for ``v6+end``
how long the last step and each of its parts took, and a block's last step after its last
walk. In Numba's CUDA simulator the timer reads 0: it runs there (a tiny batch) to check the
kernels only.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numba import config, cuda, float32, int32, uint32, uint64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import probe_walk  # noqa: E402  (scripts/, this script's folder)

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import attention_v5, attention_v6  # noqa: E402

WARP = attention_v6.WARP
TILE = attention_v6.TILE
NEG_INF = attention_v6.NEG_INF
KINDS = ("v6", "v6+end", "loads", "loads+128")

if config.ENABLE_CUDASIM:

    @cuda.jit(device=True)
    def _now():
        """Simulator: 0 (it has no global timer)."""
        return uint64(0)

    @cuda.jit(device=True)
    def _sm():
        """Simulator: 0."""
        return uint32(0)

else:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda.extending import intrinsic

    def _special(name: str, bits: int) -> Any:
        """An intrinsic that reads special register ``%name`` (``bits`` wide)."""

        @intrinsic
        def read(typingctx):  # noqa: ANN001, ANN202
            sig = (types.uint64 if bits == 64 else types.uint32)()

            def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
                fn = ir.FunctionType(ir.IntType(bits), [])
                return builder.asm(fn, f"mov.u{bits} $0, %{name};", "=l" if bits == 64 else "=r",
                                   [], True)  # fmt: skip

            return sig, codegen

        return read

    _now = _special("globaltimer", 64)
    _sm = _special("smid", 32)


@functools.cache
def loads_walk(head_dim: int, block_size: int, delay: int) -> Any:
    """A device function with ``make_walk``'s arguments that makes version 6's loads, in its
    order, into its two sets of registers, but only XORs each tile into one word, then (with
    ``delay``) runs a chain of that many dependent integer multiply-adds."""
    load_tile = attention_v6.make_load_tile(
        head_dim, block_size, attention_v6._make_load16(""), True
    )
    fold = probe_walk.make_fold(head_dim, delay)

    @cuda.jit(device=True, **attention_v6.INLINE)
    def walk(
        k_even, v_even, k_odd, v_odd, q, acc, s, p, key_words, value_words, ids, start, end,
        base, head, scale, lane, swap, posted,
    ):  # fmt: skip
        g = lane >> 2
        t = lane & 3
        x = uint32(0)
        load_tile(k_even, v_even, key_words, value_words, ids, start, start, end, base, head, g, t)
        for t0 in range(start, end, 2 * TILE):
            t1 = t0 + TILE
            if t1 < end:
                load_tile(k_odd, v_odd, key_words, value_words, ids, t1, start, end, base, head,
                          g, t)  # fmt: skip
            x = fold(k_even, v_even, x)
            if t1 < end:
                if t1 + TILE < end:
                    load_tile(k_even, v_even, key_words, value_words, ids, t1 + TILE, start, end,
                              base, head, g, t)  # fmt: skip
                x = fold(k_odd, v_odd, x)
        return float32(x & uint32(0xFF)), float32(0.0)

    return walk


@functools.cache
def stamped_kernel(group: int, head_dim: int, block_size: int, warps: int, heads: int,
                   kind: str) -> Any:  # fmt: skip
    """Version 6's partition kernel up to the end of its walk (``kind``: one of ``KINDS``),
    each warp writing ``[start, end, sm, wrote, met, done]`` to ``stamps[warp]`` and each
    lane the sum of what it holds to ``sink`` (so that nothing is left out as unused); for
    ``v6+end`` then on to the end of version 6's kernel, its output in ``out``: ``wrote`` when
    the warp has written its run (``write_run``), ``met`` when the block's warps have met at
    the barrier before the combine, ``done`` when the warp has done its part of the combine
    (all three ``end`` for the others)."""
    load = attention_v6._make_load16("")
    ending = kind.startswith("v6+end")
    if kind.startswith("v6"):
        walk = attention_v6.make_walk(group, head_dim, block_size, load, attention_v6.TUNING,
                                      heads)  # fmt: skip
    else:
        walk = loads_walk(head_dim, block_size, int(kind.partition("+")[2] or 0))
    k_pieces = head_dim // 8 // 4
    k_words, v_words, q_words = 8 * k_pieces, 8 * k_pieces, 4 * k_pieces
    acc_size = 4 * (head_dim // 16)
    row = head_dim // 2
    shift = block_size.bit_length() - 1
    runs = warps // heads
    load_query = attention_v6.make_load_query(group, head_dim)
    swap_words = attention_v6.SWAP
    # a warp's run for combine_warps, as version 6's, its maxima from ``tops`` on
    choices = kind.split("+")[2:] if ending else []  # v6+end+lean+padded: make_end's
    write_run, combine_warps, slot = attention_v6.make_end(
        group, head_dim, warps, heads, "padded" in choices, "lean" in choices
    )
    tops = slot - 2 * group

    @cuda.jit(**({} if config.ENABLE_CUDASIM else {"launch_bounds": warps * WARP}))
    def kernel(stamps, sink, out, partial_out, max_logits, exp_sums, query_words, key_words,
               value_words, block_tables, seq_lens, scale, partition_size):  # noqa: ANN001, ANN202  # fmt: skip
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        kv_head = cuda.blockIdx.x * heads + warp % heads
        block = (seq * cuda.gridDim.z + part) * cuda.gridDim.x + cuda.blockIdx.x
        at = block * warps + warp
        began = _now()
        seq_len = seq_lens[seq]
        sub = partition_size // runs
        start = part * partition_size + warp // heads * sub
        end = min(start + sub, seq_len)
        num_heads = query_words.shape[0] * 2 // head_dim // seq_lens.shape[0]
        id_words = -(-(sub >> shift) // 4) * 4
        ids = cuda.shared.array(0, int32)[warp * id_words : (warp + 1) * id_words]
        runs_at = warps * id_words  # [ids | runs (v6+end) | swap | posted], as version 6's
        swap_at = runs_at + (warps * slot if ending and runs > 1 else 0)
        smem = cuda.shared.array(0, float32)
        swap = smem[swap_at : swap_at + warps * swap_words]  # (the simulator's)
        posted = cuda.shared.array(0, uint32)[swap_at + warps * swap_words :]
        alone = cuda.gridDim.z == 1
        run = smem[runs_at + warp * slot : runs_at + (warp + 1) * slot]
        x = float32(0.0)
        ended = began
        wrote = began
        if start < seq_len:
            attention_v6.fetch_ids(ids, block_tables[seq], start, end, shift, lane)
            g = lane >> 2
            t = lane & 3
            q = cuda.local.array(q_words, uint32)
            load_query(q, query_words, seq, num_heads, kv_head, g, t)
            k_even = cuda.local.array(k_words, uint32)
            v_even = cuda.local.array(v_words, uint32)
            k_odd = cuda.local.array(k_words, uint32)
            v_odd = cuda.local.array(v_words, uint32)
            acc = cuda.local.array(acc_size, float32)
            s = cuda.local.array(8, float32)
            p = cuda.local.array(4, float32)
            top, total = walk(
                k_even, v_even, k_odd, v_odd, q, acc, s, p, key_words, value_words, ids, start,
                end, (num_heads // group) * row, kv_head * row, scale, lane, swap, posted,
            )  # fmt: skip
            x = top + total
            for i in range(acc_size):
                x += acc[i]
            ended = _now()
            if ending:
                write_run(
                    out, partial_out, max_logits, exp_sums, acc, top, total, run, seq, kv_head,
                    part, alone, lane, swap,
                )  # fmt: skip
            wrote = _now()
        else:
            ended = _now()
            if ending and runs > 1:
                for i in range(lane, slot, WARP):
                    run[i] = NEG_INF if tops <= i < tops + group else float32(0.0)
            wrote = _now()
        met = wrote
        if ending and runs > 1:
            cuda.syncthreads()
            met = _now()
            combine_warps(
                out, partial_out, max_logits, exp_sums, smem[runs_at:], slot, seq,
                cuda.blockIdx.x * heads, part, alone,
            )  # fmt: skip
        sink[at * WARP + lane] = x
        if lane == 0:
            stamps[at, 0] = began
            stamps[at, 1] = ended
            stamps[at, 2] = uint64(_sm())
            stamps[at, 3] = wrote if ending else ended
            stamps[at, 4] = met if ending else ended
            stamps[at, 5] = _now() if ending else ended

    return kernel


def _quantiles(x: np.ndarray) -> str:
    q = np.quantile(x, [0, 0.01, 0.1, 0.5, 0.9, 0.99, 1])
    return " / ".join(f"{v:7.1f}" for v in q)


def report(stamps: np.ndarray, warps: int, ran: np.ndarray) -> None:
    """Print what one launch's ``stamps`` say (``ran``: the warps that had tokens)."""
    began = stamps[:, 0].astype(np.float64)
    ended = stamps[:, 1].astype(np.float64)
    zero = began.min()
    began, ended = (began - zero) / 1e3, (ended - zero) / 1e3  # us from the first start
    span = ended.max()
    took = (ended - began)[ran]
    print(f"    span {span:.1f} us; quantiles 0 / 1 / 10 / 50 / 90 / 99 / 100%:")
    print(f"    started     {_quantiles(began)}")
    print(f"    ended       {_quantiles(ended[ran])}")
    print(f"    took        {_quantiles(took)}")
    blocks = ended.reshape(-1, warps)
    print(f"    ends within a block, last - first   {_quantiles(np.ptp(blocks, axis=1))}")
    sms = stamps[:, 2]
    last = np.array([ended[sms == sm].max() for sm in np.unique(sms)])
    print(f"    each SM's last end ({len(last)} SMs)  {_quantiles(last)}")
    busy = took.sum() / (len(ran) * span) if span > 0 else 0.0
    mean_end = ended[ran].mean()
    print(f"    warp places busy {100 * busy:.1f}% of the span; mean end {mean_end:.1f} us, "
          f"{span - mean_end:.1f} us before the last")  # fmt: skip
    wrote, met, done = ((stamps[:, i].astype(np.float64) - zero) / 1e3 for i in (3, 4, 5))
    if np.any(done != ended):
        print(f"    the last step: to the last warp done {done.max():.1f} us; a warp's "
              f"{_quantiles(done - ended)}")  # fmt: skip
        print(f"      write_run            {_quantiles((wrote - ended)[ran])}")
        print(f"      barrier, from wrote  {_quantiles(met - wrote)}")
        print(f"      combine, from met    {_quantiles(done - met)}")
        last = blocks.max(axis=1)  # each block's last walk's end
        print(f"      a block's last done - its last walk's end "
              f"{_quantiles(done.reshape(-1, warps).max(axis=1) - last)}")  # fmt: skip


def probe(shape: gpu.AttentionShape, timing: Any, kinds: tuple[str, ...] = KINDS) -> None:
    """One batch: the launches' times, then each kind's stamps."""
    print(f"{shape.seqs} x {shape.context}, {shape.heads}/{shape.kv_heads}", flush=True)
    partition, warps, heads = attention_v6.choose_launch(
        shape.seqs, shape.kv_heads, shape.context, shape.block_size
    )
    print(f"  launch: partition {partition}, {warps} warps a block over {heads} kv heads")
    a = gpu.attention_inputs(shape, seed=3)
    print(f"  SDPA (contiguous cache)      {1e3 * (gpu.sdpa_ms(shape, timing) or 0):8.1f} us")
    ms = gpu.time_ms(lambda: attention_v6.launch_v6(a), timing)
    print(f"  launch_v6                    {1e3 * ms:8.1f} us", flush=True)
    want = a.out.copy_to_host().astype(np.float32)
    group = shape.heads // shape.kv_heads
    runs = warps // heads
    parts = -(-shape.context // partition)
    grid = (shape.kv_heads // heads, shape.seqs, parts)
    n = int(np.prod(grid)) * warps
    id_words = -(-(partition // runs // shape.block_size) // 4) * 4
    walk_shared = 4 * warps * (id_words + attention_v6.SWAP + attention_v6.POSTED)
    end_shared = attention_v6.shared_bytes(
        group, shape.head_dim, shape.block_size, partition // runs, warps, heads, True
    )  # (padded: a few words more than unpadded needs)
    stamps = cuda.device_array((n, 6), np.uint64)
    sink = cuda.device_array(n * WARP, np.float32)
    query, keys, values = attention_v6.words(a)
    args = (stamps, sink, a.out, *a.workspace(partition), query, keys, values, a.block_tables,
            a.seq_lens, a.scale, partition)  # fmt: skip
    at = np.arange(n)
    starts = (at // warps // grid[0] % parts) * partition + (at % warps) // heads * (
        partition // runs
    )  # fmt: skip
    ran = starts < a.host_seq_lens[at // warps // grid[0] // parts]
    for kind in kinds:
        kernel = stamped_kernel(group, shape.head_dim, shape.block_size, warps, heads, kind)
        shared = end_shared if kind.startswith("v6+end") else walk_shared
        attention_v5.allow_shared(kernel, args, shared)
        a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))

        def launch(k=kernel, shared=shared) -> None:
            k[grid, warps * WARP, 0, shared](*args)

        ms = gpu.time_ms(launch, timing)
        same = ""
        if kind.startswith("v6+end"):
            diff = float(np.max(np.abs(a.out.copy_to_host().astype(np.float32) - want)))
            same = f" (|diff| from launch_v6's output {diff:.1e})"
        print(f"  {kind:28s} {1e3 * ms:8.1f} us{same}", flush=True)
        for compiled in kernel.overloads.values():
            print(f"    {compiled.regs_per_thread} registers, "
                  f"{compiled.local_mem_per_thread} bytes of local memory a thread")  # fmt: skip
        launch()
        cuda.synchronize()
        report(stamps.copy_to_host(), warps, ran)


def main() -> None:
    timing = gpu.Timing(0, 1, 1) if config.ENABLE_CUDASIM else gpu.Timing()
    print(gpu.device_name(), flush=True)
    kinds = KINDS
    batches = []
    for arg in sys.argv[1:]:
        if arg.startswith("--kinds="):
            kinds = tuple(arg.partition("=")[2].split(","))
        else:
            batches.append(arg)
    shapes = [gpu.batch_shape(name) for name in batches or ["64x4096/8"]]
    if config.ENABLE_CUDASIM:  # one tiny batch, 4 query heads a kv head
        shapes = [gpu.AttentionShape(2, 64, 8, 2, 64)]
    for shape in shapes:
        probe(shape, timing, kinds)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
