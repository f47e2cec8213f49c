"""End to end: the toy decoder over the paged KV cache gives the logits of the contiguous cache.

The paged runner goes through everything at once: the block manager's tables, slot mappings,
copy-on-write after a fork and swapping out and back in (to other block ids), and the kernels
``reshape_and_cache``, ``copy_blocks``, ``swap_blocks`` and ``paged_attention``. The contiguous
runner keeps each sequence's K/V in one array and attends densely in float64. Besides the logits
at every step, the tests check the whole cache: every sequence's K/V, read through its block
table from the GPU cache (or the CPU cache while swapped out), equals the contiguous copy bit for
bit. Shapes are tiny because the kernels run in Numba's CUDA simulator (MINIPAGED_GPU=1: a GPU).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minipaged.errors import (
    DuplicateSequence,
    InvalidRequest,
    InvalidState,
    OutOfMemory,
    UnknownSequence,
)
from minipaged.kernels.reference import gather_kv
from minipaged.toy_model import ContiguousRunner, PagedRunner, ToyConfig, ToyDecoder

CONFIG = ToyConfig(vocab_size=32, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16)
SMALL = ToyConfig(vocab_size=32, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16)
BLOCK_SIZE = 4
THREADS = 16  # the fewest attention allows (a power of two >= head_dim); valid on a GPU too
TOLERANCE = {np.float32: 1e-4, np.float16: 1e-2}  # relative to the largest logit


@pytest.fixture(autouse=True, scope="module")
def quick_thread_switches():
    """The simulator's barriers wait for every Python thread of a block; a short GIL switch
    interval lets them meet quickly, without changing any result."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def assert_same_logits(paged: np.ndarray, expected: np.ndarray, dtype: type) -> None:
    assert paged.shape == expected.shape == (CONFIG.vocab_size,)
    assert np.isfinite(paged).all(), "a NaN slot of the cache was read"
    tol = TOLERANCE[dtype] * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(paged, expected, rtol=0, atol=tol)


def assert_same_cache(paged: PagedRunner, ref: ContiguousRunner) -> None:
    """Every sequence's K/V, gathered through its block table from wherever its blocks are,
    equals the contiguous copy exactly; the two runners know the same sequences."""
    manager = paged.manager
    assert set(manager._tables) == set(ref.keys)
    gpu = paged.key_cache.copy_to_host(), paged.value_cache.copy_to_host()
    cpu = paged.cpu_key_cache, paged.cpu_value_cache
    for seq_id in ref.keys:
        n = manager.num_tokens(seq_id)
        assert n == len(ref.keys[seq_id])
        key_cache, value_cache = cpu if manager.is_swapped(seq_id) else gpu
        table = np.array(manager.block_table(seq_id))
        np.testing.assert_array_equal(gather_kv(key_cache, table, n), ref.keys[seq_id])
        np.testing.assert_array_equal(gather_kv(value_cache, table, n), ref.values[seq_id])


def runners(
    dtype: type = np.float32, gpu_blocks: int = 48, cpu_blocks: int = 24, config: ToyConfig = CONFIG
) -> tuple[PagedRunner, ContiguousRunner]:
    model = ToyDecoder(config)
    paged = PagedRunner(model, gpu_blocks, BLOCK_SIZE, cpu_blocks, dtype, threads=THREADS)
    return paged, ContiguousRunner(model, dtype)


