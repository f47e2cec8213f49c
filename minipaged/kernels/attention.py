"""Paged decode attention: one new query token per sequence attends to the sequence's cached K/V.

For sequence ``s`` and query head ``h`` (kv head ``h // (num_heads // num_kv_heads)``, which is
grouped-query attention when several query heads share one kv head)::

    logit_t = scale * q . k_t            for t < seq_lens[s], k_t found through block_tables[s]
    p_t     = exp(logit_t - max logit) / sum_t' exp(logit_t' - max logit)
    out     = sum_t p_t v_t

Subtracting the maximum keeps every ``exp`` at most 1 (no overflow) and does not change the
result. Every kernel converts float16 inputs to float32 and accumulates in float32.

Three numbered versions, slow to fast:

0. ``paged_attention_naive``: one thread per output element ``(seq, head, d)``, no shared memory,
   no synchronisation. Each thread recomputes every dot product itself: easy to check, wasteful.
1. ``paged_attention_v1``: one thread block per ``(seq, head)``. The threads share the work: each
   computes the logits of a strided subset of tokens into shared memory, block-wide tree
   reductions in shared memory give the maximum and the sum, then the threads split the weighted
   sum of V by dimension (and by token group) and combine their partial sums. The whole context's
   logits live in shared memory, which bounds the context length (``V1_MAX_CONTEXT``).
2. ``paged_attention_v2``: the context is cut into partitions of ``partition_size`` tokens, and a
   grid ``(head, seq, partition)`` of thread blocks runs v1's body on each partition in parallel,
   keeping for each the partial output (normalised over the partition alone), its maximum logit
   ``m_p`` and its sum of exponentials ``l_p``. A reduction kernel then merges the partitions:
   with ``M = max_p m_p`` partition ``p`` weighs ``w_p = l_p * exp(m_p - M)`` and
   ``out = sum_p w_p out_p / sum_p w_p``.

Version 3, in ``attention_v3.py``, is version 2 rebuilt to read the cache near the memory
bandwidth; ``paged_attention`` uses it for every shape it serves. For the others it picks v1 or
v2 (``choose_version``): v1 is one pass, v2 pays a second kernel and a round trip through global
memory, but it splits each thread's long walk over the context into partitions that run in
parallel, and it has no context-length limit. Measured, v2 wins as soon as a context spans two
partitions.

Reductions use shared memory only (no warp shuffles), so every kernel also runs in Numba's CUDA
simulator; ``cuda.syncthreads()`` is only ever called by all threads of a block together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import config, cuda, float32

from minipaged.errors import InvalidRequest
from minipaged.kernels import validate as v

VEC = 4  # consecutive elements one thread loads per step: VEC independent loads in flight
MAX_HEAD_DIM = 256
MAX_THREADS = 512  # threads per block
SHARED_BYTES = 48 * 1024  # shared memory a block may use without opting in
# Shared memory of v1/v2, in float32s: q [head_dim] | red [threads * VEC] | logits [tokens].
# v1 keeps a whole context's logits there, so with the largest head_dim and thread count a
# context of up to 9,984 tokens always fits; v2 needs room for one partition only.
V1_MAX_CONTEXT = SHARED_BYTES // 4 - MAX_HEAD_DIM - MAX_THREADS * VEC
PARTITION_SIZE = 512  # tokens per v2 partition
THREADS = 32 if config.ENABLE_CUDASIM else 128  # default threads per block (at least head_dim)
NEG_INF = np.float32(-np.inf)


# --- shared building blocks (device functions) ---------------------------------------------------


@cuda.jit(device=True)
def _block_max(red, value):
    """Maximum of ``value`` over the thread block (blockDim.x a power of two), via a tree in
    shared memory; every thread gets the result."""
    tid = cuda.threadIdx.x
    red[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            red[tid] = max(red[tid], red[tid + stride])
        cuda.syncthreads()
        stride //= 2
    result = red[0]
    cuda.syncthreads()  # all have read red[0] before anyone reuses red
    return result


@cuda.jit(device=True)
def _block_sum(red, value):
    """Sum of ``value`` over the thread block, like ``_block_max``."""
    tid = cuda.threadIdx.x
    red[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            red[tid] += red[tid + stride]
        cuda.syncthreads()
        stride //= 2
    result = red[0]
    cuda.syncthreads()
    return result


@cuda.jit(device=True)
def _softmax_numerators(q, logits, red, key_cache, table, kv_head, start, end):
    """For the tokens ``start <= t < end`` of one sequence (block table row ``table``), set
    ``logits[t - start] = exp(q . k_t - m)`` with ``m`` the largest ``q . k_t``; return
    ``(m, sum of those exponentials)``. ``q`` (shared) already holds ``scale * query``.
    Thread ``i`` handles tokens ``start + i``, ``start + i + blockDim.x``, ...; the inner loop of
    constant length VEC is unrolled by the compiler, so VEC loads of a K row are in flight at
    once instead of one (head_dim is a multiple of VEC)."""
    tid = cuda.threadIdx.x
    block_size = key_cache.shape[1]
    head_dim = key_cache.shape[3]
    local_max = NEG_INF
    for t in range(start + tid, end, cuda.blockDim.x):
        block = table[t // block_size]
        row = t % block_size
        dot = float32(0.0)
        for d0 in range(0, head_dim, VEC):
            for j in range(VEC):
                dot += q[d0 + j] * float32(key_cache[block, row, kv_head, d0 + j])
        logits[t - start] = dot
        local_max = max(local_max, dot)
    m = _block_max(red, local_max)
    local_sum = float32(0.0)
    for t in range(start + tid, end, cuda.blockDim.x):
        e = math.exp(logits[t - start] - m)
        logits[t - start] = e
        local_sum += e
    total = _block_sum(red, local_sum)  # its barriers also publish every thread's logits
    return m, total


@cuda.jit(device=True)
def _weighted_values(logits, red, value_cache, table, kv_head, start, end):
    """``sum_t logits[t - start] * v_t[d]`` over ``start <= t < end`` for ``d = threadIdx.x``
    (meaningful for threads below head_dim; needs blockDim.x >= head_dim).

    ``lanes = head_dim // VEC`` neighbouring threads cover one V row, VEC elements each, so a
    warp reads contiguous memory. The block holds ``groups = blockDim.x // lanes`` such teams;
    team ``g`` sums tokens ``start + g``, ``start + g + groups``, ... Every thread's loop is a
    chain of dependent steps (find the block, then load), so its length, ``len / groups``, and
    the VEC loads per step decide the speed. The teams' partial sums meet in ``red``."""
    tid = cuda.threadIdx.x
    block_size = value_cache.shape[1]
    head_dim = value_cache.shape[3]
    lanes = head_dim // VEC
    groups = cuda.blockDim.x // lanes
    group = tid // lanes
    d0 = (tid % lanes) * VEC
    acc = cuda.local.array(VEC, float32)
    for j in range(VEC):
        acc[j] = float32(0.0)
    if group < groups:
        for t in range(start + group, end, groups):
            block = table[t // block_size]
            p = logits[t - start]
            for j in range(VEC):
                acc[j] += p * float32(value_cache[block, t % block_size, kv_head, d0 + j])
        for j in range(VEC):
            red[group * head_dim + d0 + j] = acc[j]
    cuda.syncthreads()
    total = float32(0.0)
    if tid < head_dim:
        for g in range(groups):
            total += red[g * head_dim + tid]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _shared_arrays(head_dim):
    """Carve the block's dynamic shared memory (its size is set at launch) into ``q``
    [head_dim], ``red`` [blockDim.x * VEC] and ``logits`` [the rest].

    One dynamic array rather than three static ones: its size follows the launch, and in the
    simulator static shared arrays are created by whichever thread asks first, which two threads
    can both do at once, each getting its own copy."""
    smem = cuda.shared.array(0, float32)
    red_end = head_dim + cuda.blockDim.x * VEC
    return smem[:head_dim], smem[head_dim:red_end], smem[red_end:]


def _shared_bytes(head_dim: int, threads: int, tokens: int) -> int:
    return 4 * (head_dim + threads * VEC + tokens)


# --- 0. naive: one thread per output element -----------------------------------------------------


@cuda.jit
def paged_attention_naive_kernel(out, query, key_cache, value_cache, block_tables, seq_lens, scale):
    """1-D grid over ``num_seqs * num_heads * head_dim`` threads."""
    i = cuda.grid(1)
    num_seqs, num_heads, head_dim = query.shape
    if i >= num_seqs * num_heads * head_dim:
        return
    seq = i // (num_heads * head_dim)
    head = (i // head_dim) % num_heads
    d = i % head_dim
    kv_head = head // (num_heads // key_cache.shape[2])
    block_size = key_cache.shape[1]
    seq_len = seq_lens[seq]
    m = NEG_INF
    for t in range(seq_len):  # pass 1: the largest logit
        block = block_tables[seq, t // block_size]
        dot = float32(0.0)
        for j in range(head_dim):
            dot += float32(query[seq, head, j]) * float32(
                key_cache[block, t % block_size, kv_head, j]
            )
        m = max(m, dot * scale)
    total = float32(0.0)
    acc = float32(0.0)
    for t in range(seq_len):  # pass 2: exponentials, their sum, and the weighted sum of V
        block = block_tables[seq, t // block_size]
        dot = float32(0.0)
        for j in range(head_dim):
            dot += float32(query[seq, head, j]) * float32(
                key_cache[block, t % block_size, kv_head, j]
            )
        e = math.exp(dot * scale - m)
        total += e
        acc += e * float32(value_cache[block, t % block_size, kv_head, d])
    out[seq, head, d] = acc / total


# --- 1. v1: one thread block per (sequence, head) ------------------------------------------------


@cuda.jit
def paged_attention_v1_kernel(out, query, key_cache, value_cache, block_tables, seq_lens, scale):
    """Grid ``(num_heads, num_seqs)``; dynamic shared memory: ``max_seq_len`` float32 logits."""
    head = cuda.blockIdx.x
    seq = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    head_dim = query.shape[2]
    kv_head = head // (query.shape[1] // key_cache.shape[2])
    q, red, logits = _shared_arrays(head_dim)
    for d in range(tid, head_dim, cuda.blockDim.x):
        q[d] = float32(query[seq, head, d]) * scale
    cuda.syncthreads()
    table = block_tables[seq]
    seq_len = seq_lens[seq]
    _, total = _softmax_numerators(q, logits, red, key_cache, table, kv_head, 0, seq_len)
    acc = _weighted_values(logits, red, value_cache, table, kv_head, 0, seq_len)
    if tid < head_dim:
        out[seq, head, tid] = acc / total


# --- 2. v2: partitions in parallel, then a reduction ---------------------------------------------


@cuda.jit
def paged_attention_v2_kernel(
    partial_out,
    max_logits,
    exp_sums,
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    scale,
    partition_size,
):
    """Grid ``(num_heads, num_seqs, max_partitions)``; dynamic shared memory: ``partition_size``
    float32 logits. Writes, for partition p: ``partial_out[seq, head, p]`` (normalised over the
    partition), ``max_logits[seq, head, p]`` and ``exp_sums[seq, head, p]``."""
    head = cuda.blockIdx.x
    seq = cuda.blockIdx.y
    part = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    seq_len = seq_lens[seq]
    start = part * partition_size
    if start >= seq_len:  # past this sequence's end: the whole block leaves together
        return
    end = min(start + partition_size, seq_len)
    head_dim = query.shape[2]
    kv_head = head // (query.shape[1] // key_cache.shape[2])
    q, red, logits = _shared_arrays(head_dim)
    for d in range(tid, head_dim, cuda.blockDim.x):
        q[d] = float32(query[seq, head, d]) * scale
    cuda.syncthreads()
    table = block_tables[seq]
    m, total = _softmax_numerators(q, logits, red, key_cache, table, kv_head, start, end)
    acc = _weighted_values(logits, red, value_cache, table, kv_head, start, end)
    if tid < head_dim:
        partial_out[seq, head, part, tid] = acc / total
    if tid == 0:
        max_logits[seq, head, part] = m
        exp_sums[seq, head, part] = total


@cuda.jit
def paged_attention_v2_reduce_kernel(
    out, partial_out, max_logits, exp_sums, seq_lens, partition_size
):
    """Grid ``(num_heads, num_seqs)``: merge a sequence's partitions. Every thread recomputes the
    global maximum and the weights (a handful of partitions: cheaper than synchronising)."""
    head = cuda.blockIdx.x
    seq = cuda.blockIdx.y
    num_parts = (seq_lens[seq] + partition_size - 1) // partition_size
    m = NEG_INF
    for p in range(num_parts):
        m = max(m, max_logits[seq, head, p])
    total = float32(0.0)
    for p in range(num_parts):
        total += exp_sums[seq, head, p] * math.exp(max_logits[seq, head, p] - m)
    for d in range(cuda.threadIdx.x, out.shape[2], cuda.blockDim.x):
        acc = float32(0.0)
        for p in range(num_parts):
            w = exp_sums[seq, head, p] * math.exp(max_logits[seq, head, p] - m)
            acc += w * partial_out[seq, head, p, d]
        out[seq, head, d] = acc / total


# --- host side -----------------------------------------------------------------------------------


@dataclass
class AttentionArgs:
    """Validated inputs on the device, ready for any version's launch.

    ``out`` is the device output; ``host_out`` the NumPy array to copy it into afterwards (None
    when the caller works on the device); ``host_seq_lens`` the checked lengths on the host,
    from which a version may plan its work once (``plans`` keeps what it planned).
    ``prepare_attention`` makes these; ``launch_*`` reuse them, which is how
    ``scripts/gpu_check.py`` times the kernels without the host-side checks.
    """

    query: Any
    key_cache: Any
    value_cache: Any
    block_tables: Any
    seq_lens: Any
    out: Any
    host_out: np.ndarray | None
    scale: np.float32
    threads: int
    max_seq_len: int
    host_seq_lens: np.ndarray | None = None
    plans: dict[Any, Any] = field(default_factory=dict, repr=False)
    _workspaces: dict[int, tuple[Any, Any, Any]] = field(default_factory=dict, repr=False)
    _counters: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(num_seqs, num_heads, head_dim)``."""
        return v.shape_of(self.query)  # type: ignore[return-value]

    def workspace(self, partition_size: int) -> tuple[Any, Any, Any]:
        """v2's float32 buffers ``(partial_out, max_logits, exp_sums)`` for partitions of
        ``partition_size`` tokens: ``buffers`` for as many as the longest sequence has."""
        return self.buffers(-(-self.max_seq_len // partition_size))

    def buffers(self, parts: int) -> tuple[Any, Any, Any]:
        """float32 ``partial_out [num_seqs, num_heads, parts, head_dim]``, ``max_logits`` and
        ``exp_sums [num_seqs, num_heads, parts]``, allocated once per number of parts."""
        if parts not in self._workspaces:
            num_seqs, num_heads, head_dim = self.shape
            self._workspaces[parts] = (
                cuda.device_array((num_seqs, num_heads, parts, head_dim), dtype=np.float32),
                cuda.device_array((num_seqs, num_heads, parts), dtype=np.float32),
                cuda.device_array((num_seqs, num_heads, parts), dtype=np.float32),
            )
        return self._workspaces[parts]

    def counters(self, per_seq: int) -> Any:
        """Zeroed int32 ``[num_seqs, per_seq]`` on the device, allocated once: a kernel that
        counts its finished blocks in them (version 5 merging in place) leaves them zero."""
        if per_seq not in self._counters:
            zeros = np.zeros((self.shape[0], per_seq), dtype=np.int32)
            self._counters[per_seq] = cuda.to_device(zeros)
        return self._counters[per_seq]

    def result(self) -> Any:
        """The output in the caller's form: copied into ``host_out`` or left on the device."""
        if self.host_out is None:
            return self.out
        np.copyto(self.host_out, self.out.copy_to_host())
        return self.host_out


def prepare_attention(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    out: Any = None,
    threads: int | None = None,
) -> AttentionArgs:
    """Check every input on the host (see module ``validate``) and stage it on the device.

    Shapes: ``query [num_seqs, num_heads, head_dim]``, caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (same dtype as query, float16 or
    float32), ``block_tables int32 [num_seqs, max_blocks]``, ``seq_lens int32 [num_seqs]``.
    ``num_heads`` must be a multiple of ``num_kv_heads``; ``threads`` a power of two, at least
    head_dim. ``out``, when given, receives the result (same shape and dtype as query).
    """
    dtype = v.check_float_array("query", query, 3)
    num_blocks, block_size, kv_heads, head_dim = v.check_kv_caches(key_cache, value_cache)
    v.check_same("dtype", ("query", "key_cache"), dtype, np.dtype(key_cache.dtype))
    num_seqs, num_heads, q_dim = v.shape_of(query)
    v.check_same("head_dim", ("query", "key_cache"), q_dim, head_dim)
    if num_heads % kv_heads:
        raise InvalidRequest(
            f"num_heads = {num_heads} is not a multiple of num_kv_heads = {kv_heads}"
        )
    if head_dim > MAX_HEAD_DIM or head_dim % VEC:
        raise InvalidRequest(
            f"head_dim = {head_dim} is not supported: it must be a multiple of {VEC} and at "
            f"most {MAX_HEAD_DIM}"
        )
    tables = v.host_index_array("block_tables", block_tables, np.int32, 2)
    lens = v.host_index_array("seq_lens", seq_lens, np.int32, 1)
    v.check_same("number of sequences", ("query", "block_tables"), num_seqs, tables.shape[0])
    v.check_block_tables(tables, lens, num_blocks, block_size)
    scale = v.check_scalar("scale", scale)
    if abs(scale) > float(np.finfo(np.float32).max):
        raise InvalidRequest(f"scale = {scale!r} does not fit in float32")
    if threads is None:
        threads = max(THREADS, 1 << (head_dim - 1).bit_length())
    threads = v.check_int("threads", threads, head_dim, MAX_THREADS)
    if threads & (threads - 1):
        raise InvalidRequest(f"threads must be a power of two, got {threads}")
    host_out = None
    if out is not None:
        v.check_same("dtype", ("out", "query"), v.check_float_array("out", out, 3), dtype)
        v.check_same("shape", ("out", "query"), v.shape_of(out), (num_seqs, num_heads, head_dim))
        host_out = out if isinstance(out, np.ndarray) else None
    elif isinstance(query, np.ndarray):
        host_out = np.empty((num_seqs, num_heads, head_dim), dtype=dtype)
    d_out = (
        out if v.is_device_array(out) else cuda.device_array((num_seqs, num_heads, head_dim), dtype)
    )
    return AttentionArgs(
        query=v.to_device(query),
        key_cache=v.to_device(key_cache),
        value_cache=v.to_device(value_cache),
        block_tables=cuda.to_device(tables),  # the checked copy: no unchecked id reaches a kernel
        seq_lens=cuda.to_device(lens),
        out=d_out,
        host_out=host_out,
        scale=np.float32(scale),
        threads=threads,
        max_seq_len=int(lens.max()),
        host_seq_lens=lens,
    )


def launch_naive(a: AttentionArgs) -> None:
    """Launch version 0 on checked inputs (the ``launch_*`` functions skip the host-side checks,
    for callers that run many batches on tables they already checked, and for timing)."""
    num_seqs, num_heads, head_dim = a.shape
    n = num_seqs * num_heads * head_dim
    paged_attention_naive_kernel[-(-n // a.threads), a.threads](
        a.out, a.query, a.key_cache, a.value_cache, a.block_tables, a.seq_lens, a.scale
    )


def launch_v1(a: AttentionArgs) -> None:
    """Launch version 1 on checked inputs; refuses contexts beyond ``V1_MAX_CONTEXT``."""
    if a.max_seq_len > V1_MAX_CONTEXT:
        raise InvalidRequest(
            f"context of {a.max_seq_len} tokens is longer than v1's limit of {V1_MAX_CONTEXT} "
            "(its logits must fit in shared memory); use paged_attention_v2"
        )
    num_seqs, num_heads, _ = a.shape
    shared = _shared_bytes(a.shape[2], a.threads, a.max_seq_len)
    paged_attention_v1_kernel[(num_heads, num_seqs), a.threads, 0, shared](
        a.out, a.query, a.key_cache, a.value_cache, a.block_tables, a.seq_lens, a.scale
    )


def launch_v2(a: AttentionArgs, partition_size: int = PARTITION_SIZE) -> None:
    """Launch version 2 (partition kernel, then reduction kernel) on checked inputs."""
    partition_size = v.check_int("partition_size", partition_size, 1, V1_MAX_CONTEXT)
    num_seqs, num_heads, _ = a.shape
    partial_out, max_logits, exp_sums = a.workspace(partition_size)
    parts = partial_out.shape[2]
    shared = _shared_bytes(a.shape[2], a.threads, partition_size)
    paged_attention_v2_kernel[(num_heads, num_seqs, parts), a.threads, 0, shared](
        partial_out,
        max_logits,
        exp_sums,
        a.query,
        a.key_cache,
        a.value_cache,
        a.block_tables,
        a.seq_lens,
        a.scale,
        partition_size,
    )
    reduce_partitions(a, partition_size)


def reduce_partitions(a: AttentionArgs, partition_size: int) -> None:
    """Merge the partitions in ``a``'s workspace into ``a.out`` with version 2's reduction
    kernel: the second launch of every partitioned version (2 to 5)."""
    num_seqs, num_heads, _ = a.shape
    partial_out, max_logits, exp_sums = a.workspace(partition_size)
    paged_attention_v2_reduce_kernel[(num_heads, num_seqs), a.threads](
        a.out, partial_out, max_logits, exp_sums, a.seq_lens, partition_size
    )


def choose_version(max_seq_len: int, partition_size: int = PARTITION_SIZE) -> str:
    """``"v1"`` when the longest context is a single partition, else ``"v2"``.

    Measured on an H100 (docs/benchmarks.md): with one partition v2 is v1 plus a reduction
    launch, so v1 wins; with two or more, v2 won at every batch size tried (up to 8,192
    (seq, head) blocks), by 4% with many blocks and up to 6.5x with few, because a v1 thread's
    loop over the context is a chain of dependent loads as long as the context, which v2 cuts
    into partitions that run in parallel. (vLLM's own v1 keeps up better and gets picked for
    large batches too; see docs/kernels.md.)"""
    return "v1" if max_seq_len <= min(partition_size, V1_MAX_CONTEXT) else "v2"


def paged_attention_naive(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    out: Any = None,
    threads: int | None = None,
) -> Any:
    """Version 0 (one thread per output element). Arguments as for ``paged_attention``."""
    a = prepare_attention(
        query, key_cache, value_cache, block_tables, seq_lens, scale, out, threads
    )
    launch_naive(a)
    return a.result()


def paged_attention_v1(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    out: Any = None,
    threads: int | None = None,
) -> Any:
    """Version 1 (one thread block per (sequence, head)); contexts up to ``V1_MAX_CONTEXT``.
    Arguments as for ``paged_attention``."""
    a = prepare_attention(
        query, key_cache, value_cache, block_tables, seq_lens, scale, out, threads
    )
    launch_v1(a)
    return a.result()


def paged_attention_v2(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    partition_size: int = PARTITION_SIZE,
    out: Any = None,
    threads: int | None = None,
) -> Any:
    """Version 2 (partitions in parallel, then a reduction). Arguments as for
    ``paged_attention``."""
    v.check_int("partition_size", partition_size, 1, V1_MAX_CONTEXT)
    a = prepare_attention(
        query, key_cache, value_cache, block_tables, seq_lens, scale, out, threads
    )
    launch_v2(a, partition_size)
    return a.result()


def fast_version(
    dtype: Any,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    partition_size: int | None = None,
    small_grid: bool = False,
) -> str | None:
    """The fast version ``paged_attention`` runs for this shape: ``"v6"``, ``"v5"``, ``"v4"``,
    ``"v3"``, or None when only versions 1 and 2 serve it. ``partition_size`` None: each
    version's own; ``small_grid``: the batch is one ``attention_v5.small_grid`` calls small.

    Version 6 (the cache loaded straight into the tensor cores' registers) is picked wherever
    it serves the shape: on an H100 it was the fastest version on every batch of the benchmark
    (docs/benchmarks.md, 2026-12-06), 2 to 9% faster than version 5 with 4 query heads per kv
    head, and with one 1.8 to 3.6% faster than the better of versions 4 and 5. Where it does
    not serve, version 5 (tensor cores through shared memory) is picked for grouped-query
    attention and for small batches, version 4 for other multi-head attention: measured on an
    H200, version 5 was the faster on every batch with 4 query heads per kv head and on the
    small ones with one (its shorter partitions fill the GPU), version 4 on the large ones
    with one. Then version 4 before version 3 (1.3 to 1.8 times faster with grouped-query
    attention), and version 3 before v1 and v2 (3 to 8 times faster on an H100).
    """
    from minipaged.kernels import attention_v3, attention_v4, attention_v5, attention_v6

    shape = (np.dtype(dtype), num_heads, num_kv_heads, head_dim, block_size)
    grouped = num_heads > num_kv_heads
    if attention_v6.supports(*shape, partition_size or block_size) is None:
        return "v6"
    partition_size = partition_size or PARTITION_SIZE  # (v5's own choice is never longer)
    v5_helps = grouped or small_grid
    if v5_helps and attention_v5.supports(*shape, partition_size) is None:
        return "v5"
    if attention_v4.supports(*shape, partition_size) is None:
        return "v4"
    if (
        attention_v3.supports(*shape, partition_size=partition_size) is None
        and partition_size % block_size == 0
    ):
        return "v3"
    return None


def paged_attention(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_tables: Any,
    seq_lens: Any,
    scale: float,
    partition_size: int | None = None,
    out: Any = None,
    threads: int | None = None,
) -> Any:
    """Decode attention over a paged KV cache; returns ``[num_seqs, num_heads, head_dim]`` in
    query's dtype: a NumPy array when ``query`` is one, else a device array (or ``out``).

    Runs ``fast_version``'s pick where there is one, else v1 or v2 by ``choose_version``
    (``threads`` then applies to them). ``partition_size`` None lets the version choose:
    versions 6 and 5 take their partitions and blocks of several warps by the batch (their
    ``choose_launch``; version 5 its merge too), the others ``PARTITION_SIZE``. All inputs are
    checked before anything runs: ``InvalidRequest`` for shapes, dtypes and scalars,
    ``InvalidBlockTable`` for block ids outside the cache and lengths the block table does not
    cover.
    """
    from minipaged.kernels import attention_v3, attention_v4, attention_v5, attention_v6

    if partition_size is not None:
        v.check_int("partition_size", partition_size, 1, V1_MAX_CONTEXT)
    a = prepare_attention(
        query, key_cache, value_cache, block_tables, seq_lens, scale, out, threads
    )
    num_seqs, num_heads, head_dim = a.shape
    _, block_size, kv_heads, _ = a.key_cache.shape
    small = partition_size is None and attention_v5.small_grid(num_seqs, kv_heads, a.max_seq_len)
    version = fast_version(
        a.key_cache.dtype, num_heads, kv_heads, head_dim, block_size, partition_size, small
    )
    if version == "v6":
        attention_v6.launch_v6(a, partition_size)  # (None: its own partitions and warps)
        return a.result()
    if version == "v5":
        if partition_size is None:
            attention_v5.launch_chosen(a)
        else:
            attention_v5.launch_v5(a, partition_size)
        return a.result()
    partition_size = partition_size or PARTITION_SIZE
    if version == "v4":
        attention_v4.launch_v4(a, partition_size)
    elif version == "v3":
        attention_v3.launch_v3(a, partition_size)
    elif choose_version(a.max_seq_len, partition_size) == "v1":
        launch_v1(a)
    else:
        launch_v2(a, partition_size)
    return a.result()
