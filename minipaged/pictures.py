"""Pictures for the docs: memory maps, buddy free lists, block tables, copy-on-write and the
simulator's breakdown, written as plain SVG text.

Why plain SVG instead of matplotlib: each picture is a few dozen rectangles, lines and labels, so
writing it directly needs no extra package, and the result is *deterministic*: the same state
gives the same bytes on every machine. That is what lets the images committed in ``docs/img/`` be
checked against a fresh rendering, so the pictures never drift from the code that made them.

Every renderer only reads the object it is given and returns the SVG document as a string;
:func:`render_all` draws the docs' pictures, each from a small scenario that the walkthrough it
belongs to repeats step by step. Colours match the text map of :mod:`minipaged.viz` and the
simulator's plot: blue for requested units (tokens), orange for reserved but unused units
(internal fragmentation), grey for free units.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from minipaged.alloc.base import Allocator
from minipaged.alloc.buddy import BuddyAllocator
from minipaged.alloc.fit import FirstFitAllocator
from minipaged.alloc.paged import PagedAllocator
from minipaged.block_manager import BlockManager
from minipaged.errors import InvalidRequest
from minipaged.metrics import report
from minipaged.sim import POLICIES, RunResult, SimConfig, make_workload, simulate
from minipaged.sim.engine import PARTS
from minipaged.sim.report import PART_COLORS, PART_LABELS
from minipaged.viz import FREE, REQUESTED, unit_states

# Two shades per state, alternating from one allocation to the next, so that neighbouring
# allocations can be told apart.
REQUESTED_COLOURS = ("#2f7ed8", "#1c5aa6")
WASTED_COLOURS = ("#f7a35c", "#d9822b")
FREE_COLOUR = "#e3e3e3"
SEQUENCE_COLOURS = ("#1c5aa6", "#2e9c5a", "#8e44ad", "#c0392b")
HIGHLIGHT = "#d62728"
MAX_UNITS = 4096  # a memory map of more cells than this is no longer readable
MAX_BLOCKS = 64  # likewise for the physical blocks of a block-table picture


def _num(v: float) -> str:
    """A coordinate as short, stable text: two decimals at most, no trailing zeros."""
    return f"{round(v, 2):g}"


class Canvas:
    """An SVG document built element by element; :meth:`svg` returns its text.

    Elements are written in call order, later ones on top, so draw lines before the boxes
    they connect. Coordinates are pixels from the top-left corner."""

    def __init__(self, width: float, height: float) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = []

    def rect(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        fill: str,
        stroke: str = "none",
        stroke_width: float = 1,
        dash: bool = False,
    ) -> None:
        extra = ' stroke-dasharray="4 3"' if dash else ""
        self.parts.append(
            f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(h)}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{_num(stroke_width)}"{extra}/>'
        )

    def text(
        self,
        x: float,
        y: float,
        s: str,
        size: float = 12,
        anchor: str = "start",
        bold: bool = False,
        fill: str = "#222",
    ) -> None:
        weight = ' font-weight="bold"' if bold else ""
        self.parts.append(
            f'<text x="{_num(x)}" y="{_num(y)}" font-size="{_num(size)}" '
            f'text-anchor="{anchor}" fill="{fill}"{weight}>{escape(s)}</text>'
        )

    def line(
        self,
        x1: float,
        y1: float,
        x2: float,
        y2: float,
        colour: str = "#555",
        width: float = 1.2,
        dash: bool = False,
        arrow: bool = False,
    ) -> None:
        extra = (' stroke-dasharray="5 3"' if dash else "") + (
            ' marker-end="url(#arrow)"' if arrow else ""
        )
        self.parts.append(
            f'<line x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}" '
            f'stroke="{colour}" stroke-width="{_num(width)}"{extra}/>'
        )

    def svg(self, title: str = "") -> str:
        w, h = _num(self.width), _num(self.height)
        head = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif">',
        ]
        if title:
            head.append(f"<title>{escape(title)}</title>")
        head += [
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            'fill="context-stroke"/></marker></defs>',
            f'<rect width="{w}" height="{h}" fill="white"/>',
        ]
        return "\n".join(head + self.parts + ["</svg>", ""])


def _legend(c: Canvas, x: float, y: float, items: Sequence[tuple[str, str]]) -> None:
    """Colour swatches with labels in one row, starting at ``(x, y)``."""
    for colour, label in items:
        c.rect(x, y - 10, 12, 12, colour, "#888", 0.5)
        c.text(x + 17, y, label, 11)
        x += 30 + 6.2 * len(label)


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{name} must be an int >= 1, got {value!r}")
    return value


# ----- arenas ------------------------------------------------------------------------------------


def _owners(allocator: Allocator) -> list[int]:
    """For every unit, the index of the live allocation holding it (in ``allocations()`` order),
    or -1 for a free unit."""
    owner = [-1] * allocator.total
    for i, a in enumerate(allocator.allocations()):
        if a.blocks:
            block_size = a.size // len(a.blocks)
            for b in a.blocks:
                owner[b * block_size : (b + 1) * block_size] = [i] * block_size
        else:
            owner[a.offset : a.end] = [i] * a.size
    return owner


def _unit_colours(allocator: Allocator) -> list[str]:
    """The fill colour of every unit: its state, in the shade of its allocation's parity."""
    colours = []
    for state, owner in zip(unit_states(allocator), _owners(allocator), strict=True):
        if state == FREE:
            colours.append(FREE_COLOUR)
        elif state == REQUESTED:
            colours.append(REQUESTED_COLOURS[owner % 2])
        else:
            colours.append(WASTED_COLOURS[owner % 2])
    return colours


