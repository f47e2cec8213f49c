"""Tests of the serving simulator: workloads, traces, the engine's accounting, the CLI.

The spine is :func:`audit`, which checks the *whole* state of an engine (every request in exactly
one place, the policy's books against its allocator or block manager, no overcommitment, the
budget conserved) and runs after every step of every simulation here, including the Hypothesis
state machine at the end.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from minipaged.cli import main
from minipaged.errors import InvalidRequest, InvalidState, TraceFormatError, UnknownSequence
from minipaged.lessons import under_test
from minipaged.sim import report
from minipaged.sim.engine import COLUMNS, PREEMPT_MODES, Engine, SimConfig, simulate, slots_for_gib
from minipaged.sim.policies import (
    CONTIGUOUS,
    POLICIES,
    ContiguousPolicy,
    Group,
    PagedPolicy,
    Policy,
    Usage,
    make_policy,
)
from minipaged.sim.workload import (
    PUBLISHED_MEANS,
    Request,
    arrivals,
    clipped_lognormal_mean,
    load_trace,
    lognormal_mu,
    make_workload,
    prompt_tokens,
    token_id,
)

# The code under test: the library's, or a student's file under `minipaged lesson check`.
simulate = under_test("simulate", simulate)

COL = {c: i for i, c in enumerate(COLUMNS)}

# ----- the whole-state audit --------------------------------------------------------------------


def audit(e: Engine) -> None:
    """Check everything an engine and its policy promise, between two steps."""
    p = e.policy
    # The budget is conserved in every step, and no part is negative.
    for row in e.rows[-2:]:
        assert row[COL["weight"]] >= 1
        parts = row[COL["tokens"] : COL["free"] + 1]
        assert min(parts) >= 0 and sum(parts) == p.budget, row
        assert row[COL["batch"]] >= 0
    # Every submitted request is in exactly one place.
    places = (
        [r.id for r in e.pending]
        + [g.request.id for g in e.waiting]
        + [g.request.id for g in e.running]
        + [g.request.id for g in e.swapped]
        + [c[0] for c in e.completed]
    )
    assert sorted(places) == sorted(e.ids)
    for _, step, generated in e.completed:  # complete, and not faster than one token a step
        assert step >= 0 and generated > 0
    for g in e.running:
        assert 1 <= g.generated < g.request.output_len
    for g in e.waiting:
        assert 0 <= g.generated < g.request.output_len
    for g in e.swapped:
        assert 1 <= g.generated < g.request.output_len
    usage = p.usage()
    assert sum(usage) == p.budget and min(usage) >= 0
    if isinstance(p, ContiguousPolicy):
        audit_contiguous(e, p, usage)
    else:
        assert isinstance(p, PagedPolicy)
        audit_paged(e, p, usage)


def audit_contiguous(e: Engine, p: ContiguousPolicy, usage: Usage) -> None:
    assert not e.swapped and e.preemptions == 0  # reservations never run out
    assert set(p.allocations) == {g.request.id for g in e.running}
    live = sorted((a for allocs in p.allocations.values() for a in allocs), key=lambda a: a.offset)
    for a, b in zip(live, live[1:], strict=False):
        assert a.end <= b.offset  # no overlap
    assert all(0 <= a.offset and a.end <= p.budget for a in live)
    stats = p.allocator.stats()
    assert stats.reserved == p.reserved_slots == sum(a.size for a in live) <= p.budget
    assert stats.free == p.budget - p.reserved_slots == usage.free
    tokens = needed = 0
    for g in e.running:
        allocs = p.allocations[g.request.id]
        assert len(allocs) == g.samples
        for a in allocs:
            assert a.size >= p.reserve(g.request) >= g.request.total_len
            assert a.size == p.footprint(p.reserve(g.request))
        tokens += g.samples * (g.request.input_len + g.generated)
        needed += g.samples * g.request.total_len
    assert usage == Usage(tokens, needed - tokens, p.reserved_slots - needed, 0, usage.free)
    if p.name == "oracle":
        assert usage.internal == 0


def audit_paged(e: Engine, p: PagedPolicy, usage: Usage) -> None:
    bm, bs = p.bm, p.block_size
    stats = bm.stats()
    on_gpu = sum(g.samples for g in e.running)
    assert stats.num_sequences == on_gpu + sum(g.samples for g in e.swapped)
    assert stats.num_swapped == sum(g.samples for g in e.swapped)
    assert usage.reserved == 0
    assert usage.tokens == stats.tokens_stored
    assert usage.internal == stats.slots_wasted <= on_gpu * (bs - 1)
    assert usage.free == (stats.free_blocks + stats.cached_blocks) * bs
    assert usage.unusable == p.budget % bs
    assert stats.used_blocks <= stats.num_blocks and stats.cpu_used_blocks <= stats.num_cpu_blocks
    held: set[int] = set()
    for g in e.running:
        r = g.request
        for seq in g.seq_ids:
            n = bm.num_tokens(seq)
            assert not bm.is_swapped(seq)
            assert n == p.lengths[seq]
            assert r.input_len + g.generated <= n <= min(r.input_len + g.generated + 1, r.total_len)
            table = bm.block_table(seq)
            assert len(table) == -(-n // bs)
            held.update(table)
        if p.sharing:  # the prompt's full blocks stay shared by all samples
            tables = [bm.block_table(seq)[: r.input_len // bs] for seq in g.seq_ids]
            assert all(t == tables[0] for t in tables)
    assert len(held) == stats.used_blocks  # no block leaks, none is held twice by mistake
    for g in e.swapped:
        assert all(bm.is_swapped(seq) for seq in g.seq_ids)
    for g in e.waiting:
        for seq in g.seq_ids:
            with pytest.raises(UnknownSequence):
                bm.num_tokens(seq)


def run_audited(requests, policy, config=None):
    result = simulate(requests, policy, config, on_step=audit)
    check_completion(result, requests)
    return result


def check_completion(result, requests):
    """Every request completes exactly once, with its full output, no sooner than possible."""
    by_id = {r.id: r for r in requests}
    ids = [c[0] for c in result.completed]
    assert sorted(ids) == sorted(by_id)
    for rid, step, generated in result.completed:
        r = by_id[rid]
        assert generated == r.output_len
        assert step >= r.arrival + r.output_len - 1
    t = result.timeline
    assert (t[:, COL["tokens"] : COL["free"] + 1].sum(axis=1) == result.budget).all()
    if len(t):
        assert result.steps == t[-1, COL["step"]] + t[-1, COL["weight"]]


def small(**kw) -> SimConfig:
    base = dict(kv_slots=128, max_len=32, block_size=4, watermark=0.0, swap_slots=64)
    base.update(kw)
    return SimConfig(**base)


# ----- workloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sharegpt", "alpaca"])
def test_synthetic_means_match_the_published_means(name):
    requests = make_workload(name, 100_000, seed=1)
    mean_in, mean_out = PUBLISHED_MEANS[name]
    assert np.mean([r.input_len for r in requests]) == pytest.approx(mean_in, rel=0.03)
    assert np.mean([r.output_len for r in requests]) == pytest.approx(mean_out, rel=0.03)


@pytest.mark.parametrize("name", ["sharegpt", "alpaca", "prefix"])
@pytest.mark.parametrize("max_len", [2048, 300, 2])
def test_synthetic_requests_fit(name, max_len):
    if name == "prefix" and max_len == 2:
        with pytest.raises(InvalidRequest, match="prefix_len 256"):
            make_workload(name, 10, max_len=max_len)
        return
    requests = make_workload(name, 2000, seed=3, max_len=max_len)
    assert [r.id for r in requests] == list(range(2000))
    for r in requests:
        assert r.input_len >= 1 and r.output_len >= 1 and r.total_len <= max_len
        assert r.arrival == 0
        if name == "prefix":
            assert r.prefix_len == 256 and 0 <= r.prefix_id < 4 and r.input_len > 256
        else:
            assert r.prefix_id is None and r.prefix_len == 0


def test_workloads_are_deterministic_per_seed():
    assert make_workload("sharegpt", 50, seed=7) == make_workload("sharegpt", 50, seed=7)
    assert make_workload("sharegpt", 50, seed=7) != make_workload("sharegpt", 50, seed=8)
    assert make_workload("prefix", 50, 2, rate=0.5) == make_workload("prefix", 50, 2, rate=0.5)


def test_rate_changes_arrivals_only():
    burst = make_workload("alpaca", 400, seed=5)
    spread = make_workload("alpaca", 400, seed=5, rate=0.25)
    assert [(r.input_len, r.output_len) for r in burst] == [
        (r.input_len, r.output_len) for r in spread
    ]
    steps = [r.arrival for r in spread]
    assert steps == sorted(steps) and steps[-1] == pytest.approx(400 / 0.25, rel=0.2)
    assert arrivals(3, math.inf, 0) == [0, 0, 0]


def test_lognormal_calibration():
    mu = lognormal_mu(100.0, 1.0, 1, 500)
    assert clipped_lognormal_mean(mu, 1.0, 1, 500) == pytest.approx(100.0)
    x = np.clip(np.random.default_rng(0).lognormal(mu, 1.0, 400_000), 1, 500)
    assert x.mean() == pytest.approx(100.0, rel=0.01)
    with pytest.raises(InvalidRequest, match="mean of 600"):
        lognormal_mu(600.0, 1.0, 1, 500)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="bogus", num_requests=5), "unknown workload 'bogus'"),
        (dict(name="alpaca", num_requests=0), "num_requests"),
        (dict(name="alpaca", num_requests=5, rate=0), "rate"),
        (dict(name="alpaca", num_requests=5, seed=-1), "seed"),
        (dict(name="alpaca", num_requests=5, max_len=1), "max_len"),
        (dict(name="prefix", num_requests=5, num_prefixes=0), "num_prefixes"),
    ],
)
def test_bad_workload_arguments(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        make_workload(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(id=-1, input_len=1, output_len=1), "id must be an int >= 0"),
        (dict(id=0, input_len=0, output_len=1), "input_len"),
        (dict(id=0, input_len=1, output_len=True), "output_len"),
        (dict(id=0, input_len=1, output_len=1, arrival=-2), "arrival"),
        (dict(id=0, input_len=4, output_len=1, prefix_len=2), "needs a prefix_id"),
        (dict(id=0, input_len=4, output_len=1, prefix_id=1), "prefix_len must be"),
        (dict(id=0, input_len=4, output_len=1, prefix_id=1, prefix_len=5), "longer than"),
    ],
)
def test_bad_requests(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        Request(**kwargs)


def test_token_ids_share_only_system_prompts():
    a = Request(0, 6, 2, prefix_id=1, prefix_len=4)
    b = Request(1, 6, 2, prefix_id=1, prefix_len=4)
    c = Request(2, 6, 2, prefix_id=2, prefix_len=4)
    assert prompt_tokens(a)[:4] == prompt_tokens(b)[:4]
    assert prompt_tokens(a)[4:] != prompt_tokens(b)[4:]
    assert not set(prompt_tokens(a)) & set(prompt_tokens(c))
    outputs = {token_id(a, 6, s) for s in range(3)} | {token_id(b, 6, s) for s in range(3)}
    assert len(outputs) == 6 and not outputs & set(prompt_tokens(a) + prompt_tokens(b))


# ----- traces -----------------------------------------------------------------------------------


def test_csv_trace(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "input_len,output_len,arrival,prefix_id,extra\n10,5,3,,x\n\n20,4,0.5,sys,y\n30,2,0,sys,z\n"
    )
    requests = load_trace(path, max_len=64, prefix_len=8)
    assert requests == [
        Request(2, 30, 2, 0, prefix_id=0, prefix_len=8),
        Request(1, 20, 4, 1, prefix_id=0, prefix_len=8),
        Request(0, 10, 5, 3),
    ]


def test_jsonl_trace(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"input_len": 5, "output_len": 1}\n'
        "\n"
        '{"input_len": 9, "output_len": 3, "arrival": 2, "prefix_id": 7, "prefix_len": 9}\n'
        '{"input_len": 4, "output_len": 3, "prefix_id": "a"}\n'
    )
    requests = load_trace(path, max_len=16)
    assert requests == [
        Request(0, 5, 1),
        Request(2, 4, 3, 0, prefix_id=1, prefix_len=4),
        Request(1, 9, 3, 2, prefix_id=0, prefix_len=9),
    ]


@pytest.mark.parametrize(
    "name, text, line, match",
    [
        ("a.csv", "input_len,arrival\n1,2\n", 1, "no 'output_len' column"),
        ("a.csv", "input_len,output_len\n1,2\n3,x\n", 3, "output_len must be an integer"),
        ("a.csv", "input_len,output_len\n1,2\n\n0,2\n", 4, "input_len must be an integer >= 1"),
        ("a.csv", "input_len,output_len\n1.5,2\n", 2, "input_len"),
        ("a.csv", "input_len,output_len\n1,2,3\n", 2, "more fields"),
        ("a.csv", "input_len,output_len,arrival\n1,2\n", 2, "no value for 'arrival'"),
        ("a.csv", "input_len,output_len\n1,\n", 2, "missing 'output_len'"),
        ("a.csv", "input_len,output_len,arrival\n1,2,-1\n", 2, "arrival must be a number"),
        ("a.csv", "input_len,output_len,arrival\n1,2,nan\n", 2, "arrival"),
        ("a.csv", "input_len,output_len\n60,10\n", 2, "exceeds max_len 64"),
        ("a.csv", "input_len,output_len,prefix_len\n6,1,3\n", 2, "without a prefix_id"),
        ("a.jsonl", '{"input_len": 1, "output_len": 2}\n{"input_len": 1\n', 2, "not valid JSON"),
        ("a.jsonl", "[1, 2]\n", 1, "expected a JSON object"),
        ("a.jsonl", '{"input_len": true, "output_len": 2}\n', 1, "input_len"),
        ("a.jsonl", '{"input_len": 2.0, "output_len": 2}\n', 1, "input_len"),
        ("a.jsonl", '{"input_len": 4}\n', 1, "missing 'output_len'"),
        ("a.jsonl", '{"input_len": 4, "output_len": 2, "arrival": "soon"}\n', 1, "arrival"),
        (
            "a.jsonl",
            '{"input_len": 4, "output_len": 2, "prefix_id": 1, "prefix_len": 5}\n',
            1,
            "prefix_len 5 is longer than input_len 4",
        ),
    ],
)
def test_malformed_traces_name_file_and_line(tmp_path, name, text, line, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceFormatError, match=match) as info:
        load_trace(path, max_len=64)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_empty_and_binary_traces(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("input_len,output_len\n\n")
    with pytest.raises(TraceFormatError, match="holds no requests"):
        load_trace(empty)
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceFormatError, match="not UTF-8"):
        load_trace(binary)


def test_trace_format_is_sniffed_without_a_known_suffix(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text('{"input_len": 3, "output_len": 1}\n')
    assert load_trace(path) == [Request(0, 3, 1)]


# ----- the engine: exact small cases ------------------------------------------------------------


def test_oracle_counts_external_fragmentation_exactly():
    # A and C live long, B and D leave after 5 steps: 60 slots are free in two holes of 30, and
    # F (40 slots) waits from step 5 until A and C complete after step 18.
    reqs = [
        Request(0, 1, 19),
        Request(1, 25, 5),
        Request(2, 1, 19),
        Request(3, 25, 5),
        Request(4, 35, 5),
    ]
    result = run_audited(reqs, "oracle", SimConfig(kv_slots=100, max_len=64))
    t = result.timeline
    assert t[0, COL["tokens"]] == 2 + 26 + 2 + 26 and t[0, COL["reserved"]] == 100 - 56
    assert list(t[:5, COL["external"]]) == [0] * 5  # memory is missing, not fragmented
    assert list(t[5:19, COL["external"]]) == [60] * 14
    assert list(t[5:19, COL["free"]]) == [0] * 14
    assert t[19, COL["external"]] == 0 and t[19, COL["batch"]] == 1
    assert result.completed[-1] == (4, 23, 5) and result.steps == 24
    assert result.shares()["external"] == pytest.approx(14 * 60 / (24 * 100))


def test_paged_counts_the_partial_last_block_as_external():
    result = run_audited([Request(0, 3, 3)], "paged", SimConfig(kv_slots=100, max_len=8))
    assert (result.timeline[:, COL["external"]] == 100 % 16).all()
    assert result.timeline[0, COL["tokens"]] == 4 and result.timeline[0, COL["internal"]] == 12


def test_max_reserves_the_whole_context_window():
    reqs = make_workload("alpaca", 30, seed=2, max_len=32)
    result = run_audited(reqs, "max", small(kv_slots=100))
    assert result.peak_batch == 3  # 3 x 32 slots fit in 100, 4 do not
    t = result.timeline
    in_use = t[:, COL["tokens"]] + t[:, COL["reserved"]] + t[:, COL["internal"]]
    assert set(in_use.tolist()) <= {0, 32, 64, 96}


def test_pow2_reserves_the_next_power_of_two():
    result = run_audited([Request(0, 10, 7)], "pow2", SimConfig(kv_slots=64, max_len=32))
    row = result.timeline[0]
    assert row[COL["tokens"]] == 11 and row[COL["reserved"]] == 6 and row[COL["internal"]] == 15


def test_sharing_stores_the_prompt_once_and_copies_on_write():
    req = [Request(0, 10, 3)]
    cfg = small(kv_slots=64, samples=3)
    shared = run_audited(req, "paged+sharing", cfg)
    assert shared.timeline[0, COL["tokens"]] == 8 + 3 * (2 + 1)  # 2 full blocks + 3 own tails
    assert shared.timeline[0, COL["internal"]] == 3
    assert shared.cow_copies == 2  # the last writer keeps the original block
    plain = run_audited(req, "paged", cfg)
    assert plain.timeline[0, COL["tokens"]] == 3 * 11 and plain.cow_copies == 0


def test_prefix_caching_stores_a_shared_system_prompt_once():
    reqs = [Request(i, 10, 2, prefix_id=0, prefix_len=8) for i in range(2)]
    cached = run_audited(reqs, "paged+prefix", small(kv_slots=64))
    assert cached.timeline[0, COL["tokens"]] == 22 - 8 and cached.prefix_hit_blocks == 2
    assert run_audited(reqs, "paged", small(kv_slots=64)).timeline[0, COL["tokens"]] == 22


@pytest.mark.parametrize("preempt", PREEMPT_MODES)
@pytest.mark.parametrize("policy", ["paged", "paged+prefix", "paged+sharing"])
def test_preemption_completes_everything(preempt, policy):
    reqs = [Request(i, 6, 24) for i in range(6)]
    cfg = small(kv_slots=64, max_len=64, samples=2 if policy == "paged+sharing" else 1)
    result = run_audited(reqs, policy, SimConfig(**{**cfg.__dict__, "preempt": preempt}))
    assert result.preemptions > 0
    assert (result.swaps > 0) == (preempt == "swap")


def test_requests_sharing_cached_blocks_are_recomputed_not_swapped():
    # Every request reuses the cached system-prompt block, which cannot be on CPU and GPU at once.
    reqs = [Request(i, 4, 40, prefix_id=0, prefix_len=4) for i in range(6)]
    cfg = small(kv_slots=64, max_len=64, preempt="swap")
    result = run_audited(reqs, "paged+prefix", cfg)
    assert result.preemptions > 0 and result.swaps == 0 and result.prefix_hit_blocks > 0


def test_swap_falls_back_to_recompute_without_cpu_memory():
    reqs = [Request(i, 4, 40) for i in range(6)]
    result = run_audited(
        reqs, "paged", small(kv_slots=64, max_len=64, preempt="swap", swap_slots=0)
    )
    assert result.preemptions > 0 and result.swaps == 0


def test_max_batch_caps_the_running_sequences():
    reqs = make_workload("alpaca", 40, seed=4, max_len=32)
    for policy in ("oracle", "paged"):
        result = run_audited(reqs, policy, small(kv_slots=512, max_batch=3))
        assert result.peak_batch == 3


def test_idle_stretches_are_skipped_but_counted():
    reqs = [Request(0, 4, 2), Request(1, 4, 2, arrival=100)]
    result = run_audited(reqs, "paged", small())
    t = result.timeline
    assert result.steps == 102 and len(t) == 5
    assert list(t[2]) == [2, 98, 0, 0, 0, 0, 128, 0]
    assert result.completed == [(0, 1, 2), (1, 101, 2)]
    assert result.mean_batch == pytest.approx(4 / 102)


def test_results_are_deterministic():
    reqs = make_workload("sharegpt", 60, seed=9, max_len=64, rate=2.0)
    for policy in POLICIES:
        a = simulate(reqs, policy, small(kv_slots=400, max_len=64, samples=2))
        b = simulate(reqs, policy, small(kv_slots=400, max_len=64, samples=2))
        assert a.summary() == b.summary() and a.completed == b.completed
        assert np.array_equal(a.timeline, b.timeline)


def test_requests_that_can_never_run_are_refused_up_front():
    with pytest.raises(InvalidRequest, match="request 0 needs 1 x 32 slots under policy max"):
        simulate([Request(0, 2, 2), Request(1, 2, 2)], "max", SimConfig(kv_slots=16, max_len=32))
    with pytest.raises(InvalidRequest, match="request 0 needs 3 blocks under policy paged"):
        simulate([Request(0, 40, 8)], "paged", SimConfig(kv_slots=32, max_len=64))
    with pytest.raises(InvalidRequest, match="more than max_len 8"):
        simulate([Request(0, 6, 6)], "oracle", SimConfig(kv_slots=32, max_len=8))
    with pytest.raises(InvalidRequest, match="unknown policy 'lru'"):
        simulate([Request(0, 2, 2)], "lru", small())


def test_submit_refuses_without_changing_anything():
    e = Engine(make_policy("pow2", 64, 32), small(kv_slots=64), [Request(0, 2, 2)])
    for bad, match in [(Request(0, 3, 3), "already taken"), (Request(1, 30, 30), "max_len")]:
        with pytest.raises(InvalidRequest, match=match):
            e.submit(bad)
    assert e.ids == {0} and list(e.pending) == [Request(0, 2, 2)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_slots=0), "kv_slots"),
        (dict(block_size=0), "block_size"),
        (dict(samples=0), "samples"),
        (dict(samples=1001), "samples"),
        (dict(preempt="drop"), "preempt"),
        (dict(watermark=1.0), "watermark"),
        (dict(max_batch=1, samples=2), "max_batch 1"),
        (dict(max_len=1), "max_len"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        SimConfig(**kwargs)


def test_a_policy_that_never_admits_is_reported_not_looped():
    class Never(Policy):
        name, budget = "never", 10

        def check(self, request, samples):
            pass

        def admit(self, g: Group) -> bool:
            return False

        def grow(self, g):
            return True

        def release(self, g):
            pass

        def usage(self):
            return Usage(0, 0, 0, 0, 10)

    e = Engine(Never(), small(), [Request(0, 2, 2)])
    with pytest.raises(InvalidState, match="request 0 cannot be served"):
        e.run_step()


def test_default_budget_is_40_gib_of_opt13b():
    assert SimConfig().kv_slots == slots_for_gib(40) == 40 * 2**30 // (800 * 1024) == 52428
    with pytest.raises(InvalidRequest):
        slots_for_gib(-1)


# ----- Hypothesis: random small workloads over every policy -------------------------------------

request_lists = st.lists(
    st.tuples(
        st.integers(1, 15),  # input
        st.integers(1, 15),  # output
        st.integers(0, 6),  # arrival
        st.sampled_from([None, 0, 1]),  # system prompt
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=100)
@given(
    specs=request_lists,
    policy=st.sampled_from(POLICIES),
    block_size=st.sampled_from([1, 2, 4, 8]),
    samples=st.integers(1, 3),
    preempt=st.sampled_from(PREEMPT_MODES),
    swap_slots=st.sampled_from([0, 16, 64]),
)
def test_random_workloads_conserve_and_complete(
    specs, policy, block_size, samples, preempt, swap_slots
):
    reqs = []
    for i, (n_in, n_out, arrival, prefix) in enumerate(specs):
        n_out = min(n_out, 16 - n_in)
        plen = min(n_in, 4) if prefix is not None else 0
        reqs.append(Request(i, n_in, n_out, arrival, prefix, plen))
    cfg = SimConfig(
        kv_slots=16 * 3 + 8,
        max_len=16,
        block_size=block_size,
        samples=samples,
        preempt=preempt,
        swap_slots=swap_slots,
        watermark=0.0,
    )
    run_audited(reqs, policy, cfg)


class EngineMachine(RuleBasedStateMachine):
    """Requests arrive while the engine runs; the whole state is audited after every rule."""

    @initialize(
        policy=st.sampled_from(POLICIES),
        per_sample=st.sampled_from([16, 24, 40, 64]),
        block_size=st.sampled_from([1, 2, 4, 8]),
        samples=st.integers(1, 3),
        preempt=st.sampled_from(PREEMPT_MODES),
        swap_slots=st.sampled_from([0, 24, 96]),
        watermark=st.sampled_from([0.0, 0.1]),
        max_batch=st.sampled_from([0, 4]),
    )
    def setup(
        self, policy, per_sample, block_size, samples, preempt, swap_slots, watermark, max_batch
    ):
        budget = per_sample * samples  # room for at least one request of max_len 16
        self.config = SimConfig(
            kv_slots=budget,
            max_len=16,
            block_size=block_size,
            samples=samples,
            preempt=preempt,
            swap_slots=swap_slots,
            watermark=watermark,
            max_batch=max(max_batch, samples) if max_batch else 0,
        )
        swap_blocks = swap_slots // block_size if preempt == "swap" else 0
        self.engine = Engine(
            make_policy(policy, budget, 16, block_size, swap_blocks, watermark), self.config
        )
        self.submitted: list[Request] = []

    @rule(
        batch=st.lists(
            st.tuples(
                st.integers(1, 15),
                st.integers(1, 15),
                st.integers(0, 3),
                st.sampled_from([None, 0, 1]),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def arrive(self, batch):
        e = self.engine
        for n_in, n_out, delay, prefix in batch:
            plen = min(n_in, 5) if prefix is not None else 0
            r = Request(
                len(self.submitted), n_in, min(n_out, 16 - n_in), e.step + delay, prefix, plen
            )
            pending = list(e.pending)
            try:
                e.submit(r)
            except InvalidRequest:  # too large for this budget: refused, nothing changed
                assert list(e.pending) == pending and r.id not in e.ids
                continue
            self.submitted.append(r)

    @rule()
    def step(self):
        self.engine.run_step()

    @invariant()
    def whole_state_is_consistent(self):
        if hasattr(self, "engine"):
            audit(self.engine)

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        while not e.finished:
            e.run_step()
            audit(e)
        check_completion(e.result(), self.submitted)


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=100, stateful_step_count=40)


# ----- report and CLI ---------------------------------------------------------------------------


def test_progress_bar_draws_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = report.ProgressBar(tty, delay=0, interval=0)
    bar.update(0.5, "paged 5/10")
    assert "[###############...............]  50.0%" in tty.getvalue()
    assert "paged 5/10" in tty.getvalue()
    bar.close()
    assert tty.getvalue().endswith("\r\033[K")
    pipe = io.StringIO()
    for enabled in (True, False):
        quiet = report.ProgressBar(pipe, enabled=enabled, delay=0, interval=0)
        quiet.update(1.0)
        quiet.close()
    assert pipe.getvalue() == ""
    slow = report.ProgressBar(Tty(), delay=60)
    slow.update(0.1)
    assert slow.stream.getvalue() == ""


def test_cli_help_states_the_definitions(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--requests", "--policy", "--preempt", "internal", "external", "copy-on-write"):
        assert word in out


def test_cli_table(capsys):
    assert main(["simulate", "--requests", "12", "--quiet", "--kv-slots", "6000"]) == 0
    out = capsys.readouterr().out
    assert "12 requests, ShareGPT-like" in out
    for name in POLICIES:
        assert f"\n{name} " in out
    assert "paged+sharing equals paged" in out


def test_cli_json(capsys):
    argv = ["simulate", "--requests", "10", "--json", "--workload", "prefix", "--samples", "2"]
    assert main([*argv, "--policy", "oracle,paged+prefix", "--policy", "max,oracle"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in data["results"]] == ["oracle", "paged+prefix", "max"]
    assert data["config"]["samples"] == 2 and data["config"]["requests"] == 10
    for r in data["results"]:
        assert sum(r["memory"].values()) == pytest.approx(1.0)
        assert r["completed"] == 10


def test_cli_trace_and_errors(tmp_path, capsys):
    good = tmp_path / "t.csv"
    good.write_text("input_len,output_len\n5,3\n7,2\n")
    assert main(["simulate", "--trace", str(good), "--json", "--policy", "paged"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["completed"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_len": 5, "output_len": 3}\n{"input_len": -5, "output_len": 3}\n')
    assert main(["simulate", "--trace", str(bad)]) == 2
    assert f"error: {bad}:2: input_len" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert main(["simulate", "--policy", "max,fifo"]) == 2
    assert "unknown policy 'fifo'" in capsys.readouterr().err
    assert main(["simulate", "--kv-slots", "100", "--requests", "3", "--policy", "max"]) == 2
    assert "under policy max" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--block-size", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_cli_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    path = tmp_path / "mem.png"
    argv = ["simulate", "--requests", "8", "--quiet", "--kv-slots", "5000", "--policy", "max,paged"]
    assert main([*argv, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot saved" in capsys.readouterr().out
    assert main([*argv, "--plot", str(tmp_path / "no" / "dir.png")]) == 2
    assert "no directory" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    assert main([*argv, "--plot", str(path)]) == 2
    assert "pip install 'minipaged[plot]'" in capsys.readouterr().err


def test_plot_without_matplotlib_raises_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"minipaged\[plot\]"):
        report.plot([], tmp_path / "x.png")


def test_table_lists_every_result():
    reqs = [Request(0, 3, 2)]
    results = [simulate(reqs, p, small()) for p in CONTIGUOUS]
    lines = report.table(results).splitlines()
    assert len(lines) == 3 + len(CONTIGUOUS)
    assert lines[3].startswith("max ") and lines[3].count("%") == 5
