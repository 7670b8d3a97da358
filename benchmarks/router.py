"""TokenRangeRouter costs: installing a route, advancing a request, building a step's plan.

A route install is one request added at a token boundary: `add_request` plus its share
of the `begin_step` that applies it (the time of that `begin_step` minus the time of the
same `begin_step` with nothing to apply). Goal: < 10 us per route install (the
KernelFlume paper reports 7.2 us). Pure Python; runs anywhere.

    python benchmarks/router.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, save_json  # noqa: E402

from kflume.router import FillThenLeastLoaded, TokenRangeRouter  # noqa: E402


def make_router(nodes: int, background: int, range_tokens: int) -> TokenRangeRouter:
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=range_tokens))
    for i in range(nodes):
        r.add_node(f"n{i}", 1 << 40)
    for i in range(background):
        r.add_request(("bg", i), 1000)
    r.begin_step()
    return r


def route_install_us(nodes, background, batch, prompt, range_tokens, reps) -> float:
    samples = []
    for rep in range(reps):
        r = make_router(nodes, background, range_tokens)
        t0 = time.perf_counter()
        r.begin_step()  # the same boundary with nothing to apply
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(batch):
            r.add_request((rep, i), prompt)
        r.begin_step()
        total = time.perf_counter() - t0
        # The second begin_step also plans the new requests: subtract their planning too
        # (an empty boundary over the grown batch).
        t0 = time.perf_counter()
        r.begin_step()
        grown = time.perf_counter() - t0
        samples.append((total - grown) / batch * 1e6)
        del base
    return statistics.median(samples)


def advance_us(nodes, batch, range_tokens, steps=200) -> tuple[float, float]:
    """(advance per request, begin_step per step) in a steady decode."""
    r = make_router(nodes, 0, range_tokens)
    for i in range(batch):
        r.add_request(i, 1000)
    plan = r.begin_step()
    adv, step = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        for rid in plan.requests:
            r.advance(rid)
        t1 = time.perf_counter()
        plan = r.begin_step()
        t2 = time.perf_counter()
        adv.append((t1 - t0) / batch * 1e6)
        step.append((t2 - t1) * 1e6)
    return statistics.median(adv), statistics.median(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    rows = []
    for nodes, background, batch, prompt, rt in [
        (4, 0, 32, 4096, 4096),  # one range per request
        (4, 256, 32, 4096, 4096),  # with 256 requests already routed
        (8, 256, 32, 32768, 4096),  # 8 ranges per request
        (64, 1024, 256, 32768, 4096),
    ]:
        us = route_install_us(nodes, background, batch, prompt, rt, args.reps)
        ranges = -(-prompt // rt)
        rows.append(dict(nodes=nodes, routed=background, batch=batch, prompt=prompt,
                         ranges=ranges, install_us=us, per_range_us=us / ranges))
    steady = []
    for nodes, batch in [(4, 32), (8, 256)]:
        a, s = advance_us(nodes, batch, 4096)
        steady.append(dict(nodes=nodes, batch=batch, advance_us=a, begin_step_us=s,
                           begin_step_per_request_us=s / batch))
    print(header("TokenRangeRouter edit costs (pure Python)"))
    print("| nodes | already routed | new requests | prompt tokens | ranges each | "
          "route install us | per range us |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['routed']} | {r['batch']} | {r['prompt']} | {r['ranges']} | "
              f"{r['install_us']:.2f} | {r['per_range_us']:.2f} |")
    print("\n| nodes | batch | advance us / request | begin_step us | begin_step us / request |")
    print("|---|---|---|---|---|")
    for s in steady:
        print(f"| {s['nodes']} | {s['batch']} | {s['advance_us']:.2f} | {s['begin_step_us']:.1f} | "
              f"{s['begin_step_per_request_us']:.2f} |")
    print("\ngoal: < 10 us per route install (KernelFlume paper: 7.2 us)")
    save_json("router.json", {"install": rows, "steady": steady})


if __name__ == "__main__":
    main()
