"""End-to-end TPOT: Llama-3.1-8B-shaped decode, colocated vs disaggregated, same run.

- weights: random bf16 tensors of the Llama-3.1-8B shape (32 layers, hidden 4096,
  32/8 heads of 128, FFN 14336, vocab 128256), made here, saved as safetensors shards
  and loaded back by the weight node (attention nodes never see them);
- colocated: the same model on GPU0, SDPA (cuDNN) attention over a KV cache, the whole
  step in one CUDA graph;
- kflume: the weight node on GPU0, one attention node process on GPU1 (UCX, cuda_ipc),
  the whole step in one CUDA graph with GraphSignal and the transport on the host;
  without pipelining and with LayerPipeline (2 micro-batches); then a second attention
  node joins during the run.

Every figure is a per-step wall time (host bookkeeping, graph replay and transport) over
`--steps` steps after `--warmup`, p50 and p99.

    python benchmarks/e2e.py                       # GPU host with 2 GPUs
    python benchmarks/e2e.py --tiny --device cpu --configs 2x512 --steps 5 --warmup 2
                                                   # a 10-second smoke run of the code path
                                                   # (the default sizes take minutes on CPU)
"""

from __future__ import annotations

import argparse
import bisect
import gc
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, save_json  # noqa: E402

from kflume.captured import CapturedRemoteAttention, StepServer  # noqa: E402
from kflume.cluster import Cluster  # noqa: E402
from kflume.gcwatch import gc_pauses  # noqa: E402
from kflume.graph import warm_and_capture  # noqa: E402
from kflume.pipeline import LayerPipeline  # noqa: E402


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


# ---- weights: made here, saved as safetensors, loaded by the weight node ------------------------
def make_checkpoint(shape: Shape, path: Path, device: str) -> None:
    from safetensors.torch import save_file

    g = torch.Generator(device=device).manual_seed(0)

    def w(*s):
        return (torch.randn(*s, generator=g, device=device) * s[-1] ** -0.5).to(torch.bfloat16)

    save_file({"embed": w(shape.vocab, shape.dim), "head": w(shape.vocab, shape.dim),
               "norm": torch.ones(shape.dim, dtype=torch.bfloat16, device=device)},
              path / "base.safetensors")
    hd = shape.head_dim
    for i in range(shape.layers):
        save_file({"wqkv": w((shape.heads + 2 * shape.kv_heads) * hd, shape.dim),
                   "wo": w(shape.dim, shape.heads * hd), "w13": w(2 * shape.ffn, shape.dim),
                   "w2": w(shape.dim, shape.ffn),
                   "n1": torch.ones(shape.dim, dtype=torch.bfloat16, device=device),
                   "n2": torch.ones(shape.dim, dtype=torch.bfloat16, device=device)},
                  path / f"layer{i:02d}.safetensors")


def load_checkpoint(shape: Shape, path: Path, device: str) -> dict:
    from safetensors.torch import load_file

    W = load_file(path / "base.safetensors", device=device)
    W["layers"] = [load_file(path / f"layer{i:02d}.safetensors", device=device)
                   for i in range(shape.layers)]
    return W


# ---- the weight node's model: plain functions, static buffers (gpt-fast style) --------------
def _rope(x, pos, cos, sin):  # x [b, H, D], pos [b]
    c, s = cos[pos][:, None], sin[pos][:, None]
    x1, x2 = x[..., ::2].float(), x[..., 1::2].float()
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).to(x.dtype)


def _rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def _before(x, pos, n1, wqkv, cos, sin, heads: int, kv_heads: int):
    """Norm, QKV projection, RoPE of one layer: q [b, H, D], k, v [b, Hkv, D]."""
    b, hd = x.shape[0], cos.shape[1] * 2
    q, k, v = F.linear(_rms(x, n1), wqkv).split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
    return (_rope(q.view(b, heads, hd), pos, cos, sin),
            _rope(k.view(b, kv_heads, hd), pos, cos, sin), v.reshape(b, kv_heads, hd))


def _after(x, attn, wo, n2, w13, w2):
    """Output projection, residual, norm, SwiGLU FFN, residual."""
    x = x + F.linear(attn.reshape(x.shape[0], -1), wo)
    gate, up = F.linear(_rms(x, n2), w13).chunk(2, -1)
    return x + F.linear(F.silu(gate) * up, w2)


