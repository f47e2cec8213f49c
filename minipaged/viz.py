"""Pictures of an arena: a one-line text memory map, buddy free lists, and an optional PNG/SVG.

Fragmentation is easiest to understand by looking at it: holes between live allocations are
external fragmentation, the unused tails of reservations are internal fragmentation. Every unit
of the arena is in exactly one of three states, drawn as:

- ``#`` requested: reserved for an allocation and asked for by it;
- ``+`` reserved but not requested: internal fragmentation (a buddy block's rounded-up tail, a
  paged allocation's partly filled last block, or a block held through the paged allocator's
  block-level API, whose use only its holder knows);
- ``.`` free.

So, unscaled, the map has exactly ``requested`` ``#``, ``reserved - requested`` ``+`` and
``free`` ``.`` characters, matching ``allocator.stats()``.
"""

from __future__ import annotations

from pathlib import Path

from minipaged.alloc.base import Allocator
from minipaged.errors import InvalidRequest
from minipaged.metrics import fragmentation_index, free_counts, unusable_index

REQUESTED, WASTED, FREE = "#", "+", "."
LEGEND = (
    f"{REQUESTED} requested   {WASTED} reserved, not requested (internal fragmentation)   "
    f"{FREE} free"
)


def unit_states(allocator: Allocator) -> str:
    """The state of every unit of the arena, one character per unit (see the module doc).

    Units start as reserved, free extents become ``.``, and the requested units of each live
    allocation become ``#``: the first ``requested`` units of a contiguous allocation, or of a
    paged allocation's blocks taken in block-table order (only its last block is partly filled).
    """
    cells = bytearray(WASTED.encode() * allocator.total)
    for offset, length in allocator.free_extents():
        cells[offset : offset + length] = FREE.encode() * length
    for a in allocator.allocations():
        if a.blocks:
            block_size = a.size // len(a.blocks)
            left = a.requested
            for b in a.blocks:
                used = min(block_size, left)
                cells[b * block_size : b * block_size + used] = REQUESTED.encode() * used
                left -= used
        else:
            cells[a.offset : a.offset + a.requested] = REQUESTED.encode() * a.requested
    return cells.decode()


def _check_width(width: object) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise InvalidRequest(f"width must be an int >= 1, got {width!r}")
    return width


def memory_map(allocator: Allocator, width: int = 64) -> str:
    """A text map of the arena on one line of at most ``width`` cells, with a scale line and a
    legend.

    An arena of at most ``width`` units gets one cell per unit. A larger one gets ``scale =
    ceil(total / width)`` units per cell (the last cell may hold fewer); a cell whose units are
    mixed shows the state that holds most of them, ties going to ``#``, then ``+``, then ``.``.
    So a hole smaller than half a cell disappears from a scaled map: look at the metrics too.
    """
    width = _check_width(width)
    states = unit_states(allocator)
    total = len(states)
    scale = max(1, -(-total // width))
    cells = []
    for start in range(0, total, scale):
        chunk = states[start : start + scale]
        cells.append(max((REQUESTED, WASTED, FREE), key=chunk.count))  # max keeps the first tie
    unit = "unit" if scale == 1 else "units"
    scale_line = f"{total} units, 1 cell = {scale} {unit}"
    if scale > 1:
        scale_line += " (a mixed cell shows the state of most of its units)"
    return f"|{''.join(cells)}|\n{scale_line}\n{LEGEND}"


def buddy_free_lists(allocator: Allocator, indices: bool = False) -> str:
    """Free blocks per order, like a row of ``/proc/buddyinfo``.

    For a buddy allocator these are its free lists; for any other allocator, the counts that
    :func:`minipaged.metrics.free_counts` cuts from its free extents. With ``indices=True`` two
    more rows give Linux's fragmentation index and unusable free space index for a request of
    each order, as ratios (``/sys/kernel/debug/extfrag/extfrag_index`` and ``unusable_index``
    print them the same way: -1.000 means the request would succeed).
    """
    counts = free_counts(allocator)
    rows = [("order", [str(k) for k in range(len(counts))]), ("free", [str(n) for n in counts])]
    if indices:
        orders = range(len(counts))
        rows.append(("extfrag", [f"{fragmentation_index(counts, k) / 1000:.3f}" for k in orders]))
        rows.append(("unusable", [f"{unusable_index(counts, k) / 1000:.3f}" for k in orders]))
    col = max(len(v) for _, values in rows for v in values) + 1
    head = max(len(name) for name, _ in rows)
    return "\n".join(
        name.ljust(head) + "".join(v.rjust(col) for v in values) for name, values in rows
    )


def plot_memory_map(allocator: Allocator, path: str | Path, width: int = 64) -> Path:
    """Draw every unit of the arena as a coloured square, ``width`` units per row, and save the
    picture to ``path`` (the suffix picks the format: .png, .svg, .pdf). Returns the path.

    matplotlib is optional (``pip install minipaged[plot]``) and is imported only here; without
    it this raises ``ModuleNotFoundError`` saying what to install. The figure is drawn through
    ``matplotlib.figure.Figure`` directly, so no global pyplot state or GUI backend is touched.
    """
    width = _check_width(width)
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ModuleNotFoundError(
            "plot_memory_map needs matplotlib: pip install 'minipaged[plot]'"
        ) from e
    states = unit_states(allocator)
    rows = max(1, -(-len(states) // width))
    codes = {REQUESTED: 0, WASTED: 1, FREE: 2}
    grid = [[3] * width for _ in range(rows)]  # 3: past the end of the arena
    for i, s in enumerate(states):
        grid[i // width][i % width] = codes[s]
    colours = ["tab:blue", "tab:orange", "lightgray", "white"]
    fig = Figure(figsize=(max(4.0, width / 8), max(1.5, rows / 8 + 1)))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=3, aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{type(allocator).__name__}: {len(states)} units, {width} per row")
    labels = ["requested", "reserved, not requested", "free"]
    ax.legend(
        handles=[Patch(color=c, label=t) for c, t in zip(colours, labels, strict=False)],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=3,
        frameon=False,
    )
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    return path
