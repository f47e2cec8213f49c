"""Tests of the block manager: hand-checked cases, then a state machine that runs it next to a
shadow model (every sequence's tokens as a plain list) and two numpy arrays standing in for the
GPU and CPU KV caches, written and copied only as the manager's answers say."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from minipaged.block_manager import (
    BlockManager,
    KVCacheSpec,
    gpu_num_blocks,
    num_blocks_for,
    same_prefix,
)
from minipaged.errors import (
    DuplicateSequence,
    InvalidRequest,
    InvalidState,
    MinipagedError,
    OutOfMemory,
    UnknownSequence,
)
from minipaged.lessons import under_test

# The code under test: the library's, or a student's file under `minipaged lesson check`.
BlockManager = under_test("BlockManager", BlockManager)
same_prefix = under_test("same_prefix", same_prefix)


def snapshot(bm: BlockManager):
    """Everything a failed call must leave as it was. Keys compare by identity (eq=False)."""
    return (
        {s: list(t) for s, t in bm._tables.items()},
        {s: list(t) for s, t in bm._tokens.items()},
        set(bm._swapped),
        dict(bm._keys),
        dict(bm._cache),
        (bm.prefix_hits, bm.prefix_misses, bm.evictions),
        bm.gpu.free_queue(),
        [bm.gpu.refcount(b) for b in range(bm.gpu.num_blocks)],
        bm.cpu.free_queue(),
        [bm.cpu.refcount(b) for b in range(bm.cpu.num_blocks)],
        bm.stats(),
    )


def raises_unchanged(bm: BlockManager, exc: type[Exception], fn, *args, **kwargs):
    before = snapshot(bm)
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert snapshot(bm) == before
    return info.value


# ----- sizing --------------------------------------------------------------------------------


def test_opt_13b_bytes_per_token():
    # 40 layers, hidden 5120 = 40 heads x 128, fp16: 800 KiB of KV per token
    spec = KVCacheSpec(num_layers=40, num_kv_heads=40, head_dim=128)
    assert spec.bytes_per_token == 819200 == 800 * 1024
    assert spec.bytes_per_block(16) == 16 * 819200


def test_num_blocks_for():
    spec = KVCacheSpec(40, 40, 128, 2)
    # 40 GiB at 90%: floor(38654705664 / 13107200) = 2949 blocks of 16 tokens
    assert num_blocks_for(40 * 2**30, spec, 16) == 2949
    assert num_blocks_for(40 * 2**30, spec, 16, utilization=1.0) == 3276
    assert num_blocks_for(819200 * 16, spec, 16, utilization=1.0) == 1
    assert num_blocks_for(819200 * 16 - 1, spec, 16, utilization=1.0) == 0
    assert num_blocks_for(0, spec, 1) == 0
    assert num_blocks_for(10_000, KVCacheSpec(1, 1, 1, 1), 1, utilization=0.5) == 2500


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"memory_bytes": -1}, "-1"),
        ({"utilization": 0}, "0"),
        ({"utilization": 1.5}, "1.5"),
        ({"utilization": "0.9"}, "'0.9'"),
        ({"block_size": 0}, "0"),
    ],
)
def test_num_blocks_for_rejects(kwargs, bad):
    args = {"memory_bytes": 2**30, "spec": KVCacheSpec(2, 2, 2), "block_size": 4} | kwargs
    with pytest.raises(InvalidRequest, match=bad):
        num_blocks_for(**args)


def test_kv_cache_spec_rejects_bad_shapes():
    with pytest.raises(InvalidRequest, match="num_kv_heads.*0"):
        KVCacheSpec(num_layers=2, num_kv_heads=0, head_dim=8)
    with pytest.raises(InvalidRequest, match="dtype_bytes"):
        KVCacheSpec(2, 2, 8, dtype_bytes=1.5)


def test_gpu_num_blocks_without_a_real_gpu():
    spec = KVCacheSpec(40, 40, 128)
    with pytest.raises(InvalidRequest):
        gpu_num_blocks(spec, 0)
    try:
        n = gpu_num_blocks(spec, 16)
    except InvalidState as e:  # the simulator reports infinite memory; no driver is an error too
        assert "memory" in str(e)
    else:  # a real GPU (MINIPAGED_GPU=1)
        assert isinstance(n, int) and n >= 0


# ----- hand-checked block manager cases ------------------------------------------------------


def test_block_table_and_slot_mapping():
    bm = BlockManager(8, 4, watermark=0)
    assert bm.allocate("a", [5, 6, 7]) == 0
    assert bm.allocate("b", list(range(10))) == 0
    assert bm.block_table("a") == [0]
    assert bm.block_table("b") == [1, 2, 3]
    assert bm.num_tokens("b") == 10
    slots = bm.slot_mapping("b")
    assert slots.dtype == np.int64
    assert slots.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert bm.slot_mapping("b", [9, 0, 4]).tolist() == [13, 4, 8]
    assert bm.append_slots("a", 2, [1, 2]) == []
    assert bm.block_table("a") == [0, 4]
    assert bm.slot_mapping("a").tolist() == [0, 1, 2, 3, 16]
    e = raises_unchanged(bm, InvalidRequest, bm.slot_mapping, "a", [5])
    assert "position 5" in str(e)
    raises_unchanged(bm, InvalidRequest, bm.slot_mapping, "a", [-1])
    raises_unchanged(bm, InvalidRequest, bm.slot_mapping, "a", [0.5])


def test_stats_and_internal_fragmentation():
    bm = BlockManager(10, 4, watermark=0)
    bm.allocate(1, [1] * 5)  # 2 blocks, 3 slots wasted
    bm.allocate(2, [2] * 8)  # 2 full blocks
    bm.fork(1, 3)  # shares both blocks: stored once
    s = bm.stats()
    assert (s.num_blocks, s.used_blocks, s.free_blocks, s.cached_blocks) == (10, 4, 6, 0)
    assert (s.tokens_stored, s.slots_wasted, s.num_sequences, s.num_swapped) == (13, 3, 3, 0)


def test_watermark_applies_to_new_sequences_only():
    bm = BlockManager(100, 4, watermark=0.05)
    assert bm.watermark_blocks == 5
    assert bm.can_allocate(95 * 4) and not bm.can_allocate(95 * 4 + 1)
    e = raises_unchanged(bm, InvalidRequest, bm.allocate, 0, [0] * (96 * 4))
    assert "96 blocks" in str(e)
    bm.allocate(1, [1] * (90 * 4))
    assert bm.can_allocate(5 * 4) and not bm.can_allocate(5 * 4 + 1)
    e = raises_unchanged(bm, OutOfMemory, bm.allocate, 2, [2] * 21)
    assert e.requested == 6 and "watermark" in str(e)
    bm.allocate(2, [2] * 4)  # leaves 9 free
    # appends may use the watermark's blocks, down to the last free block
    assert bm.can_append(1, 9 * 4) and not bm.can_append(1, 9 * 4 + 1)
    raises_unchanged(bm, OutOfMemory, bm.append_slots, 1, 9 * 4 + 1)
    bm.append_slots(1, 9 * 4)
    assert bm.stats().free_blocks == 0
    raises_unchanged(bm, OutOfMemory, bm.append_slots, 2, 1)


def test_fork_shares_blocks_and_copy_on_write_reports_the_pair():
    bm = BlockManager(8, 4, watermark=0)
    bm.allocate("p", [1, 2, 3, 4, 5, 6])  # blocks [0, 1], the last one half full
    bm.fork("p", "c")
    assert bm.block_table("c") == [0, 1]
    assert bm.gpu.refcount(0) == bm.gpu.refcount(1) == 2
    assert bm.stats().used_blocks == 2
    assert bm.can_append("c", 2)
    assert bm.append_slots("c", 1, [7]) == [(1, 2)]  # copy block 1 into 2 before writing
    assert bm.block_table("c") == [0, 2] and bm.block_table("p") == [0, 1]
    assert bm.gpu.refcount(1) == 1 and bm.gpu.refcount(0) == 2
    assert bm.append_slots("p", 1, [8]) == []  # the parent holds block 1 alone now
    assert bm.block_table("p") == [0, 1]


def test_append_after_fork_of_a_full_last_block_needs_no_copy():
    bm = BlockManager(8, 4, watermark=0)
    bm.allocate("p", [1, 2, 3, 4])
    bm.fork("p", "c")
    assert bm.append_slots("c", 1) == []
    assert bm.block_table("c") == [0, 1] and bm.block_table("p") == [0]


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(2, 4, watermark=0)
    bm.allocate("p", [1, 2, 3, 4, 5])  # both blocks
    bm.fork("p", "c")
    assert not bm.can_append("c")
    raises_unchanged(bm, OutOfMemory, bm.append_slots, "c", 1, [6])


def sharing_manager(num_blocks: int = 16, **kwargs) -> BlockManager:
    """p, c1 and c2 hold blocks [0, 1], block 1 half full (ref count 3); f holds the full block
    2, u the block 3 with one slot left."""
    bm = BlockManager(num_blocks, 4, watermark=0, **kwargs)
    bm.allocate("p", [1, 2, 3, 4, 5, 6])
    bm.fork("p", "c1")
    bm.fork("p", "c2")
    bm.allocate("f", [7, 8, 9, 10])
    bm.allocate("u", [11, 12, 13])
    return bm


STEP = ["c1", "p", "f", "c2", "u"]


def by_value(bm: BlockManager):
    """``snapshot`` with every prefix-cache key as its hash, tokens and parent's hash, so that
    two managers can be compared (keys themselves compare by identity)."""
    keys = {b: (k.hash, k.tokens, k.parent and k.parent.hash) for b, k in bm._keys.items()}
    return snapshot(bm)[:3] + (keys,) + snapshot(bm)[4:]


def test_append_slots_batch_hand_checked():
    bm = sharing_manager()
    # c1 and p copy the shared block 1 (ref count 3, then 2); c2, its last holder, keeps it;
    # f starts a new block; u fills its own block in place
    assert bm.append_slots_batch(STEP, [20, 21, 22, 23, 24]) == [(1, 4), (1, 5)]
    tables = {s: bm.block_table(s) for s in STEP}
    assert tables == {"c1": [0, 4], "p": [0, 5], "f": [2, 6], "c2": [0, 1], "u": [3]}
    assert bm.gpu.refcount(0) == 3 and bm.gpu.refcount(1) == 1
    assert [bm.num_tokens(s) for s in STEP] == [7, 7, 5, 7, 4]
    assert bm.append_slots_batch([]) == []


@pytest.mark.parametrize("order", [STEP, ["u", "c2", "f", "c1", "p"], ["f", "c2"]])
@pytest.mark.parametrize("known", [False, True])
def test_append_slots_batch_is_append_slots_in_order(order, known):
    one = sharing_manager(enable_prefix_caching=True)
    batch = sharing_manager(enable_prefix_caching=True)
    tokens = list(range(30, 30 + len(order))) if known else None
    pairs = []
    for i, seq in enumerate(order):
        pairs += one.append_slots(seq, 1, [tokens[i]] if known else None)
    assert batch.append_slots_batch(tuple(order), tokens) == pairs
    assert by_value(batch) == by_value(one)
    # u's block fills: it gets a key only when its tokens are known
    assert (3 in batch._keys) == (known and "u" in order)


def test_append_slots_batch_needs_exactly_the_blocks_it_takes():
    bm = sharing_manager(num_blocks=7)  # 3 free: the step takes two copies and a new block
    bm.append_slots_batch(STEP)
    assert bm.gpu.num_free_blocks == 0
    bm = sharing_manager(num_blocks=6)  # 2 free: the copies fit, f's new block would not
    e = raises_unchanged(bm, OutOfMemory, bm.append_slots_batch, STEP)
    assert e.requested == 3 and e.free == 2
    assert bm.append_slots_batch(["c1", "p"]) == [(1, 4), (1, 5)]


def test_append_slots_batch_refuses_bad_steps_and_changes_nothing():
    bm = sharing_manager(num_cpu_blocks=4)
    bm.allocate("s", [1, 2])
    bm.swap_out("s")
    cases = [
        (UnknownSequence, "99", ["p", "f", 99]),
        (UnknownSequence, r"\[1\]", ["p", [1]]),
        (InvalidState, "'s'.*swapped out", ["p", "s"]),
        (InvalidRequest, "'f' twice", ["f", "p", "f"]),
        (InvalidRequest, "list or tuple", "pf"),
        (InvalidRequest, "list or tuple", {"p"}),
        (InvalidRequest, "2 tokens for 3", ["p", "f", "u"], [1, 2]),
        (InvalidRequest, "'x'", ["p"], ["x"]),
        (InvalidRequest, "True", ["p"], [True]),
    ]
    for exc, text, *args in cases:
        e = raises_unchanged(bm, exc, bm.append_slots_batch, *args)
        assert re.search(text, str(e)), (args, str(e))
    assert bm.append_slots_batch(["u"], np.array([5])) == []  # numpy ints are ints
    assert bm.num_tokens("u") == 4


def test_prefix_hit_reuses_blocks_and_never_the_last_token():
    bm = BlockManager(16, 4, watermark=0, enable_prefix_caching=True)
    prompt = list(range(100, 108))  # exactly two full blocks
    assert bm.allocate(1, prompt) == 0
    assert (bm.prefix_hits, bm.prefix_misses) == (0, 1)
    # same prompt while the first is alive: block 0 is shared, the last block is recomputed
    assert bm.allocate(2, prompt) == 4
    assert bm.block_table(2)[0] == bm.block_table(1)[0]
    assert bm.block_table(2)[1] != bm.block_table(1)[1]
    assert bm.gpu.refcount(bm.block_table(1)[0]) == 2
    # one token longer: both full blocks are reused, the new token gets a fresh block
    assert bm.allocate(3, prompt + [1]) == 8
    assert bm.block_table(3)[:2] == bm.block_table(1)
    assert (bm.prefix_hits, bm.prefix_misses) == (3, 1)
    # after freeing everything the blocks stay cached and revive
    for s in (1, 2, 3):
        bm.free(s)
    assert bm.stats().cached_blocks == 2 and bm.stats().used_blocks == 0
    assert bm.allocate(4, prompt + [2, 3]) == 8
    assert bm.stats().cached_blocks == 0 and bm.evictions == 0


def test_unknown_tokens_are_not_cached():
    bm = BlockManager(16, 2, watermark=0, enable_prefix_caching=True)
    bm.allocate(1, [1, 2, 3])
    bm.append_slots(1, 1)  # block 1 = [3, ?]: cannot be cached, nor anything after it
    bm.append_slots(1, 2, [5, 6])
    bm.free(1)
    assert bm.stats().cached_blocks == 1
    assert bm.allocate(2, [1, 2, 3, 4, 5, 6, 7]) == 2


def test_hash_collision_is_a_miss():
    bm = BlockManager(16, 2, watermark=0, enable_prefix_caching=True, hash_fn=lambda p, t: 0)
    bm.allocate(1, [1, 2, 3])
    assert bm.allocate(2, [7, 8, 9]) == 0  # the same hash, other tokens: a miss
    assert bm.block_table(2)[0] != bm.block_table(1)[0]
    assert (bm.prefix_hits, bm.prefix_misses) == (0, 2)
    assert bm.allocate(3, [1, 2, 5]) == 2  # a real hit is confirmed and taken
    assert bm.block_table(3)[0] == bm.block_table(1)[0]


def test_collision_in_the_parent_chain_is_a_miss():
    # the hash sums the tokens, so (1, 2) and (2, 1) collide; the child block (5, 5) of the
    # prefix (2, 1) must not serve a sequence whose prefix is (1, 2)
    bm = BlockManager(
        16, 2, watermark=0, enable_prefix_caching=True, hash_fn=lambda p, t: (p, sum(t))
    )
    bm.allocate("a", [1, 2, 0])  # caches (1, 2)
    bm.allocate("b", [2, 1, 5, 5, 0])  # (2, 1) collides, so is not cached; (5, 5) is
    assert bm.block_table("b")[1] in bm._cache.values()
    assert bm.allocate("c", [1, 2, 5, 5, 0]) == 2  # only (1, 2) is reused
    assert bm.block_table("c")[0] == bm.block_table("a")[0]
    assert bm.block_table("c")[1] != bm.block_table("b")[1]


def test_lru_eviction_order():
    bm = BlockManager(5, 2, watermark=0, enable_prefix_caching=True)
    bm.allocate(1, [1, 2, 3, 4, 5])  # blocks [0, 1, 2]; 0 and 1 full and cached
    bm.free(1)  # freed last block first
    assert bm.gpu.free_queue() == [3, 4, 2, 1, 0]
    assert bm.stats().cached_blocks == 2
    bm.allocate(2, [9, 9, 9])  # takes 3 and 4, never used
    bm.allocate(3, [8])  # takes 2, which held a partial block: nothing cached is lost
    assert bm.evictions == 0
    bm.allocate(4, [7])  # takes 1: the tail of the cached prefix is the LRU victim
    assert bm.evictions == 1 and bm.block_table(4) == [1]
    assert sorted(bm._cache.values()) == [0, 3]  # 3 holds (9, 9) of sequence 2
    bm.free(4)
    bm.free(3)
    assert bm.gpu.free_queue() == [0, 1, 2]
    assert bm.allocate(5, [1, 2, 3, 4, 5]) == 2  # only block 0 survived
    assert bm.block_table(5) == [0, 1, 2] and bm.evictions == 1


def test_reviving_a_cached_block_saves_it_from_eviction():
    bm = BlockManager(3, 2, watermark=0, enable_prefix_caching=True)
    bm.allocate(1, [1, 2, 3])  # blocks [0, 1]; 0 cached
    bm.free(1)
    assert bm.gpu.free_queue() == [2, 1, 0]
    # needs 2 blocks: reuses block 0 from the cache, then takes 2 from the head
    assert bm.allocate(2, [1, 2, 7]) == 2
    assert bm.block_table(2) == [0, 2] and bm.evictions == 0


def test_swap_preserves_sharing_and_requires_a_closed_group():
    bm = BlockManager(8, 4, num_cpu_blocks=8, watermark=0)
    bm.allocate("p", [1, 2, 3, 4, 5])
    bm.fork("p", "c")
    bm.append_slots("c", 1)  # c: [0, 2], p: [0, 1]
    e = raises_unchanged(bm, InvalidState, bm.swap_out, "c")
    assert "block 0" in str(e) and "'c'" in str(e)
    pairs = bm.swap_out(["p", "c"])
    assert sorted(g for g, _ in pairs) == [0, 1, 2]  # the shared block moves once
    cpu = dict(pairs)
    assert bm.block_table("p") == [cpu[0], cpu[1]] and bm.block_table("c") == [cpu[0], cpu[2]]
    assert bm.cpu.refcount(cpu[0]) == 2
    assert bm.is_swapped("p") and bm.stats().used_blocks == 0
    raises_unchanged(bm, InvalidState, bm.append_slots, "p", 1)
    raises_unchanged(bm, InvalidState, bm.fork, "p", "x")
    raises_unchanged(bm, InvalidState, bm.slot_mapping, "p")
    raises_unchanged(bm, InvalidState, bm.swap_in, "p")
    assert bm.can_swap_in(("c", "p"))
    back = dict(bm.swap_in(("c", "p")))
    assert len(back) == 3
    assert bm.block_table("p")[0] == bm.block_table("c")[0] == back[cpu[0]]
    assert bm.gpu.refcount(back[cpu[0]]) == 2 and bm.stats().cpu_used_blocks == 0


def test_swap_group_of_tuple_ids():
    bm = BlockManager(8, 2, num_cpu_blocks=8, watermark=0)
    bm.allocate((7, 0), [1, 2, 3])
    bm.fork((7, 0), (7, 1))
    raises_unchanged(bm, InvalidState, bm.swap_out, (7, 0))  # one sequence, not the group 7, 0
    assert len(bm.swap_out([(7, 0), (7, 1)])) == 2
    assert bm.can_swap_in([(7, 1), (7, 0)])
    e = raises_unchanged(bm, InvalidState, bm.swap_in, (7, 1))
    assert "(7, 1)" in str(e) and "outside the group" in str(e)
    bm.swap_in(((7, 1), (7, 0)))
    raises_unchanged(bm, UnknownSequence, bm.swap_out, (7, 2))
    raises_unchanged(bm, UnknownSequence, bm.swap_out, [[1]])
    raises_unchanged(bm, InvalidRequest, bm.swap_out, [])


def test_swap_needs_room():
    bm = BlockManager(4, 2, watermark=0)  # no CPU pool
    bm.allocate(1, [1, 2, 3])
    e = raises_unchanged(bm, OutOfMemory, bm.swap_out, 1)
    assert "CPU blocks" in str(e)
    bm = BlockManager(4, 2, num_cpu_blocks=4, watermark=0.5)
    bm.allocate(1, [1, 2, 3])
    bm.swap_out(1)
    bm.allocate(2, [1, 2, 3])
    assert not bm.can_swap_in(1)
    raises_unchanged(bm, OutOfMemory, bm.swap_in, [1])


def test_bad_calls_name_the_offending_value():
    bm = BlockManager(4, 2, watermark=0)
    bm.allocate(1, [1])
    cases = [
        (UnknownSequence, "99", bm.free, 99),
        (UnknownSequence, "99", bm.append_slots, 99),
        (UnknownSequence, "99", bm.fork, 99, 100),
        (UnknownSequence, "99", bm.block_table, 99),
        (UnknownSequence, "99", bm.swap_out, [1, 99]),
        (DuplicateSequence, "1", bm.allocate, 1, [2]),
        (DuplicateSequence, "1", bm.fork, 1, 1),
        (InvalidRequest, "none", bm.allocate, 2, []),
        (InvalidRequest, "'x'", bm.allocate, 2, [1, "x"]),
        (InvalidRequest, "True", bm.allocate, 2, [True]),
        (InvalidRequest, "hashable", bm.allocate, [2], [1]),
        (InvalidRequest, "0", bm.append_slots, 1, 0),
        (InvalidRequest, "2 tokens", bm.append_slots, 1, 1, [1, 2]),
        (InvalidRequest, r"\[1, 1\]", bm.swap_out, [1, 1]),
        (InvalidState, "not swapped", bm.swap_in, 1),
        (InvalidRequest, "0", bm.can_allocate, 0),
    ]
    for exc, text, fn, *args in cases:
        e = raises_unchanged(bm, exc, fn, *args)
        assert isinstance(e, MinipagedError)
        assert re.search(text, str(e)), (fn, args, str(e))
    bm.free(1)
    raises_unchanged(bm, UnknownSequence, bm.free, 1)  # a double free
    with pytest.raises(InvalidRequest, match="watermark"):
        BlockManager(4, 2, watermark=1)


def test_same_prefix():
    from minipaged.block_manager import BlockKey

    a0 = BlockKey(1, (1, 2), None)
    b0 = BlockKey(1, (1, 2), None)  # equal content, another object
    a1, b1 = BlockKey(2, (3,), a0), BlockKey(2, (3,), b0)
    assert same_prefix(a1, b1) and same_prefix(None, None)
    assert not same_prefix(a1, BlockKey(2, (3,), BlockKey(1, (2, 1), None)))
    assert not same_prefix(a1, a0) and not same_prefix(a0, None)


# ----- the state machine ---------------------------------------------------------------------

ALPHABET = st.integers(0, 2)
PREFIXES = [(), (0, 1, 2, 0, 1, 2, 0, 1), (2, 2, 2, 2, 1, 1, 1, 1), (0, 1, 2, 0, 2, 2)]
HASHES = {
    "default": None,
    "ignores parent": lambda parent, tokens: sum(tokens) % 3,  # collisions along chains
    "constant": lambda parent, tokens: 7,  # every block collides with every other
}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockManagerMachine(RuleBasedStateMachine):
    """The shadow model is ``self.tokens`` (true token ids of every sequence). The fake caches
    ``self.gpu_kv`` / ``self.cpu_kv`` hold, per slot, the token whose KV would be stored there:
    written through ``slot_mapping`` only for the tokens the model computes (not prefix hits),
    and copied exactly as the returned pairs say. Reading every sequence back through its block
    table must give its tokens."""

    @initialize(
        num_gpu=st.integers(4, 24),
        block_size=st.integers(1, 4),
        num_cpu=st.integers(0, 12),
        watermark=st.sampled_from([0.0, 0.01, 0.1, 0.2]),
        prefix=st.booleans(),
        hash_name=st.sampled_from(sorted(HASHES)),
    )
    def setup(self, num_gpu, block_size, num_cpu, watermark, prefix, hash_name):
        self.bm = BlockManager(
            num_gpu,
            block_size,
            num_cpu_blocks=num_cpu,
            watermark=watermark,
            enable_prefix_caching=prefix,
            hash_fn=HASHES[hash_name],
        )
        self.bs = block_size
        self.gpu_kv = np.full((num_gpu, block_size), -1, dtype=np.int64)
        self.cpu_kv = np.full((num_cpu, block_size), -1, dtype=np.int64)
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0
        self.counters = (0, 0, 0)

    # ----- helpers -------------------------------------------------------------------------

    def running(self) -> list[int]:
        return [s for s in self.tokens if not self.bm.is_swapped(s)]

    def swapped(self) -> list[int]:
        return [s for s in self.tokens if self.bm.is_swapped(s)]

    def holders(self, swapped: bool) -> Counter:
        c: Counter = Counter()
        for s in self.swapped() if swapped else self.running():
            c.update(self.bm.block_table(s))
        return c

    def closure(self, seq: int) -> list[int]:
        """The sequences that share blocks with ``seq``, directly or through others."""
        same_pool = self.swapped() if self.bm.is_swapped(seq) else self.running()
        group, blocks, grew = {seq}, set(self.bm.block_table(seq)), True
        while grew:
            grew = False
            for s in same_pool:
                if s not in group and blocks & set(self.bm.block_table(s)):
                    group.add(s)
                    blocks |= set(self.bm.block_table(s))
                    grew = True
        return sorted(group)

    def write(self, seq: int, start: int) -> None:
        """The model computes KV for positions ``start..`` and writes it; each written block must
        be held by this sequence alone (full and shared blocks are read-only)."""
        positions = list(range(start, len(self.tokens[seq])))
        slots = self.bm.slot_mapping(seq, positions)
        for slot in slots:
            assert self.bm.gpu.refcount(int(slot) // self.bs) == 1
        self.gpu_kv.reshape(-1)[slots] = [self.tokens[seq][p] for p in positions]

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    # ----- rules ---------------------------------------------------------------------------

    @rule(data=st.data())
    def allocate(self, data):
        prompt = list(data.draw(st.sampled_from(PREFIXES)))
        prompt += data.draw(st.lists(ALPHABET, min_size=0 if prompt else 1, max_size=9))
        seq, need = self.new_id(), ceil_div(len(prompt), self.bs)
        wm, free = self.bm.watermark_blocks, self.bm.gpu.num_free_blocks
        can = self.bm.can_allocate(len(prompt))
        assert can == (free - need >= wm)
        if need + wm > self.bm.gpu.num_blocks:
            raises_unchanged(self.bm, InvalidRequest, self.bm.allocate, seq, prompt)
            return
        before = snapshot(self.bm)
        try:
            cached = self.bm.allocate(seq, prompt)
        except OutOfMemory:
            assert not can and snapshot(self.bm) == before
            event("allocate: out of memory")
            return
        assert self.bm.gpu.num_free_blocks >= wm
        assert cached % self.bs == 0 and 0 <= cached <= (len(prompt) - 1) // self.bs * self.bs
        assert cached == 0 or self.bm.enable_prefix_caching
        event(f"allocate: {'hit' if cached else 'no hit'}")
        self.tokens[seq] = prompt
        self.write(seq, cached)

    @rule(data=st.data(), n=st.integers(1, 5), known=st.booleans())
    def append(self, data, n, known):
        if not self.running():
            return
        seq = data.draw(st.sampled_from(self.running()))
        new = data.draw(st.lists(ALPHABET, min_size=n, max_size=n))
        length, table = len(self.tokens[seq]), self.bm.block_table(seq)
        cow = length % self.bs != 0 and self.holders(False)[table[-1]] > 1
        need = ceil_div(length + n, self.bs) - len(table) + cow
        can = self.bm.can_append(seq, n)
        assert can == (need <= self.bm.gpu.num_free_blocks)
        if not can:
            raises_unchanged(self.bm, OutOfMemory, self.bm.append_slots, seq, n, new)
            event("append: out of memory")
            return
        pairs = self.bm.append_slots(seq, n, new if known else None)
        assert len(pairs) == cow
        for src, dst in pairs:
            event("append: copy on write")
            assert src == table[-1] and dst == self.bm.block_table(seq)[len(table) - 1]
            self.gpu_kv[dst] = self.gpu_kv[src]
        self.tokens[seq] += new
        self.write(seq, length)

    @rule(data=st.data(), known=st.booleans())
    def append_batch(self, data, known):
        """One decode step over several running sequences: the same as one ``append_slots``
        per sequence in order, except that a step that does not fit changes nothing."""
        if not self.running():
            return
        batch = data.draw(st.lists(st.sampled_from(self.running()), min_size=1, unique=True))
        new = data.draw(st.lists(ALPHABET, min_size=len(batch), max_size=len(batch)))
        tables = {s: self.bm.block_table(s) for s in batch}
        refs, need, copies = self.holders(False), 0, []  # copies: (seq, src), in order
        for s in batch:
            last = tables[s][-1]
            if len(self.tokens[s]) % self.bs == 0:
                need += 1
            elif refs[last] > 1:  # a later holder in the step sees one holder less
                need += 1
                refs[last] -= 1
                copies.append((s, last))
        if need > self.bm.gpu.num_free_blocks:
            raises_unchanged(self.bm, OutOfMemory, self.bm.append_slots_batch, batch, new)
            event("append batch: out of memory")
            return
        pairs = self.bm.append_slots_batch(batch, new if known else None)
        assert [src for src, _ in pairs] == [src for _, src in copies]
        for (s, _), (src, dst) in zip(copies, pairs, strict=True):
            event("append batch: copy on write")
            assert dst == self.bm.block_table(s)[len(tables[s]) - 1]
            self.gpu_kv[dst] = self.gpu_kv[src]  # every copy before any new KV is written
        for s, token in zip(batch, new, strict=True):
            self.tokens[s].append(token)
            self.write(s, len(self.tokens[s]) - 1)

    @rule(data=st.data())
    def fork(self, data):
        if not self.tokens:
            return
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.new_id()
        if self.bm.is_swapped(parent):
            raises_unchanged(self.bm, InvalidState, self.bm.fork, parent, child)
            return
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @rule(data=st.data())
    def free(self, data):
        if not self.tokens:
            return
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        del self.tokens[seq]
        raises_unchanged(self.bm, UnknownSequence, self.bm.free, seq)  # a double free

    @rule(data=st.data())
    def swap_out(self, data):
        if not self.running():
            return
        seq = data.draw(st.sampled_from(self.running()))
        group = self.closure(seq)
        if len(group) > 1:
            raises_unchanged(self.bm, InvalidState, self.bm.swap_out, seq)
        blocks = {b for s in group for b in self.bm.block_table(s)}
        if len(blocks) > self.bm.cpu.num_free_blocks:
            raises_unchanged(self.bm, OutOfMemory, self.bm.swap_out, group)
            return
        pairs = self.bm.swap_out(group if len(group) > 1 else seq)
        event("swap out")
        assert sorted(g for g, _ in pairs) == sorted(blocks)
        for g, c in pairs:
            self.cpu_kv[c] = self.gpu_kv[g]

    @rule(data=st.data())
    def swap_in(self, data):
        if not self.swapped():
            return
        seq = data.draw(st.sampled_from(self.swapped()))
        group = self.closure(seq)
        if len(group) > 1:
            raises_unchanged(self.bm, InvalidState, self.bm.swap_in, [seq])
        blocks = {b for s in group for b in self.bm.block_table(s)}
        fits = self.bm.gpu.num_free_blocks - len(blocks) >= self.bm.watermark_blocks
        assert self.bm.can_swap_in(group) == fits
        if not fits:
            raises_unchanged(self.bm, OutOfMemory, self.bm.swap_in, group)
            return
        pairs = self.bm.swap_in(tuple(group))
        event("swap in")
        assert sorted(c for c, _ in pairs) == sorted(blocks)
        for c, g in pairs:
            self.gpu_kv[g] = self.cpu_kv[c]

    @rule(data=st.data())
    def bad_call(self, data):
        """Calls that must fail with the right error and change nothing."""
        bm, unknown = self.bm, self.next_id + 1000
        calls = [
            (UnknownSequence, bm.append_slots, unknown),
            (UnknownSequence, bm.fork, unknown, self.next_id + 2000),
            (UnknownSequence, bm.free, unknown),
            (UnknownSequence, bm.swap_out, [unknown]),
            (UnknownSequence, bm.slot_mapping, unknown),
            (UnknownSequence, bm.append_slots_batch, [unknown]),
            (InvalidRequest, bm.allocate, unknown, []),
        ]
        if self.tokens:
            seq = data.draw(st.sampled_from(sorted(self.tokens)))
            calls += [
                (DuplicateSequence, bm.allocate, seq, [0]),
            ]
            if self.bm.is_swapped(seq):
                calls += [
                    (InvalidState, bm.append_slots, seq, 1),
                    (InvalidState, bm.append_slots_batch, [seq]),
                    (InvalidState, bm.can_append, seq),
                    (InvalidState, bm.fork, seq, unknown),
                    (InvalidState, bm.swap_out, seq),
                    (InvalidState, bm.slot_mapping, seq),
                    (InvalidRequest, bm.swap_in, [seq, seq]),
                ]
            else:
                other = data.draw(st.sampled_from(sorted(self.tokens)))
                calls += [
                    (DuplicateSequence, bm.fork, seq, other),
                    (InvalidRequest, bm.append_slots, seq, 0),
                    (InvalidRequest, bm.append_slots, seq, 2, [1]),
                    (UnknownSequence, bm.append_slots_batch, [seq, unknown]),
                    (InvalidRequest, bm.append_slots_batch, [seq, seq]),
                    (InvalidRequest, bm.append_slots_batch, [seq], [1, 2]),
                    (InvalidRequest, bm.slot_mapping, seq, [len(self.tokens[seq])]),
                    (InvalidState, bm.swap_in, seq),
                    (InvalidRequest, bm.swap_out, [seq, seq]),
                ]
        exc, fn, *args = data.draw(st.sampled_from(calls))
        raises_unchanged(bm, exc, fn, *args)

    @rule()
    def compact(self):
        """Used blocks move below the boundary; the pairs are copied as the kernel would."""
        bm = self.bm
        used = bm.gpu.num_blocks - bm.gpu.num_free_blocks
        pairs = bm.compact()
        event(f"compact moved {min(len(pairs), 3)}+ blocks")
        assert all(src >= used > dst for src, dst in pairs)
        assert len({d for _, d in pairs}) == len(pairs) == len({s for s, _ in pairs})
        for src, dst in pairs:  # no block is both: any order gives the same result
            self.gpu_kv[dst] = self.gpu_kv[src]
        assert all(bm.gpu.is_free(b) for b in range(used, bm.gpu.num_blocks))

    # ----- invariants ----------------------------------------------------------------------

    @invariant()
    def tables_cover_tokens_and_read_back(self):
        bm = self.bm
        assert sorted(bm._tables) == sorted(self.tokens)
        for seq, toks in self.tokens.items():
            assert bm.num_tokens(seq) == len(toks)
            table = bm.block_table(seq)
            assert len(table) == ceil_div(len(toks), self.bs)
            kv = self.cpu_kv if bm.is_swapped(seq) else self.gpu_kv
            assert kv[table].reshape(-1)[: len(toks)].tolist() == toks
            if not bm.is_swapped(seq):
                assert bm.slot_mapping(seq).tolist() == [
                    table[p // self.bs] * self.bs + p % self.bs for p in range(len(toks))
                ]

    @invariant()
    def ref_counts_match_tables(self):
        for pool, swapped in ((self.bm.gpu, False), (self.bm.cpu, True)):
            holders = self.holders(swapped)
            assert [pool.refcount(b) for b in range(pool.num_blocks)] == [
                holders[b] for b in range(pool.num_blocks)
            ]
            assert sorted(pool.free_queue()) == [
                b for b in range(pool.num_blocks) if holders[b] == 0
            ]

    @invariant()
    def prefix_cache_is_sound(self):
        """Keys only on full blocks whose stored KV (and whole prefix) match them; a free block
        has a key exactly when the cache maps its hash to it."""
        bm, bs = self.bm, self.bs
        if not bm.enable_prefix_caching:
            assert not bm._keys and not bm._cache
        for h, b in bm._cache.items():
            assert bm._keys[b].hash == h
        for b, key in bm._keys.items():
            assert self.gpu_kv[b].tolist() == list(key.tokens)
            if bm.gpu.is_free(b):
                assert bm._cache[key.hash] == b
        for seq in self.running():
            toks = self.tokens[seq]
            for i, b in enumerate(bm.block_table(seq)):
                key = bm._keys.get(b)
                if key is None:
                    continue
                chain = []
                while key is not None:
                    chain[:0] = key.tokens
                    key = key.parent
                assert chain == toks[: (i + 1) * bs]

    @invariant()
    def stats_add_up(self):
        bm, s = self.bm, self.bm.stats()
        used = set(self.holders(False))
        cached = {b for b in bm._cache.values() if bm.gpu.is_free(b)}
        assert s.used_blocks == len(used) and s.cached_blocks == len(cached)
        assert s.free_blocks + s.used_blocks + s.cached_blocks == s.num_blocks
        assert s.cpu_used_blocks == len(self.holders(True))
        fill = {}
        for seq in self.running():
            for i, b in enumerate(bm.block_table(seq)):
                fill[b] = min(self.bs, len(self.tokens[seq]) - i * self.bs)
        assert s.tokens_stored == sum(fill.values())
        assert s.slots_wasted == len(used) * self.bs - s.tokens_stored
        counters = (s.prefix_hits, s.prefix_misses, s.evictions)
        assert all(new >= old for new, old in zip(counters, self.counters, strict=True))
        self.counters = counters


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=300, stateful_step_count=60)