class Model:
    """The Llama-shaped model, weights in `W`. `compiled`: its per-layer halves go through
    torch.compile (Inductor fuses the norms, RoPE and SwiGLU's elementwise work into a few
    kernels, as serving engines do); one compile per micro-batch size, shared by every
    layer (the weights are arguments)."""

    def __init__(self, shape: Shape, W: dict, batch: int, context: int, device: str,
                 compiled: bool = False):
        self.s, self.W, self.device = shape, W, device
        hd = shape.head_dim
        freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device).float() / hd))
        ang = torch.arange(context + 4096, device=device).float()[:, None] * freq
        self.cos, self.sin = ang.cos(), ang.sin()
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.full((batch,), context, dtype=torch.long, device=device)
        wrap = (lambda f: torch.compile(f, dynamic=False)) if compiled else (lambda f: f)
        self._before, self._after = wrap(_before), wrap(_after)

    def before(self, layer, state):
        x, pos = state
        lw = self.W["layers"][layer]
        return self._before(x, pos, lw["n1"], lw["wqkv"], self.cos, self.sin, self.s.heads,
                            self.s.kv_heads)

    def after(self, layer, state, attn):
        x, pos = state
        lw = self.W["layers"][layer]
        return (self._after(x, attn, lw["wo"], lw["n2"], lw["w13"], lw["w2"]), pos)

    def warm(self, rows) -> None:
        """Run both halves once per micro-batch size (compiles before any capture)."""
        for r in rows:
            x = self.W["embed"][self.ids[r]]
            q, _, _ = self.before(0, (x, self.pos[r]))
            self.after(0, (x, self.pos[r]), torch.zeros_like(q))

    def finish_step(self, x):
        logits = F.linear(_rms(x, self.W["norm"]), self.W["head"])
        self.ids.copy_(logits.argmax(-1))
        self.pos.add_(1)


# ---- attention back ends for the pipeline ------------------------------------------------------
class LocalKV:
    """Colocated attention: SDPA (cuDNN) over a [B, Hkv, L, D] cache per layer."""

    def __init__(self, shape: Shape, batch: int, context: int, device: str):
        g = torch.Generator(device=device).manual_seed(1)
        mk = lambda: torch.randn(batch, shape.kv_heads, context, shape.head_dim,  # noqa: E731
                                 generator=g, device=device, dtype=torch.bfloat16)
        self.k = [mk() for _ in range(shape.layers)]
        self.v = [mk() for _ in range(shape.layers)]
        self.context = context

    def start(self, layer, q, k, v, rows=None):
        return (layer, q, k, v, rows if rows is not None else slice(None))

    def finish(self, h):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        layer, q, k, v, r = h  # r: a slice of rows, so the caches below are views
        self.k[layer][r, :, self.context - 1] = k  # the step's token, at a fixed slot
        self.v[layer][r, :, self.context - 1] = v
        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if q.is_cuda \
            else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(q[:, :, None], self.k[layer][r], self.v[layer][r],
                                               enable_gqa=True)
        return o[:, :, 0]


class NoAttention:
    """The weight node's work alone (attention output = zeros): the local-compute time."""

    def start(self, layer, q, k, v, rows=None):
        return q

    def finish(self, q):
        return torch.zeros_like(q)


def step_fn(model: Model, pipe: LayerPipeline, batch: int):
    rows = pipe.split(batch)

    def step():
        x = model.W["embed"][model.ids]
        out = pipe([(x[r], model.pos[r]) for r in rows], rows)
        model.finish_step(torch.cat([o[0] for o in out]))

    return step, rows


def time_steps(n, run_one) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run_one()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def slot_breakdown(trace) -> dict:
    """Median per served slot (a layer's micro-batch), in microseconds: host reaction and
    sends; at the nodes and on the wire; reply handling and release."""
    if not trace:
        return {}
    med = lambda i: statistics.median(t[i] for t in trace) * 1e6  # noqa: E731
    return {"send_us": med(1), "remote_us": med(2), "release_us": med(3), "n": len(trace)}


def per_step_slots(trace) -> dict:
    """Per step (a trace's slots, in order, start again at 0 each step): the median and
    the largest remote time of its slots, in microseconds, and which slot that was
    (layer * micro-batches + micro-batch)."""
    steps: list[list[float]] = []
    for t in trace:
        if t[0] == 0 or not steps:
            steps.append([])
        steps[-1].append(t[2] * 1e6)
    return {"remote_us_median": [round(statistics.median(s), 1) for s in steps],
            "remote_us_max": [round(max(s), 1) for s in steps],
            "remote_max_slot": [max(range(len(s)), key=s.__getitem__) for s in steps]}


def step_tails(step_trace) -> list[float]:
    """Per step, ms from its last slot released to its appends and streams acknowledged."""
    return [round((end - last) * 1e3, 3) for _, last, end in step_trace]


