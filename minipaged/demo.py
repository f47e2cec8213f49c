"""minipaged fragment --demo: watch an allocator fragment under a random workload.

The workload is a reproducible list of operations drawn once from --seed: each step either asks
for 1..--max-request pages or, with probability --free-prob, frees a live allocation. A free
names its victim by a number u in [0, 1): the live allocation at index int(u * live) in
allocation order. So every allocator sees exactly the same operations, and --all compares them on
equal terms; they differ only in which requests fail, and why:

- missing: fewer pages free than asked for (no placement could have helped);
- fragmented: enough pages free in total, but no piece large enough (external fragmentation).

The paged allocator cuts the same pages into blocks of --block-size pages; it rounds each request
up to whole blocks, but never fails for fragmentation. Metrics and the memory map describe the
arena at the end of the run. With --compact the arena is then compacted (live allocations moved
towards page 0, see minipaged.compaction) and shown before and after.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass

from minipaged.alloc.base import Allocation, Allocator
from minipaged.alloc.buddy import BuddyAllocator
from minipaged.alloc.fit import BestFitAllocator, FirstFitAllocator
from minipaged.alloc.paged import PagedAllocator
from minipaged.cli import int_at_least
from minipaged.compaction import Move, compact
from minipaged.errors import InvalidRequest, OutOfMemory
from minipaged.metrics import Report, report
from minipaged.viz import buddy_free_lists, memory_map

ALLOCATORS = ("buddy", "first-fit", "best-fit", "paged")
MAX_PAGES = 1 << 20  # keeps a demo run (and its memory map, one byte per page) quick


def make_allocator(name: str, pages: int, block_size: int = 4) -> Allocator:
    """A fresh allocator over ``pages`` pages. The buddy allocator gets the largest max_order
    that fits (so any request up to the largest power of two <= pages can be served); the paged
    allocator gets ``pages // block_size`` blocks."""
    if name == "buddy":
        return BuddyAllocator(pages, pages.bit_length() - 1)
    if name == "first-fit":
        return FirstFitAllocator(pages)
    if name == "best-fit":
        return BestFitAllocator(pages)
    if name == "paged":
        return PagedAllocator(pages // block_size, block_size)
    raise InvalidRequest(f"unknown allocator {name!r}; choose from {', '.join(ALLOCATORS)}")


def largest_request(name: str, pages: int) -> int:
    """The largest request ``make_allocator(name, pages)`` can ever serve."""
    return 1 << (pages.bit_length() - 1) if name == "buddy" else pages


Op = tuple[str, float]  # ("alloc", pages) or ("free", u in [0, 1))


def workload(steps: int, seed: int, max_request: int, free_prob: float = 0.5) -> list[Op]:
    """``steps`` operations drawn from ``random.Random(seed)``: the same seed gives the same list
    on every machine and Python version (``random`` guarantees its sequences per seed)."""
    rng = random.Random(seed)
    ops: list[Op] = []
    for _ in range(steps):
        if rng.random() < free_prob:
            ops.append(("free", rng.random()))
        else:
            ops.append(("alloc", rng.randint(1, max_request)))
    return ops


@dataclass
class Result:
    """What happened when one allocator ran a workload, and its metrics at the end."""

    name: str
    allocator: Allocator
    requests: int = 0
    served: int = 0
    missing: int = 0
    fragmented: int = 0
    frees: int = 0

    @property
    def report(self) -> Report:
        return report(self.allocator)


def run(name: str, allocator: Allocator, ops: list[Op]) -> Result:
    """Drive ``allocator`` through ``ops`` and count successes, failures by cause, and frees.
    A free when nothing is live does nothing; a failed allocation changes nothing."""
    result = Result(name, allocator)
    live: list[Allocation] = []
    for kind, value in ops:
        if kind == "free":
            if live:
                allocator.free(live.pop(int(value * len(live))))
                result.frees += 1
            continue
        result.requests += 1
        try:
            live.append(allocator.alloc(int(value)))
            result.served += 1
        except OutOfMemory as e:
            if e.fragmented:
                result.fragmented += 1
            else:
                result.missing += 1
    return result


def _describe(result: Result, width: int) -> str:
    r = result.report
    source = "buddy free lists" if result.name == "buddy" else "cut from free memory: free_counts"
    lines = [
        memory_map(result.allocator, width),
        "",
        f"free blocks per order ({source}) and Linux's indices",
        buddy_free_lists(result.allocator, indices=True),
        "",
        f"utilisation             {r.utilisation:.3f}   requested / total",
        f"internal fragmentation  {r.internal_fragmentation:.3f}   1 - requested / reserved",
        f"external fragmentation  {r.external_fragmentation:.3f}   1 - largest free / free",
        f"live allocations {r.allocations}; free {r.free} in {r.free_extents} extents, "
        f"largest request that fits {r.largest_free}",
        "",
        f"allocation requests     {result.requests}",
        f"  served                {result.served}",
        f"  failed, missing       {result.missing}   (too few free pages in total)",
        f"  failed, fragmented    {result.fragmented}   (enough free pages, no piece large enough)",
        f"frees                   {result.frees}",
    ]
    return "\n".join(lines)


def _table(results: list[Result]) -> str:
    head = [
        "allocator",
        "util",
        "internal",
        "external",
        "requests",
        "served",
        "missing",
        "fragmented",
    ]
    rows = [head]
    for res in results:
        r = res.report
        rows.append(
            [
                res.name,
                f"{r.utilisation:.3f}",
                f"{r.internal_fragmentation:.3f}",
                f"{r.external_fragmentation:.3f}",
                str(res.requests),
                str(res.served),
                str(res.missing),
                str(res.fragmented),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        row[0].ljust(widths[0])
        + "".join(v.rjust(w + 2) for v, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    )


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def fragment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``fragment`` subcommand: check the arguments together, run, print."""
    if not args.demo:
        parser.print_help(sys.stderr)
        parser.exit(2, "\nminipaged fragment: error: nothing to do; add --demo to run the demo\n")
    if args.all and args.allocator is not None:
        parser.error("--all runs every allocator; leave out --allocator")
    names = list(ALLOCATORS) if args.all else [args.allocator or "buddy"]
    if "paged" in names and args.pages % args.block_size:
        parser.error(f"--pages {args.pages} is not a multiple of --block-size {args.block_size}")
    limit = min(largest_request(name, args.pages) for name in names)
    if args.max_request > limit:
        parser.error(
            f"--max-request {args.max_request} can never fit: with --pages "
            f"{args.pages} the largest request {'/'.join(names)} can serve is {limit}"
        )
    ops = workload(args.steps, args.seed, args.max_request, args.free_prob)
    results = [run(n, make_allocator(n, args.pages, args.block_size), ops) for n in names]
    print(
        f"fragment demo: {', '.join(names)}; {args.pages} pages, {args.steps} steps, "
        f"seed {args.seed}, requests of 1..{args.max_request} pages, free probability "
        f"{args.free_prob}"
        + (f", paged blocks of {args.block_size} pages" if "paged" in names else "")
    )
    print()
    print(_table(results) if args.all else _describe(results[0], args.width))
    if args.compact:
        print()
        print(_compaction_table(results) if args.all else _compaction(results[0], args.width))
    return 0


# --- --compact: the same arena before and after compaction ----------------------------------------


def _compact(result: Result) -> tuple[Report, list[Move]]:
    """Compact the allocator of ``result`` in place; returns its report from before and the
    moves. The paged allocator has nothing to compact: ([] moves)."""
    before = result.report
    if result.name == "paged":
        return before, []
    return before, compact(result.allocator)


def _compaction(result: Result, width: int) -> str:
    if result.name == "paged":
        return (
            "compaction: nothing to do for the paged allocator: any free blocks serve any "
            "request, so it never fails for fragmentation"
        )
    before_map = memory_map(result.allocator, width).splitlines()[0]
    before_lists = buddy_free_lists(result.allocator, indices=True)
    r0, moves = _compact(result)
    r1 = result.report
    lines = [
        f"compaction: {len(moves)} moves, {sum(m.length for m in moves)} pages copied "
        f"(live allocations packed towards page 0)",
        "",
        f"before {before_map}",
        f"after  {memory_map(result.allocator, width).splitlines()[0]}",
        "",
        "before",
        before_lists,
        "after",
        buddy_free_lists(result.allocator, indices=True),
        "",
        f"external fragmentation  {r0.external_fragmentation:.3f} -> "
        f"{r1.external_fragmentation:.3f}",
        f"free extents            {r0.free_extents} -> {r1.free_extents}",
        f"largest request that fits {r0.largest_free} -> {r1.largest_free}",
    ]
    return "\n".join(lines)


def _compaction_table(results: list[Result]) -> str:
    rows = [["allocator", "moves", "copied", "extents", "largest", "external"]]
    for res in results:
        r0, moves = _compact(res)
        r1 = res.report
        rows.append(
            [
                res.name,
                str(len(moves)),
                str(sum(m.length for m in moves)),
                f"{r0.free_extents}->{r1.free_extents}",
                f"{r0.largest_free}->{r1.largest_free}",
                f"{r0.external_fragmentation:.3f}->{r1.external_fragmentation:.3f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    body = "\n".join(
        row[0].ljust(widths[0])
        + "".join(v.rjust(w + 2) for v, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    )
    return "after compaction (before->after)\n" + body


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``minipaged fragment``."""
    p = subparsers.add_parser(
        "fragment",
        help="watch an allocator fragment under a random workload (--demo)",
        description=(__doc__ or "").split("\n\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--demo", action="store_true", help="run the demo (required)")
    p.add_argument("--allocator", choices=ALLOCATORS, help="allocator to run (default: buddy)")
    p.add_argument("--all", action="store_true", help="compare all four allocators in a table")
    p.add_argument(
        "--pages",
        type=int_at_least(1, MAX_PAGES),
        default=256,
        help=f"arena size, at most {MAX_PAGES} (default 256)",
    )
    p.add_argument(
        "--steps",
        type=int_at_least(0),
        default=2000,
        help="operations in the workload (default 2000)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--max-request",
        type=int_at_least(1),
        default=32,
        help="largest request in pages (default 32)",
    )
    p.add_argument(
        "--free-prob",
        type=_probability,
        default=0.5,
        help="probability that a step frees (default 0.5)",
    )
    p.add_argument(
        "--block-size",
        type=int_at_least(1),
        default=4,
        help="pages per block of the paged allocator (default 4)",
    )
    p.add_argument(
        "--width", type=int_at_least(1), default=64, help="cells in the memory map (default 64)"
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="then compact the arena and show it before and after (maps, indices, extents)",
    )
    p.set_defaults(func=lambda args: fragment(args, p))
