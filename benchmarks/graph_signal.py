"""GraphSignal: what one post -> host -> release -> wait round trip costs inside a graph.

A captured graph of K slots, each `post(i)` then `wait(i)`, replayed while the host
serves the slots in order (wait_posted, release). Per-slot time = replay time / K;
compared with the same graph without signals (K tiny kernels) measured in the same run.

    python benchmarks/graph_signal.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, save_json  # noqa: E402

from kflume.graph import GraphSignal, warm_and_capture  # noqa: E402

K = 64


def run(reps: int = 200) -> dict:
    sig = GraphSignal(K, "cuda")
    x = torch.zeros(1024, device="cuda")
    s = torch.cuda.Stream()

    def step():
        for i in range(K):
            x.add_(1)
            sig.post(i)
            sig.wait(i)

    def serve():
        for i in range(K):
            sig.wait_posted(i, 10)
            sig.release(i)

    g = warm_and_capture(step, s, serve, timeout=30)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.cuda.stream(s):
            g.replay()
        serve()
        s.synchronize()
        times.append((time.perf_counter() - t0) * 1e6 / K)
    return {"per_slot_us": statistics.median(times), "p99_us": sorted(times)[int(.99 * reps)]}


def baseline(reps: int = 200) -> float:
    x = torch.zeros(1024, device="cuda")
    s = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        x.add_(1)
    s.synchronize()
    with torch.cuda.graph(g, stream=s):
        for _ in range(K):
            x.add_(1)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.cuda.stream(s):
            g.replay()
        s.synchronize()
        times.append((time.perf_counter() - t0) * 1e6 / K)
    return statistics.median(times)


def main() -> None:
    base = baseline()
    res = run()
    print(header(f"GraphSignal round trip inside a CUDA graph ({K} points per replay)"))
    print(f"peer: a graph of {K} tiny kernels, no signals: {base:.2f} us per kernel")
    print("| GraphSignal | per point us (median) | p99 us | SMs held while waiting |")
    print("|---|---|---|---|")
    print(f"| post, host release, wait | {res['per_slot_us']:.2f} | {res['p99_us']:.2f} | "
          "1 (spin kernel) |")
    save_json("graph_signal.json", {"baseline_us": base, **res})


if __name__ == "__main__":
    main()
