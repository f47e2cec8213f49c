"""A toy decoder layer run two ways: over a contiguous KV cache, and over the paged KV cache.

Why it exists: the block manager and the kernels are each tested alone, but the claim that
matters is end to end: a model decoding through block tables, copy-on-write and swapping computes
exactly what it would compute with each sequence's keys and values in one contiguous array.

The model is one decoder layer with random (seeded) weights, in NumPy::

    x      = embed[token] + pos_embed[position]
    q,k,v  = x @ wq, x @ wk, x @ wv       num_heads query heads, num_kv_heads key/value heads
    a      = attention(q, keys and values of positions 0..position)
    logits = (x + a @ wo) @ w_head

With a single layer a token's K and V depend only on the token and its position, never on the
other tokens. So a prompt needs no causal attention over itself: its K/V are written to the cache
in one go, and only its last token attends, to give the logits that pick the first new token.
Query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (grouped-query attention).

Two runners share the model and differ only in where K/V live:

- :class:`ContiguousRunner` keeps one growing ``[tokens, kv_heads, head_dim]`` array per sequence
  and attends densely over it in float64: the obvious, slow, trusted version;
- :class:`PagedRunner` keeps one GPU cache ``[num_blocks, block_size, kv_heads, head_dim]``
  shared by all sequences (Numba device arrays, never copied back) and a CPU cache of the same
  block shape (pinned host memory). A :class:`~minipaged.block_manager.BlockManager` decides which
  block holds which tokens, and the kernels move the data: ``reshape_and_cache`` writes new K/V,
  ``copy_blocks`` does copy-on-write, ``swap_blocks`` moves blocks to the CPU and back, and
  ``paged_attention`` reads the cache through the block tables.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numba import cuda

from minipaged.block_manager import BlockManager
from minipaged.errors import (
    DuplicateSequence,
    InvalidRequest,
    UnknownSequence,
)
from minipaged.kernels import copy_blocks, paged_attention, reshape_and_cache, swap_blocks

CACHE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass(frozen=True)
class ToyConfig:
    """The toy layer's sizes. ``num_heads`` must be a multiple of ``num_kv_heads``."""

    vocab_size: int = 64
    hidden_size: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_positions: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be an int >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidRequest(
                f"num_heads = {self.num_heads} is not a multiple of "
                f"num_kv_heads = {self.num_kv_heads}"
            )


