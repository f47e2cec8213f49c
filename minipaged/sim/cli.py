"""``minipaged simulate``: replay a serving workload over KV-cache policies and print where the
memory goes."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from minipaged.cli import int_at_least
from minipaged.errors import InvalidRequest, MinipagedError
from minipaged.sim.engine import (
    DEFAULT_KV_GIB,
    KV_BYTES_PER_TOKEN,
    PREEMPT_MODES,
    SimConfig,
    simulate,
    slots_for_gib,
)
from minipaged.sim.policies import POLICIES
from minipaged.sim.report import ProgressBar, plot, table
from minipaged.sim.workload import WORKLOADS, Request, load_trace, make_workload

DEFAULT_REQUESTS = 1000

DESCRIPTION = """\
Replay an LLM serving workload over several KV-cache allocation policies and show where the
memory goes, as the PagedAttention paper's memory study does. A continuous-batching scheduler
admits requests while KV memory allows, generates one token per running sequence per step, and
preempts (recompute or swap) when a paged policy runs out of memory. The default: 1000
ShareGPT-like requests, all arriving at step 0, on 40 GiB of KV memory for an OPT-13B-like model
(800 KiB per token: 52,428 token slots), max_len 2048, block size 16. Results are the same for the
same arguments and --seed."""

EPILOG = """\
policies (a request's real total length is input_len + output_len, known in advance):
  max            reserve max_len slots per sample, rounded up to a power of two (buddy allocator)
  pow2           reserve the next power of two of the real total length (buddy allocator)
  oracle         reserve exactly the real total length (contiguous best fit)
  paged          blocks of --block-size slots on demand (vLLM-style block manager)
  paged+prefix   paged, with prefix caching (try --workload prefix)
  paged+sharing  paged; the --samples outputs of a request fork from one prompt and share its
                 blocks, with copy-on-write (try --samples 4)

where the memory goes (shares of the budget, measured in every step after the step's tokens
are stored and before completed requests free their memory, then averaged over all steps):
  tokens     slots holding a token's KV. Contiguous: tokens stored, every sample counted.
             Paged: slots of used blocks holding a token, a block shared by several sequences
             counted once.
  reserved   contiguous: the real total length of each running sample minus its tokens stored
             (slots held for tokens not generated yet). Paged: 0, blocks are taken on demand.
  internal   contiguous: reserved slots minus the real total lengths (slots no token will ever
             use: up to max_len, or up to the power of two). Paged: the empty slots of partly
             filled last blocks.
  external   in a step where the request at the head of the queue could not be admitted
             although at least as much memory as it needed was free in total (the allocator had
             no piece large enough), all free memory of that step. Paged policies never have
             this, but the last (budget mod block size) slots, too few for a block, count here.
  free       all other free memory (paged: free blocks, also those still cached for prefix
             reuse).
  In every step: tokens + reserved + internal + external + free = the budget.

other columns: batch size (sequences that stored a token in a step: mean over steps, and peak),
steps to serve every request, completed requests per step, and preemptions (each one a request
evicted by recompute or swap). Averages include the final drain, when memory empties.

trace files (--trace): CSV with a header, or JSON lines, with input_len and output_len, and
optionally arrival (step), prefix_id (equal ids share a system prompt) and prefix_len."""


def _number(minimum: float, inclusive: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or value < minimum or (value == minimum and not inclusive):
            relation = "at least" if inclusive else "more than"
            raise argparse.ArgumentTypeError(f"must be {relation} {minimum}, got {text}")
        return value

    return parse


def _policies(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated --policy values, in order, without duplicates."""
    if not values:
        return list(POLICIES)
    chosen: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name not in POLICIES:
                raise InvalidRequest(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
            if name not in chosen:
                chosen.append(name)
    return chosen


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``minipaged simulate``."""
    p = subparsers.add_parser(
        "simulate",
        help="replay a serving workload over KV-cache policies; show where the memory goes",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="sharegpt", help="default: sharegpt")
    w.add_argument("--trace", type=Path, help="CSV or JSONL trace file (replaces --workload)")
    w.add_argument(
        "--requests",
        type=int_at_least(1),
        help=f"number of requests (default {DEFAULT_REQUESTS}; a trace: all of its lines)",
    )
    w.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    w.add_argument(
        "--rate",
        type=_number(0, inclusive=False),
        default=math.inf,
        help="mean arrivals per step, Poisson (default inf: all at step 0; not for --trace)",
    )
    w.add_argument(
        "--samples", type=int_at_least(1), default=1, help="outputs per request (default 1)"
    )
    w.add_argument(
        "--prefixes",
        type=int_at_least(1),
        default=4,
        help="system prompts of --workload prefix (default 4)",
    )
    w.add_argument(
        "--prefix-len",
        type=int_at_least(1),
        default=256,
        help="tokens per system prompt (default 256; for a trace, where a line has no prefix_len)",
    )
    m = p.add_argument_group("memory and scheduling")
    m.add_argument(
        "--policy",
        action="append",
        metavar="NAME[,NAME]",
        help=f"policies to run, repeatable (default all: {','.join(POLICIES)})",
    )
    m.add_argument(
        "--kv-gib",
        type=_number(0, inclusive=False),
        default=DEFAULT_KV_GIB,
        help=f"KV memory in GiB at {KV_BYTES_PER_TOKEN // 1024} KiB/token (default 40)",
    )
    m.add_argument(
        "--kv-slots", type=int_at_least(1), help="KV budget in token slots (overrides --kv-gib)"
    )
    m.add_argument("--max-len", type=int_at_least(2), default=2048, help="default 2048")
    m.add_argument("--block-size", type=int_at_least(1), default=16, help="default 16")
    m.add_argument(
        "--preempt", choices=PREEMPT_MODES, default="recompute", help="default recompute"
    )
    m.add_argument(
        "--swap-gib", type=_number(0), default=4.0, help="CPU swap space in GiB (default 4)"
    )
    m.add_argument(
        "--watermark",
        type=_number(0),
        default=0.01,
        help="share of blocks kept free at admission (default 0.01)",
    )
    m.add_argument(
        "--max-batch", type=int_at_least(0), default=0, help="most running sequences (0: any)"
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print JSON instead of the table")
    o.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="save stacked bars and memory over time (needs matplotlib)",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _requests(args: argparse.Namespace) -> tuple[list[Request], str]:
    if args.trace is not None:
        requests = load_trace(args.trace, args.max_len, args.prefix_len)
        if args.requests is not None:
            requests = requests[: args.requests]
        return requests, f"trace {args.trace}"
    n = args.requests or DEFAULT_REQUESTS
    requests = make_workload(
        args.workload, n, args.seed, args.max_len, args.rate, args.prefixes, args.prefix_len
    )
    names = {"sharegpt": "ShareGPT-like", "alpaca": "Alpaca-like"}
    return requests, names.get(args.workload, "shared-prefix (Alpaca-like questions)")


def run(args: argparse.Namespace) -> int:
    """The subcommand: validate everything first, then simulate each policy in turn."""
    try:
        policies = _policies(args.policy)
        if args.plot is not None:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                raise MinipagedError("--plot needs matplotlib: pip install 'minipaged[plot]'")
            if not args.plot.parent.is_dir():
                raise InvalidRequest(f"--plot: no directory {str(args.plot.parent)!r}")
        config = SimConfig(
            kv_slots=args.kv_slots or slots_for_gib(args.kv_gib),
            max_len=args.max_len,
            block_size=args.block_size,
            samples=args.samples,
            preempt=args.preempt,
            swap_slots=slots_for_gib(args.swap_gib),
            watermark=args.watermark,
            max_batch=args.max_batch,
        )
        requests, what = _requests(args)
        bar = ProgressBar(enabled=not args.quiet)
        results = []
        try:
            for i, name in enumerate(policies):

                def progress(done: int, total: int, i: int = i, name: str = name) -> None:
                    bar.update((i + done / total) / len(policies), f"{name} {done}/{total}")

                results.append(simulate(requests, name, config, progress=progress))
        finally:
            bar.close()
    except (MinipagedError, OSError) as e:
        print(f"minipaged simulate: error: {e}", file=sys.stderr)
        return 2
    mean_in = sum(r.input_len for r in requests) / len(requests)
    mean_out = sum(r.output_len for r in requests) / len(requests)
    head = (
        f"{len(requests)} requests, {what}: mean {mean_in:.1f} input / {mean_out:.1f} output "
        f"tokens, {config.samples} sample(s) each\n"
        f"KV budget {config.kv_slots:,} token slots, max_len {config.max_len}, block size "
        f"{config.block_size}, preempt {config.preempt}, seed {args.seed}\n"
    )
    if args.json:
        out = {
            "config": {
                "workload": "trace" if args.trace is not None else args.workload,
                "trace": None if args.trace is None else str(args.trace),
                "requests": len(requests),
                "seed": args.seed,
                "rate": None if math.isinf(args.rate) else args.rate,  # JSON has no infinity
                "mean_input": mean_in,
                "mean_output": mean_out,
                **{k: getattr(config, k) for k in config.__dataclass_fields__},
            },
            "results": [r.summary() for r in results],
        }
        print(json.dumps(out, indent=2))
    else:
        print(head)
        print(table(results))
        notes = _notes(policies, requests, config)
        if notes:
            print("\n" + "\n".join(notes))
    if args.plot is not None:
        try:
            plot(results, args.plot, f"minipaged simulate: {len(requests)} requests, {what}")
        except (ImportError, OSError) as e:
            print(f"minipaged simulate: error: {e}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"\nplot saved to {args.plot}")
    return 0


def _notes(policies: list[str], requests: list[Request], config: SimConfig) -> list[str]:
    """Hints when a policy cannot differ from plain paged on this workload."""
    notes = []
    shared = any(r.prefix_len >= config.block_size for r in requests)
    if "paged+prefix" in policies and config.samples == 1 and not shared:
        notes.append(
            "note: no full block of prompt is shared, so paged+prefix equals paged "
            "(try --workload prefix)"
        )
    if "paged+sharing" in policies and config.samples == 1:
        notes.append(
            "note: with one sample per request nothing is forked, so paged+sharing equals "
            "paged (try --samples 4)"
        )
    return notes
