"""Version 6's launches and tuning choices against its default launch, beside SDPA, on the
batches where the goal is SDPA's speed.

    python3 scripts/tune_choices_v6.py [--choices=a,b+c,...] [--rounds=N] [batch ...]

``batch``: ``SEQSxCONTEXT/KV`` such as ``64x4096/8`` (32 query heads), or
``SEQSxCONTEXT/HEADS:KV`` such as ``64x4096/8:8`` (default: 64 x 4096 with 8 kv heads and with
32, and 32 x 8192 with 8). ``--choices``: the variants (default: none, only SDPA and the
default launch), each one or more items joined by ``+``: tuning choices of
``attention_v6.CHOICES`` (added to the default ones, ``attention_v6.TUNING``), and at most one
launch ``PARTITION/WARPS/HEADS`` instead of ``choose_launch``'s (where it has several
partitions a sequence, the merge kernel that follows is also timed alone). Each variant's
output is compared with the default launch's. ``--rounds``: time SDPA, the default and the
variants that many times in turn (default 2), since two launches timed minutes apart on the
same GPU can differ by 1%: the median of each round is printed, then each variant's time
against the default's, round by round. Also prints each kernel's registers and local memory a
thread (local memory: the registers spilled). In Numba's CUDA simulator it runs once, on a tiny
batch, as a check.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from minipaged.bench import gpu
from minipaged.kernels import attention_v5, attention_v6


def run(shape: gpu.AttentionShape, variants: list[tuple[str, ...]], rounds: int,
        timing: gpu.Timing) -> None:  # fmt: skip
    """One batch: SDPA, the default launch and each variant, ``rounds`` times in turn."""
    print(f"{shape.seqs} x {shape.context}, {shape.heads}/{shape.kv_heads}", flush=True)
    pick = attention_v6.choose_launch(shape.seqs, shape.kv_heads, shape.context, shape.block_size)
    print(f"  launch: {pick}")
    a = gpu.attention_inputs(shape, seed=5)
    attention_v6.launch_v6(a)
    print(f"  default: {_registers(shape, attention_v6.TUNING, pick)}")
    want = a.out.copy_to_host().astype(np.float32)
    names = ["default"]
    launches = [lambda: attention_v6.launch_v6(a)]
    for items in variants:
        launch = [int(x) for i in items if "/" in i for x in i.split("/")] or [None, 1, 1]
        tuning = tuple(sorted({*attention_v6.TUNING, *(i for i in items if "/" not in i)}))
        a.out.copy_to_device(np.full(a.out.shape, np.nan, a.out.dtype))
        attention_v6.launch_v6(a, *launch, tuning=tuning)
        diff = float(np.max(np.abs(a.out.copy_to_host().astype(np.float32) - want)))
        registers = _registers(shape, tuning, launch if launch[0] else pick)
        print(f"  {'+'.join(items):24s} |diff| from the default's {diff:.1e}; {registers}",
              flush=True)  # fmt: skip
        names.append("+".join(items))
        launches.append(lambda t=tuning, n=launch: attention_v6.launch_v6(a, *n, tuning=t))
        if launch[0] and launch[0] < shape.context:  # the merge kernel alone, as it follows
            names.append(f"{launch[0]}: merge alone")
            launches.append(lambda n=launch[0]: attention_v5.merge_partitions(
                a, n, attention_v5.MERGE_THREADS))  # fmt: skip
    times = np.zeros((rounds, len(launches)))
    sdpa = np.zeros(rounds)
    for r in range(rounds):
        sdpa[r] = 1e3 * (gpu.sdpa_ms(shape, timing) or 0.0)
        for i, launch in enumerate(launches):
            times[r, i] = 1e3 * gpu.time_ms(launch, timing)
        row = "  ".join(f"{n} {t:.1f}" for n, t in zip(names, times[r], strict=True))
        print(f"  round {r}: SDPA {sdpa[r]:.1f}  {row} us", flush=True)
    for i, name in enumerate(names):
        vs_default = " / ".join(f"{x:+.2%}" for x in times[:, i] / times[:, 0] - 1)
        vs_sdpa = " / ".join(f"{x:.3f}x" for x in sdpa / times[:, i])
        print(f"  {name:24s} against the default {vs_default}; SDPA {vs_sdpa}", flush=True)


def _registers(shape: gpu.AttentionShape, tuning: tuple[str, ...], launch: Sequence[int]) -> str:
    """Registers and local memory a thread of the kernel ``launch_v6`` ran for ``shape`` with
    ``tuning`` (sorted, as ``launch_v6`` passes it) at ``launch``, its ``(partition, warps,
    heads)``."""
    _, warps, heads = launch
    kernel = attention_v6.make_kernel(
        shape.heads // shape.kv_heads, shape.head_dim, shape.block_size, warps, 0, "", heads,
        tuning,
    )  # fmt: skip
    if gpu.SIMULATED:
        return "no registers in the simulator"
    return ", ".join(f"{c.regs_per_thread} registers, {c.local_mem_per_thread} bytes of local "
                     "memory a thread" for c in kernel.overloads.values())  # fmt: skip


def main() -> None:
    variants = []
    rounds = 2
    batches = []
    for arg in sys.argv[1:]:
        if arg.startswith("--choices="):
            variants = [tuple(v.split("+")) for v in arg.partition("=")[2].split(",") if v]
        elif arg.startswith("--rounds="):
            rounds = int(arg.partition("=")[2])
        else:
            batches.append(arg)
    unknown = {c for v in variants for c in v if "/" not in c} - set(attention_v6.CHOICES)
    if unknown:
        sys.exit(f"unknown choices {sorted(unknown)}; known: {attention_v6.CHOICES}")
    timing = gpu.Timing(0, 1, 1) if gpu.SIMULATED else gpu.Timing()  # the simulator: a check
    print(gpu.device_name(), flush=True)
    shapes = [gpu.batch_shape(n) for n in batches or ["64x4096/8", "32x8192/8", "64x4096/32"]]
    if gpu.SIMULATED:  # one tiny batch of 4 query heads a kv head, two tiles a sequence
        shapes, rounds = [gpu.AttentionShape(2, 32, 8, 2, 64)], 1
    for shape in shapes:
        run(shape, variants, rounds, timing)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
