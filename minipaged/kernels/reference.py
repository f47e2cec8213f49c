"""NumPy references for every kernel: the same contract, written the obvious way.

Each CUDA kernel in ``cache_ops.py`` and ``attention.py`` has its twin here; the tests run both on
the same inputs and compare. The references do no validation (the kernels' host wrappers do) and
compute in float64, so they are the yardstick the float32-accumulating kernels are measured
against. ``paged_attention_partitions_ref`` and ``reduce_partitions_ref`` spell out the math of the
split-context (v2) kernel: per-partition softmax statistics and the rescaling that merges them.
"""

from __future__ import annotations

import numpy as np


def gather_kv(cache: np.ndarray, block_table: np.ndarray, seq_len: int) -> np.ndarray:
    """The ``[seq_len, num_kv_heads, head_dim]`` keys (or values) of one sequence, in token order.

    Token ``t`` lives in physical block ``block_table[t // block_size]`` at row
    ``t % block_size``: taking the sequence's blocks in table order and flattening
    ``[blocks, block_size]`` into one token axis puts every token back in place.
    """
    block_size = cache.shape[1]
    num_used = -(-seq_len // block_size)
    blocks = cache[np.asarray(block_table[:num_used], dtype=np.int64)]
    return blocks.reshape(num_used * block_size, *cache.shape[2:])[:seq_len]


def reshape_and_cache_ref(
    key: np.ndarray,
    value: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    slot_mapping: np.ndarray,
) -> None:
    """Write token ``i``'s K and V (``[num_kv_heads, head_dim]``) into slot ``slot_mapping[i]``,
    i.e. block ``slot // block_size``, row ``slot % block_size``; negative slots are skipped."""
    block_size = key_cache.shape[1]
    for i, slot in enumerate(np.asarray(slot_mapping).tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[i]
        value_cache[slot // block_size, slot % block_size] = value[i]


def paged_attention_ref(
    query: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Decode attention, one query token per sequence, computed in float64.

    ``out[s, h] = softmax(scale * K_s q[s, h]) V_s`` where ``K_s``, ``V_s`` are sequence ``s``'s
    keys and values of kv head ``h // (num_heads // num_kv_heads)`` (grouped-query attention).
    Returned in ``query.dtype``.
    """
    num_seqs, num_heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    out = np.empty((num_seqs, num_heads, head_dim), dtype=np.float64)
    for s in range(num_seqs):
        length = int(seq_lens[s])
        k = gather_kv(key_cache, block_tables[s], length).astype(np.float64)  # [len, kv, dim]
        v = gather_kv(value_cache, block_tables[s], length).astype(np.float64)
        # query heads grouped by the kv head they read: q[kv, g] is head kv * group + g
        q = query[s].astype(np.float64).reshape(kv_heads, num_heads // kv_heads, head_dim)
        logits = np.einsum("kgd,tkd->kgt", q, k) * scale
        p = np.exp(logits - logits.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        out[s] = np.einsum("kgt,tkd->kgd", p, v).reshape(num_heads, head_dim)
    return out.astype(query.dtype)


def paged_attention_partitions_ref(
    query: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    scale: float,
    partition_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First phase of v2: attention of each query over each partition of ``partition_size``
    tokens on its own.

    Returns ``(partial_out, max_logits, exp_sums)`` with shapes ``[seqs, heads, parts, head_dim]``,
    ``[seqs, heads, parts]`` and ``[seqs, heads, parts]`` (float64), where for partition ``p``:
    ``max_logits = m_p = max logit``, ``exp_sums = l_p = sum exp(logit - m_p)`` and
    ``partial_out = sum exp(logit - m_p) v / l_p`` (a softmax over the partition alone).
    Partitions past a sequence's end are left as NaN: nothing may read them.
    """
    num_seqs, num_heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    parts = -(-int(np.max(seq_lens)) // partition_size)
    partial = np.full((num_seqs, num_heads, parts, head_dim), np.nan)
    max_logits = np.full((num_seqs, num_heads, parts), np.nan)
    exp_sums = np.full((num_seqs, num_heads, parts), np.nan)
    for s in range(num_seqs):
        length = int(seq_lens[s])
        k = gather_kv(key_cache, block_tables[s], length).astype(np.float64)
        v = gather_kv(value_cache, block_tables[s], length).astype(np.float64)
        q = query[s].astype(np.float64).reshape(kv_heads, num_heads // kv_heads, head_dim)
        logits = (np.einsum("kgd,tkd->kgt", q, k) * scale).reshape(num_heads, length)
        for p, start in enumerate(range(0, length, partition_size)):
            chunk = logits[:, start : start + partition_size]  # [heads, tokens]
            m = chunk.max(axis=1)
            e = np.exp(chunk - m[:, None]).reshape(kv_heads, -1, chunk.shape[1])
            weighted = np.einsum("kgt,tkd->kgd", e, v[start : start + partition_size])
            max_logits[s, :, p] = m
            exp_sums[s, :, p] = e.sum(axis=2).ravel()
            partial[s, :, p] = weighted.reshape(num_heads, head_dim) / exp_sums[s, :, p, None]
    return partial, max_logits, exp_sums


def reduce_partitions_ref(
    partial_out: np.ndarray,
    max_logits: np.ndarray,
    exp_sums: np.ndarray,
    seq_lens: np.ndarray,
    partition_size: int,
) -> np.ndarray:
    """Second phase of v2: merge the partitions of each sequence into one softmax.

    With ``M = max_p m_p``, partition ``p`` carries weight ``w_p = l_p * exp(m_p - M)`` (its sum
    of exponentials, rescaled to the common maximum), and
    ``out = sum_p w_p * partial_out_p / sum_p w_p``. Returned as float64.
    """
    num_seqs, num_heads, _, head_dim = partial_out.shape
    out = np.empty((num_seqs, num_heads, head_dim))
    for s in range(num_seqs):
        parts = -(-int(seq_lens[s]) // partition_size)
        m = max_logits[s, :, :parts]
        w = exp_sums[s, :, :parts] * np.exp(m - m.max(axis=1, keepdims=True))
        out[s] = np.einsum("hp,hpd->hd", w, partial_out[s, :, :parts]) / w.sum(axis=1)[:, None]
    return out


def copy_blocks_ref(
    key_caches: list[np.ndarray], value_caches: list[np.ndarray], block_mapping: np.ndarray
) -> None:
    """For every layer and every ``(src, dst)`` pair, copy block ``src`` over block ``dst``."""
    for src, dst in np.asarray(block_mapping).reshape(-1, 2).tolist():
        for cache in (*key_caches, *value_caches):
            cache[dst] = cache[src]


def swap_blocks_ref(src: np.ndarray, dst: np.ndarray, block_mapping: np.ndarray) -> None:
    """For every ``(s, d)`` pair, copy block ``s`` of ``src`` over block ``d`` of ``dst``."""
    for s, d in np.asarray(block_mapping).reshape(-1, 2).tolist():
        dst[d] = src[s]


def layout_diagram(block_table: list[int], seq_len: int, block_size: int) -> str:
    """A text picture of where one sequence's tokens live in the paged KV cache.

    Shows the logical -> physical block map and the physical blocks row by row, with each row's
    slot number (``block * block_size + row``, what ``slot_mapping`` holds).
    """
    num_used = -(-seq_len // block_size)
    lines = [
        f"block_size = {block_size}, seq_len = {seq_len}, "
        f"block_table = {list(block_table[:num_used])}",
        "logical block -> physical block",
    ]
    for i in range(num_used):
        first, last = i * block_size, min((i + 1) * block_size, seq_len) - 1
        lines.append(f"  {i:3d} (tokens {first}..{last}) -> {block_table[i]}")
    lines.append("physical blocks of key_cache / value_cache, one cell per row (token):")
    top_slot = (max(block_table[:num_used]) + 1) * block_size - 1
    cell = max(len(f"t{seq_len - 1}"), len(f"s{top_slot}"))
    for i, block in sorted(enumerate(block_table[:num_used]), key=lambda item: item[1]):
        tokens = [i * block_size + r for r in range(block_size)]
        names = [f"t{t}" if t < seq_len else "--" for t in tokens]
        slots = [f"s{block * block_size + r}" for r in range(block_size)]
        head = f"  block {block:3d} tokens"
        lines.append(head + " | " + " | ".join(n.ljust(cell) for n in names) + " |")
        lines.append(
            "slots".rjust(len(head)) + " | " + " | ".join(s.ljust(cell) for s in slots) + " |"
        )
    return "\n".join(lines)
