"""Host time of a node's handling of one weight-node append: a step's new token of
every layer for B requests, in one message (what `CapturedRemoteAttention` sends each
step), from the message's arrival to its kernel queued, alone and behind GPU work
queued ahead (another micro-batch's attention, say), which the node should not wait for.

The weight node waits for this append's acknowledgement at the end of each step
(docs/benchmarks.md, "the wait for acknowledgements"), so its host time is on the step's
critical path. With `--profile`, also the functions it spends that time in (cProfile).

    python benchmarks/node_append.py                # GPU, the e2e shape
    python benchmarks/node_append.py --device cpu --tokens 512 --iters 50   # smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StubPeer, header, save_json  # noqa: E402

from kflume.comm.wire import Header  # noqa: E402
from kflume.node import (  # noqa: E402
    AttentionNode,
    NodeConfig,
    NodeServer,  # noqa: E402
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32768, help="held per request and layer")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    dev, b, n, layers, hkv, d = args.device, args.batch, args.tokens, args.layers, 8, 128
    cuda = dev == "cuda"
    node = AttentionNode(NodeConfig(
        layers=layers, kv_heads=hkv, head_dim=d, dtype="bfloat16" if cuda else "float32",
        capacity_tokens=b * (n + 2 * args.iters + 1024), device=dev, q_heads=32))
    reqs = list(range(b))
    node.open(reqs, [n] * b)
    chunk = min(n, 1024)
    fill = torch.zeros(b, layers, chunk, hkv, d, device=dev, dtype=node.dtype)
    for t0 in range(0, n, chunk):  # every layer holds n tokens (page tables as wide)
        node.append_layers(range(layers), reqs, [t0] * b, [t0] * b, fill[:, :, : n - t0],
                           fill[:, :, : n - t0])
    del fill
    srv = NodeServer(node, None, type("L", (), {"address": "bench"})())
    k = torch.randn(b, layers, 1, hkv, d, device=dev).to(node.dtype)
    v = torch.randn_like(k)
    nxt = iter(range(n, 1 << 30))

    def handle(queued: bool = False) -> float:
        if queued:  # ~0.5-1 ms of GPU work queued ahead on the node's stream
            torch.cuda._sleep(1_000_000)
        o = next(nxt)
        h = Header("append", layer=0, requests=reqs, ints={"offsets": [o] * b,
                   "positions": [o] * b}, info={"layers": layers})
        t0 = time.perf_counter()
        srv._handle(StubPeer, h, [k, v], t0)
        dt = time.perf_counter() - t0
        srv._deferred.clear()
        return dt * 1e6

    def timed(queued: bool) -> dict:
        us = []
        for i in range(args.iters):
            if cuda and i % 8 == 0:  # the launch queue never fills
                torch.cuda.synchronize()
            us.append(handle(queued))
        if cuda:
            torch.cuda.synchronize()
        us.sort()
        return {"median_us": statistics.median(us), "p90_us": us[int(0.9 * len(us))]}

    for _ in range(20):  # warm up: kernels loaded, caches made
        handle()
    res = {"alone": timed(False)}
    if cuda:
        res["behind queued GPU work"] = timed(True)
    print(header(f"A node's handling of a step's append: B={b}, {layers} layers, {n} "
                 "tokens held"))
    print("| append handled | median us | p90 us |\n|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['median_us']:.1f} | {r['p90_us']:.1f} |")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for i in range(200):
            if cuda and i % 8 == 0:
                torch.cuda.synchronize()
            handle()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue())
    save_json("node_append.json", res)


if __name__ == "__main__":
    main()