# --- the scenario ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "config", "num_new", "fork_at", "swap_at"),
    [(np.float32, CONFIG, 24, 6, 14), (np.float16, SMALL, 12, 2, 5)],  # float16: shorter, cheaper
    ids=["float32", "float16"],
)
def test_generation_matches_contiguous_cache_through_fork_and_swap(
    dtype: type, config: ToyConfig, num_new: int, fork_at: int, swap_at: int
) -> None:
    """Three prompts with partly filled last blocks; greedy decoding of ``num_new`` tokens each.
    After ``fork_at`` steps sequence 0 forks into 3 (its last block is partly filled and now
    shared), and parent and child continue with different tokens, so the first append copies
    that block on write. After ``swap_at`` steps the group {0, 3} is swapped out for 3 steps
    while 1 and 2 go on, then swapped back into other blocks. Logits agree at every step."""
    paged, ref = runners(dtype, config=config)
    prompts = {0: [3, 1, 4, 1, 5], 1: [9, 2, 6, 5, 3, 5, 8], 2: [9, 7, 9, 3, 2, 3, 8, 4, 6, 2]}
    logits = {}
    for seq_id, prompt in prompts.items():
        logits[seq_id] = ref.prefill(seq_id, prompt)
        assert_same_logits(paged.prefill(seq_id, prompt), logits[seq_id], dtype)
    assert_same_cache(paged, ref)
    generated = dict.fromkeys(prompts, 0)
    swapped: list[int] = []
    old_tables: dict[int, list[int]] = {}
    for step in range(num_new + 8):
        if step == fork_at:
            assert paged.manager.num_tokens(0) % BLOCK_SIZE != 0  # a shared, partial last block
            paged.fork(0, 3)
            ref.fork(0, 3)
            logits[3], generated[3] = logits[0], generated[0]
        if step == swap_at:
            swapped = [0, 3]
            old_tables = {s: paged.manager.block_table(s) for s in swapped}
            paged.swap_out(swapped)
            assert_same_cache(paged, ref)
        if step == swap_at + 3:
            paged.swap_in(swapped)
            for s in swapped:
                assert paged.manager.block_table(s) != old_tables[s]
            swapped = []
            assert_same_cache(paged, ref)
        tokens = {}
        for seq_id in sorted(generated):
            if seq_id not in swapped and generated[seq_id] < num_new:
                best = int(np.argmax(logits[seq_id]))
                tokens[seq_id] = (best + 1) % CONFIG.vocab_size if seq_id == 3 else best
        if not tokens:
            break
        copies_before = paged.cow_copies
        expected = ref.decode(tokens)
        for seq_id, out in paged.decode(tokens).items():
            assert_same_logits(out, expected[seq_id], dtype)
            generated[seq_id] += 1
        logits.update(expected)
        if step == fork_at:
            assert paged.cow_copies == copies_before + 1  # parent and child diverged: one copy
        assert_same_cache(paged, ref)
    assert generated == dict.fromkeys(range(4), num_new)
    assert paged.cow_copies == 1


# --- random interleavings ------------------------------------------------------------------------


class EndToEnd(RuleBasedStateMachine):
    """Prefill, decode, fork, swap out, swap in and free in any order, on a pool small enough to
    run out. After every step the whole cache of every sequence equals the contiguous one.
    Two query heads share one KV head here: half the simulator's work of ``CONFIG``."""

    def __init__(self) -> None:
        super().__init__()
        self.paged, self.ref = runners(np.float32, 12, 8, SMALL)
        self.next_id = 0
        self.swap_groups: list[list[int]] = []

    def running(self) -> list[int]:
        return sorted(s for s in self.ref.keys if not self.paged.manager.is_swapped(s))

    @precondition(lambda self: len(self.ref.keys) < 4)
    @rule(prompt=st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=9))
    def prefill(self, prompt: list[int]) -> None:
        seq_id = self.next_id
        if not self.paged.manager.can_allocate(len(prompt)):
            with pytest.raises(OutOfMemory):
                self.paged.prefill(seq_id, prompt)
            return
        self.next_id += 1
        expected = self.ref.prefill(seq_id, prompt)
        assert_same_logits(self.paged.prefill(seq_id, prompt), expected, np.float32)

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        ids = self.running()
        tokens = {s: data.draw(st.integers(0, CONFIG.vocab_size - 1)) for s in ids}
        try:
            out = self.paged.decode(tokens)
        except OutOfMemory:
            return  # nothing changed: the invariant below checks it
        expected = self.ref.decode(tokens)
        for seq_id in ids:
            assert_same_logits(out[seq_id], expected[seq_id], np.float32)

    @precondition(lambda self: self.running() and len(self.ref.keys) < 4)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.running()))
        self.paged.fork(parent, self.next_id)
        self.ref.fork(parent, self.next_id)
        self.next_id += 1

    @precondition(lambda self: self.running())
    @rule()
    def swap_out(self) -> None:
        """All running sequences as one group: closed under sharing, whatever was forked."""
        group = self.running()
        try:
            self.paged.swap_out(group)
        except OutOfMemory:
            return
        self.swap_groups.append(group)

    @precondition(lambda self: self.swap_groups)
    @rule()
    def swap_in(self) -> None:
        group = self.swap_groups[0]
        if not self.paged.manager.can_swap_in(group):
            with pytest.raises(OutOfMemory):
                self.paged.swap_in(group)
            return
        self.paged.swap_in(self.swap_groups.pop(0))

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(self.running()))
        self.paged.free(seq_id)
        self.ref.free(seq_id)

    @invariant()
    def caches_agree(self) -> None:
        assert_same_cache(self.paged, self.ref)
        assert {s for g in self.swap_groups for s in g} == set(self.ref.keys) - set(self.running())