ARENA_LEGEND = (
    (REQUESTED_COLOURS[0], "requested"),
    (WASTED_COLOURS[0], "reserved, not requested (internal fragmentation)"),
    (FREE_COLOUR, "free"),
)


def memory_map_svg(allocator: Allocator, per_row: int = 32, title: str = "") -> str:
    """A memory map of any allocator's arena: one square per unit, ``per_row`` units per row,
    coloured requested / reserved-but-unused / free, with the metrics that sum it up.

    Neighbouring allocations alternate between two shades so their borders show. The unit counts
    per colour are exactly ``stats()``'s (as in :func:`minipaged.viz.memory_map`); arenas of more
    than 4096 units raise ``InvalidRequest`` (cut the picture from a smaller example)."""
    per_row = _check_positive("per_row", per_row)
    if allocator.total > MAX_UNITS:
        raise InvalidRequest(
            f"an arena of {allocator.total} units is too large to draw (at most {MAX_UNITS})"
        )
    colours = _unit_colours(allocator)
    cell, pad = 16, 12
    rows = max(1, -(-len(colours) // per_row))
    top = pad + (22 if title else 0)
    width = max(2 * pad + per_row * cell, 640)
    c = Canvas(width, top + rows * cell + 92)
    if title:
        c.text(pad, pad + 12, title, 14, bold=True)
    for i, colour in enumerate(colours):
        c.rect(pad + i % per_row * cell, top + i // per_row * cell, cell, cell, colour, "white")
    r = report(allocator)
    y = top + rows * cell + 20
    c.text(
        pad,
        y,
        f"{r.total} units: {r.requested} requested, {r.reserved - r.requested} reserved but "
        f"unused, {r.free} free in {r.free_extents} piece(s)",
        11.5,
    )
    c.text(pad, y + 18, f"largest request that fits now: {r.largest_free} units", 11.5)
    c.text(
        pad,
        y + 36,
        f"internal fragmentation {r.internal_fragmentation:.3f}    external fragmentation "
        f"{r.external_fragmentation:.3f}    utilisation {r.utilisation:.3f}",
        11.5,
    )
    _legend(c, pad, y + 62, ARENA_LEGEND)
    return c.svg(title or f"memory map of a {type(allocator).__name__}")


def buddy_svg(allocator: BuddyAllocator, title: str = "") -> str:
    """A buddy allocator's arena and, under it, its free lists: one row per order, each free
    block drawn under the pages it covers, so the alignment rule (a block of order k starts at a
    multiple of 2**k) and the buddy pairs can be seen. At most 256 pages."""
    if not isinstance(allocator, BuddyAllocator):
        raise InvalidRequest(f"buddy_svg draws a BuddyAllocator, got {allocator!r}")
    if allocator.total > 256:
        raise InvalidRequest(f"{allocator.total} pages are too many to draw (at most 256)")
    cell = max(6, min(24, 640 // allocator.total))
    pad, label_w, row_h = 12, 170, 30
    x0 = pad + label_w
    top = pad + (22 if title else 0)
    orders = range(allocator.max_order, -1, -1)
    width = max(x0 + allocator.total * cell + pad, 560)
    c = Canvas(width, top + 40 + row_h * len(orders) + 40)
    if title:
        c.text(pad, pad + 12, title, 14, bold=True)
    c.text(pad, top + 16, "arena (pages)", 12, bold=True)
    for i, colour in enumerate(_unit_colours(allocator)):
        c.rect(x0 + i * cell, top + 2, cell, 20, colour, "white")
    if cell >= 14:
        for i in range(0, allocator.total, 4 if cell < 20 else 2):
            c.text(x0 + i * cell + cell / 2, top + 34, str(i), 9, "middle", fill="#666")
    free = allocator.free_blocks()
    counts = allocator.buddyinfo()
    y = top + 44
    for k in orders:
        c.text(pad, y + 16, f"order {k} ({1 << k} pages): {counts[k]} free", 11.5)
        c.line(x0, y + row_h - 3, x0 + allocator.total * cell, y + row_h - 3, "#ddd", 0.8)
        for off, order in free:
            if order == k:
                c.rect(x0 + off * cell + 1, y + 4, (1 << k) * cell - 2, 20, FREE_COLOUR, "#555")
                if (1 << k) * cell >= 26:
                    c.text(x0 + (off + (1 << k) / 2) * cell, y + 18, f"@{off}", 10, "middle")
        y += row_h
    _legend(c, pad, y + 22, ARENA_LEGEND)
    return c.svg(title or "buddy allocator free lists")


# ----- block tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableView:
    """What a block-table picture shows, copied out of a :class:`BlockManager` at one moment (the
    manager keeps changing; a before/after picture needs two views).

    ``tables`` and ``lengths`` cover the running sequences asked for, in that order; ``swapped``
    the ones whose blocks are in CPU memory; ``refs`` is every GPU block's ref count."""

    block_size: int
    tables: dict[Hashable, tuple[int, ...]]
    lengths: dict[Hashable, int]
    refs: tuple[int, ...]
    swapped: tuple[Hashable, ...] = ()

    def fill(self, block: int) -> int:
        """Tokens stored in a GPU block (0 when free): the same for every table holding it."""
        for seq, table in self.tables.items():
            if block in table:
                i = table.index(block)
                return min(self.block_size, self.lengths[seq] - i * self.block_size)
        return 0


def table_view(bm: BlockManager, seq_ids: Sequence[Hashable]) -> TableView:
    """Copy the block tables of ``seq_ids`` (and every GPU block's ref count) out of ``bm``.
    Raises ``UnknownSequence`` for an id ``bm`` does not know, and ``InvalidRequest`` when the
    pool has more than 64 blocks (too many to draw)."""
    if bm.gpu.num_blocks > MAX_BLOCKS:
        raise InvalidRequest(
            f"a pool of {bm.gpu.num_blocks} blocks is too large to draw (at most {MAX_BLOCKS})"
        )
    tables, lengths, swapped = {}, {}, []
    for seq in seq_ids:
        if bm.is_swapped(seq):
            swapped.append(seq)
        else:
            tables[seq] = tuple(bm.block_table(seq))
            lengths[seq] = bm.num_tokens(seq)
    refs = tuple(bm.gpu.refcount(b) for b in range(bm.gpu.num_blocks))
    return TableView(bm.block_size, tables, lengths, refs, tuple(swapped))


BOX_W, BOX_H, GAP = 96, 28, 8
COLUMN_W = 150  # one sequence's column of logical blocks, with the space for its lines


def _slots(c: Canvas, x: float, y: float, block_size: int, used: int, free: bool) -> None:
    """A block as ``block_size`` slots: tokens blue, empty slots orange (grey if free)."""
    w = BOX_W / block_size
    for s in range(block_size):
        colour = REQUESTED_COLOURS[0] if s < used else FREE_COLOUR if free else WASTED_COLOURS[0]
        c.rect(x + s * w, y, w, BOX_H, colour, "white", 0.8)


def _panel_size(view: TableView) -> tuple[float, float]:
    seqs = len(view.tables)
    left, right = (seqs + 1) // 2, seqs // 2
    longest = max((len(t) for t in view.tables.values()), default=0)
    rows = max(len(view.refs), longest)
    width = (left + right) * COLUMN_W + BOX_W + 2 * 70
    return width, 40 + rows * (BOX_H + GAP) + (18 if view.swapped else 0)


def _draw_tables(
    c: Canvas, view: TableView, x0: float, y0: float, highlight: Sequence[int] = ()
) -> None:
    """One panel: the physical blocks in a column in the middle, the sequences' logical blocks
    in columns to its left and right (first sequence left, second right, and so on outwards),
    and an arrow from every logical block to the physical block its table names."""
    seqs = list(view.tables)
    left = (len(seqs) + 1) // 2
    px = x0 + left * COLUMN_W + 70  # the physical column
    columns = {}
    for i, seq in enumerate(seqs):
        side = i // 2 + 1  # columns counted outwards from the physical one
        if i % 2 == 0:
            columns[seq] = (px - 70 - side * COLUMN_W + (COLUMN_W - BOX_W), "right")
        else:
            columns[seq] = (px + BOX_W + 70 + (side - 1) * COLUMN_W, "left")
    top = y0 + 34

    def row_y(i: int) -> float:
        return top + i * (BOX_H + GAP)

    c.text(px + BOX_W / 2, y0 + 14, "physical blocks", 12, "middle", bold=True)
    for n, seq in enumerate(seqs):  # lines first, boxes over them
        colour = SEQUENCE_COLOURS[n % len(SEQUENCE_COLOURS)]
        x, edge = columns[seq]
        x1, x2 = (x + BOX_W, px - 2) if edge == "right" else (x, px + BOX_W + 2)
        for i, b in enumerate(view.tables[seq]):
            c.line(x1, row_y(i) + BOX_H / 2, x2, row_y(b) + BOX_H / 2, colour, arrow=True)
    for n, seq in enumerate(seqs):
        colour = SEQUENCE_COLOURS[n % len(SEQUENCE_COLOURS)]
        x, _ = columns[seq]
        c.text(
            x + BOX_W / 2,
            y0 + 14,
            f"seq {seq}: {view.lengths[seq]} tokens",
            12,
            "middle",
            bold=True,
            fill=colour,
        )
        for i in range(len(view.tables[seq])):
            used = min(view.block_size, view.lengths[seq] - i * view.block_size)
            _slots(c, x, row_y(i), view.block_size, used, free=False)
            c.rect(x, row_y(i), BOX_W, BOX_H, "none", colour, 1.5)
            c.text(
                x - 4 if x < px else x + BOX_W + 4,
                row_y(i) + 18,
                f"L{i}",
                10,
                "end" if x < px else "start",
                fill=colour,
            )
    for b, ref in enumerate(view.refs):
        y = row_y(b)
        _slots(c, px, y, view.block_size, view.fill(b), free=ref == 0)
        hot = b in highlight
        c.rect(px, y, BOX_W, BOX_H, "none", HIGHLIGHT if hot else "#444", 3 if hot else 1)
        label = f"{b}" if ref <= 1 else f"{b}  ref {ref}"
        badge = 8 + 6.5 * len(label)  # a white badge keeps the label readable over the slots
        c.rect(px + (BOX_W - badge) / 2, y + 7, badge, 15, "white", "#999", 0.5)
        c.text(
            px + BOX_W / 2,
            y + 18,
            label,
            11,
            "middle",
            bold=ref > 1,
            fill="#111" if ref else "#777",
        )
    if view.swapped:
        names = ", ".join(str(s) for s in view.swapped)
        c.text(x0, top + len(view.refs) * (BOX_H + GAP) + 8, f"swapped out to CPU: {names}", 11)


TABLE_LEGEND = (
    (REQUESTED_COLOURS[0], "slot holding a token"),
    (WASTED_COLOURS[0], "empty slot of a used block"),
    (FREE_COLOUR, "free block"),
)


def block_tables_svg(view: TableView, title: str = "", highlight: Sequence[int] = ()) -> str:
    """Block tables as arrows from each sequence's logical blocks to the physical blocks of the
    GPU pool (drawn with their slots and, when shared, their ref count); blocks in
    ``highlight`` get a red outline."""
    w, h = _panel_size(view)
    pad, head = 12, 22 if title else 0
    c = Canvas(max(w + 2 * pad, 520), h + head + 2 * pad + 24)
    if title:
        c.text(pad, pad + 12, title, 14, bold=True)
    _draw_tables(c, view, pad, pad + head, highlight)
    _legend(c, pad, pad + head + h + 18, TABLE_LEGEND)
    return c.svg(title or "block tables")


def cow_svg(
    before: TableView, after: TableView, copies: Sequence[tuple[int, int]], title: str = ""
) -> str:
    """Copy-on-write, before and after: two block-table panels side by side. ``copies`` are
    the ``(src, dst)`` pairs ``append_slots`` returned; src is outlined in the first panel, dst
    in the second, and the caption names the copies the copy-blocks kernel must make."""
    (w1, h1), (w2, h2) = _panel_size(before), _panel_size(after)
    pad, head = 12, 22 if title else 0
    h = max(h1, h2)
    c = Canvas(w1 + w2 + 3 * pad + 20, h + head + 2 * pad + 64)
    if title:
        c.text(pad, pad + 12, title, 14, bold=True)
    _draw_tables(c, before, pad, pad + head, [s for s, _ in copies])
    c.line(pad + w1 + 10, pad + head, pad + w1 + 10, pad + head + h, "#bbb", 1, dash=True)
    _draw_tables(c, after, 2 * pad + w1 + 20, pad + head, [d for _, d in copies])
    y = pad + head + h + 16
    c.text(pad, y, "before: the shared last block is read-only", 12)
    c.text(2 * pad + w1 + 20, y, "after appending one token to one sequence", 12)
    pairs = ", ".join(f"block {s} -> block {d}" for s, d in copies) or "none"
    c.text(pad, y + 20, f"copies for the copy-blocks kernel: {pairs}", 12, bold=True)
    _legend(c, pad, y + 44, TABLE_LEGEND)
    return c.svg(title or "copy-on-write")


# ----- the simulator -----------------------------------------------------------------------------


def breakdown_svg(results: Sequence[RunResult], title: str = "") -> str:
    """The simulator's breakdown of the KV budget (token states, reservation, internal and
    external fragmentation, free; averaged over the run) as one stacked bar per policy, as in the
    PagedAttention paper's memory study."""
    if not results:
        raise InvalidRequest("breakdown_svg needs at least one simulation result, got none")
    pad, label_w, bar_w, bar_h = 12, 110, 560, 26
    head = 22 if title else 0
    c = Canvas(2 * pad + label_w + bar_w + 110, 2 * pad + head + 24 + len(results) * 36 + 40)
    if title:
        c.text(pad, pad + 12, title, 14, bold=True)
    y = pad + head + 8
    c.text(
        pad + label_w + bar_w / 2,
        y + 6,
        "share of the KV budget, averaged over all steps",
        11,
        "middle",
        fill="#555",
    )
    c.text(pad + label_w + bar_w + 12, y + 6, "mean batch", 11, fill="#555")
    y += 16
    for r in results:
        x = pad + label_w
        c.text(x - 8, y + 17, r.policy, 12, "end", bold=True)
        for part, share in r.shares().items():
            w = share * bar_w
            c.rect(x, y, w, bar_h, PART_COLORS[part])
            if w >= 34:
                ink = "white" if part in ("tokens", "internal", "external") else "#222"
                c.text(x + w / 2, y + 17, f"{100 * share:.0f}%", 10.5, "middle", fill=ink)
            x += w
        c.text(pad + label_w + bar_w + 12, y + 17, f"{r.mean_batch:.1f}", 12)
        y += 36
    _legend(c, pad, y + 18, [(PART_COLORS[p], PART_LABELS[p]) for p in PARTS])
    return c.svg(title or "where the KV memory goes")


# ----- the docs' pictures ------------------------------------------------------------------------


def fragmented_first_fit() -> FirstFitAllocator:
    """The allocators walkthrough's example: seven requests, then every other one freed. 46
    units are free, yet a request of 20 fails: the largest hole holds 16."""
    ff = FirstFitAllocator(64)
    live = [ff.alloc(n) for n in (8, 6, 10, 4, 12, 8, 6)]
    for a in live[::2]:
        ff.free(a)
    return ff


def paged_same_requests() -> PagedAllocator:
    """The same requests on a paged allocator of 16 blocks of 4 units; after the same frees the
    request of 20 succeeds, in blocks scattered over the arena."""
    pa = PagedAllocator(16, 4)
    live = [pa.alloc(n) for n in (8, 6, 10, 4, 12, 8, 6)]
    for a in live[::2]:
        pa.free(a)
    pa.alloc(20)
    return pa


def buddy_example() -> BuddyAllocator:
    """32 pages of order up to 5: requests of 3, 5, 1 and 6 pages, then the 5 freed."""
    buddy = BuddyAllocator(32, 5)
    live = [buddy.alloc(n) for n in (3, 5, 1, 6)]
    buddy.free(live[1])
    return buddy


def block_table_example() -> BlockManager:
    """Two sequences whose blocks interleave in the pool: A gets blocks 0 and 1, B blocks 2 and
    3, and A's growth past 8 tokens takes block 4."""
    bm = BlockManager(num_gpu_blocks=8, block_size=4, watermark=0)
    bm.allocate("A", [1, 2, 3, 4, 5])
    bm.allocate("B", [6, 7, 8, 9, 10, 11])
    bm.append_slots("A", 4)
    return bm


def cow_example() -> tuple[TableView, TableView, list[tuple[int, int]]]:
    """A 6-token parent forked into a child, then one token appended to the child: the shared,
    partly filled last block is copied first. Returns the views before and after, and the
    copies."""
    bm = BlockManager(num_gpu_blocks=6, block_size=4, watermark=0)
    bm.allocate("parent", [1, 2, 3, 4, 5, 6])
    bm.fork("parent", "child")
    before = table_view(bm, ["parent", "child"])
    copies = bm.append_slots("child")
    return before, table_view(bm, ["parent", "child"]), copies


def simulator_example() -> list[RunResult]:
    """The simulator walkthrough's run: 200 ShareGPT-like requests, all at step 0, on 16,384
    token slots, under every policy."""
    requests = make_workload("sharegpt", 200, seed=0)
    config = SimConfig(kv_slots=16384)
    return [simulate(requests, policy, config) for policy in POLICIES]


def _cow_picture() -> str:
    before, after, copies = cow_example()
    return cow_svg(before, after, copies, "copy-on-write after fork")


PICTURES: dict[str, Callable[[], str]] = {
    "arena_first_fit.svg": lambda: memory_map_svg(
        fragmented_first_fit(), 32, "first fit: 46 units free, a request of 20 fails"
    ),
    "arena_paged.svg": lambda: memory_map_svg(
        paged_same_requests(), 32, "paged (blocks of 4): the request of 20 fits in 5 blocks"
    ),
    "buddy_free_lists.svg": lambda: buddy_svg(buddy_example(), "buddy allocator, 32 pages"),
    "block_tables.svg": lambda: block_tables_svg(
        table_view(block_table_example(), ["A", "B"]), "block tables (block size 4)"
    ),
    "copy_on_write.svg": _cow_picture,
    "sim_breakdown.svg": lambda: breakdown_svg(
        simulator_example(), "200 ShareGPT-like requests, 16,384 token slots"
    ),
}


def render_all(outdir: str | Path) -> list[Path]:
    """Draw every picture of :data:`PICTURES` into ``outdir`` (created if missing); returns the
    paths written, in the order of :data:`PICTURES`."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in PICTURES.items():
        path = out / name
        path.write_text(draw(), encoding="utf-8")
        paths.append(path)
    return paths


__all__ = [
    "PICTURES",
    "Canvas",
    "TableView",
    "block_tables_svg",
    "breakdown_svg",
    "buddy_svg",
    "cow_svg",
    "memory_map_svg",
    "render_all",
    "table_view",
]
