"""Draw the pictures of the lessons' READMEs with the library itself, so they cannot drift.

A README embeds a picture between two markers::

    <!-- picture: NAME -->
    ```text
    ...what PICTURES[NAME]() returns...
    ```
    <!-- end picture -->

``python lessons/make_pictures.py`` redraws every embedded picture in place;
``python lessons/make_pictures.py --check`` only reports stale ones (tests/test_lessons.py does the
same through :func:`stale`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minipaged.alloc import BuddyAllocator, FirstFitAllocator, PagedAllocator
from minipaged.block_manager import BlockManager
from minipaged.kernels.reference import (
    layout_diagram,
    paged_attention_partitions_ref,
    reduce_partitions_ref,
)
from minipaged.metrics import report
from minipaged.sim import POLICIES, SimConfig, make_workload, simulate
from minipaged.sim import report as sim_report
from minipaged.viz import buddy_free_lists, memory_map

HERE = Path(__file__).resolve().parent
BLOCK = re.compile(r"(<!-- picture: (\S+) -->\n```text\n)(.*?)(```\n<!-- end picture -->)", re.S)


def _metrics(a) -> str:
    r = report(a)
    return (
        f"free {r.free} of {r.total}, largest free piece {r.largest_free}: "
        f"internal fragmentation {r.internal_fragmentation:.3f}, "
        f"external fragmentation {r.external_fragmentation:.3f}"
    )


def fit_holes() -> str:
    """01: first fit after requests came and went: enough free memory, no piece large enough."""
    a = FirstFitAllocator(64)
    live = [a.alloc(n) for n in (6, 10, 4, 12, 5, 9, 8)]
    for x in live[::2]:
        a.free(x)
    return "\n".join([memory_map(a), _metrics(a), "", buddy_free_lists(a, indices=True)])


def buddy_split() -> str:
    """02: a buddy arena after alloc(3), alloc(1), alloc(5): rounded-up tails are '+'."""
    b = BuddyAllocator(16, 4)
    for n in (3, 1, 5):
        b.alloc(n)
    blocks = ", ".join(f"({off}, order {k})" for off, k in b.free_blocks())
    return "\n".join([memory_map(b), f"free blocks: {blocks}", "", buddy_free_lists(b)])


def paged_tables() -> str:
    """03: a paged pool whose allocations are scattered, yet any free block serves anyone."""
    p = PagedAllocator(8, 4)
    a, b, c = p.alloc(6), p.alloc(3), p.alloc(5)
    p.free(b)
    d = p.alloc(9)
    lines = [memory_map(p), _metrics(p), ""]
    for name, x in (("a", a), ("c", c), ("d", d)):
        lines.append(f"{name}: {x.requested} slots, block table {list(x.blocks)}")
    lines.append(f"free queue (head first): {p.free_queue()}")
    return "\n".join(lines)


def cow_fork() -> str:
    """04: fork shares every block; the first append to the shared last block copies it."""
    bm = BlockManager(8, 4, watermark=0)
    bm.allocate("parent", list(range(6)))
    bm.fork("parent", "child")
    lines = ["after fork:"]
    lines += [f"  {s}: {bm.block_table(s)}" for s in ("parent", "child")]
    lines.append(f"  ref counts: {[bm.gpu.refcount(b) for b in bm.block_table('parent')]}")
    pairs = bm.append_slots("child", 1)
    lines.append(f"child appends one token -> copy {pairs} (src, dst) first:")
    lines += [f"  {s}: {bm.block_table(s)}" for s in ("parent", "child")]
    lines.append(f"  child's slots: {bm.slot_mapping('child').tolist()}")
    return "\n".join(lines)


def prefix_hits() -> str:
    """05: two prompts with an 8-token common prefix share its two blocks."""
    bm = BlockManager(8, 4, watermark=0, enable_prefix_caching=True)
    system = [101, 102, 103, 104, 105, 106, 107, 108]
    cached = [bm.allocate("a", system + [1, 2, 3]), bm.allocate("b", system + [7, 8])]
    lines = [
        f"{s}: block table {bm.block_table(s)}, {c} tokens cached"
        for s, c in zip("ab", cached, strict=True)
    ]
    bm.free("a")
    bm.free("b")
    s = bm.stats()
    lines.append(f"after both finish: {s.cached_blocks} blocks cached, {s.free_blocks} empty")
    lines.append(f"c: {bm.allocate('c', system + [9])} tokens cached, table {bm.block_table('c')}")
    return "\n".join(lines)


def slot_layout() -> str:
    """06: where a sequence's tokens live in the paged KV cache."""
    return layout_diagram([7, 2, 9], 10, 4)