def tail_split(ops, step_trace) -> dict:
    """Where a step's wait for acknowledgements goes, from the node's op trace ([seq, op,
    seen, launched, sent]): per step, ms after its last reply released, of each append
    (seen, launched, acknowledged) and each stream acknowledged, named by the order the
    node answered them in its step (`append0`, `append1`, ...: medians over the steps that
    had one, so a run whose steps differ in their appends mixes them), and the wait
    itself."""
    per: dict[str, list[list[float]]] = {}
    for began, last, end in step_trace:
        mine = [e for e in ops if began <= e[2] <= end]
        for op in ("append", "stream"):
            ts = [[(t - last) * 1e3 for t in e[2:]] for e in mine if e[1] == op]
            for i, t in enumerate(ts):
                per.setdefault(f"{op}{i}", []).append(t if op == "append" else t[-1:])
    out = {k: [round(statistics.median(x[j] for x in v), 3) for j in range(len(v[0]))]
           for k, v in per.items()}
    out["tail"] = round(statistics.median(step_tails(step_trace)), 3) if step_trace else 0.0
    return out


def gc_in_steps(pauses, step_trace) -> list:
    """The collector pauses (began, seconds, generation) that began during a traced step
    (from its serving to the next one's, boundary included): [step, ms, generation]."""
    if not step_trace:
        return []
    starts, end = [b for b, _, _ in step_trace], step_trace[-1][2]
    out = []
    for began, secs, gen in pauses:
        i = bisect.bisect_right(starts, began) - 1
        if i >= 0 and (i < len(starts) - 1 or began <= end):
            out.append([i, round(secs * 1e3, 3), gen])
    return out


def one_way(trace, node_trace) -> dict:
    """Median per slot served by one node stream (micro-batches of one node), in
    microseconds, from both sides' clocks (one clock on a Linux host): q on the way
    (weight node sent -> node saw it), node launch, node launch -> reply sent, reply on
    the way (node sent -> weight node saw it). A mailbox stream's reply is delivered by
    the layer's own graph: there "sent" is the launch, and the reply's way includes the
    node's kernels."""
    at_node = {(e[0], e[1]): e[2:] for e in node_trace}
    rows = []
    for t in trace:
        if len(t[7]) == 1 and (t[7][0], t[6]) in at_node:
            seen, launched, sent = at_node[t[7][0], t[6]]
            rows.append((seen - t[4], launched - seen, sent - launched, t[5] - sent))
    if not rows:
        return {}
    med = lambda i: statistics.median(r[i] for r in rows) * 1e6  # noqa: E731
    return {"q_us": med(0), "node_launch_us": med(1), "node_reply_us": med(2),
            "reply_us": med(3), "n": len(rows)}


def profile_steps(run_one, n: int, name: str, cap=None) -> dict:
    """GPU time per step by kernel family over `n` steps (torch.profiler: CUPTI sees the
    kernels a replayed graph runs); the table and a Chrome trace go to $OUT. With `cap`
    (tracing its slots), also each slot's timeline on one clock (`slot_timeline`)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("kflume.clock"):  # ties perf_counter to the trace's clock
            clock = time.perf_counter()
        for _ in range(n):
            run_one()
    torch.cuda.synchronize()
    fam: dict[str, list[float]] = {}
    for e in prof.key_averages():
        t = e.self_device_time_total  # the kernels' own time (ops and API calls: 0)
        if not t or e.key.startswith("aten::"):
            continue
        k = e.key.lower()
        f = ("wait" if "wait_kernel" in k else "post" if "post_kernel" in k else
             "memcpy" if k.startswith("memcpy") else
             "attention/merge" if "merge" in k or "split_kv" in k else
             "gemm" if any(x in k for x in ("gemm", "cutlass", "sm90", "nvjet", "cublas"))
             else "index (gather/scatter)" if "index" in k else "other")
        a = fam.setdefault(f, [0.0, 0])
        a[0] += t / n
        a[1] += e.count / n
    out = {f: {"us": round(t, 1), "kernels": round(c, 1)} for f, (t, c) in fam.items()}
    dest = Path(os.environ.get("OUT", "."))
    prof.export_chrome_trace(str(dest / f"{name}.trace.json"))
    (dest / f"{name}.kernels.txt").write_text(prof.key_averages().table(
        sort_by="self_device_time_total", row_limit=40))
    if cap is not None and cap.trace:
        out["slot_timeline_us"] = slot_timeline(dest / f"{name}.trace.json", clock,
                                                cap.trace[-n * cap.signal.slots:])
    return out


def slot_timeline(trace_path: Path, clock: float, slots: list) -> dict:
    """Per slot, on one clock, medians in microseconds: GPU post done -> the host sees it;
    host sends; sent -> answered (node and wire); answered -> released; released -> GPU
    wait done; and the wait kernel's own time (the GPU stalled on the slot). Kernels from
    the profiler's trace, host times from `CapturedRemoteAttention.trace` (perf_counter,
    mapped onto the trace's clock by the `kflume.clock` range)."""
    import json

    ev = json.loads(trace_path.read_text())["traceEvents"]
    by = lambda key: sorted((e for e in ev if key(e)), key=lambda e: e["ts"])  # noqa: E731
    posts = by(lambda e: e.get("cat") == "kernel" and "post_kernel" in e.get("name", ""))
    waits = by(lambda e: e.get("cat") == "kernel" and "wait_kernel" in e.get("name", ""))
    mark = by(lambda e: e.get("name") == "kflume.clock")
    n = min(len(posts), len(waits), len(slots))
    if not n or not mark:
        return {}
    off = mark[0]["ts"] - clock * 1e6  # trace us = perf_counter us + off
    rows = []
    for p, w, t in zip(posts[-n:], waits[-n:], slots[-n:]):
        _, d_send, d_remote, d_release, sent, answered = t[:6]
        seen, sent, answered = (x * 1e6 + off for x in (sent - d_send, sent, answered))
        released = answered + d_release * 1e6
        rows.append((seen - (p["ts"] + p["dur"]), d_send * 1e6, d_remote * 1e6,
                     d_release * 1e6, (w["ts"] + w["dur"]) - released, w["dur"]))
    names = ("post_to_seen", "send", "remote", "release", "released_to_wait_done",
             "wait_kernel")
    return {k: round(statistics.median(r[i] for r in rows), 1) for i, k in enumerate(names)} | {
        "n": n}


