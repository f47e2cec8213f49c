"""How long the serving simulator takes: time per policy for a large workload.

Not a test (tests check correctness only); run it by hand:

    python scripts/bench_sim.py                      # 10,000 ShareGPT-like requests
    python scripts/bench_sim.py --requests 1000 --workload prefix --samples 2

Cost model: contiguous policies do O(1) work per step plus one allocator call per admission, so
their time grows with the number of steps; paged policies call the block manager once per running
sequence per step, so theirs grows with steps x batch size (the tokens generated), and prefix
caching adds the hashing of every full block.

Measured on the development machine (2 CPU cores shared with other jobs, so wall times vary:
CPU seconds are the stable number; Python 3.11, default configuration: 40 GiB of OPT-13B KV =
52,428 slots, max_len 2048, block size 16, recompute), 10,000 ShareGPT-like requests all
arriving at step 0:

    policy           wall s    CPU s    steps  steps/s  tokens/s
    max                 2.5      2.1   135489    64759   1601318
    pow2                1.9      1.5    76783    50751   2214452
    oracle              1.7      1.4    59874    42091   2355268
    paged               9.7      8.2    32766     3994    408354
    paged+prefix       20.3     17.0    32766     1928    197122
    paged+sharing      10.5      8.4    32766     3900    398773
    all                46.6     38.6

(steps/s and tokens/s per CPU second). So 10,000 requests take about 40 CPU seconds for all
six policies, of which the paged ones take most: they call the block manager for every token.
``minipaged simulate`` with its default 1,000 requests takes about 5 CPU seconds there.
"""

from __future__ import annotations

import argparse
import time

from minipaged.sim import POLICIES, WORKLOADS, SimConfig, make_workload, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--workload", choices=WORKLOADS, default="sharegpt")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", action="append", choices=POLICIES)
    args = parser.parse_args()
    requests = make_workload(args.workload, args.requests, args.seed)
    config = SimConfig(samples=args.samples)
    print(f"{args.requests} {args.workload} requests, {args.samples} sample(s) each")
    print(f"{'policy':14} {'wall s':>8} {'CPU s':>8} {'steps':>8} {'steps/s':>8} {'tokens/s':>9}")
    total_wall = total_cpu = 0.0
    tokens = sum(r.output_len for r in requests) * args.samples
    for policy in args.policy or POLICIES:
        wall, cpu = time.perf_counter(), time.process_time()
        result = simulate(requests, policy, config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        print(
            f"{policy:14} {wall:8.1f} {cpu:8.1f} {result.steps:8d} {result.steps / cpu:8.0f} "
            f"{tokens / cpu:9.0f}"
        )
    print(f"{'all':14} {total_wall:8.1f} {total_cpu:8.1f}")


if __name__ == "__main__":
    main()
