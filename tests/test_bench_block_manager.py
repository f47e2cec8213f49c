"""Tests of the block-manager benchmark: the trace is a valid, deterministic engine loop, its
replay leaves the manager empty, and both decode APIs do the same thing. Correctness only: no
test looks at a speed."""

from __future__ import annotations

import json

import pytest

from minipaged.bench import block_manager as bench
from minipaged.bench.block_manager import ALLOCATE, DECODE, FORK, FREE
from minipaged.block_manager import BlockManager
from minipaged.errors import InvalidRequest


@pytest.fixture(scope="module")
def trace() -> bench.Trace:
    return bench.make_trace(bench.QUICK_SEQS, seed=1)


def test_the_trace_is_a_valid_engine_loop(trace):
    """Every sequence is created once (allocated or forked from a live parent), appended to at
    most once per step while alive, and freed once; the counts add up."""
    alive: set[int] = set()
    created, freed = [], []
    appends = steps = 0
    for kind, a, b in trace.ops:
        if kind == ALLOCATE:
            assert len(alive) < trace.max_running  # admitted only into a free place
            assert a not in alive and a not in created
            assert b and all(isinstance(t, int) and 0 <= t < bench.VOCAB_SIZE for t in b)
            alive.add(a)
            created.append(a)
        elif kind == FORK:
            assert a in alive and b not in alive and b not in created
            alive.add(b)
            created.append(b)
        elif kind == DECODE:
            assert len(a) == len(set(a)) == len(b) and set(a) == alive  # all running decode
            appends += len(a)
            steps += 1
        else:
            assert kind == FREE and a in alive and b is None
            alive.remove(a)
            freed.append(a)
    assert not alive and sorted(freed) == sorted(created)
    assert trace.allocations == bench.QUICK_SEQS == sum(op[0] == ALLOCATE for op in trace.ops)
    assert trace.forks == sum(op[0] == FORK for op in trace.ops) > 0
    assert trace.frees == len(freed) == trace.allocations + trace.forks
    assert trace.appends == appends and trace.steps == steps
    assert sorted(created)[: bench.QUICK_SEQS] == list(range(bench.QUICK_SEQS))


def test_every_sequence_decodes_before_it_is_freed(trace):
    decoded: set[int] = set()
    for kind, a, _ in trace.ops:
        if kind == DECODE:
            decoded.update(a)
        elif kind == FREE:
            assert a in decoded


@pytest.mark.parametrize("watermark", [0.0, 0.01, 0.2])
def test_the_pool_never_runs_out_and_the_manager_ends_empty(trace, watermark):
    num_blocks = bench.pool_blocks(trace, watermark)
    assert num_blocks - int(watermark * num_blocks) >= trace.peak_blocks
    bm = BlockManager(num_blocks, trace.block_size, watermark=watermark, enable_prefix_caching=True)
    copies, decode_seconds = bench.replay(bm, trace)  # raises OutOfMemory if the pool is short
    s = bm.stats()
    assert s.num_sequences == 0 and s.used_blocks == 0
    assert s.free_blocks + s.cached_blocks == s.num_blocks
    assert s.prefix_hits > 0 and s.evictions >= 0 and copies > 0 and decode_seconds > 0


def test_batched_and_one_by_one_replays_end_in_the_same_state(trace):
    managers = []
    for batched in (True, False):
        bm = BlockManager(
            bench.pool_blocks(trace, 0.01), trace.block_size, enable_prefix_caching=True
        )
        copies, _ = bench.replay(bm, trace, batched=batched)
        cached = {b: (k.hash, k.tokens) for b, k in bm._keys.items()}
        managers.append((copies, bm.stats(), bm.gpu.free_queue(), dict(bm._cache), cached))
    assert managers[0] == managers[1]


def test_the_trace_is_deterministic_by_seed():
    a = bench.make_trace(200, seed=3)
    assert bench.make_trace(200, seed=3) == a
    assert bench.make_trace(200, seed=4).ops != a.ops


def test_run_quick():
    r = bench.run(bench.QUICK_SEQS, repeats=2, seed=1, warmup=False)
    t = bench.make_trace(bench.QUICK_SEQS, seed=1)
    assert (r.allocations, r.appends, r.forks, r.frees, r.steps) == (
        t.allocations,
        t.appends,
        t.forks,
        t.frees,
        t.steps,
    )
    assert r.num_gpu_blocks == bench.pool_blocks(t, r.watermark) and r.watermark == 0.01
    assert r.ops == r.allocations + r.appends + r.frees + r.forks
    assert r.prefix_hit_blocks > 0 and r.copies > 0 and r.batched
    assert len(r.all_seconds) == 2 and min(r.all_seconds) <= r.seconds <= max(r.all_seconds)
    assert 0 < r.decode_seconds <= r.seconds
    assert r.appends_per_s == pytest.approx(r.appends / r.seconds)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["appends"] == r.appends and d["ops_per_s"] == pytest.approx(r.ops_per_s)
    assert d["decode_appends_per_s"] == pytest.approx(r.decode_appends_per_s)
    table = bench.format_table(r)
    for text in ("append (token slots)", f"{r.appends:,}", "prefix-hit blocks", "appends/s"):
        assert text in table
    # the same trace counts the same in a second run, prefix caching off or one by one
    off = bench.run(bench.QUICK_SEQS, repeats=1, seed=1, enable_prefix_caching=False)
    assert off.prefix_hit_blocks == off.evictions == 0 and off.copies == r.copies
    single = bench.run(bench.QUICK_SEQS, repeats=1, seed=1, batched=False, warmup=False)
    assert (single.copies, single.prefix_hit_blocks, single.evictions) == (
        r.copies,
        r.prefix_hit_blocks,
        r.evictions,
    )
    assert "one per sequence" in bench.format_table(single)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bench.run(10, repeats=0),
        lambda: bench.run(10, watermark=1.0),
        lambda: bench.make_trace(0),
        lambda: bench.make_trace(10, block_size=0),
        lambda: bench.make_trace(10, fork_fraction=1.5),
        lambda: bench.make_trace(10, output_mean=0.5),
    ],
)
def test_bad_arguments_are_refused(call):
    with pytest.raises(InvalidRequest):
        call()