def stats(ms: list[float]) -> dict:
    s = sorted(ms)
    p99 = s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]
    return {"p50_ms": statistics.median(s), "p99_ms": p99, "mean_ms": statistics.fmean(s),
            "n": len(s), "steps_ms": [round(x, 2) for x in ms]}


# ---- runs -------------------------------------------------------------------------------
def run_colocated(shape, W, batch, context, device, args) -> dict:
    model = Model(shape, W, batch, context, device, compiled=args.compile)
    for mb in (1, 2):
        model.warm(LayerPipeline(shape.layers, None, None, None, mb).split(batch))
    kv = LocalKV(shape, batch, context, device)
    out = {}
    for label, attn in (("colocated", kv), ("local_compute", NoAttention())):
        for mb in (1, 2):
            if label == "colocated" and mb == 2:
                continue
            pipe = LayerPipeline(shape.layers, model.before, model.after, attn, mb)
            step, _ = step_fn(model, pipe, batch)
            s = torch.cuda.Stream()
            g = warm_and_capture(step, s)

            def one(g=g, s=s):
                with torch.cuda.stream(s):
                    g.replay()
                s.synchronize()
            time_steps(args.warmup, one)
            out[f"{label}_mb{mb}" if label == "local_compute" else label] = stats(
                time_steps(args.steps, one))
    del kv
    torch.cuda.empty_cache()
    return out


