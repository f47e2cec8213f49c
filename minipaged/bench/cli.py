"""``minipaged bench``: how fast the kernels and the block manager are, against the hardware's
limit and against what a user would pick instead."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from datetime import date
from typing import Any

DESCRIPTION = """\
Time the paged-attention kernels (versions 2 to 6, the one paged_attention picks marked, and
PyTorch's scaled_dot_product_attention on a contiguous cache where torch is installed),
copy_blocks and reshape_and_cache on the GPU, and the block manager's decode path on the CPU.
Every GPU figure is a median of CUDA-event timings after warm-up; bandwidths are shown as a
share of a device-to-device copy measured in the same run (bytes read plus bytes written).
Without a CUDA GPU only the block-manager section runs (NUMBA_ENABLE_CUDASIM=1 with --quick
dry-runs the GPU sections in the simulator)."""

EPILOG = """\
sections:
  attention      decode, float16, head_dim 128, block 16, 32 query heads over 8 kv heads and
                 over 32, batch x context 1 x 32768 ... 256 x 1024
  copy           copy_blocks of 1 ... 4096 blocks of 16 tokens x 8 heads x 128 (one layer;
                 --layers 32: every pair in each of 32 layers, one launch, as an engine does)
  cache          reshape_and_cache of the tokens of 1 ... 4096 such blocks
  block-manager  BlockManager on a decode-heavy trace of 100,000 sequences (CPU, one core)

goals (docs/benchmarks.md): attention (as picked) >= 70% of the copy bandwidth at long
contexts and no slower than SDPA at >= 64 x 4096; copy_blocks >= 80% for >= 256 blocks;
>= 1,000,000 token-slot appends per second in the block manager."""

SECTIONS = ("attention", "copy", "cache", "block-manager")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from minipaged.cli import int_at_least

    p = sub.add_parser(
        "bench",
        help="time the kernels and the block manager against the hardware's limits",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "sections",
        nargs="*",
        type=_section,
        metavar="SECTION",
        help=f"what to run, any of {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a dry run)")
    p.add_argument("--samples", type=int_at_least(1), help="timed samples per figure (default 15)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch SDPA comparison")
    p.add_argument("--sequences", type=int_at_least(1), help="block-manager trace size")
    p.add_argument(
        "--threads",
        type=_thread_counts,
        help="threads per block to compare in the copy and cache sections, e.g. 128,256,1024",
    )
    p.add_argument(
        "--layers",
        type=int_at_least(1),
        default=1,
        help="layers of the copy section's cache, copied in one launch (default 1; 0.5 GiB each)",
    )
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    p.set_defaults(func=run)


def _section(text: str) -> str:
    if text not in SECTIONS:
        raise argparse.ArgumentTypeError(
            f"unknown section {text!r}; choose from {', '.join(SECTIONS)}"
        )
    return text


def _thread_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not counts or any(not 1 <= c <= 1024 for c in counts):
        raise argparse.ArgumentTypeError(f"thread counts must be in 1..1024, got {text!r}")
    return counts


def _say(text: str = "") -> None:
    print(text, flush=True)


def _progress(text: str) -> None:
    print(f"  ... {text}", file=sys.stderr, flush=True)


def _gpu_available() -> bool:
    from numba import config, cuda

    return bool(config.ENABLE_CUDASIM) or cuda.is_available()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _attention_table(rows: list[dict[str, Any]], copy_gbs: float) -> list[str]:
    versions = ("v2", "v3", "v4", "v5", "v6")
    names = (*versions, "sdpa")
    lines = [
        "| heads/kv | seqs x context | MB read | "
        + " | ".join(f"{n} ms" for n in (*versions, "SDPA"))
        + " | "
        + " | ".join((*versions, "SDPA"))
        + " | picked vs SDPA | "
        + " | ".join(f"max abs({n} - v2)" for n in versions[1:])
        + " |",
        "| --- | --- |" + " ---: |" * (3 * len(versions) + 3),
    ]
    for r in rows:
        picked = r.get("picked")
        fast, sdpa = r.get(f"{picked}_ms"), r.get("sdpa_ms")
        versus = f"{sdpa / fast:.2f}x ({picked})" if fast and sdpa else "-"
        lines.append(
            f"| {r['heads']}/{r['kv_heads']} | {r['seqs']} x {r['context']} "
            f"| {r['bytes'] / 1e6:.0f} | "
            + " | ".join(_ms(r.get(f"{n}_ms")) for n in names)
            + " | "
            + " | ".join(_pct(r.get(f"{n}_share")) for n in names)
            + f" | {versus} | "
            + " | ".join(f"{r.get(f'{n}_vs_v2', float('nan')):.1e}" for n in versions[1:])
            + " |"
        )
    lines.append(
        f"(shares: bytes read / time / {copy_gbs:.0f} GB/s copy bandwidth; v5 and v6 with "
        "their own partitions and warps; picked: what paged_attention runs)"
    )
    return lines


def _copy_table(rows: list[dict[str, Any]], what: str) -> list[str]:
    threads = [k.split("@")[1] for k in rows[0] if k.startswith("ms@")]
    head = "| blocks | MB moved | " + " | ".join(f"ms ({t} thr) | share ({t} thr)" for t in threads)
    lines = [what, head + " |", "| --- | ---: |" + " ---: | ---: |" * len(threads)]
    for r in rows:
        cells = " | ".join(f"{r[f'ms@{t}']:.4f} | {_pct(r[f'share@{t}'])}" for t in threads)
        lines.append(f"| {r['blocks']} | {r['bytes'] / 1e6:.1f} | {cells} |")
    return lines


def run(args: argparse.Namespace) -> int:
    sections = args.sections or list(SECTIONS)
    results: dict[str, Any] = {
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "command": "minipaged bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "",
    }
    gpu_sections = [s for s in sections if s != "block-manager"]
    if gpu_sections and not _gpu_available():
        _say(
            f"no CUDA GPU found: skipping {', '.join(gpu_sections)} "
            "(NUMBA_ENABLE_CUDASIM=1 minipaged bench --quick dry-runs them in the simulator)"
        )
        gpu_sections = []
    if gpu_sections:
        _run_gpu(gpu_sections, args, results)
    if "block-manager" in sections:
        from minipaged.bench import block_manager

        kwargs: dict[str, Any] = {}
        if args.sequences:
            kwargs["num_seqs"] = args.sequences
        elif args.quick:
            kwargs["num_seqs"] = block_manager.QUICK_SEQS
        if args.quick:
            kwargs["repeats"] = 1
        _say("== block manager (CPU, one core) ==")
        t0 = time.perf_counter()
        result = block_manager.run(**kwargs)
        _say(block_manager.format_table(result))
        _say(f"({time.perf_counter() - t0:.1f} s)")
        results["block_manager"] = result.to_dict()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
        _say(f"wrote {args.json}")
    return 0


def _run_gpu(sections: list[str], args: argparse.Namespace, results: dict[str, Any]) -> None:
    import warnings

    from minipaged.bench import gpu

    warnings.filterwarnings("ignore", message=".*under-utilization")  # small sizes are small
    timing = gpu.Timing(warmup=1, reps=1, samples=1) if args.quick else gpu.Timing()
    if args.samples:
        timing.samples = args.samples
    _say(f"device: {gpu.device_name()}")
    copy_gbs = gpu.copy_bandwidth(timing, nbytes=(1 << 16) if args.quick else (1 << 30))
    _say(f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written)")
    results.update(device=gpu.device_name(), copy_gbs=copy_gbs)
    if "attention" in sections:
        _say("== paged attention, decode ==")
        rows = gpu.bench_attention(
            gpu.attention_shapes(args.quick),
            copy_gbs,
            timing,
            partition_size=16 if args.quick else gpu.attention_v3.PARTITION_SIZE,
            with_torch=not args.no_torch,
            progress=_progress,
        )
        for line in _attention_table(rows, copy_gbs):
            _say(line)
        results["attention"] = rows
    shape = gpu.CacheShape(64, 4, 2, 32, counts=(1, 4, 16)) if args.quick else gpu.CacheShape()
    layers = args.layers
    threads = {"threads": args.threads} if args.threads else {}
    for section, key, bench, title, copy_shape in (
        ("copy", "copy_blocks", gpu.bench_copy_blocks,
         f"K and V, {layers} layer{'s' if layers > 1 else ''}, one launch",
         replace(shape, layers=layers)),
        ("cache", "reshape_and_cache", gpu.bench_reshape_and_cache, "tokens of n blocks", shape),
    ):  # fmt: skip
        if section in sections:
            rows = bench(copy_shape, copy_gbs, timing, progress=_progress, **threads)
            for line in _copy_table(rows, f"== {key} ({title}) =="):
                _say(line)
            results[key] = rows
