"""From process start to first served attention: where an attention node's start goes,
cold and from a warm pool.

Cold: a `kflume node` process (`NodeProcess`, what `Cluster.local` and `ProcessProvider`
start), timed stage by stage. Interpreter start, `import torch` and `import kflume` are
timed in fresh interpreters (medians); the rest in each start: the way to the node's
`main()`, CUDA initialisation and the KV pools, the kernels' warm-up (on a GPU, Triton
compiles them or loads them from its cache: $TRITON_CACHE_DIR, default ~/.triton/cache),
UCX and listening (the node's handshake carries these timestamps), the address read by
the parent, the weight side's connect and handshake (`cluster.add_node(address=...)`),
and the first step served (a 16-token prompt appended, then one decode step's attention
over every layer).

Warm pool: the same join through a `WarmPool` whose node already listens:
`cluster.add_node()` (hand-out, connect, handshake), then the first step served.

    python benchmarks/node_start.py                          # CPU
    python benchmarks/node_start.py --device cuda            # a GPU, Llama-3.1-8B's KV
    python benchmarks/node_start.py --device cuda --fresh-triton-cache   # compile anew
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, header, save_json  # noqa: E402

from kflume import Cluster  # noqa: E402
from kflume.comm.ucx import UcxTransport  # noqa: E402
from kflume.config import NodeConfig  # noqa: E402
from kflume.node.process import NodeProcess  # noqa: E402
from kflume.providers import ProcessProvider, WarmPool  # noqa: E402

PROMPT = 16


IMPORTS = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
           "import kflume; print(t1 - t0, time.perf_counter() - t1)")


def fresh_interpreter(env: dict, repeats: int) -> dict:
    """Medians over fresh interpreters: `python -c pass` (wall), and the time of
    `import torch` and then of `import kflume` in one."""
    start, torch_s, kflume_s = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        start.append(time.perf_counter() - t)
        out = subprocess.run([sys.executable, "-c", IMPORTS], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        torch_s.append(float(out[0]))
        kflume_s.append(float(out[1]))
    return {"interpreter start": statistics.median(start),
            "import torch": statistics.median(torch_s),
            "import kflume": statistics.median(kflume_s)}


def first_steps(cluster: Cluster, rid: str) -> dict:
    """A request's prompt appended, then two decode steps' attention over every layer:
    the wall-clock time (time.time()) the first layer's attention came back, the first
    step ended, and the second (a step at full speed, for comparison) ended."""
    g, c = torch.Generator().manual_seed(0), cluster.geometry
    dev, dt = torch.device("cuda" if c.device.startswith("cuda") else "cpu"), c.torch_dtype
    rand = lambda *s: torch.randn(*s, generator=g).to(dev, dt)  # noqa: E731
    cluster.router.add_request(rid, PROMPT)
    times = {}
    for step in ("first step", "second step"):
        plan = cluster.begin_step()
        for layer in range(c.layers if plan.prefill else 0):
            cluster.remote.prefill(layer, rid, rand(PROMPT, c.kv_heads, c.head_dim),
                                   rand(PROMPT, c.kv_heads, c.head_dim))
        for layer in range(c.layers):
            out = cluster.remote(layer, rand(1, c.q_heads, c.head_dim),
                                 rand(1, c.kv_heads, c.head_dim), rand(1, c.kv_heads, c.head_dim))
            if not times:
                out.cpu()
                times["first attention"] = time.time()
        out.cpu()
        cluster.end_step(wait=True)
        cluster.router.advance(rid)
        times[step] = time.time()
    cluster.router.finish_request(rid)
    return times


def cold_start(geometry: NodeConfig, token: str, env: dict) -> dict:
    """One node process started, joined and served: each stage's seconds."""
    cluster = Cluster(UcxTransport(token=token), geometry)
    cluster.attention(num_q_heads=geometry.q_heads, device=geometry.device)
    t0 = time.time()
    proc = NodeProcess(geometry, token=token, env=env, wait=False, timeout=600.0)
    try:
        address = proc.wait_ready()
        t_seen = time.time()
        name = cluster.add_node(address=address)
        t_joined = time.time()
        t = first_steps(cluster, "first")
        s = cluster.clients[name].info["startup"]
    finally:
        cluster.close()
        proc.stop()
    return {"spawn -> main()": s["main"] - t0, "CUDA init + KV pools": s["pools"] - s["main"],
            "kernel warm-up": s["warmup"] - s["pools"], "UCX + listen": s["listen"] - s["warmup"],
            "address read by the parent": t_seen - s["listen"],
            "connect + handshake": t_joined - t_seen, **served(t, t_joined),
            "total": t["first attention"] - t0}


