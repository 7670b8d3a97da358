"""Soak: several clients generating on shared nodes that join, leave and are killed.

Clients generate over and over on shared node processes while nodes join, leave
(SIGTERM) and are killed (SIGKILL). This process (the controller) starts `--nodes`
`kflume node` processes with one cluster token, then, every `--every` seconds or so,
does one of: start a node and have every client connect it (a join, which enters each
client's routing at a token boundary in the middle of its generation), SIGTERM a node (a
graceful leave: each client's cluster moves its ranges off at its next boundaries, and
the node exits once it holds nothing, or at its drain deadline), or SIGKILL one (each
client recomputes what it held; a node still draining may be killed too), keeping
between `--min-nodes` and `--max-nodes` nodes.

Each client is a process of its own (multiprocessing, spawn), not a thread: a client is
a weight node, with its own UCX worker, torch thread pool and decode loop. Threads of one
process would share the GIL (their steps serialised), kflume's transport and the model's
hooks are not made for several threads, a fault in one would take down all, and the
memory figure wanted is each client's own resident set. Spawn, never fork: a forked
child would inherit its parent's UCX and torch state.

A client builds the same random Llama (`--seed`), prompts of its own and their outputs
from the unpatched model, connects to the nodes (`Cluster.connect` with the token),
patches the model and generates until told to stop; it reads joins between tokens. The
report: generations, wrong outputs (tokens not equal to the unpatched model's), lost
requests (a generation that raised: each of its requests), tokens each client
recomputed, leaving nodes a client lost instead of moving off, the nodes' lifecycle, and
each process's resident memory (psutil, else /proc) at start, halfway and end: a
client's from its first generation to its last, a node's from listening to its end.

    python benchmarks/soak.py --seconds 180 --clients 3
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NEW, BATCH, LENGTHS = 24, 3, (16, 28, 40)  # per generation: tokens, rows; prompt lengths


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` in MiB (None once it is gone)."""
    try:
        import psutil

        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            return None
    except ImportError:
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
            return kb / 1024
        except (OSError, StopIteration):
            return None


# ---- a client -----------------------------------------------------------------------
def client(idx: int, args, token: str, nodes: dict, inbox, outbox) -> None:
    """Generate until told to stop; report every generation to `outbox`."""
    try:
        _client(idx, args, token, nodes, inbox, outbox)
    except BaseException:
        import traceback

        outbox.put(("crash", idx, traceback.format_exc()))
        raise