def run_kflume(shape, W, batch, context, device, node_device, args, add_node: bool,
               graphs: bool = True) -> dict:
    # Each process sees both GPUs (cuda_ipc needs it), the node's first.
    env = {"CUDA_VISIBLE_DEVICES": "1,0"} if node_device == "cuda" and args.node_gpu == 1 else {}
    # Every run (stage x micro-batches) appends a token a step, and all stay on node0
    # until the last run adds a node: room for all of them (2 steps each for capture).
    runs = 2 * (len(args.stages) if graphs else 1)
    capacity = batch * (context + (args.warmup + args.steps + 2) * runs + 64 + 64)
    dtype = "bfloat16" if device == "cuda" else "float32"
    cl = Cluster.local(1, layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                       dtype=dtype, capacity_tokens=capacity, device=node_device, env=env,
                       range_tokens=args.range_tokens, timeout=60.0, q_heads=shape.heads,
                       graphs=graphs, stream_graphs=node_device != "cuda" or args.node_gpu != 0)
    try:
        remote = cl.attention(num_q_heads=shape.heads, device=device, max_batch=batch)
        t0 = time.perf_counter()
        for r in range(batch):
            cl.router.add_request(r, context)
        cl.begin_step()
        g = torch.Generator(device=device).manual_seed(2)
        wdt = W["embed"].dtype
        for layer in range(shape.layers):
            for r in range(batch):
                k = torch.randn(context, shape.kv_heads, shape.head_dim, device=device,
                                generator=g).to(wdt)
                remote.prefill(layer, r, k, torch.randn_like(k))
            remote.end_step(wait=True)
        prefill_s = time.perf_counter() - t0
        out = {"prefill_s" + ("" if graphs else "[eager node]"): prefill_s}
        model = Model(shape, W, batch, context, device, compiled=args.compile)
        for mb in (1, 2):
            model.warm(LayerPipeline(shape.layers, None, None, None, mb).split(batch))
        stages = args.stages if graphs else args.stages[:1]
        # the headline stage last: its run adds a node, which would change the others'
        for stage, mb in [(st, mb) for st in stages[1:] + stages[:1] for mb in (1, 2)]:
            try:
                pipe_rows = LayerPipeline(shape.layers, None, None, None, mb).split(batch)
                cap = CapturedRemoteAttention(remote, batch=batch, num_layers=shape.layers,
                                              row_ranges=pipe_rows, max_nodes=2,
                                              mechanism=args.mechanism, dtype=wdt,
                                              **STAGES[stage])
                pipe = LayerPipeline(shape.layers, model.before, model.after, cap, mb)
                step, _ = step_fn(model, pipe, batch)

                def boundary(cap=cap, split: dict | None = None):
                    t = [time.perf_counter()]
                    remote.end_step()
                    t.append(time.perf_counter())
                    for r in range(batch):
                        cl.router.advance(r)
                    plan = cl.begin_step()
                    t.append(time.perf_counter())
                    cap.load(plan)
                    if split is not None:  # where the boundary's host time goes, ms
                        t.append(time.perf_counter())
                        for k, a, b in zip(("acks", "plan", "load"), t, t[1:]):
                            split.setdefault(k, []).append((b - a) * 1e3)

                cap.load(cl.router.last_plan)
                s = torch.cuda.Stream() if device == "cuda" else None
                graph = None
                if s is not None:  # the warm-up before capture ran this step: advance past it
                    graph = warm_and_capture(step, s, serve=cap.serve_step)
                    boundary()
                parts: dict[str, list[float]] = {"serve": [], "sync": [], "boundary": []}
                split: dict[str, list[float]] = {}
                server = StepServer(cap, timeout=60.0)
                gc.collect()  # what a serving loop does once warm: the long-lived objects
                gc.freeze()  # leave the collector's reach (no full collection mid-step)
                gc_pauses()  # (watched from here on: which steps a collection fell in)
                print(f"  {batch}x{context} stage={stage} micro-batches={mb}: captured",
                      flush=True)

                def one(cap=cap, graph=graph, s=s, step=step, parts=parts, server=server,
                        split=split):
                    t0 = time.perf_counter()
                    if graph is not None:
                        if args.serve == "thread":
                            server.begin()  # served from its own thread: a launch may block
                        with torch.cuda.stream(s):
                            graph.replay()
                        if args.serve == "thread":
                            server.end()
                        else:
                            cap.serve_step()
                        t1 = time.perf_counter()
                        s.synchronize()
                    else:  # CPU smoke run: eager, served from a thread
                        t = threading.Thread(target=cap.serve_step)
                        t.start()
                        step()
                        t.join(60)
                        t1 = time.perf_counter()
                    t2 = time.perf_counter()
                    boundary(split=split)
                    t3 = time.perf_counter()
                    for k, v in (("serve", t1 - t0), ("sync", t2 - t1), ("boundary", t3 - t2)):
                        parts[k].append(v * 1e3)

                time_steps(args.warmup, one)
                cl.clients["node0"].stats(reset_timings=True)
                key = ("kflume" if mb == 1 else "kflume_pipelined") + (
                    "" if stage == args.stages[0] else f"[{stage}]") + (
                    "" if graphs else "[eager node]")
                cap.trace_steps = args.steps
                out[key] = stats(time_steps(args.steps, one))
                out[key]["slots"] = slot_breakdown(cap.trace)
                # each timed step's host parts and slot times (which steps were slow, and
                # where: in the e2e.json output)
                out[key]["per_step"] = {
                    **{f"{k}_ms": [round(x, 3) for x in v[-args.steps:]]
                       for k, v in parts.items()},
                    **per_step_slots(cap.trace), "tail_ms": step_tails(cap.step_trace)}
                out[key]["parts_ms"] = {k: statistics.median(v[-args.steps:])
                                        for k, v in parts.items()}
                out[key]["boundary_ms"] = {k: round(statistics.median(v[-args.steps:]), 3)
                                           for k, v in split.items()}
                node = cl.clients["node0"].stats(reset_timings=True, trace=512)
                out[key]["node_us"] = {k: node.get(f"attend_{k}_us", 0.0)
                                       for k in ("handle", "reply")}
                appends = [e for e in node.get("op_trace", []) if e[1] == "append"]
                if appends:  # an append's host handling, then its launch to its ack sent
                    out[key]["node_us"].update(
                        append_handle=statistics.median(e[3] - e[2] for e in appends) * 1e6,
                        append_reply=statistics.median(e[4] - e[3] for e in appends) * 1e6)
                out[key]["tail_split_ms"] = tail_split(node.get("op_trace", []),
                                                       cap.step_trace)
                out[key]["one_way"] = one_way(cap.trace, node.get("attend_trace", []))
                # collector pauses in the timed steps, here and on the node: [step, ms, gen]
                out[key]["gc"] = {"weight": gc_in_steps(gc_pauses().recent, cap.step_trace),
                                  "node": gc_in_steps(node.get("gc_trace", []),
                                                      cap.step_trace)}
                if args.profile and stage == args.stages[0] and graph is not None:
                    out[key]["gpu_per_step"] = profile_steps(one, 3, f"{batch}x{context}-{key}",
                                                             cap)
                print(f"  {key}: {out[key]}", flush=True)
                cap.trace_steps = 0
                if add_node and mb == 2 and stage == args.stages[0]:
                    cap.trace_steps = 20  # per-slot times of each window, below
                    before = time_steps(20, one)
                    slots_before = slot_breakdown(cap.trace)
                    join_env = ({"CUDA_VISIBLE_DEVICES": f"{args.join_gpu},0"}
                                if args.join_gpu is not None else None)
                    name = cl.add_node(capacity, wait=False, env=join_env)
                    cl.processes[name].wait_ready()
                    # Steps go on while the node is connected and prepared (its graphs
                    # captured, kflume/cluster.py); it enters the routing at a boundary
                    # after that, then takes every new token (node0 drained), first
                    # appended at the step after, attended over from the one after that.
                    joined, deadline = [], time.monotonic() + 120
                    first = len(parts["serve"])
                    while name not in cl.clients:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{name} did not join in 120 s")
                        joined += time_steps(1, one)
                    cl.router.drain_node("node0")
                    joined += time_steps(2, one)
                    # where the join steps' time went (host parts, boundary split), ms
                    join_parts = {k: [round(x, 2) for x in v[first : first + len(joined)]]
                                  for k, v in {**parts, **split}.items()}
                    n = min(len(joined), 20)  # (the trace keeps 20 steps)
                    join_parts.update({k: v[-n:] for k, v in per_step_slots(cap.trace).items()},
                                      tail_ms=step_tails(cap.step_trace)[-n:])
                    # the new node's first messages, against the first-append step's
                    # timeline (ms from its start: last reply released, acknowledged)
                    began, last, end = cap.step_trace[-1]
                    ops = cl.clients[name].stats(trace=16).get("op_trace", [])
                    join_parts["last_step_ms"] = [round((last - began) * 1e3, 2),
                                                  round((end - began) * 1e3, 2)]
                    join_parts["new_node_ops_ms"] = [
                        [op, *(round((t - began) * 1e3, 2) for t in e)]
                        for _, op, *e in ops]
                    after = time_steps(20, one)
                    slots_after = slot_breakdown(cap.trace)
                    cap.trace_steps = 0
                    load = cl.router.node_load(name)
                    out["add_node"] = {"gpu": args.join_gpu if args.join_gpu is not None
                                       else args.node_gpu,
                                       "before": stats(before), "after": stats(after),
                                       "join_steps_ms": joined, "new_node_tokens": load,
                                       "join_parts_ms": join_parts,
                                       "slots_before": slots_before,
                                       "slots_after": slots_after,
                                       "after_steps_ms": [round(t, 2) for t in after]}
                    print(f"  add_node: {out['add_node']}", flush=True)
                server.close()
                cap.close()  # (no node joining later prepares for this graph)
            except Exception as e:  # noqa: BLE001 - record it, go on with the next run
                print(f"  {batch}x{context} stage={stage} micro-batches={mb} failed: {e!r}",
                      flush=True)
                out[f"failed[{stage},{mb}]"] = repr(e)
        return out
    finally:
        cl.close()