def served(t: dict, t_joined: float) -> dict:
    return {"first attention served (prompt appended, layer 0 attended)":
            t["first attention"] - t_joined,
            "rest of the first step (all layers)": t["first step"] - t["first attention"],
            "a second step, for comparison": t["second step"] - t["first step"]}


class TimedStarts:
    """A provider that times its inner provider's `start()` (a WarmPool's hand-out)."""

    def __init__(self, inner) -> None:
        self.inner, self.took = inner, []

    def start(self, name, config, env=None):
        t = time.perf_counter()
        handle = self.inner.start(name, config, env)
        self.took.append(time.perf_counter() - t)
        return handle


def warm_join(geometry: NodeConfig, token: str, env: dict) -> dict:
    """A join from a warm pool whose node listens: `add_node()` (hand-out, connect,
    handshake), then the first step served."""
    pool = WarmPool(ProcessProvider(token, env), 1, geometry)
    timed = TimedStarts(pool)
    cluster = Cluster(UcxTransport(token=token), geometry, provider=timed)
    cluster.attention(num_q_heads=geometry.q_heads, device=geometry.device)
    try:
        deadline = time.monotonic() + 600
        while pool.ready_count() < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the pool's node did not listen within 600 s")
            time.sleep(0.05)
        t0 = time.time()
        cluster.add_node()
        t_joined = time.time()
        t = first_steps(cluster, "first")
        assert pool.stats.ready == 1, "the pool handed out a node that did not listen yet"
    finally:
        cluster.close()
        pool.close()  # (the replacement it started)
    return {"hand-out from the pool": timed.took[0],
            "connect + handshake": t_joined - t0 - timed.took[0], **served(t, t_joined),
            "total": t["first attention"] - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="where the node's KV lives: cpu or cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--capacity-tokens", type=int, default=None,
                   help="the node's KV tokens (default: 4096 on CPU, 262144 on a GPU)")
    p.add_argument("--repeats", type=int, default=3, help="cold starts and joins timed")
    p.add_argument("--fresh-triton-cache", action="store_true",
                   help="give the nodes an empty TRITON_CACHE_DIR (kernels compiled anew)")
    args = p.parse_args()
    cap = args.capacity_tokens or (262144 if args.device.startswith("cuda") else 4096)
    geometry = NodeConfig(layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                          capacity_tokens=cap, dtype=args.dtype, device=args.device,
                          q_heads=args.q_heads)
    token = secrets.token_hex(8)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    if args.fresh_triton_cache:
        env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kflume-triton-")
    cache = env.get("TRITON_CACHE_DIR") or os.environ.get("TRITON_CACHE_DIR") or "~/.triton/cache"
    print(header("Attention node start: process start to first served attention"))
    print(f"# commit {git_rev()}; node: {args.layers} layers x {args.kv_heads} KV heads x "
          f"{args.head_dim}, {args.dtype}, {cap} tokens on {args.device}; Triton cache "
          f"{cache}{' (fresh each start)' if args.fresh_triton_cache else ''}")
    full_env = {**os.environ, **env}
    pre = fresh_interpreter(full_env, max(3, args.repeats))
    colds, warms = [], []
    for i in range(args.repeats):
        if args.fresh_triton_cache:
            env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kflume-triton-")
        colds.append(cold_start(geometry, token, env))
        warms.append(warm_join(geometry, token, env))
        print(f"# run {i + 1}: cold {colds[-1]['total']:.2f} s, warm pool "
              f"{warms[-1]['total']:.3f} s", flush=True)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(f"\n| stage | cold s (median of {args.repeats}) | warm pool s |")
    print("|---|---|---|")
    for k, v in pre.items():
        print(f"| {k} (fresh interpreter) | {v:.3f} | – |")
    rows = {k: (med(colds, k), None) for k in colds[0] if k != "total"}
    rows["hand-out from the pool"] = (None, med(warms, "hand-out from the pool"))
    for k in warms[0]:
        if k not in ("hand-out from the pool", "total"):
            rows[k] = (med(colds, k), med(warms, k))
    rows["**process start (warm pool: add_node) to first served attention**"] = (
        med(colds, "total"), med(warms, "total"))
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    for k, (c, w) in rows.items():
        print(f"| {k} | {fmt(c)} | {fmt(w)} |")
    print(f"\n# the first three rows add up to what spawn -> main() measures in the node "
          f"({med(colds, 'spawn -> main()'):.3f} s)")
    save_json("node_start.json", {"fresh_interpreter": pre, "cold": colds, "warm_pool": warms,
                                  "device": args.device, "capacity_tokens": cap})


if __name__ == "__main__":
    main()
