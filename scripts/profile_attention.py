"""One decode batch through paged attention versions 2 to 5, for a profiler:

    ncu --section SpeedOfLight python3 scripts/profile_attention.py [SEQS CONTEXT HEADS KV_HEADS]

Runs each version twice (the first launch compiles), then stops; the defaults are the issue's
64 x 4096, 32 query heads over 8 kv heads, float16, head_dim 128, block 16.
"""

from __future__ import annotations

import sys
from pathlib import Path

from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipaged.bench import gpu  # noqa: E402
from minipaged.kernels import attention, attention_v3, attention_v4, attention_v5  # noqa: E402

seqs, context, heads, kv_heads = (int(x) for x in (sys.argv[1:] or [64, 4096, 32, 8]))
a = gpu.attention_inputs(gpu.AttentionShape(seqs, context, heads, kv_heads), seed=1)
for _ in range(2):
    attention.launch_v2(a)
    attention_v3.launch_v3(a)
    attention_v4.launch_v4(a)
    attention_v5.launch_chosen(a)  # as paged_attention picks its launch
cuda.synchronize()
print("done")