TestEndToEnd = EndToEnd.TestCase
TestEndToEnd.settings = settings(max_examples=10, stateful_step_count=10)


# --- refusals ------------------------------------------------------------------------------------


def test_config_refuses_heads_that_do_not_group() -> None:
    with pytest.raises(InvalidRequest, match="num_heads = 3"):
        ToyConfig(num_heads=3, num_kv_heads=2)
    with pytest.raises(InvalidRequest, match="head_dim"):
        ToyConfig(head_dim=0)


def test_same_seed_same_model() -> None:
    a, b = ToyDecoder(CONFIG), ToyDecoder(CONFIG)
    np.testing.assert_array_equal(a.wq, b.wq)
    c = ToyDecoder(ToyConfig(seed=1))
    assert not np.array_equal(a.wq, c.wq)


def test_bad_requests_change_nothing() -> None:
    paged, ref = runners()
    with pytest.raises(InvalidRequest, match="cache_dtype"):
        PagedRunner(paged.model, 4, 4, cache_dtype=np.float64)
    with pytest.raises(InvalidRequest, match="cache_dtype"):
        ContiguousRunner(ref.model, "int8")
    for runner in (paged, ref):
        runner.prefill("a", [1, 2, 3])
        with pytest.raises(InvalidRequest, match="token 32"):
            runner.prefill("b", [1, 32])
        with pytest.raises(InvalidRequest, match="token -1"):
            runner.decode({"a": -1})
        with pytest.raises(InvalidRequest, match="max_positions"):
            runner.prefill("b", [0] * (CONFIG.max_positions + 1))
        with pytest.raises(DuplicateSequence):
            runner.prefill("a", [1])
        with pytest.raises(UnknownSequence):
            runner.decode({"a": 1, "nobody": 1})
        with pytest.raises(DuplicateSequence):
            runner.fork("a", "a")
    assert_same_cache(paged, ref)
    assert paged.manager.num_tokens("a") == 3


def test_decode_refuses_swapped_and_full_pools_without_changes() -> None:
    paged, ref = runners(gpu_blocks=3, cpu_blocks=2)
    paged.prefill("a", [1, 2, 3, 4])  # one full block
    ref.prefill("a", [1, 2, 3, 4])
    paged.prefill("b", [5, 6, 7, 8, 9])  # two blocks: the pool is full
    ref.prefill("b", [5, 6, 7, 8, 9])
    with pytest.raises(OutOfMemory):  # "a" needs a new block, "b" has room: all or nothing
        paged.decode({"b": 1, "a": 1})
    assert_same_cache(paged, ref)
    paged.swap_out("a")
    with pytest.raises(InvalidState, match="swapped out"):
        paged.decode({"b": 1, "a": 1})
    assert_same_cache(paged, ref)
    expected = ref.decode({"b": 1})
    assert_same_logits(paged.decode({"b": 1})["b"], expected["b"], np.float32)
    assert_same_cache(paged, ref)
