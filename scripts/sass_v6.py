"""Version 6's machine code for some batches, to compare what the compiler made of each:

    python3 scripts/sass_v6.py DIR [batch[@PARTITION/WARPS/HEADS] ...]

``batch``: ``SEQSxCONTEXT/KV`` or ``SEQSxCONTEXT/HEADS:KV`` (``minipaged.bench.gpu.batch_shape``),
at ``choose_launch``'s launch or the one named after ``@``, with all of ``make_walk``'s tuning
choices, as ``launch_v6`` makes it. For each, writes the kernel's SASS (``nvdisasm``'s, through
Numba) to ``DIR/<batch>.sass`` and prints its registers and local memory a thread, its
instructions in all and those of the walk's loop (the longest that holds tensor-core products,
``HMMA``: from a branch backwards to its target), by opcode. Needs a GPU and ``nvdisasm`` on
the path.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import numpy as np

from minipaged.bench import gpu
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


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in sys.argv[2:] or ["64x4096/8", "64x4096/8:8"]:
        name, _, launch = item.partition("@")
        shape = gpu.batch_shape(name)
        a = gpu.attention_inputs(gpu.AttentionShape(2, 64, shape.heads, shape.kv_heads), seed=1)
        pick = attention_v6.choose_launch(
            shape.seqs, shape.kv_heads, shape.context, shape.block_size
        )
        partition, warps, heads = (int(x) for x in launch.split("/")) if launch else pick
        attention_v6.launch_v6(a, partition, warps, heads)  # compiles the kernel for the launch
        kernel = attention_v6.make_kernel(
            shape.heads // shape.kv_heads, shape.head_dim, shape.block_size, warps, 0, "", heads,
            tuple(sorted(attention_v6.TUNING)),
        )  # fmt: skip
        ((sig, compiled),) = kernel.overloads.items()
        sass = kernel.inspect_sass(sig)
        path = out_dir / (item.replace("/", "_").replace(":", "-").replace("@", "_at_") + ".sass")
        path.write_text(sass)
        code = instructions(sass)
        loop = walk_loop(code)
        print(f"{item}: launch {(partition, warps, heads)}, {compiled.regs_per_thread} registers, "
              f"{compiled.local_mem_per_thread} bytes of local memory a thread; "
              f"{sum(1 for _, o, _ in code if not o.startswith('LABEL '))} instructions, "
              f"the walk's loop {len(loop)}", flush=True)  # fmt: skip
        counts = collections.Counter(op.split(".")[0] for op in loop)
        print("  loop: " + ", ".join(f"{op} {n}" for op, n in counts.most_common()), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
