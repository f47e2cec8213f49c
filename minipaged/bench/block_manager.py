"""How fast the CPU block manager is: operations per second on a decode-heavy serving trace.

The trace is what a serving engine's scheduler asks of :class:`~minipaged.block_manager.
BlockManager` while it serves ``num_seqs`` requests with continuous batching:

- requests arrive with prompts; half of them start with one of a few shared system prompts, so
  prefix caching finds their first blocks already cached (prefix hits);
- up to ``max_running`` sequences decode together; each engine step appends one token slot to
  every running sequence (the decode step), then frees the sequences that finished, and the next
  step admits waiting requests into the free places (``allocate``);
- a few sequences are forked part-way through (parallel sampling, beam-like), so their children
  share blocks and copy a shared, partly filled last block on their first append;
- every sequence is freed at the end.

Prompt lengths are lognormal (mean about 140 tokens plus the system prompt), output lengths
geometric (mean 256 tokens), so most operations are appends: about 28 million token-slot appends
for the default 100,000 requests.

Only the block manager is timed. The trace is generated first (:func:`make_trace`) as a list of
small op tuples whose token lists are built in advance, and :func:`replay` just calls the manager.
The GPU pool is sized from the trace (:attr:`Trace.peak_blocks`, an upper bound on the blocks in
use at any moment) so that no call runs out of memory, with the default watermark kept free on
top.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from minipaged.block_manager import BlockManager
from minipaged.errors import InvalidRequest, InvalidState

QUICK_SEQS = 500  # a trace size for tests and the warm-up: well under a second
VOCAB_SIZE = 32_000

# The kinds of op in a trace. Every op is a 3-tuple (kind, a, b):
ALLOCATE = 0  # (ALLOCATE, seq_id, prompt tokens)
DECODE = 1  # (DECODE, seq ids, one new token each): one slot per running sequence
FORK = 2  # (FORK, parent id, child id)
FREE = 3  # (FREE, seq_id, None)


@dataclass(frozen=True)
class Trace:
    """A precomputed trace: ``ops`` in order, and what they add up to.

    ``peak_blocks`` bounds the GPU blocks in use at any moment from above: the largest sum, over
    the sequences alive at once, of the blocks each would hold at its final length with nothing
    shared. Sharing (prefix hits, forks) only lowers the real number."""

    ops: list[tuple]
    block_size: int
    max_running: int
    allocations: int
    appends: int
    forks: int
    frees: int
    steps: int
    peak_blocks: int


def make_trace(
    num_seqs: int = 100_000,
    seed: int = 0,
    *,
    block_size: int = 16,
    max_running: int = 256,
    output_mean: float = 256.0,
    prompt_median: float = 100.0,
    shared_fraction: float = 0.5,
    num_system_prompts: int = 4,
    fork_fraction: float = 0.05,
    max_children: int = 3,
) -> Trace:
    """Generate a decode-heavy trace of ``num_seqs`` requests, deterministically from ``seed``.

    The engine loop it records: admit waiting requests while fewer than ``max_running``
    sequences run (``ALLOCATE``), append one slot to every running sequence (``DECODE``), then
    fork and free (``FORK``, ``FREE``). A request decodes ``Geometric(1 / output_mean)`` tokens
    (at most ``16 * output_mean``); its own prompt part is lognormal around ``prompt_median``
    tokens (at most 4096), after one of ``num_system_prompts`` shared system prompts of 200 to
    400 tokens for a ``shared_fraction`` of the requests. A ``fork_fraction`` of the requests
    with at least two output tokens fork 1 to ``max_children`` children after a uniformly drawn
    decode step (before their last); a child decodes its own geometric number of tokens. Token
    ids are drawn uniformly from a vocabulary of 32,000. Requests have ids ``0 .. num_seqs - 1``,
    children the ids after them."""
    for name, value, minimum in (
        ("num_seqs", num_seqs, 1),
        ("block_size", block_size, 1),
        ("max_running", max_running, 1),
        ("num_system_prompts", num_system_prompts, 1),
        ("max_children", max_children, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidRequest(f"{name} must be an int >= {minimum}, got {value!r}")
    for name, value in (("shared_fraction", shared_fraction), ("fork_fraction", fork_fraction)):
        if not 0 <= value <= 1:
            raise InvalidRequest(f"{name} must be in [0, 1], got {value!r}")
    if not output_mean >= 1 or not prompt_median >= 1:
        raise InvalidRequest(
            f"output_mean and prompt_median must be >= 1, got {output_mean!r}, {prompt_median!r}"
        )

    rng = np.random.default_rng(seed)
    vocab = tuple(range(VOCAB_SIZE))  # one int object per token id, shared by every list

    def tokens(n: int) -> list[int]:
        return [vocab[t] for t in rng.integers(VOCAB_SIZE, size=n).tolist()]

    system = [tokens(int(n)) for n in rng.integers(200, 401, size=num_system_prompts)]
    prompt_len = np.clip(
        np.rint(rng.lognormal(math.log(prompt_median), 0.8, size=num_seqs)), 1, 4096
    ).astype(np.int64)
    out_cap = int(16 * output_mean)
    output_len = np.minimum(rng.geometric(1 / output_mean, size=num_seqs), out_cap).tolist()
    shared = (rng.random(num_seqs) < shared_fraction).tolist()
    which = rng.integers(num_system_prompts, size=num_seqs).tolist()
    forks = (rng.random(num_seqs) < fork_fraction).tolist()
    children = rng.integers(1, max_children + 1, size=num_seqs).tolist()
    fork_u = rng.random(num_seqs).tolist()

    ops: list[tuple] = []
    running: dict[int, None] = {}  # insertion-ordered: the order of the decode batch
    final_blocks: dict[int, int] = {}  # blocks each running sequence holds at its end
    ends: dict[int, list[int]] = {}  # step -> sequences whose last decode step it is
    fork_at: dict[int, list[int]] = {}  # step -> parents that fork after it
    started: dict[int, tuple[int, int]] = {}  # running sequence -> (its tokens, first step)
    next_req, next_child, step = 0, num_seqs, 0
    used = peak = appends = num_forks = 0

    def start(seq: int, num_tokens: int, decode_steps: int, first_step: int) -> None:
        """The sequence runs from ``first_step`` on and decodes in ``decode_steps`` steps."""
        nonlocal used, peak
        running[seq] = None
        started[seq] = (num_tokens, first_step)
        final_blocks[seq] = -(-(num_tokens + decode_steps) // block_size)
        used += final_blocks[seq]
        peak = max(peak, used)
        ends.setdefault(first_step + decode_steps - 1, []).append(seq)

    while next_req < num_seqs or running:
        while len(running) < max_running and next_req < num_seqs:
            r = next_req
            next_req += 1
            prompt = tokens(int(prompt_len[r]))
            if shared[r]:
                prompt = system[which[r]] + prompt
            ops.append((ALLOCATE, r, prompt))
            start(r, len(prompt), output_len[r], step)
            if forks[r] and output_len[r] >= 2:
                fork_at.setdefault(step + int(fork_u[r] * (output_len[r] - 1)), []).append(r)
        batch = tuple(running)
        ops.append((DECODE, batch, tuple(tokens(len(batch)))))
        appends += len(batch)
        for parent in fork_at.pop(step, ()):
            num_tokens, first_step = started[parent]
            num_tokens += step - first_step + 1  # its prompt and every token decoded so far
            for _ in range(children[parent]):
                child = next_child
                next_child += 1
                ops.append((FORK, parent, child))
                num_forks += 1
                # the child decodes from the next step on; its length is drawn like a request's
                steps = min(int(rng.geometric(1 / output_mean)), out_cap)
                start(child, num_tokens, steps, step + 1)
        for seq in ends.pop(step, ()):
            ops.append((FREE, seq, None))
            del running[seq], started[seq]
            used -= final_blocks.pop(seq)
        step += 1
    return Trace(
        ops=ops,
        block_size=block_size,
        max_running=max_running,
        allocations=num_seqs,
        appends=appends,
        forks=num_forks,
        frees=num_seqs + num_forks,
        steps=step,
        peak_blocks=peak,
    )


def pool_blocks(trace: Trace, watermark: float) -> int:
    """The smallest GPU pool in which the trace never runs out: ``peak_blocks`` in use while
    ``int(watermark * num_blocks)`` blocks stay free for admissions."""
    n = math.ceil(trace.peak_blocks / (1 - watermark))
    while n - int(watermark * n) < trace.peak_blocks:
        n += 1
    return n


def replay(bm: BlockManager, trace: Trace, batched: bool = True) -> tuple[int, float]:
    """Run the trace's ops on ``bm``; returns the number of copy-on-write block copies and the
    seconds spent inside decode steps.

    A decode step is one ``append_slots_batch`` call, as an engine makes once per step, or with
    ``batched=False`` one ``append_slots(seq, 1, [token])`` call per sequence."""
    allocate, fork, free, clock = bm.allocate, bm.fork, bm.free, time.perf_counter
    if batched:
        decode_step = bm.append_slots_batch
    else:
        append = bm.append_slots

        def decode_step(seq_ids: tuple[int, ...], tokens: tuple[int, ...]) -> list:
            return [p for s, t in zip(seq_ids, tokens, strict=True) for p in append(s, 1, [t])]

    copies, decode_seconds = 0, 0.0
    for kind, a, b in trace.ops:
        if kind == DECODE:
            t0 = clock()
            copies += len(decode_step(a, b))
            decode_seconds += clock() - t0
        elif kind == ALLOCATE:
            allocate(a, b)
        elif kind == FREE:
            free(a)
        else:
            fork(a, b)
    return copies, decode_seconds


@dataclass(frozen=True)
class BlockManagerBench:
    """What :func:`run` measured. ``seconds`` is the median wall time of one replay of the whole
    trace, and ``ops_per_s`` and ``appends_per_s`` divide by it, so the appends per second
    include the time spent allocating, forking and freeing around them. ``decode_seconds`` is
    the median time spent inside the decode steps alone (``decode_appends_per_s``). ``ops``
    counts each token-slot append, allocation, fork and free as one operation; prefix hits are
    no operations of their own (they happen inside ``allocate``) and are counted in blocks."""

    num_seqs: int
    seed: int
    block_size: int
    max_running: int
    num_gpu_blocks: int
    watermark: float
    enable_prefix_caching: bool
    batched: bool
    python: str
    steps: int
    allocations: int
    appends: int
    frees: int
    forks: int
    prefix_hit_blocks: int
    copies: int
    evictions: int
    repeats: int
    seconds: float
    all_seconds: tuple[float, ...]
    decode_seconds: float

    @property
    def ops(self) -> int:
        return self.allocations + self.appends + self.frees + self.forks

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def appends_per_s(self) -> float:
        return self.appends / self.seconds

    @property
    def decode_appends_per_s(self) -> float:
        return self.appends / self.decode_seconds

    def to_dict(self) -> dict[str, Any]:
        """Every field and every rate above, for JSON."""
        d = asdict(self)
        d["all_seconds"] = list(self.all_seconds)
        d.update(
            ops=self.ops,
            ops_per_s=self.ops_per_s,
            appends_per_s=self.appends_per_s,
            decode_appends_per_s=self.decode_appends_per_s,
        )
        return d


@dataclass(frozen=True)
class _Replay:
    seconds: float
    decode_seconds: float
    copies: int
    prefix_hits: int
    evictions: int


def _replay_once(
    trace: Trace, num_gpu_blocks: int, watermark: float, prefix: bool, batched: bool
) -> _Replay:
    """Time one replay on a fresh manager (built outside the timed region) and check that it
    ends empty: no sequence left, every block free or cached."""
    bm = BlockManager(
        num_gpu_blocks, trace.block_size, watermark=watermark, enable_prefix_caching=prefix
    )
    t0 = time.perf_counter()
    copies, decode_seconds = replay(bm, trace, batched)
    seconds = time.perf_counter() - t0
    s = bm.stats()
    if s.num_sequences or s.used_blocks:
        raise InvalidState(
            f"the trace left {s.num_sequences} sequences and {s.used_blocks} used blocks behind"
        )
    return _Replay(seconds, decode_seconds, copies, bm.prefix_hits, bm.evictions)


def run(
    num_seqs: int = 100_000,
    repeats: int = 3,
    seed: int = 0,
    *,
    block_size: int = 16,
    max_running: int = 256,
    watermark: float = 0.01,
    enable_prefix_caching: bool = True,
    batched: bool = True,
    warmup: bool = True,
) -> BlockManagerBench:
    """Replay one trace of ``num_seqs`` requests (:func:`make_trace`) ``repeats`` times, each on
    a fresh manager whose pool :func:`pool_blocks` sizes, after one warm-up replay of a
    ``QUICK_SEQS`` trace; report the medians. ``batched=False`` replays the decode steps through
    ``append_slots``, one sequence at a time. Raises ``InvalidState`` if a replay leaves a
    sequence or a used block behind, or if two replays of the trace count differently."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidRequest(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(watermark, bool) or not isinstance(watermark, int | float):
        raise InvalidRequest(f"watermark must be a number in [0, 1), got {watermark!r}")
    if not 0 <= watermark < 1:
        raise InvalidRequest(f"watermark must be in [0, 1), got {watermark!r}")
    trace = make_trace(num_seqs, seed, block_size=block_size, max_running=max_running)
    num_gpu_blocks = pool_blocks(trace, watermark)
    if warmup:
        small = make_trace(QUICK_SEQS, seed, block_size=block_size, max_running=max_running)
        _replay_once(
            small, pool_blocks(small, watermark), watermark, enable_prefix_caching, batched
        )
    replays = [
        _replay_once(trace, num_gpu_blocks, watermark, enable_prefix_caching, batched)
        for _ in range(repeats)
    ]
    first = replays[0]
    counts = {(r.copies, r.prefix_hits, r.evictions) for r in replays}
    if len(counts) > 1:
        raise InvalidState(f"replays of one trace counted differently: {sorted(counts)}")
    return BlockManagerBench(
        num_seqs=num_seqs,
        seed=seed,
        block_size=block_size,
        max_running=max_running,
        num_gpu_blocks=num_gpu_blocks,
        watermark=watermark,
        enable_prefix_caching=enable_prefix_caching,
        batched=batched,
        python=f"{platform.python_implementation()} {platform.python_version()}",
        steps=trace.steps,
        allocations=trace.allocations,
        appends=trace.appends,
        frees=trace.frees,
        forks=trace.forks,
        prefix_hit_blocks=first.prefix_hits,
        copies=first.copies,
        evictions=first.evictions,
        repeats=repeats,
        seconds=statistics.median(r.seconds for r in replays),
        all_seconds=tuple(r.seconds for r in replays),
        decode_seconds=statistics.median(r.decode_seconds for r in replays),
    )


