"""Numba CUDA kernels for a paged KV cache, each beside its NumPy reference (``reference.py``).

Layout (one layer; a model has one such pair per layer)::

    key_cache, value_cache : [num_blocks, block_size, num_kv_heads, head_dim]  float16 | float32
    block_tables           : int32 [num_seqs, max_blocks_per_seq]  physical block of each
                             logical block; entries past a sequence's end are never read
    seq_lens               : int32 [num_seqs]
    slot_mapping           : int64 [num_tokens]  slot = block * block_size + row; < 0 = skip

    sequence s, seq_len = 10, block_size = 4, block_tables[s] = [7, 2, 9, -1]

      tokens   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
      logical  block 0     | block 1     | block 2
                  |              |             |
      physical    v              v             v
      key_cache  [2]: t4 t5 t6 t7    (slots  8..11)
                 [7]: t0 t1 t2 t3    (slots 28..31)
                 [9]: t8 t9 -- --    (slots 36..39, two rows still free)
                 each row: the token's keys, [num_kv_heads, head_dim], contiguous

``reference.layout_diagram(block_table, seq_len, block_size)`` draws this picture for any sequence.

Kernels (host wrappers validate everything before launching; see ``validate.py``):

- ``reshape_and_cache``: new tokens' K/V into their slots;
- ``copy_blocks``: block copies within the cache, all pairs and layers in one launch;
- ``swap_blocks``: block copies between device and (pinned) host caches;
- ``paged_attention`` (dispatching to ``paged_attention_v1``, ``paged_attention_v2``,
  ``paged_attention_v3``, ``paged_attention_v4`` or ``paged_attention_v5``), ``paged_attention_v6``
  (the cache loaded straight into the tensor cores' registers), ``paged_attention_v7`` (the
  cache through shared memory by bulk copies, sm_90) and ``paged_attention_naive``:
  decode attention over the paged cache.
"""

from minipaged.kernels.attention import (
    choose_version,
    paged_attention,
    paged_attention_naive,
    paged_attention_v1,
    paged_attention_v2,
)
from minipaged.kernels.attention_v3 import paged_attention_v3
from minipaged.kernels.attention_v4 import paged_attention_v4
from minipaged.kernels.attention_v5 import paged_attention_v5
from minipaged.kernels.attention_v6 import paged_attention_v6
from minipaged.kernels.attention_v7 import paged_attention_v7
from minipaged.kernels.cache_ops import copy_blocks, reshape_and_cache, swap_blocks

__all__ = [
    "choose_version",
    "copy_blocks",
    "paged_attention",
    "paged_attention_naive",
    "paged_attention_v1",
    "paged_attention_v2",
    "paged_attention_v3",
    "paged_attention_v4",
    "paged_attention_v5",
    "paged_attention_v6",
    "paged_attention_v7",
    "reshape_and_cache",
    "swap_blocks",
]
