"""Elastic scale-out: add attention nodes while requests decode, when KV capacity runs low.

Long, bursty decode needs KV capacity, not model replicas. Here requests arrive in bursts
and grow; a tiny autoscaler starts another attention node (a `kflume node` process) in
the background whenever free KV capacity falls under a reserve, and the router puts new
ranges on it from the next token boundary on. Nothing stops or restarts: every step's
attention output is checked against attention over each request's full KV.

    python examples/elastic_scale_out.py
    python examples/elastic_scale_out.py --in-process --steps 120
"""

from __future__ import annotations

import argparse
import time

import torch

from kflume import Cluster
from kflume.testing import ReferenceKV, rel_err

LAYERS, HQ, HKV, D = 2, 8, 2, 64


def free_tokens(cluster: Cluster) -> int:
    return sum(cluster.router.free_tokens(n) for n in cluster.router.nodes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--node-tokens", type=int, default=600, help="KV capacity of each node")
    ap.add_argument("--reserve", type=int, default=300, help="scale out under this many free")
    ap.add_argument("--in-process", action="store_true", help="no processes, no UCX")
    ap.add_argument("--model-ms", type=float, default=30.0,
                    help="time each step spends in the (absent) model, so that a node "
                    "started mid-run has time to come up")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    make = Cluster.in_process if args.in_process else Cluster.local
    arrivals = {0: [120, 40], 20: [200, 90, 150], 45: [260]}  # step -> prompt lengths
    ref = ReferenceKV(LAYERS)
    worst, next_id, waiting = 0.0, 0, []
    with make(1, layers=LAYERS, kv_heads=HKV, head_dim=D, capacity_tokens=args.node_tokens,
              range_tokens=64) as cluster:
        remote = cluster.attention(num_q_heads=HQ)
        cluster.begin_step()  # the first boundary: the node enters the routing table
        starting = None
        for step in range(args.steps):
            waiting += arrivals.get(step, [])
            new = []
            # Admit waiting requests while their prompt fits with a reserve left for growth.
            while waiting and free_tokens(cluster) - sum(new) >= waiting[0] + args.reserve:
                new.append(waiting.pop(0))
            for n in new:  # their prompts' KV goes to the nodes at this boundary
                cluster.router.add_request(next_id, n)
                next_id += 1
            if starting is None and (waiting or free_tokens(cluster) - sum(new) < args.reserve):
                starting = cluster.add_node(args.node_tokens, wait=False)
                print(f"step {step:3d}: {free_tokens(cluster) - sum(new)} tokens free, "
                      f"{len(waiting)} requests waiting -> starting node {starting}")
            t0 = time.perf_counter()
            plan = cluster.begin_step()  # boundary: new requests, nodes that became ready
            if starting in cluster.clients:
                print(f"step {step:3d}: node {starting} joined "
                      f"({len(cluster.clients)} nodes, {free_tokens(cluster)} tokens free)")
                starting = None
            for rid in plan.prefill:
                n = plan.positions[plan.requests.index(rid)]
                for layer in range(LAYERS):
                    k, v = rand(n, HKV, D), rand(n, HKV, D)
                    remote.prefill(layer, rid, k, v)
                    ref.extend(layer, rid, k, v)
            b = len(plan.requests)
            for layer in range(LAYERS):
                q, k, v = rand(b, HQ, D), rand(b, HKV, D), rand(b, HKV, D)
                out = remote(layer, q, k, v)
                for i, rid in enumerate(plan.requests):
                    ref.extend(layer, rid, k[i : i + 1], v[i : i + 1])
                worst = max(worst, rel_err(out, ref.attend(layer, plan.requests, q, remote.scale)))
            ms = (time.perf_counter() - t0) * 1e3
            for rid in plan.requests:
                cluster.router.advance(rid)
            time.sleep(args.model_ms / 1e3)  # stand-in for the model's projections and FFN
            if step % 10 == 0 or new:
                held = " ".join(f"{n}={cluster.router.node_load(n)}"
                                for n in cluster.router.nodes())
                print(f"step {step:3d}: {b} requests, {ms:6.1f} ms, tokens per node: {held}")
        remote.end_step(wait=True)
        print(cluster.table())
        for rid in cluster.router.requests():
            cluster.router.finish_request(rid)
        cluster.begin_step()  # frees their KV on the nodes
    print(f"{len(cluster.router.nodes())} nodes at the end; worst relative error of any step: "
          f"{worst:.1e}")
    assert worst < 1e-5, "attention over the nodes must equal attention over the full KV"


if __name__ == "__main__":
    main()
