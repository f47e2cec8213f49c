"""Showing a simulation's results: a table, JSON, a picture, and a progress bar.

Nothing here changes a result; every function only reads :class:`RunResult` objects.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from minipaged.sim.engine import COLUMNS, PARTS, RunResult

PART_LABELS = {
    "tokens": "token states",
    "reserved": "reservation",
    "internal": "internal frag.",
    "external": "external frag.",
    "free": "free",
}
PART_COLORS = {
    "tokens": "#2f7ed8",
    "reserved": "#f7a35c",
    "internal": "#e4572e",
    "external": "#8c564b",
    "free": "#d9d9d9",
}


def table(results: Sequence[RunResult]) -> str:
    """One row per policy: the budget's breakdown in percent (averaged over the run's steps),
    the batch size in sequences, steps, completed requests per step and preemptions."""
    head = (
        f"{'':14} {'share of the KV budget, averaged over all steps':^53}  "
        f"{'batch size':^11}\n"
        f"{'policy':14} {'tokens':>9} {'reserved':>9} {'internal':>9} {'external':>9} "
        f"{'free':>9}  {'mean':>5} {'peak':>5} {'steps':>8} {'req/step':>9} {'preempted':>9}"
    )
    lines = [line.rstrip() for line in head.splitlines()]
    lines.append("-" * len(lines[1]))
    for r in results:
        shares = r.shares()
        parts = " ".join(f"{100 * shares[p]:8.1f}%" for p in PARTS)
        lines.append(
            f"{r.policy:14} {parts}  {r.mean_batch:5.1f} {r.peak_batch:5d} {r.steps:8d} "
            f"{r.throughput:9.4f} {r.preemptions:9d}"
        )
    return "\n".join(lines)


def plot(results: Sequence[RunResult], path: str | Path, title: str = "") -> None:
    """Save a figure to ``path``: the breakdown as stacked bars (one per policy, as in the
    PagedAttention paper's memory study) and the share of the budget in use (tokens, reservation
    and internal fragmentation) over the steps of each run.

    Needs matplotlib (``pip install 'minipaged[plot]'``); ``ImportError`` says so if it is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install 'minipaged[plot]' (or matplotlib)"
        ) from None
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[1, 1.4])
    names = [r.policy for r in results]
    bottom = [0.0] * len(results)
    for p in PARTS:
        share = [100 * r.shares()[p] for r in results]
        bars.bar(names, share, bottom=bottom, label=PART_LABELS[p], color=PART_COLORS[p])
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    bars.set_ylabel("share of the KV budget (%)")
    bars.set_ylim(0, 100)
    bars.set_title("where the KV memory goes (average over the run)")
    bars.tick_params(axis="x", rotation=30)
    bars.legend(loc="upper left", bbox_to_anchor=(0, -0.22), ncol=3, fontsize="small")
    col = {c: i for i, c in enumerate(COLUMNS)}
    for r in results:
        t = r.timeline
        in_use = t[:, col["tokens"]] + t[:, col["reserved"]] + t[:, col["internal"]]
        lines.plot(
            t[:, col["step"]], 100 * in_use / r.budget, label=r.policy, drawstyle="steps-post"
        )
    lines.set_xlabel("step")
    lines.set_ylabel("KV budget in use (%)")
    lines.set_ylim(0, 100)
    lines.set_title("memory in use over time")
    lines.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ProgressBar:
    """A one-line progress bar on a terminal, for runs longer than ``delay`` seconds.

    It draws nothing before ``delay`` has passed (short runs stay quiet), redraws at most every
    ``interval`` seconds, and is off when the stream is not a terminal (output piped to a file or
    a test) or ``enabled`` is False. ``close`` wipes the line, so the table starts clean."""

    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool = True,
        delay: float = 1.0,
        interval: float = 0.1,
        width: int = 30,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.delay, self.interval, self.width = delay, interval, width
        self.start = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def update(self, fraction: float, label: str = "") -> None:
        """Show ``fraction`` (0..1) of the work done, with a short ``label``."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay or now - self.last < self.interval:
            return
        self.last = now
        fraction = min(1.0, max(0.0, fraction))
        filled = int(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {100 * fraction:5.1f}% {now - self.start:6.1f}s {label}")
        self.stream.write("\033[K")  # clear what a longer earlier line left behind
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False