def _client(idx: int, args, token: str, nodes: dict, inbox, outbox) -> None:
    import torch
    from faults import model_and_prompts
    from transformers import StoppingCriteria, StoppingCriteriaList

    import kflume
    from kflume import Cluster

    torch.set_num_threads(1)
    model, _, _ = model_and_prompts(args.seed)
    g = torch.Generator().manual_seed(1000 + idx)
    sets = []
    for n in LENGTHS:  # each row padded on the left to a random length
        ids = torch.randint(3, model.config.vocab_size, (BATCH, n), generator=g)
        mask = torch.ones_like(ids)
        for row in range(BATCH):
            mask[row, : int(torch.randint(0, n // 2, (1,), generator=g))] = 0
        ids = ids * mask
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                              do_sample=False)
        sets.append((ids, mask, want))
    cfg = model.config
    cl = Cluster.connect(nodes, layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, q_heads=cfg.num_attention_heads,
                         dtype="float32", token=token, range_tokens=16, timeout=args.timeout)
    kflume.patch(model, cl)
    stop, recomputed = [], [0]
    restore = cl.recovery.restore

    def counted(plan) -> None:  # the tokens this client recomputes
        recomputed[0] += sum(r.end - r.start for r in plan.restores)
        restore(plan)
    cl.recovery.restore = counted

    def read_inbox() -> None:
        while True:
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "stop":
                stop.append(True)
            else:  # ("join", name, address)
                try:
                    cl.add_node(address=msg[2], name=msg[1], wait=False)
                except Exception as e:  # noqa: BLE001 - it left or died meanwhile
                    outbox.put(("join_failed", idx, msg[1], f"{type(e).__name__}: {e}"))

    class Inbox(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            read_inbox()  # joins between tokens
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    n = 0
    while not stop:
        ids, mask, want = sets[n % len(sets)]
        t0 = time.perf_counter()
        err = None
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                 do_sample=False, stopping_criteria=StoppingCriteriaList([Inbox()]))
            ok = bool(torch.equal(out, want))
        except Exception as e:  # noqa: BLE001 - a lost generation is counted
            ok, err = False, f"{type(e).__name__}: {e}"
        outbox.put(("gen", {"client": idx, "ok": ok, "error": err,
                            "wall_s": time.perf_counter() - t0, "rss": rss_mib(os.getpid()),
                            "lost_nodes": sorted(cl.recovery.lost),
                            "recomputed": recomputed[0]}))
        n += 1
        read_inbox()
    kflume.unpatch(model)
    cl.close()
    outbox.put(("done", idx, rss_mib(os.getpid())))


# ---- the controller -------------------------------------------------------------------
class Nodes:
    """The node processes: started, joined, left, killed; their memory sampled."""

    def __init__(self, args, token: str) -> None:
        from kflume import NodeConfig
        from kflume.node.process import NodeProcess

        self.NodeProcess, self.args, self.token = NodeProcess, args, token
        self.config = NodeConfig(layers=3, kv_heads=2, head_dim=16, q_heads=4,
                                 capacity_tokens=args.capacity_tokens, dtype="float32",
                                 page_size=4)
        self.env = {"OMP_NUM_THREADS": "1", "KFLUME_DRAIN_DEADLINE": str(args.drain_deadline)}
        self.procs: dict[str, object] = {}
        self.state: dict[str, str] = {}  # starting, serving, leaving, left, killed
        self.rss: dict[str, list] = {}  # name -> [(time, MiB), ...]
        self.when: dict[str, float] = {}  # leaving: SIGTERM time; then seconds to exit
        self.count = 0

    def start(self) -> str:
        name = f"n{self.count}"
        self.count += 1
        self.procs[name] = self.NodeProcess(self.config, token=self.token, env=self.env,
                                            wait=False, timeout=120)
        self.state[name] = "starting"
        return name

    def ready(self) -> list[tuple[str, str]]:
        """(name, address) of the nodes that began to listen since the last call."""
        out = []
        for name, p in self.procs.items():
            if self.state[name] == "starting" and p.ready():
                self.state[name] = "serving"
                out.append((name, p.address))
        return out

    def live(self, *states) -> list[str]:
        return [n for n, s in self.state.items() if s in (states or ("serving",))]

    def signal(self, name: str, how: str) -> None:
        p = self.procs[name]
        if how == "leave":
            p.leave()
            self.state[name], self.when[name] = "leaving", time.monotonic()
        else:
            p.kill()
            self.state[name] = "killed"

    def exits(self) -> None:
        """Leaving nodes that exited: the time from SIGTERM."""
        for name in self.live("leaving"):
            if not self.procs[name].running:
                self.state[name] = "left"
                self.when[name] = time.monotonic() - self.when[name]

    def sample(self) -> None:
        self.exits()
        for name, p in self.procs.items():
            if self.state[name] in ("serving", "leaving") and (r := rss_mib(p.pid)):
                self.rss.setdefault(name, []).append((time.monotonic(), r))

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()


def soak(args) -> dict:
    import secrets

    rng = random.Random(args.seed)
    token = secrets.token_hex(16)
    nodes = Nodes(args, token)
    ctx = mp.get_context("spawn")
    outbox, clients, inboxes = ctx.Queue(), [], []
    events, gens, joins_failed, done = [], [], [], {}
    first_rss: dict[int, float] = {}
    try:
        for _ in range(args.nodes):
            nodes.start()
        while nodes.live("starting"):
            nodes.ready()
            time.sleep(0.05)
        addrs = {n: nodes.procs[n].address for n in nodes.live()}
        for i in range(args.clients):
            inboxes.append(ctx.Queue())
            clients.append(ctx.Process(target=client, args=(i, args, token, addrs,
                                                            inboxes[i], outbox)))
            clients[i].start()
        t0 = time.monotonic()
        next_event = t0 + args.warmup + rng.uniform(.5, 1.5) * args.every
        next_sample = 0.0
        while time.monotonic() - t0 < args.seconds + args.warmup:
            now = time.monotonic()
            for name, addr in nodes.ready():  # a started node listens: every client joins it
                for q in inboxes:
                    q.put(("join", name, addr))
            nodes.exits()
            if now >= next_sample:
                nodes.sample()
                next_sample = now + 2
            if now >= next_event:
                n = len(nodes.live("serving", "starting"))
                can = (["join"] if n < args.max_nodes else []) + (
                    ["leave", "kill"] if len(nodes.live()) > args.min_nodes else [])
                if len(nodes.live()) <= args.min_nodes and nodes.live("leaving"):
                    can.append("kill")  # a leaving node, killed while it drains
                if can:
                    what = rng.choice(can)
                    pick = nodes.live("serving", "leaving") if what == "kill" else nodes.live()
                    name = nodes.start() if what == "join" else rng.choice(pick)
                    if what != "join":
                        nodes.signal(name, what)
                    events.append((round(now - t0, 1), what, name))
                    print(f"{now - t0:6.1f} s: {what} {name}", flush=True)
                next_event = now + rng.uniform(.5, 1.5) * args.every
            try:
                msg = outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if msg[0] == "gen":
                g = {**msg[1], "t": time.monotonic()}
                gens.append(g)
                first_rss.setdefault(g["client"], g["rss"])
                if not g["ok"]:
                    print(f"client {g['client']}: "
                          f"{'LOST: ' + g['error'] if g['error'] else 'WRONG'}", flush=True)
            elif msg[0] == "join_failed":
                joins_failed.append(msg[1:])
            elif msg[0] == "crash":
                print(f"client {msg[1]} crashed:\n{msg[2]}", flush=True)
                done[msg[1]] = None
        for q in inboxes:
            q.put(("stop",))
        deadline = time.monotonic() + 120
        while len(done) < len(clients) and time.monotonic() < deadline:
            nodes.ready()
            try:
                msg = outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg[0] == "gen":
                gens.append({**msg[1], "t": time.monotonic()})
            elif msg[0] in ("done", "crash"):
                done[msg[1]] = msg[2] if msg[0] == "done" else None
        nodes.sample()
        if len(done) < len(clients):
            print(f"clients that did not stop within 120 s: "
                  f"{sorted(set(range(len(clients))) - set(done))}", flush=True)
        return report(args, nodes, events, gens, joins_failed, first_rss,
                      time.monotonic() - t0)
    finally:
        for p in clients:
            p.join(10)
            if p.is_alive():
                p.kill()
        nodes.close()


def report(args, nodes, events, gens, joins_failed, first_rss, wall) -> dict:
    from common import git_rev, header

    wrong = [g for g in gens if not g["ok"] and g["error"] is None]
    lost = [g for g in gens if g["error"] is not None]
    kinds = {k: sum(e[1] == k for e in events) for k in ("join", "leave", "kill")}
    print(header(f"Soak: {args.clients} clients, {wall:.0f} s, commit {git_rev()}"))
    print(f"nodes: {args.nodes} at the start, {kinds['join']} joins, {kinds['leave']} leaves "
          f"(SIGTERM), {kinds['kill']} kills (SIGKILL); between {args.min_nodes} and "
          f"{args.max_nodes}; joins a client could not make (the node gone first): "
          f"{len(joins_failed)}")
    left = {n: w for n, w in nodes.when.items() if nodes.state[n] == "left"}
    if left:
        print(f"leaves: {len(left)} exited on their own, SIGTERM to exit p50 "
              f"{sorted(left.values())[len(left) // 2]:.2f} s, max {max(left.values()):.2f} s")
    print(f"generations: {len(gens)} ({len(gens) * BATCH} requests, {len(gens) * BATCH * NEW} "
          f"tokens); wrong outputs: {len(wrong)}; lost requests: {len(lost) * BATCH}")
    last = {g["client"]: g for g in gens}  # each client's last report
    recomputed = {i: g["recomputed"] for i, g in sorted(last.items())}
    seen_lost = {i: sorted(set(g["lost_nodes"]) & set(left)) for i, g in sorted(last.items())}
    print(f"tokens recomputed per client: {recomputed}; nodes that left (SIGTERM) which a "
          f"client lost instead (its link gone before it moved off; nothing recomputed "
          f"unless it held tokens there): {seen_lost}")
    for g in lost[:10]:
        print(f"  client {g['client']}: {g['error']}")
    print("\n| process | RSS start MiB | halfway | end | growth MiB | growth in the 2nd half |"
          "\n|---|---|---|---|---|---|")
    series = {f"client {i}": [(g["t"], g["rss"]) for g in gens if g["client"] == i and g["rss"]]
              for i in sorted(first_rss)}
    series.update({f"node {n} ({nodes.state[n]})": xs for n, xs in nodes.rss.items()})
    rows = {}
    for k, xs in series.items():
        mid = min(xs, key=lambda x: abs(x[0] - (xs[0][0] + xs[-1][0]) / 2))[1]
        rows[k] = (xs[0][1], mid, xs[-1][1])
        a, m, b = rows[k]
        print(f"| {k} | {a:.0f} | {m:.0f} | {b:.0f} | {b - a:+.0f} | {b - m:+.0f} |")
    ok = not wrong and not lost
    print(f"goal 0 wrong outputs, 0 lost requests: {'met' if ok else 'not met'}")
    return {"wall_s": wall, "events": events, "generations": len(gens), "wrong": len(wrong),
            "lost_requests": len(lost) * BATCH, "lost": [g["error"] for g in lost],
            "recomputed": recomputed, "leaves_seen_lost": seen_lost,
            "joins_failed": joins_failed, "rss_mib": rows, "left_exit_s": left,
            "gen_s_p50": sorted(g["wall_s"] for g in gens)[len(gens) // 2] if gens else None}


def main(argv=None) -> int:
    from common import save_json

    from kflume.cli import parser

    ap = parser("benchmarks/soak.py", __doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180, help="how long the faults go on")
    ap.add_argument("--clients", type=int, default=3, help="client processes")
    ap.add_argument("--nodes", type=int, default=3, help="node processes at the start")
    ap.add_argument("--min-nodes", type=int, default=2, help="no leave or kill below this")
    ap.add_argument("--max-nodes", type=int, default=5, help="no join above this")
    ap.add_argument("--every", type=float, default=6.0,
                    help="mean seconds between two events (join, leave or kill)")
    ap.add_argument("--warmup", type=float, default=20.0,
                    help="seconds before the first event (the clients start up)")
    ap.add_argument("--capacity-tokens", type=int, default=4096,
                    help="KV tokens per node (all clients' requests fit on one node)")
    ap.add_argument("--drain-deadline", type=float, default=30.0,
                    help="the nodes' drain deadline after SIGTERM ($KFLUME_DRAIN_DEADLINE)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="the clients' deadline for every reply, in seconds")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the events")
    args = ap.parse_args(argv)
    if not 1 <= args.min_nodes <= args.nodes <= args.max_nodes:
        ap.error("need 1 <= --min-nodes <= --nodes <= --max-nodes")
    res = soak(args)
    save_json("soak.json", res)
    print(json.dumps({k: res[k] for k in ("generations", "wrong", "lost_requests")}))
    return 0 if not res["wrong"] and not res["lost_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
