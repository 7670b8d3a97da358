"""Timing helpers shared by the benchmark scripts.

GPU times come from CUDA events around replays of a captured CUDA graph holding several
calls (so launch gaps do not count), median over repeats, after a warm-up. Inputs that
fit in L2 are rotated among copies by the caller, so repeated calls do not measure the
cache.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def header(title: str) -> str:
    today = datetime.date.today().isoformat()
    return (f"# {title}\n# device: {device_name()}; torch {torch.__version__}; {today}\n"
            f"# command: python {' '.join(os.sys.argv)}")


def graph_time_us(fn: Callable[[], object], *, calls: int = 10, repeats: int = 25) -> float:
    """Median time of one `fn()` in microseconds, from replays of a graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def cpu_time_us(fn: Callable[[], object], *, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_bandwidth_tbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (TB/s).

    The best of a memcpy (`copy_`) and an elementwise kernel writing a new buffer.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    best_us = min(graph_time_us(lambda: dst.copy_(src), calls=5, repeats=15),
                  graph_time_us(lambda: torch.mul(src, 1.0, out=dst), calls=5, repeats=15))
    return 2 * nbytes / (best_us * 1e-6) / 1e12


class StubPeer:
    """What `NodeServer._handle` touches of a peer, to time a node's handling of a message
    in this process (node_host.py, node_append.py): its replies go nowhere."""

    class conn:
        peer, alive = "bench", True

        @staticmethod
        def send(*args, **kwargs) -> None:
            pass

    requests: set = set()


def save_json(name: str, payload: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), "w") as f:
            json.dump(payload, f, indent=1)


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


# ---- per-step wall times (benchmarks/e2e.py, colocated.py) --------------------------------
def stats(ms: list[float]) -> dict:
    s = sorted(ms)
    p99 = s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]
    return {"p50_ms": statistics.median(s), "p99_ms": p99, "steps_ms": [round(x, 2) for x in ms]}


def timed(n: int, one) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        one()
        out.append((time.perf_counter() - t0) * 1e3)
    return out
