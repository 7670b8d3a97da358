"""Host time per attend message at an attention node, piece by piece.

A node's loop is single-threaded: its host time per message sits on every layer's
critical path. This splits that time into its parts, each timed on the host without
synchronising (what the serve loop pays), next to the GPU time of the attention itself:
the NodeServer's handling of one attend message and `AttentionNode.attend` (a graph
replay on CUDA: kflume/node/graphs.py), against `split_kv_attention` launched directly;
the batch's page-table lookup; appends; and the first message of a new batch shape
(a capture, then a replay).

    python benchmarks/node_host.py                  # GPU, the e2e shape
    python benchmarks/node_host.py --device cpu --tokens 512   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StubPeer, header, save_json  # noqa: E402

from kflume.comm.wire import Header  # noqa: E402
from kflume.kernels.split_kv import default_num_splits, launch_split_kv  # noqa: E402
from kflume.node import (  # noqa: E402
    AttentionNode,
    NodeConfig,
    NodeServer,  # noqa: E402
)


def host_us(fn, n: int) -> float:
    """Median host time of `fn()` in microseconds; the device is drained every 8 calls
    so the launch queue never fills (which would make a launch wait for the GPU)."""
    out = []
    for i in range(n):
        if i % 8 == 0 and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(out)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    dev, b, n = args.device, args.batch, args.tokens
    hq, hkv, d, layers = 32, 8, 128, 2
    dtype = "bfloat16" if dev == "cuda" else "float32"
    node = AttentionNode(NodeConfig(layers=layers, kv_heads=hkv, head_dim=d, dtype=dtype,
                                    capacity_tokens=b * (n + 128 + 2 * args.iters) + 1024,
                                    device=dev, q_heads=hq))
    reqs = list(range(b))
    node.open(reqs, [n] * b)
    for layer in range(layers):
        for r in reqs:  # contents do not matter for timing
            k = torch.zeros(1, n, hkv, d, device=dev, dtype=node.dtype)
            node.append(layer, [r], [0], [0], k, k)
    q = torch.randn(b, hq, d, device=dev).to(node.dtype)
    kv_len = [n] * b
    batch = node.pages.batch(reqs, kv_len)
    pt, lens, start = batch.page_table, batch.kv_len, batch.kv_start
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev == "cuda" else 132
    splits = default_num_splits(b, hkv, pt.shape[1] * node.config.page_size, sms)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, device=dev)
    k1 = torch.randn(b, 1, hkv, d, device=dev).to(node.dtype)
    srv = NodeServer(node, None, type("L", (), {"address": "bench"})())
    h = Header("attend", layer=0, epoch=0, requests=reqs, ints={"kv_len": kv_len},
               info={"scale": d**-0.5})
    offs = iter(range(n, n + 64))

    def append():
        o = next(offs, n)
        node.append(1, reqs, [o] * b, [o] * b, k1, k1)

    step_reqs, step_kv = [f"s{r}" for r in reqs], torch.randn(b, layers, 1, hkv, d,
                                                              device=dev).to(node.dtype)
    step_off = iter(range(1 << 30))

    def append_step(queued: bool):  # a weight node's append: every layer, new offsets
        def run():
            if queued:  # the attention of another micro-batch still running on the GPU
                torch.cuda._sleep(1_000_000)
            o = next(step_off)
            node.append_layers(range(layers), step_reqs, [o] * b, [o] * b, step_kv, step_kv)
        return run

    def handle():
        srv._handle(StubPeer, h, [q], time.perf_counter())
        srv._deferred.clear()

    def event():
        torch.cuda.Event().record()

    attend = lambda: node.attend(0, reqs, kv_len, q, scale=d**-0.5)  # noqa: E731
    parts = {
        "server: handle one attend message (graph replay on CUDA)": handle,
        "AttentionNode.attend (graph replay on CUDA)": attend,
        "page-table lookup (cached)": lambda: node.pages.batch(reqs, kv_len),
        "split_kv_attention, checks off": lambda: __import__("kflume").split_kv_attention(
            q, node.k_pool[0], node.v_pool[0], pt, start, lens, num_splits=splits,
            out=out, lse=lse, check=False),
        "AttentionNode.append (1 token per request)": append,
        "AttentionNode.append_layers (a step's tokens, every layer)": append_step(False),
    }
    if dev == "cuda":  # (on CPU the node runs the torch reference instead)
        parts["Triton launches alone (split + merge)"] = lambda: launch_split_kv(
            q, node.k_pool[0], node.v_pool[0], pt, start, lens, out, lse, d**-0.5, splits)
        parts["CUDA event record"] = event
        # the host's time when GPU work is queued ahead (0.5-1 ms of sleep kernel): it
        # should not wait for that work
        parts["AttentionNode.append_layers behind queued GPU work"] = append_step(True)
    for fn in parts.values():  # warm up: compile, load modules
        fn()
    res = {name: host_us(fn, args.iters) for name, fn in parts.items()}
    if dev == "cuda":  # first message of a new batch shape: capture, then replay
        firsts = []
        for n_req in range(b - 1, 0, -1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            node.attend(0, reqs[:n_req], kv_len[:n_req], q[:n_req], scale=d**-0.5)
            firsts.append((time.perf_counter() - t0) * 1e6)
        res["first message of a new batch shape (capture + replay)"] = statistics.median(firsts)
    if dev == "cuda":
        from common import graph_time_us

        res["GPU time of the attention (split + merge)"] = graph_time_us(
            lambda: launch_split_kv(q, node.k_pool[0], node.v_pool[0], pt, start, lens, out,
                                    lse, d**-0.5, splits))
    print(header(f"Host time per attend message at a node: B={b}, {n} tokens, {hq}/{hkv} "
                 f"heads of {d}, {splits} splits"))
    print("| piece | us |\n|---|---|")
    for name, us in res.items():
        print(f"| {name} | {us:.1f} |")
    save_json("node_host.json", {"batch": b, "tokens": n, "splits": splits, "us": res})


if __name__ == "__main__":
    main()