def format_table(result: BlockManagerBench) -> str:
    """A few aligned lines for the terminal: the op counts, the time and the rates."""
    r = result
    rows = [
        ("sequences", f"{r.num_seqs:,} requests + {r.forks:,} forked children"),
        ("trace", f"{r.steps:,} engine steps, up to {r.max_running} running, seed {r.seed}"),
        (
            "pool",
            f"{r.num_gpu_blocks:,} GPU blocks of {r.block_size} slots, watermark {r.watermark}, "
            f"prefix caching {'on' if r.enable_prefix_caching else 'off'}",
        ),
        ("decode API", "append_slots_batch" if r.batched else "append_slots, one per sequence"),
        ("allocate", f"{r.allocations:,}"),
        ("append (token slots)", f"{r.appends:,}"),
        ("fork", f"{r.forks:,}"),
        ("free", f"{r.frees:,}"),
        ("prefix-hit blocks", f"{r.prefix_hit_blocks:,}"),
        ("copy-on-write copies", f"{r.copies:,}"),
        ("evictions", f"{r.evictions:,}"),
        (
            "wall time",
            f"{r.seconds:.3f} s (median of {r.repeats}: "
            + ", ".join(f"{s:.3f}" for s in r.all_seconds)
            + ")",
        ),
        ("ops/s", f"{r.ops_per_s:,.0f} ({r.ops:,} ops)"),
        ("appends/s", f"{r.appends_per_s:,.0f} over the whole trace"),
        (
            "",
            f"{r.decode_appends_per_s:,.0f} inside the decode steps "
            f"({r.decode_seconds:.3f} s of the {r.seconds:.3f} s)",
        ),
        ("python", r.python),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
