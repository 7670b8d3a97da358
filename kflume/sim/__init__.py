"""kflume.sim: a trace-driven, discrete-event cost and latency simulator.

Replays real LLM traces through colocated replicas, instance-level autoscaling
(ServerlessLLM-style) and kflume's elastic attention nodes (on the same or a cheaper GPU
class), with step times from a model calibrated on kflume's measured benchmarks, and
reports $/Mtok, TPOT, TTFT and SLO attainment per system. Torch-free; `kflume sim` is
its command line (kflume/sim/cli.py). See docs/simulation.md.

    from kflume.sim import SimConfig, build_workload, load_trace, simulate
    work = build_workload(load_trace(path), session_rate=0.05)
    results = simulate(work, SimConfig(systems=("instance", "kflume")))
    results["kflume"].dollars_per_mtok
"""

from .config import SimConfig
from .loaders import FORMATS, detect_format, load_trace
from .metrics import SystemResult
from .runner import SimRun, simulate
from .trace import Call, Trace
from .workload import Workload, build_workload

__all__ = ["FORMATS", "Call", "SimConfig", "SimRun", "SystemResult", "Trace", "Workload",
           "build_workload", "detect_format", "load_trace", "simulate"]
