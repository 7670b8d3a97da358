"""End-to-end TPOT: Llama-3.1-8B-shaped decode, colocated vs disaggregated, same run.

- weights: random bf16 tensors of the Llama-3.1-8B shape (32 layers, hidden 4096, 32/8
  heads of 128, FFN 14336, vocab 128256), saved as safetensors and loaded back by the
  weight node (attention nodes never see them);
- colocated (the peer): the same model on GPU0, SDPA (cuDNN) over a KV cache, the whole
  step in one CUDA graph; local compute: the weight node's work alone (no attention);
- kflume: the weight node on GPU0, one `kflume node` process on GPU1, the whole step in
  one CUDA graph (`kflume.CapturedStep`), unpipelined and with 2 micro-batches; then a
  second attention node joins during the pipelined run.

Every figure is a per-token wall time (boundary, graph replay, transport, output copy)
over `--steps` steps after `--warmup`, p50 and p99.

    python benchmarks/e2e.py                        # a GPU host with 2 GPUs
    python benchmarks/e2e.py --node-gpu 0           # one GPU: a functional run
    python benchmarks/e2e.py --tiny --device cpu --configs 2x512 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import steptrace  # noqa: E402
from colocated import run_colocated  # noqa: E402
from common import header, save_json, stats, timed  # noqa: E402

from kflume import CapturedStep, Cluster  # noqa: E402
from kflume.gcwatch import gc_pauses  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    dim: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256


TINY = Shape(layers=2, dim=256, heads=8, kv_heads=2, head_dim=32, ffn=512, vocab=1024)


def load_weights(s: Shape, device: str, dtype: torch.dtype) -> dict:
    """Random weights, saved as safetensors and loaded back (as a weight node would)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator(device=device).manual_seed(0)

    def w(*sh):
        return (torch.randn(*sh, generator=g, device=device) * sh[-1] ** -0.5).to(dtype)

    def one():
        return torch.ones(s.dim, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory(dir=os.environ.get("E2E_TMP")) as tmp:
        save_file({"embed": w(s.vocab, s.dim), "head": w(s.vocab, s.dim), "norm": one()},
                  f"{tmp}/base.safetensors")
        for i in range(s.layers):
            save_file({"wqkv": w((s.heads + 2 * s.kv_heads) * s.head_dim, s.dim),
                       "wo": w(s.dim, s.heads * s.head_dim), "w13": w(2 * s.ffn, s.dim),
                       "w2": w(s.dim, s.ffn), "n1": one(), "n2": one()},
                      f"{tmp}/layer{i:02d}.safetensors")
        W = load_file(f"{tmp}/base.safetensors", device=device)
        W["layers"] = [load_file(f"{tmp}/layer{i:02d}.safetensors", device=device)
                       for i in range(s.layers)]
    return W


# ---- the model: plain functions (gpt-fast style) --------------------------------------
def _rope(x, pos, cos, sin):  # x [b, H, D], pos [b]
    c, s = cos[pos][:, None], sin[pos][:, None]
    x1, x2 = x[..., ::2].float(), x[..., 1::2].float()
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).to(x.dtype)


def _rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def _before(x, pos, n1, wqkv, cos, sin, heads: int, kv_heads: int):
    b, hd = x.shape[0], cos.shape[1] * 2
    q, k, v = F.linear(_rms(x, n1), wqkv).split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
    return (_rope(q.view(b, heads, hd), pos, cos, sin),
            _rope(k.view(b, kv_heads, hd), pos, cos, sin), v.reshape(b, kv_heads, hd))


def _after(x, attn, wo, n2, w13, w2):
    x = x + F.linear(attn.reshape(x.shape[0], -1), wo)
    gate, up = F.linear(_rms(x, n2), w13).chunk(2, -1)
    return x + F.linear(F.silu(gate) * up, w2)


class Model:
    """The Llama-shaped model as `CapturedStep` takes it; `compiled`: its per-layer halves
    through torch.compile (one compile per micro-batch size, shared by every layer)."""

    def __init__(self, s: Shape, W: dict, context: int, device: str, compiled: bool = False):
        self.s, self.W = s, W
        freq = 1.0 / (500000.0 ** (torch.arange(0, s.head_dim, 2, device=device).float()
                                   / s.head_dim))
        ang = torch.arange(context + 4096, device=device).float()[:, None] * freq
        self.cos, self.sin = ang.cos(), ang.sin()
        wrap = (lambda f: torch.compile(f, dynamic=False)) if compiled else (lambda f: f)
        self._before, self._after = wrap(_before), wrap(_after)

    def embed(self, ids, pos):
        return self.W["embed"][ids], pos

    def before(self, layer, state):
        x, pos = state
        lw = self.W["layers"][layer]
        return self._before(x, pos, lw["n1"], lw["wqkv"], self.cos, self.sin, self.s.heads,
                            self.s.kv_heads)

    def after(self, layer, state, attn):
        x, pos = state
        lw = self.W["layers"][layer]
        return self._after(x, attn, lw["wo"], lw["n2"], lw["w13"], lw["w2"]), pos

    def head(self, state):
        return F.linear(_rms(state[0], self.W["norm"]), self.W["head"]).argmax(-1)


