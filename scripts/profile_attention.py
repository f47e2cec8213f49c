"""One decode batch through paged attention versions 2 to 8 and SDPA, for a profiler:

    ncu --section SpeedOfLight python3 scripts/profile_attention.py \
        [SEQS CONTEXT HEADS KV_HEADS [WHICH]]

Runs each of ``WHICH`` twice (the first launch compiles), then stops: a comma-separated list of
``v2``, ``v3``, ``v4``, ``v5`` (as ``paged_attention`` picks its launch), ``v6``
(``choose_launch``'s pick, with all of ``make_walk``'s tuning choices; ``v6+lazy``,
``v6+unmasked+lockstep`` and so on with only those, ``v6+`` with none), ``v7`` (partitions
of 4096 tokens, blocks of 8 warps over 4 kv heads, 3 stages: version 6's pick at 64 x 4096,
32/8; compute capability 9.0 only), ``v8`` (``choose_launch``'s pick) and ``sdpa``
(PyTorch's ``scaled_dot_product_attention`` on a contiguous cache of the same shape); all but
``v7`` by default. The other defaults are the issue's 64 x 4096, 32 query heads over 8 kv
heads, float16, head_dim 128, block 16.
"""

from __future__ import annotations

import sys
from pathlib import Path

from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import (  # noqa: E402
    attention,
    attention_v3,
    attention_v4,
    attention_v5,
    attention_v6,
    attention_v7,
    attention_v8,
)

RUNS = {
    "v2": attention.launch_v2,
    "v3": attention_v3.launch_v3,
    "v4": attention_v4.launch_v4,
    "v5": attention_v5.launch_chosen,
    "v6": attention_v6.launch_v6,
    "v7": lambda a: attention_v7.launch_v7(a, 4096, 8, 4, 3),
    "v8": attention_v8.launch_v8,
}

args = sys.argv[1:]
seqs, context, heads, kv_heads = (int(x) for x in (args[:4] or [64, 4096, 32, 8]))
which = args[4].split(",") if len(args) > 4 else [*(n for n in RUNS if n != "v7"), "sdpa"]
shape = gpu.AttentionShape(seqs, context, heads, kv_heads)
a = gpu.attention_inputs(shape, seed=1)
for _ in range(2):
    for name in which:
        if name == "sdpa":
            gpu.sdpa_ms(shape, gpu.Timing(0, 1, 1))  # one launch, as the others: ncu's -c counts
        elif name.startswith("v6+"):
            attention_v6.launch_v6(a, tuning=tuple(x for x in name.split("+")[1:] if x))
        else:
            RUNS[name](a)
cuda.synchronize()
print("done")
