"""Version 6's machine code for some batches, to compare what the compiler made of each:

    python3 scripts/sass_v6.py [--offline] [--choices=a,b] DIR [batch[@PARTITION/WARPS/HEADS] ...]

``batch``: ``SEQSxCONTEXT/KV`` or ``SEQSxCONTEXT/HEADS:KV`` (``minipaged.bench.gpu.batch_shape``),
at ``choose_launch``'s launch or the one named after ``@``, with all of ``make_walk``'s tuning
choices, as ``launch_v6`` makes it. For each, writes the kernel's SASS (``nvdisasm``'s, through
Numba) to ``DIR/<batch>.sass`` and prints its registers and local memory a thread, its
instructions in all, those of the walk's loop (the longest that holds tensor-core products,
``HMMA``: from a branch backwards to its target), by opcode, and those after it (the end of a
run and the block's combine). ``--choices``: tuning choices of ``attention_v6.CHOICES`` added
to ``TUNING``. Needs a GPU and ``nvdisasm`` on the path, or:

``--offline``: no GPU. The kernel is compiled for an H100 (compute capability 9.0, 132 SMs
for ``choose_launch``) by NVVM, then by ``ptxas`` (a CUDA toolkit's, on the path) and read
back by ``nvdisasm`` (on the path; ``pip install nvidia-cuda-nvdisasm`` puts one under
``site-packages/nvidia/cu13/bin``). Numba asks the GPU for its compute capability while it
compiles device functions, so this mode tells it instead. The registers and spills are
``ptxas``'s. A GPU's driver compiles the same PTX with its own version of that compiler, so
the code may differ a little: with CUDA 13.0's ``ptxas`` the walk's loop had the instructions
an H100 ran (1,157 for 64 x 4096 with 8 query heads over 8 kv heads, 1,171 for 64 over 8),
and the kernels 255 and 251 registers a thread where the H100 gave 255 and 249 (32/8, 8/8).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if "--offline" in sys.argv:
    os.environ["NUMBA_FORCE_CUDA_CC"] = "9.0"  # before Numba reads its configuration

import numpy as np
from numba import cuda, types

from minipaged.bench import gpu
from minipaged.kernels import attention_v5 as v5
from minipaged.kernels import attention_v6

LABEL = re.compile(r"^\.L_x_\d+:")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """``(offset, opcode, line)`` of each instruction, with the labels as opcode ``LABEL``."""
    out = []
    for line in sass.splitlines():
        text = line.strip()
        if LABEL.match(text):
            out.append((-1, "LABEL " + text.rstrip(":"), text))
            continue
        m = INSTRUCTION.search(text)
        if m:
            out.append((int(m.group(1), 16), m.group(3), text))
    return out


def walk_loop(code: list[tuple[int, str, str]]) -> list[str]:
    """The opcodes between a backward branch and its target label, for the longest such that
    holds an ``HMMA`` (a block's combine of its runs is a loop too, and may be longer)."""
    where = {}
    for i, (_, op, _) in enumerate(code):
        if op.startswith("LABEL "):
            where[op[6:]] = i
    best: list[str] = []
    for i, (_, op, line) in enumerate(code):
        if op == "BRA":
            m = re.search(r"\(\.L_x_\d+\)", line)
            target = m and where.get(m.group(0)[1:-1])
            if target is not None and target < i and i - target > len(best):
                loop = [o for _, o, _ in code[target : i + 1] if not o.startswith("LABEL ")]
                if any(o.startswith("HMMA") for o in loop):
                    best = loop
    return best


def after_loop(code: list[tuple[int, str, str]], loop: list[str]) -> list[str]:
    """The opcodes after the walk's loop (``loop``, as ``walk_loop`` found it) to the end."""
    ops = [o for _, o, _ in code if not o.startswith("LABEL ")]
    for i in range(len(ops) - len(loop), -1, -1):
        if ops[i : i + len(loop)] == loop:
            return ops[i + len(loop) :]
    return []


def offline_sass(kernel: Any, sig: tuple[Any, ...]) -> tuple[str, int, int]:
    """``(sass, registers, spilled bytes)`` of ``kernel`` for ``sig``, compiled for compute
    capability 9.0 without a GPU (``--offline``)."""
    from numba.cuda import cuda_paths, dispatcher

    class H100:
        compute_capability = (9, 0)

    dispatcher.get_current_device = H100  # device functions ask the GPU otherwise
    cuda_paths._get_nvrtc_path = lambda: cuda_paths._env_path_tuple("none", None)  # unused
    ptx, _ = cuda.compile_ptx(
        kernel.py_func, sig, cc=(9, 0), launch_bounds=kernel.targetoptions.get("launch_bounds")
    )
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(ptx)
        log = subprocess.run(
            ["ptxas", "-arch=sm_90", "-v", "k.ptx", "-o", "k.cubin"], cwd=tmp, check=True,
            capture_output=True, text=True,
        ).stderr  # fmt: skip
        sass = subprocess.run(
            ["nvdisasm", "-c", "k.cubin"], cwd=tmp, check=True, capture_output=True, text=True
        ).stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    return sass, registers, spilled


def kernel_types() -> tuple[Any, ...]:
    """The Numba types of version 6's kernel arguments (``kernel_args``), as a launch types
    them: float16 query, output and caches."""
    f32, u32 = types.float32, types.uint32
    return (
        types.Array(types.float16, 3, "C"), types.Array(f32, 4, "C"), types.Array(f32, 3, "C"),
        types.Array(f32, 3, "C"), types.Array(u32, 1, "C"), types.Array(u32, 1, "C"),
        types.Array(u32, 1, "C"), types.Array(types.int32, 2, "C"),
        types.Array(types.int32, 1, "C"), f32, types.int64,
    )  # fmt: skip


def main() -> None:
    offline = "--offline" in sys.argv
    choices: tuple[str, ...] = ()
    args = []
    for arg in sys.argv[1:]:
        if arg.startswith("--choices="):
            choices = tuple(c for c in arg.split("=", 1)[1].split(",") if c)
        elif arg != "--offline":
            args.append(arg)
    unknown = set(choices) - set(attention_v6.CHOICES)
    if unknown or not args:
        sys.exit(__doc__ if not args else f"unknown choices {sorted(unknown)}")
    tuning = tuple(sorted({*attention_v6.TUNING, *choices}))
    if offline:
        v5.multiprocessors = lambda: 132  # an H100's, for choose_launch
    out_dir = Path(args[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in args[1:] or ["64x4096/8", "64x4096/8:8"]:
        name, _, launch = item.partition("@")
        shape = gpu.batch_shape(name)
        pick = attention_v6.choose_launch(
            shape.seqs, shape.kv_heads, shape.context, shape.block_size
        )
        partition, warps, heads = (int(x) for x in launch.split("/")) if launch else pick
        kernel = attention_v6.make_kernel(
            shape.heads // shape.kv_heads, shape.head_dim, shape.block_size, warps, 0, "", heads,
            tuning,
        )  # fmt: skip
        if offline:
            sass, registers, spilled = offline_sass(kernel, kernel_types())
        else:
            a = gpu.attention_inputs(gpu.AttentionShape(2, 64, shape.heads, shape.kv_heads), 1)
            attention_v6.launch_v6(a, partition, warps, heads, tuning=tuning)  # compiles it
            ((sig, compiled),) = kernel.overloads.items()
            sass = kernel.inspect_sass(sig)
            registers, spilled = compiled.regs_per_thread, compiled.local_mem_per_thread
        path = out_dir / (item.replace("/", "_").replace(":", "-").replace("@", "_at_") + ".sass")
        path.write_text(sass)
        code = instructions(sass)
        loop = walk_loop(code)
        end = after_loop(code, loop)
        print(f"{item}: launch {(partition, warps, heads)}, {registers} registers, "
              f"{spilled} bytes {'spilled' if offline else 'of local memory'} a thread; "
              f"{sum(1 for _, o, _ in code if not o.startswith('LABEL '))} instructions, "
              f"the walk's loop {len(loop)}, after it {len(end)}", flush=True)  # fmt: skip
        for label, ops in (("loop", loop), ("after", end)):
            counts = collections.Counter(op.split(".")[0] for op in ops)
            print(f"  {label}: " + ", ".join(f"{op} {n}" for op, n in counts.most_common()))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