# ---- runs ------------------------------------------------------------------------------
def run_kflume(s: Shape, W: dict, batch: int, context: int, device: str, args,
               add_node: bool) -> dict:
    cuda = device == "cuda"
    env = {"CUDA_VISIBLE_DEVICES": "1,0"} if cuda and args.node_gpu == 1 else {}
    # room for every run's tokens; a join also steps while the node starts (50 a second)
    capacity = batch * (context + 4 * (args.warmup + args.steps + 64) + 8192 * add_node)
    cl = Cluster.local(1, layers=s.layers, kv_heads=s.kv_heads, head_dim=s.head_dim,
                       dtype="bfloat16" if cuda else "float32", capacity_tokens=capacity,
                       device="cuda" if cuda else "cpu", env=env, q_heads=s.heads,
                       range_tokens=args.range_tokens, timeout=60.0)
    out = {}
    try:
        cl.attention(num_q_heads=s.heads, device=device, max_batch=batch)
        t0 = time.perf_counter()
        for r in range(batch):
            cl.router.add_request(r, context)
        cl.begin_step()
        g = torch.Generator(device=device).manual_seed(2)
        for layer in range(s.layers):
            for r in range(batch):
                k = torch.randn(context, s.kv_heads, s.head_dim, device=device,
                                generator=g).to(W["embed"].dtype)
                cl.remote.prefill(layer, r, k, torch.randn_like(k))
            cl.end_step(wait=True)
        out["prefill_s"] = time.perf_counter() - t0
        model = Model(s, W, context + 1024, device, compiled=args.compile)
        ids = torch.zeros(batch, dtype=torch.long, device=device)
        pos = torch.full((batch,), context, dtype=torch.long, device=device)
        for mb in (1, 2):
            key = "kflume" if mb == 1 else "kflume_pipelined"
            with CapturedStep(cl, num_layers=s.layers, before=model.before, after=model.after,
                              embed=model.embed, head=model.head, microbatches=mb,
                              device=device, timeout=60.0) as step:

                def one(step=step):
                    ids.copy_(step(ids, pos))
                    pos.add_(1)
                timed(args.warmup + 1, one)  # the first call captures
                serving = step.captured.serving
                serving.trace_steps = args.steps
                gc_pauses()
                r = out[key] = stats(timed(args.steps, one))
                node = cl.clients["node0"].stats(trace=512)
                r.update(points=steptrace.points(serving.trace),
                         per_step={**steptrace.per_step(serving.trace),
                                   "tail_ms": steptrace.tails(serving.step_trace)},
                         one_way=steptrace.one_way(serving.trace, node.get("attend_trace", [])),
                         node_us={"handle": node.get("attend_handle_us", 0),
                                  "reply": node.get("attend_reply_us", 0)},
                         gc={"weight": steptrace.gc_in_steps(gc_pauses().recent,
                                                             serving.step_trace),
                             "node": steptrace.gc_in_steps(node.get("gc_trace", []),
                                                           serving.step_trace)})
                serving.trace_steps = 0
                print(f"  {batch}x{context} {key}: p50 {r['p50_ms']:.2f} ms", flush=True)
                if add_node and mb == 2:
                    out["add_node"] = join(cl, one, capacity, args)
    finally:
        cl.close()
    return out


def join(cl: Cluster, one, capacity: int, args) -> dict:
    """A second node joins while the pipelined step runs; it takes every new token."""
    before = timed(20, one)
    env = {"CUDA_VISIBLE_DEVICES": f"{args.join_gpu},0"} if args.join_gpu is not None else None
    name = cl.add_node(capacity, wait=False, env=env)
    joined, deadline = [], time.monotonic() + 120
    while name not in cl.clients:  # steps go on while it starts and is prepared
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not join in 120 s")
        joined += timed(1, one)
        time.sleep(0.02)
    cl.router.drain_node("node0")
    joined += timed(2, one)
    after = timed(20, one)
    return {"before": stats(before), "after": stats(after), "join_steps_ms": joined,
            "new_node_tokens": cl.router.node_load(name)}