def partitions() -> str:
    """07: v2 on one head: per-partition max logit m_p, sum l_p, weight w_p, then the merge."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 4))
    k = rng.standard_normal((3, 4, 1, 4))
    v = rng.standard_normal((3, 4, 1, 4))
    tables, lens = np.array([[2, 0, 1]]), np.array([10])
    part, m, l = paged_attention_partitions_ref(q, k, v, tables, lens, 0.5, 4)
    w = l[0, 0] * np.exp(m[0, 0] - m[0, 0].max())
    lines = ["partition  tokens  m_p      l_p     w_p     out_p[0]"]
    for p in range(part.shape[2]):
        lines.append(
            f"{p:9d}  {4 * p:2d}..{min(4 * p + 3, 9):<2d}  {m[0, 0, p]:7.3f}  {l[0, 0, p]:6.3f}"
            f"  {w[p]:6.3f}  {part[0, 0, p, 0]:7.3f}"
        )
    merged = reduce_partitions_ref(part, m, l, lens, 4)[0, 0, 0]
    lines.append(f"merged out[0] = sum w_p out_p[0] / sum w_p = {merged:.3f}")
    return "\n".join(lines)


def policies() -> str:
    """08: every policy on one small ShareGPT-like workload."""
    config = SimConfig(kv_slots=4096, max_len=512, block_size=16)
    requests = make_workload("sharegpt", 40, seed=0, max_len=512, rate=2.0)
    return sim_report.table([simulate(requests, p, config) for p in POLICIES])


def compaction() -> str:
    """09: a request that fails for fragmentation, then succeeds after sliding compaction."""
    from minipaged.compaction import compact, diagnose

    a = FirstFitAllocator(64)
    live = [a.alloc(n) for n in (6, 10, 4, 12, 5, 9, 8)]
    for x in live[::2]:
        a.free(x)
    d = diagnose(a, 24)
    lines = [memory_map(a), f"alloc(24): {d.cause} ({d.free} free, largest {d.largest_free})"]
    moves = compact(a)
    lines.append("moves (src, dst, length): " + ", ".join(str(tuple(m)) for m in moves))
    d = diagnose(a, 24)
    lines += [memory_map(a).splitlines()[0], f"alloc(24): {d.cause}"]
    return "\n".join(lines)


PICTURES: dict[str, Callable[[], str]] = {
    f.__name__: f
    for f in (fit_holes, buddy_split, paged_tables, cow_fork, prefix_hits, slot_layout, partitions)
}
PICTURES["policies"] = policies
PICTURES["compaction"] = compaction


def _redraw(text: str, cache: dict[str, str]) -> str:
    def draw(m: re.Match) -> str:
        name = m.group(2)
        if name not in cache:
            cache[name] = PICTURES[name]().rstrip("\n") + "\n"
        return m.group(1) + cache[name] + m.group(4)

    return BLOCK.sub(draw, text)


def stale() -> list[str]:
    """READMEs whose embedded pictures differ from what the library draws now."""
    cache: dict[str, str] = {}
    return [
        str(p.relative_to(HERE))
        for p in sorted(HERE.glob("*/README.md"))
        if _redraw(p.read_text(), cache) != p.read_text()
    ]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        out = stale()
        for name in out:
            print(f"stale pictures in lessons/{name}: run python lessons/make_pictures.py")
        return 1 if out else 0
    cache: dict[str, str] = {}
    for p in sorted(HERE.glob("*/README.md")):
        p.write_text(_redraw(p.read_text(), cache))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