STAGES = {"device": {"stage": "device"}, "messages": {"stage": "device", "streams": False},
          "host": {"stage": "host"},
          # streams whose replies come as messages, not into mailboxes (kflume.comm.mailbox)
          "replies": {"stage": "device", "mailbox": False},
          # mailboxes for replies, queries sent as messages (the node does not pull them)
          "push": {"stage": "device", "pull": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy shape (smoke test)")
    ap.add_argument("--configs", nargs="*", default=["8x32768", "32x32768", "8x131072"],
                    help="BATCHxCONTEXT")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--range-tokens", type=int, default=4096)
    ap.add_argument("--mechanism", default=None, help="GraphSignal mechanism (memop, kernel)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--stages", nargs="+", default=["device"], choices=list(STAGES),
                    help="CapturedRemoteAttention stage(s) to run; the first is the headline "
                         "(device: CUDA buffers, attend streams; messages: CUDA buffers, one "
                         "attend message per slot; host: pinned host buffers, messages)")
    ap.add_argument("--serve", choices=["thread", "inline"], default="thread",
                    help="serve slots from a StepServer thread (default) or, after the "
                         "launch, from the launching thread (which can deadlock when a "
                         "launch blocks)")
    ap.add_argument("--add-node", default=None,
                    help="config (BxL) that adds an attention node mid-run (default: the "
                         "first; 'none': no config)")
    ap.add_argument("--eager-node", nargs="*", default=[], metavar="BxL",
                    help="configs also run with nodes that launch their kernels per message "
                         "instead of replaying captured graphs (same run, for comparison)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, 3 steps of each headline run under torch.profiler: "
                         "GPU time per step by kernel family (and a trace under $OUT)")
    ap.add_argument("--compile", action="store_true",
                    help="the model's per-layer halves through torch.compile (colocated and "
                         "kflume alike)")
    ap.add_argument("--join-gpu", type=int, default=None,
                    help="GPU of the node that joins mid-run (default: the nodes' GPU)")
    ap.add_argument("--node-gpu", type=int, default=1,
                    help="GPU of the attention nodes (0: share the weight node's, a smoke run)")
    args = ap.parse_args()
    shape = TINY if args.tiny else Shape()
    if args.layers:
        shape = Shape(**{**shape.__dict__, "layers": args.layers})
    device = args.device
    node_device = "cuda" if device == "cuda" else "cpu"
    if device == "cuda" and args.node_gpu == 1 and torch.cuda.device_count() < 2:
        sys.exit("benchmarks/e2e.py needs two GPUs (weight node on GPU0, attention nodes on "
                 "GPU1); --node-gpu 0 puts both on one GPU for a smoke run")
    if device == "cpu":
        args.mechanism = "host"
    results = {"shape": shape.__dict__, "configs": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("E2E_TMP")) as tmp:
        t0 = time.perf_counter()
        make_checkpoint(shape, Path(tmp), device)
        W = load_checkpoint(shape, Path(tmp), device)
        if device == "cpu":
            W = {k: (v if k == "layers" else v.float()) for k, v in W.items()}
            W["layers"] = [{k: v.float() for k, v in lw.items()} for lw in W["layers"]]
        results["weights_s"] = time.perf_counter() - t0
    free_gb = torch.cuda.mem_get_info(0)[0] / 2**30 if device == "cuda" else 1e9
    for cfg in args.configs:
        batch, context = (int(x) for x in cfg.split("x"))
        kv_gb = shape.layers * batch * context * shape.kv_heads * shape.head_dim * 2 * 2 / 2**30
        res = {}
        if device == "cuda" and kv_gb + 4 < free_gb:
            res.update(run_colocated(shape, W, batch, context, device, args))
            print(f"  colocated: {res}", flush=True)
        elif device != "cuda":
            res["colocated"] = "CUDA only"
        else:
            res["colocated"] = f"does not fit: {kv_gb:.0f} GiB of KV next to the weights"
        res.update(run_kflume(shape, W, batch, context, device, node_device, args,
                              add_node=(cfg == (args.add_node or args.configs[0]))))
        if cfg in args.eager_node:  # the same, with nodes that launch kernels per message
            res.update(run_kflume(shape, W, batch, context, device, node_device, args,
                                  add_node=False, graphs=False))
        results["configs"][cfg] = res
        print(f"{cfg}: {res}", flush=True)
        save_json("e2e.json", results)  # what finished survives a later timeout
    report(results, args)
    save_json("e2e.json", results)


def slow_steps(d: dict, over: float = 1.05, most: int = 6) -> list[str]:
    """A timed run's slowest steps above `over` x its p50 (at most `most`), each with what
    its per-step records say about it."""
    steps, ps, gcs = d.get("steps_ms", []), d.get("per_step", {}), d.get("gc", {})
    slow = sorted((i for i, t in enumerate(steps) if t > over * d["p50_ms"]),
                  key=lambda i: -steps[i])[:most]

    def at(name, i):
        v = ps.get(name, [])
        return v[i] if i < len(v) else "?"

    def paused(side, i):
        return [ms for step, ms, _ in gcs.get(side, []) if step == i] or "-"

    return [f"step {i}: {steps[i]:.2f} (slot {at('remote_max_slot', i)}: "
            f"{at('remote_us_max', i)}; {at('tail_ms', i)}; {paused('weight', i)} / "
            f"{paused('node', i)})" for i in sorted(slow)]


def report(results, args) -> None:
    print(header("End-to-end TPOT, Llama-3.1-8B shape" + (" (tiny)" if args.tiny else "")))
    print(f"weights made, saved as safetensors and loaded in {results['weights_s']:.1f} s")
    print("| B x L | colocated p50 / p99 ms | kflume p50 / p99 | pipelined p50 / p99 | "
          "kflume / colocated | pipelined / colocated | local compute (1 mb / 2 mb) |")
    print("|---|---|---|---|---|---|---|")
    for cfg, r in results["configs"].items():
        col = r.get("colocated")
        c50 = col["p50_ms"] if isinstance(col, dict) else None
        if not isinstance(r.get("kflume"), dict) or not isinstance(
                r.get("kflume_pipelined"), dict):
            print(f"| {cfg} | (a run failed: see above) |")
            continue
        k, p = r["kflume"], r["kflume_pipelined"]
        lc1, lc2 = r.get("local_compute_mb1"), r.get("local_compute_mb2")
        fmt = lambda d: f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"  # noqa: E731
        print(f"| {cfg} | {fmt(col) if c50 else col} | {fmt(k)} | {fmt(p)} | "
              f"{k['p50_ms'] / c50:.2f} | {p['p50_ms'] / c50:.2f} | " if c50 else
              f"| {cfg} | {col} | {fmt(k)} | {fmt(p)} | n/a | n/a | ", end="")
        print(f"{lc1['p50_ms']:.2f} / {lc2['p50_ms']:.2f} |" if lc1 else "n/a |")
    print("\n| B x L | run | p50 / p99 ms | per slot: send / remote / release us | "
          "node: handle / launch-to-reply us | host parts: serve / sync / boundary ms | "
          "one way: q / reply us |")
    print("|---|---|---|---|---|---|---|")
    for cfg, r in results["configs"].items():
        for key, d in r.items():
            if key.startswith("kflume") and isinstance(d, dict):
                sl, pa = d.get("slots", {}), d.get("parts_ms", {})
                print(f"| {cfg} | {key} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | "
                      f"{sl.get('send_us', 0):.0f} / {sl.get('remote_us', 0):.0f} / "
                      f"{sl.get('release_us', 0):.0f} | "
                      f"{(nu := d.get('node_us', {})).get('handle', 0):.0f} / "
                      # 0: the reply's delivery is launched with the layer (mailboxes)
                      f"{f'{r:.0f}' if (r := nu.get('reply', 0)) else 'with launch'} | "
                      f"{pa.get('serve', 0):.2f} / "
                      f"{pa.get('sync', 0):.2f} / {pa.get('boundary', 0):.2f} | "
                      + (f"{ow['q_us']:.0f} / {ow['reply_us']:.0f} |"
                         if (ow := d.get("one_way")) else "n/a |"))
    splits = [(cfg, key, d["tail_split_ms"]) for cfg, r in results["configs"].items()
              for key, d in r.items() if key.startswith("kflume") and isinstance(d, dict)
              and d.get("tail_split_ms")]
    if splits:
        print("\nThe wait for acknowledgements, ms after a step's last reply (medians): "
              "each append seen / launched / acknowledged, each stream acknowledged, and "
              "the acknowledgements all in")
        for cfg, key, t in splits:
            print(f"- {cfg} {key}: " + "; ".join(
                f"{k} {' / '.join(f'{x:.2f}' for x in v)}" for k, v in t.items()
                if k != "tail") + f"; in {t['tail']:.2f}")
    slow = [(cfg, key, line) for cfg, r in results["configs"].items() for key, d in r.items()
            if key.startswith("kflume") and isinstance(d, dict)
            for line in slow_steps(d)]
    if slow:
        print("\nSteps more than 5 % above their run's p50: ms; slowest slot (index: us); "
              "wait for acknowledgements after the last reply, ms; collector pauses, "
              "weight / node, ms")
        for cfg, key, line in slow:
            print(f"- {cfg} {key}: {line}")
    for cfg, r in results["configs"].items():
        if "add_node" in r:
            a = r["add_node"]
            print(f"\n{cfg}, pipelined, a second attention node joins: p99 of the 20 steps before "
                  f"{a['before']['p99_ms']:.2f} ms, after {a['after']['p99_ms']:.2f} ms "
                  f"({a['after']['p99_ms'] / a['before']['p99_ms']:.2f}x); steps while it joined "
                  f"{[round(x, 2) for x in a['join_steps_ms']]} ms "
                  f"({a['join_parts_ms']}); it holds "
                  f"{a['new_node_tokens']} tokens; per slot, send / remote / release "
                  + " -> ".join(f"{s.get('send_us', 0):.0f} / {s.get('remote_us', 0):.0f} / "
                                f"{s.get('release_us', 0):.0f} us"
                                for s in (a["slots_before"], a["slots_after"])))


if __name__ == "__main__":
    main()