# ---- the report ---------------------------------------------------------------------------
def report(results: dict, args) -> None:
    print(header("End-to-end TPOT, Llama-3.1-8B shape" + (" (tiny)" if args.tiny else "")))
    print("| B x L | colocated p50 / p99 ms | kflume p50 / p99 | pipelined p50 / p99 | "
          "kflume / colocated | pipelined / colocated | local compute 1 mb / 2 mb |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda d: f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"  # noqa: E731
    for cfg, r in results["configs"].items():
        col, k, p = r.get("colocated"), r.get("kflume"), r.get("kflume_pipelined")
        if not (isinstance(k, dict) and isinstance(p, dict)):
            print(f"| {cfg} | (a run failed: see above) |")
            continue
        c = col["p50_ms"] if isinstance(col, dict) else None
        ratios = [f"{d['p50_ms'] / c:.2f}" if c else "n/a" for d in (k, p)]
        lc = [r.get(f"local_compute_mb{m}") for m in (1, 2)]
        lcs = " / ".join(f"{x['p50_ms']:.2f}" for x in lc) if all(lc) else "n/a"
        print(f"| {cfg} | {fmt(col) if c else col} | {fmt(k)} | {fmt(p)} | {ratios[0]} | "
              f"{ratios[1]} | {lcs} |")
    print("\n| B x L | run | per point: send / remote / release us | node: handle / reply us "
          "| one way: q / reply us |")
    print("|---|---|---|---|---|")
    for cfg, r in results["configs"].items():
        for key in ("kflume", "kflume_pipelined"):
            d = r.get(key)
            if isinstance(d, dict):
                pt, nu, ow = d["points"], d["node_us"], d["one_way"]
                print(f"| {cfg} | {key} | {pt.get('send_us', 0):.0f} / "
                      f"{pt.get('remote_us', 0):.0f} / {pt.get('release_us', 0):.0f} | "
                      f"{nu['handle']:.0f} / {nu['reply']:.0f} | "
                      + (f"{ow['q_us']:.0f} / {ow['reply_us']:.0f} |" if ow else "n/a |"))
                for line in steptrace.slow_steps(d):
                    print(f"  slow: {line}")
    for cfg, r in results["configs"].items():
        if "add_node" in r:
            a, n = r["add_node"], len(r["add_node"]["join_steps_ms"])
            print(f"\n{cfg}, pipelined, a second node joins: p99 of the 20 steps before "
                  f"{a['before']['p99_ms']:.2f} ms, after {a['after']['p99_ms']:.2f} ms "
                  f"({a['after']['p99_ms'] / a['before']['p99_ms']:.2f}x); {n}"
                  f" steps while it joined, the slowest {max(a['join_steps_ms']):.2f} ms; it "
                  f"holds {a['new_node_tokens']} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda", help="the weight node's device")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy shape (smoke test)")
    ap.add_argument("--configs", nargs="*", default=["8x32768", "32x32768", "8x131072"],
                    help="BATCHxCONTEXT")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before")
    ap.add_argument("--range-tokens", type=int, default=4096, help="router range size")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--add-node", default=None,
                    help="config (BxL) where a node joins mid-run (default: the first; 'none')")
    ap.add_argument("--compile", action="store_true",
                    help="the model's per-layer halves through torch.compile (both sides)")
    ap.add_argument("--join-gpu", type=int, default=None,
                    help="GPU of the node that joins (default: the nodes' GPU)")
    ap.add_argument("--node-gpu", type=int, default=1,
                    help="GPU of the attention nodes (0: share the weight node's)")
    args = ap.parse_args()
    shape = TINY if args.tiny else Shape()
    if args.layers:
        shape = replace(shape, layers=args.layers)
    cuda = args.device == "cuda"
    if cuda and args.node_gpu == 1 and torch.cuda.device_count() < 2:
        sys.exit("benchmarks/e2e.py needs two GPUs (weight node on GPU0, attention nodes on "
                 "GPU1); --node-gpu 0 puts both on one GPU for a functional run")
    W = load_weights(shape, args.device, torch.bfloat16 if cuda else torch.float32)
    results = {"shape": shape.__dict__, "configs": {}}
    free_gb = torch.cuda.mem_get_info(0)[0] / 2**30 if cuda else 0
    for cfg in args.configs:
        batch, context = (int(x) for x in cfg.split("x"))
        kv_gb = shape.layers * batch * context * shape.kv_heads * shape.head_dim * 4 / 2**30
        res: dict = {"colocated": "CUDA only"}
        if cuda:
            res = (run_colocated(Model(shape, W, context, "cuda", args.compile), batch,
                                 context, args) if kv_gb + 4 < free_gb else
                   {"colocated": f"does not fit: {kv_gb:.0f} GiB of KV beside the weights"})
            torch.cuda.empty_cache()
        res.update(run_kflume(shape, W, batch, context, args.device, args,
                              add_node=cfg == (args.add_node or args.configs[0])))
        results["configs"][cfg] = res
        save_json("e2e.json", results)  # what finished survives a later timeout
    report(results, args)


if __name__ == "__main__":
    main()