class ToyDecoder:
    """One decoder layer with random float32 weights drawn from ``config.seed``: the same seed
    gives the same model, so two runners built on equal configs compute the same function."""

    def __init__(self, config: ToyConfig | None = None) -> None:
        self.config = c = config or ToyConfig()
        rng = np.random.default_rng(c.seed)

        def weight(rows: int, cols: int) -> np.ndarray:  # unit-variance outputs for unit inputs
            return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

        self.embed = rng.standard_normal((c.vocab_size, c.hidden_size)).astype(np.float32)
        self.pos_embed = rng.standard_normal((c.max_positions, c.hidden_size)).astype(np.float32)
        self.wq = weight(c.hidden_size, c.num_heads * c.head_dim)
        self.wk = weight(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.wv = weight(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.wo = weight(c.num_heads * c.head_dim, c.hidden_size)
        self.w_head = weight(c.hidden_size, c.vocab_size)
        self.scale = c.head_dim**-0.5

    def check_tokens(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """The tokens as int64, refusing ids outside the vocabulary and positions
        ``start..start + len - 1`` past ``max_positions`` (there is no embedding for them)."""
        toks = np.asarray(tokens)
        if toks.ndim != 1 or toks.size == 0 or toks.dtype.kind not in "iu":
            raise InvalidRequest(f"tokens must be a non-empty 1-d sequence of ints, got {tokens!r}")
        bad = toks[(toks < 0) | (toks >= self.config.vocab_size)]
        if bad.size:
            raise InvalidRequest(
                f"token {int(bad[0])} is outside the vocabulary of {self.config.vocab_size}"
            )
        if start + len(toks) > self.config.max_positions:
            raise InvalidRequest(
                f"position {start + len(toks) - 1} is past max_positions = "
                f"{self.config.max_positions}"
            )
        return toks.astype(np.int64)

    def project(
        self, tokens: np.ndarray, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x, q, k, v)`` of ``n`` tokens: ``x [n, hidden]``, ``q [n, num_heads, head_dim]``,
        ``k`` and ``v [n, num_kv_heads, head_dim]``, all float32."""
        c = self.config
        x = self.embed[tokens] + self.pos_embed[positions]
        n = len(tokens)
        q = (x @ self.wq).reshape(n, c.num_heads, c.head_dim)
        k = (x @ self.wk).reshape(n, c.num_kv_heads, c.head_dim)
        v = (x @ self.wv).reshape(n, c.num_kv_heads, c.head_dim)
        return x, q, k, v

    def logits(self, x: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """``[n, vocab]`` float32 logits from the inputs ``x`` and the attention outputs ``attn
        [n, num_heads, head_dim]``: output projection, residual, then the head."""
        a = attn.astype(np.float32).reshape(len(x), -1)
        return (x + a @ self.wo) @ self.w_head


def _check_cache_dtype(dtype: object) -> np.dtype:
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        dt = None
    if dt not in CACHE_DTYPES:
        raise InvalidRequest(f"cache_dtype must be float16 or float32, got {dtype!r}")
    return dt


class ContiguousRunner:
    """The reference: each sequence's K/V in one contiguous array, dense attention in float64.

    K, V and the query are rounded to ``cache_dtype`` exactly as the paged runner rounds them, so
    the two runners see the same numbers and differ only by the kernel's float32 arithmetic."""

    def __init__(self, model: ToyDecoder, cache_dtype: object = np.float32) -> None:
        self.model = model
        self.cache_dtype = _check_cache_dtype(cache_dtype)
        self.keys: dict[Hashable, np.ndarray] = {}  # [tokens, kv_heads, head_dim] per sequence
        self.values: dict[Hashable, np.ndarray] = {}

    def _cache(self, seq_id: Hashable) -> np.ndarray:
        if seq_id not in self.keys:
            raise UnknownSequence(f"unknown sequence {seq_id!r}")
        return self.keys[seq_id]

    def _run(self, seq_id: Hashable, tokens: Sequence[int]) -> np.ndarray:
        """Append the tokens' K/V to the sequence and return the last token's logits."""
        start = len(self.keys[seq_id])
        toks = self.model.check_tokens(tokens, start)
        positions = np.arange(start, start + len(toks))
        x, q, k, v = self.model.project(toks, positions)
        self.keys[seq_id] = np.concatenate([self.keys[seq_id], k.astype(self.cache_dtype)])
        self.values[seq_id] = np.concatenate([self.values[seq_id], v.astype(self.cache_dtype)])
        keys = self.keys[seq_id].astype(np.float64)  # [t, kv, d]
        values = self.values[seq_id].astype(np.float64)
        group = self.model.config.num_heads // self.model.config.num_kv_heads
        query = q[-1].astype(self.cache_dtype).astype(np.float64)  # [heads, d]
        scores = np.einsum("hd,thd->ht", query, np.repeat(keys, group, axis=1)) * self.model.scale
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        attn = np.einsum("ht,thd->hd", p, np.repeat(values, group, axis=1))
        return self.model.logits(x[-1:], attn[None])[0]

    def prefill(self, seq_id: Hashable, prompt: Sequence[int]) -> np.ndarray:
        """Start a sequence from its prompt; returns the logits after the prompt ``[vocab]``."""
        if seq_id in self.keys:
            raise DuplicateSequence(f"sequence {seq_id!r} already exists")
        self.model.check_tokens(prompt, 0)
        c = self.model.config
        self.keys[seq_id] = np.empty((0, c.num_kv_heads, c.head_dim), self.cache_dtype)
        self.values[seq_id] = self.keys[seq_id].copy()
        return self._run(seq_id, prompt)

    def decode(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, np.ndarray]:
        """One step: feed each sequence its next token; returns each one's next logits."""
        for seq_id, token in tokens.items():
            self.model.check_tokens([token], len(self._cache(seq_id)))
        return {seq_id: self._run(seq_id, [token]) for seq_id, token in tokens.items()}

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child starts with a copy of the parent's whole history."""
        self._cache(parent_id)
        if child_id in self.keys:
            raise DuplicateSequence(f"sequence {child_id!r} already exists")
        self.keys[child_id] = self.keys[parent_id].copy()
        self.values[child_id] = self.values[parent_id].copy()

    def free(self, seq_id: Hashable) -> None:
        self._cache(seq_id)
        del self.keys[seq_id], self.values[seq_id]


class PagedRunner:
    """The same layer over a paged KV cache, driven by a :class:`BlockManager` and the kernels.

    The caches start full of NaN: a slot that attention reads but nobody wrote (a copy-on-write
    that did not happen, a block swapped back to the wrong place) turns the logits into NaN
    instead of quietly into other numbers. ``threads`` goes to every kernel launch (None: the
    wrappers' defaults; attention needs a power of two >= head_dim)."""

    def __init__(
        self,
        model: ToyDecoder,
        num_gpu_blocks: int,
        block_size: int,
        num_cpu_blocks: int = 0,
        cache_dtype: object = np.float32,
        threads: int | None = None,
    ) -> None:
        self.model = model
        dtype = _check_cache_dtype(cache_dtype)
        self.manager = BlockManager(num_gpu_blocks, block_size, num_cpu_blocks, watermark=0.0)
        c = model.config
        block = (block_size, c.num_kv_heads, c.head_dim)
        self.key_cache = cuda.to_device(np.full((num_gpu_blocks, *block), np.nan, dtype))
        self.value_cache = cuda.to_device(np.full((num_gpu_blocks, *block), np.nan, dtype))
        self.cpu_key_cache = cuda.pinned_array((max(1, num_cpu_blocks), *block), dtype)
        self.cpu_value_cache = cuda.pinned_array((max(1, num_cpu_blocks), *block), dtype)
        self.cpu_key_cache[...] = np.nan
        self.cpu_value_cache[...] = np.nan
        self.threads = threads
        self.cow_copies = 0  # blocks copied on write so far (to see that forks really shared)

    def _kw(self) -> dict[str, int]:
        return {} if self.threads is None else {"threads": self.threads}

    def _write_and_attend(
        self, seq_ids: list[Hashable], tokens: list[np.ndarray]
    ) -> dict[Hashable, np.ndarray]:
        """Write the new tokens' K/V into their slots, then let each sequence's last token attend
        over its whole cached history. The sequences' blocks must already hold the new slots."""
        dtype = self.key_cache.dtype
        xs, queries, keys, values, slots = [], [], [], [], []
        for seq_id, toks in zip(seq_ids, tokens, strict=True):
            end = self.manager.num_tokens(seq_id)
            positions = np.arange(end - len(toks), end)
            x, q, k, v = self.model.project(toks, positions)
            xs.append(x[-1])
            queries.append(q[-1])
            keys.append(k)
            values.append(v)
            slots.append(self.manager.slot_mapping(seq_id, positions))
        reshape_and_cache(
            np.concatenate(keys).astype(dtype),
            np.concatenate(values).astype(dtype),
            self.key_cache,
            self.value_cache,
            np.concatenate(slots),
            **self._kw(),
        )
        tables = [self.manager.block_table(s) for s in seq_ids]
        width = max(len(t) for t in tables)
        block_tables = np.array([t + [-1] * (width - len(t)) for t in tables], np.int32)
        seq_lens = np.array([self.manager.num_tokens(s) for s in seq_ids], np.int32)
        attn = paged_attention(
            np.stack(queries).astype(dtype),
            self.key_cache,
            self.value_cache,
            block_tables,
            seq_lens,
            self.model.scale,
            **self._kw(),
        )
        logits = self.model.logits(np.stack(xs), attn)
        return dict(zip(seq_ids, logits, strict=True))

    def prefill(self, seq_id: Hashable, prompt: Sequence[int]) -> np.ndarray:
        """Start a sequence: the manager gives it blocks for the whole prompt, all of the
        prompt's K/V are written in one launch, and its last token attends."""
        toks = self.model.check_tokens(prompt, 0)
        self.manager.allocate(seq_id, toks.tolist())
        return self._write_and_attend([seq_id], [toks])[seq_id]

    def decode(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, np.ndarray]:
        """One decode step for a batch: ``{seq_id: next token}`` -> ``{seq_id: its logits}``.

        Order matters. First every sequence gets a slot (``append_slots_batch``), which may copy a
        shared, partly filled last block on write; those copies run next (``copy_blocks``),
        before any new K/V is written, since the copy overwrites the whole destination block.
        Only then are the new K/V written and attention run. Everything is checked before the
        first append, so a refused step changes nothing."""
        ids = list(tokens)
        if not ids:
            raise InvalidRequest("a decode step needs at least one sequence, got none")
        for seq_id in ids:
            self.model.check_tokens([tokens[seq_id]], self.manager.num_tokens(seq_id))
        pairs = self.manager.append_slots_batch(ids, [tokens[s] for s in ids])  # all or nothing
        if pairs:
            copy_blocks([self.key_cache], [self.value_cache], pairs, **self._kw())
            self.cow_copies += len(pairs)
        toks = [np.array([tokens[s]], np.int64) for s in ids]
        return self._write_and_attend(ids, toks)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares all of the parent's blocks: nothing is copied until one of them
        writes into a shared, partly filled block (see ``decode``)."""
        self.manager.fork(parent_id, child_id)

    def swap_out(self, seq_ids: Hashable | Sequence[Hashable]) -> list[tuple[int, int]]:
        """Move a group of sequences' blocks to the CPU cache; returns the (gpu, cpu) pairs.
        The copy happens at once: the manager counts the GPU blocks free from now on."""
        pairs = self.manager.swap_out(seq_ids)
        swap_blocks(self.key_cache, self.cpu_key_cache, pairs, **self._kw())
        swap_blocks(self.value_cache, self.cpu_value_cache, pairs, **self._kw())
        return pairs

    def swap_in(self, seq_ids: Hashable | Sequence[Hashable]) -> list[tuple[int, int]]:
        """Bring a swapped group back into (usually different) GPU blocks; returns the (cpu,
        gpu) pairs. The block tables change, the tokens' K/V do not."""
        pairs = self.manager.swap_in(seq_ids)
        swap_blocks(self.cpu_key_cache, self.key_cache, pairs, **self._kw())
        swap_blocks(self.cpu_value_cache, self.value_cache, pairs, **self._kw())
        return pairs

    def free(self, seq_id: Hashable) -> None:
        """Give the sequence's blocks back; their stale K/V stays until a block is reused."""
        self.manager.free(seq_id)
