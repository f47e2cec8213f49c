"""The serving simulator: replay an LLM serving workload over several KV-cache allocation
policies and show where the memory goes (``minipaged simulate``).

- :mod:`~minipaged.sim.workload`: requests (synthetic ShareGPT/Alpaca-like lengths, shared
  system prompts, trace files);
- :mod:`~minipaged.sim.policies`: the policies, each built on the project's allocators or its
  block manager;
- :mod:`~minipaged.sim.engine`: the continuous-batching loop and the memory accounting;
- :mod:`~minipaged.sim.report`: the table, JSON, plot and progress bar;
- :mod:`~minipaged.sim.cli`: the ``simulate`` subcommand.
"""

from minipaged.sim.engine import RunResult, SimConfig, simulate
from minipaged.sim.policies import POLICIES
from minipaged.sim.workload import WORKLOADS, Request, load_trace, make_workload

__all__ = [
    "POLICIES",
    "WORKLOADS",
    "Request",
    "RunResult",
    "SimConfig",
    "load_trace",
    "make_workload",
    "simulate",
]
