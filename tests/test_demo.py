"""Tests of `minipaged fragment --demo`: output, determinism, one shared workload, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.cli import main
from minipaged.demo import ALLOCATORS, make_allocator, run, workload
from minipaged.errors import InvalidRequest
from minipaged.metrics import report


def fragment(capsys, *args: str) -> str:
    assert main(["fragment", "--demo", *args]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    return out.out


def test_default_demo_prints_map_metrics_and_failures(capsys):
    out = fragment(capsys)
    lines = out.splitlines()
    assert lines[0].startswith("fragment demo: buddy; 256 pages, 2000 steps, seed 0")
    maps = [line for line in lines if line.startswith("|")]
    assert len(maps) == 1 and len(maps[0]) == 64 + 2
    assert set(maps[0][1:-1]) <= set("#+.")
    for needle in [
        "1 cell = 4 units",
        "# requested",
        "order ",
        "extfrag ",
        "unusable ",
        "utilisation ",
        "internal fragmentation ",
        "external fragmentation ",
        "failed, missing ",
        "failed, fragmented ",
        "frees ",
    ]:
        assert needle in out, needle
    counts = {
        name: int(line.split()[-1] if "(" not in line else line.split("(")[0].split()[-1])
        for line in lines
        for name in ["allocation requests", "served", "failed, missing", "failed, fragmented"]
        if line.strip().startswith(name)
    }
    assert counts["allocation requests"] == (
        counts["served"] + counts["failed, missing"] + counts["failed, fragmented"]
    )


@pytest.mark.parametrize("name", ALLOCATORS)
def test_each_allocator_runs(capsys, name):
    out = fragment(capsys, "--allocator", name, "--steps", "300", "--pages", "64")
    assert out.startswith(f"fragment demo: {name};")
    assert "|" in out and "failed, fragmented" in out
    if name == "paged":
        assert "failed, fragmented    0 " in out  # paging never fails for fragmentation


def test_same_seed_same_output_other_seed_other_output(capsys):
    args = ["--allocator", "first-fit", "--steps", "500", "--seed", "7"]
    first = fragment(capsys, *args)
    assert fragment(capsys, *args) == first
    assert fragment(capsys, "--allocator", "first-fit", "--steps", "500", "--seed", "8") != first


def test_all_compares_every_allocator_on_one_workload(capsys):
    out = fragment(capsys, "--all", "--steps", "1000", "--seed", "3")
    lines = out.splitlines()
    assert lines[0].startswith("fragment demo: buddy, first-fit, best-fit, paged;")
    table = lines[2:]
    assert table[0].split() == [
        "allocator",
        "util",
        "internal",
        "external",
        "requests",
        "served",
        "missing",
        "fragmented",
    ]
    rows = {row.split()[0]: row.split()[1:] for row in table[1:]}
    assert list(rows) == list(ALLOCATORS)
    assert len({r[3] for r in rows.values()}) == 1  # the same number of requests for all
    for r in rows.values():
        assert int(r[3]) == int(r[4]) + int(r[5]) + int(r[6])
    assert rows["paged"][6] == "0" and rows["paged"][2] == "0.000"
    assert rows["first-fit"][1] == "0.000"  # round_to 1: no internal fragmentation
    assert fragment(capsys, "--all", "--steps", "1000", "--seed", "3") == out


def test_paged_rounds_to_blocks():
    ops = [("alloc", 5), ("alloc", 4), ("alloc", 1)]
    result = run("paged", make_allocator("paged", 16, 4), ops)
    # 5 slots take 2 blocks, 4 slots 1 block, 1 slot the last block: all served.
    assert (result.requests, result.served, result.missing, result.fragmented) == (3, 3, 0, 0)
    r = report(result.allocator)
    assert (r.requested, r.reserved, r.free) == (10, 16, 0)


def test_run_counts_failures_by_cause():
    # First fit on 8 pages: 4 + 2 + 2 fill it; freeing the two 2-page pieces at [4, 6) and
    # [6, 8) leaves one hole of 4, so a 4 fits; then a 1 is missing memory.
    ops = [("alloc", 4), ("alloc", 2), ("alloc", 2), ("free", 0.99), ("free", 0.99)]
    ops += [("alloc", 4), ("alloc", 1)]
    result = run("first-fit", make_allocator("first-fit", 8), ops)
    assert (result.requests, result.served, result.missing, result.fragmented) == (5, 4, 1, 0)
    assert result.frees == 2
    # 2 + 2 + 2 + 2; free the 1st and 3rd: 4 pages free in two holes of 2, so a 4 is fragmented.
    ops = [("alloc", 2)] * 4 + [("free", 0.0), ("free", 0.5), ("alloc", 4), ("alloc", 2)]
    result = run("first-fit", make_allocator("first-fit", 8), ops)
    assert (result.requests, result.served, result.missing, result.fragmented) == (6, 5, 0, 1)
    assert [(a.offset, a.size) for a in result.allocator.allocations()] == [
        (0, 2),
        (2, 2),
        (6, 2),
    ]


def test_make_allocator_rejects_an_unknown_name():
    with pytest.raises(InvalidRequest, match="'slab'"):
        make_allocator("slab", 8)


def test_a_free_with_nothing_live_does_nothing():
    result = run("buddy", make_allocator("buddy", 8), [("free", 0.3), ("alloc", 8), ("free", 0.0)])
    assert (result.served, result.frees) == (1, 1)
    assert report(result.allocator).free == 8


@settings(max_examples=40)
@given(
    steps=st.integers(0, 120),
    seed=st.integers(0, 2**32),
    pages=st.integers(1, 64).map(lambda n: 4 * n),
    free_prob=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_every_allocator_accounts_for_every_request(steps, seed, pages, free_prob, data):
    max_request = data.draw(st.integers(1, 1 << (pages.bit_length() - 1)))
    ops = workload(steps, seed, max_request, free_prob)
    assert ops == workload(steps, seed, max_request, free_prob)
    assert all(1 <= v <= max_request for kind, v in ops if kind == "alloc")
    requests = sum(kind == "alloc" for kind, _ in ops)
    for name in ALLOCATORS:
        result = run(name, make_allocator(name, pages, 4), ops)
        assert result.requests == requests
        assert result.served + result.missing + result.fragmented == requests
        assert report(result.allocator).allocations == result.served - result.frees
        if name == "paged":
            assert result.fragmented == 0


def test_without_demo_prints_help_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fragment"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: minipaged fragment" in err and "--max-request" in err
    assert "add --demo" in err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fragment", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--allocator" in out and "--all" in out and "fragmented" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--allocator", "slab"], "invalid choice: 'slab'"),
        (["--pages", "0"], "at least 1, got 0"),
        (["--pages", "ten"], "'ten'"),
        (["--pages", str(2**20 + 1)], "at most 1048576"),
        (["--steps", "-1"], "got -1"),
        (["--max-request", "0"], "got 0"),
        (["--max-request", "300"], "--max-request 300 can never fit"),
        (["--allocator", "buddy", "--pages", "100", "--max-request", "65"], "is 64"),
        (["--free-prob", "1.5"], "[0, 1], got 1.5"),
        (["--allocator", "paged", "--pages", "30"], "--pages 30 is not a multiple"),
        (["--all", "--pages", "30"], "--pages 30 is not a multiple"),
        (["--all", "--allocator", "buddy"], "leave out --allocator"),
        (["--width", "0"], "got 0"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(["fragment", "--demo", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_compact_shows_before_and_after(capsys):
    out = fragment(capsys, "--allocator", "first-fit", "--steps", "500", "--compact")
    assert "compaction: " in out and "before |" in out and "after  |" in out
    after_map = next(line for line in out.splitlines() if line.startswith("after  |"))
    cells = after_map.split("|")[1]
    assert "." not in cells.rstrip(".")  # first fit compacts into one free extent at the top
    assert "free extents" in out and "extfrag" in out.split("compaction: ")[1]


def test_compact_with_all_and_paged(capsys):
    out = fragment(capsys, "--all", "--steps", "500", "--compact")
    assert "after compaction (before->after)" in out
    rows = out.split("after compaction (before->after)")[1].split()
    assert rows[:6] == ["allocator", "moves", "copied", "extents", "largest", "external"]
    out = fragment(capsys, "--allocator", "paged", "--steps", "100", "--compact")
    assert "nothing to do for the paged allocator" in out
