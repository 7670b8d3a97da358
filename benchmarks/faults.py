"""Fault injection: attention nodes killed or told to leave while a model generates on them.

Each run generates with a small random Llama (CPU) whose attention is on `kflume node`
processes over UCX (`Cluster.for_model(..., kind="local")`), and hits a random node at
a random step, either between two steps or in the middle of one (before a random decoder
layer, the prompt's forward included), with a signal drawn from `--signals`:

- SIGKILL: the node dies with its KV; its spans are recomputed on the survivors;
- SIGTERM: the node leaves gracefully (it drains, its ranges migrate, nothing is
  recomputed unless it exits at its drain deadline first);
- SIGSTOP: the node hangs with its socket open; it is lost at the cluster's reply
  deadline (`--timeout`), its spans recomputed, its process killed.

A replacement node joins after each run. The report, per signal: runs finished, runs
whose tokens equal the unpatched model's, tokens recomputed and migrated, detection
time (fault to the cluster losing the node, or learning that it leaves), recovery time
(fault to the next token; for a node lost during the prompt, whose next token needs no
node, to the first token after the loss was found; p50 / p99), and the time per token
of the 3 steps after the one that recovered against the peer: the same runs' other
decode steps.

    python benchmarks/faults.py --runs 100
    python benchmarks/faults.py --runs 10 --signals SIGSTOP --timeout 2
    python benchmarks/faults.py --soak 300      # benchmarks/soak.py: clients, joins, leaves
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, header, save_json  # noqa: E402

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402

AFTER = 3  # steps after the fault's own whose time per token is "around the fault"


def model_and_prompts(seed: int = 0, vocab: int = 256, batch: int = 3, prompt: int = 40):
    """A random 3-layer Llama (4 query heads, 2 KV heads of 16) and left-padded prompts."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                   eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    mask[1 % batch, : prompt // 3] = 0  # left padding
    return model, ids * mask, mask


class Clock:
    """A StoppingCriteria that times every token and runs `fault` after token `at`."""

    def __init__(self, at: int = -1, fault=None):
        self.times, self.at, self.fault = [time.perf_counter()], at, fault

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        if len(self.times) - 1 == self.at:
            self.fault()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def generate(model, ids, mask, new: int, clock=None):
    from transformers import StoppingCriteriaList

    crit = StoppingCriteriaList([clock]) if clock else None
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                          do_sample=False, stopping_criteria=crit)


class Watch:
    """Times what the cluster does about a fault: a node lost (`Recovery.lose`), told to
    leave (`router.drain_node`), dropped; and counts the tokens recomputed and migrated."""

    def __init__(self, cl: Cluster) -> None:
        self.events: list[tuple[str, str, float]] = []  # (what, node, time)
        self.recomputed = self.migrated = 0
        lose, drain, drop, restore = (cl.recovery.lose, cl.router.drain_node, cl._drop,
                                      cl.recovery.restore)
        begin = cl.router.begin_step

        def on_lose(name, why):
            if name in cl.clients:
                self.events.append(("lost", name, time.perf_counter()))
            lose(name, why)

        def on_drain(name):
            self.events.append(("leaving", name, time.perf_counter()))
            drain(name)

        def on_drop(name):
            self.events.append(("removed", name, time.perf_counter()))
            drop(name)

        def on_restore(plan):
            self.recomputed += sum(r.end - r.start for r in plan.restores)
            restore(plan)

        def on_begin(*a, **kw):
            plan = begin(*a, **kw)
            self.migrated += sum(m.end - m.start for m in plan.migrations)
            return plan

        cl.recovery.lose, cl.router.drain_node, cl._drop = on_lose, on_drain, on_drop
        cl.recovery.restore, cl.router.begin_step = on_restore, on_begin

    def first(self, what: str, node: str, after: float) -> float | None:
        return next((t - after for w, n, t in self.events if w == what and n == node
                     and t >= after), None)


def one_run(cl: Cluster, watch: Watch, model, ids, mask, want, args, rng) -> dict:
    """A generation with one fault; afterwards the victim is gone and a new node joined."""
    how = rng.choice(args.signals)
    alive = [n for n in sorted(cl.clients) if n not in cl.recovery.leaving]
    victim = rng.choice(alive)
    proc = cl.processes[victim]
    step = rng.randrange(0, args.new_tokens - AFTER - 1)  # the fault hits token step + 1
    layer = rng.randrange(len(model.model.layers)) if step == 0 or rng.random() < .5 else None
    fault_t: list[float] = []

    def fault() -> None:
        fault_t.append(time.perf_counter())
        os.kill(proc.pid, getattr(signal, how))

    hook, forwards = None, [0]
    if layer is not None:  # before decoder layer `layer` of forward step + 1
        def pre(module, a):
            forwards[0] += 1
            if forwards[0] == step + 1:
                fault()
        hook = model.model.layers[layer].register_forward_pre_hook(pre)
    clock = Clock(step if layer is None else -1, fault)
    n_events, rec0, mig0 = len(watch.events), watch.recomputed, watch.migrated
    t0 = time.perf_counter()
    try:
        out = generate(model, ids, mask, args.new_tokens, clock)
        finished, same = True, bool(torch.equal(out, want))
    except Exception as e:  # noqa: BLE001 - a failed run is counted, not fatal
        print(f"  run failed: {type(e).__name__}: {e}", flush=True)
        finished = same = False
    finally:
        if hook is not None:
            hook.remove()
    wall = time.perf_counter() - t0
    kill_t = fault_t[0] if fault_t else None
    in_run = list(watch.events[n_events:])
    removed_in_run = any(w == "removed" and n == victim for w, n, _ in in_run)
    settle(cl, proc, victim, how)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]  # gaps[0]: the prompt's
    found = [t for w, n, t in in_run if w == "lost" and n == victim and how != "SIGTERM"]
    since = None if kill_t is None else max([kill_t, *found])  # a loss found late: from then
    nxt = [t for t in clock.times if since is not None and t > since]
    hit = clock.times.index(nxt[0]) - 1 if nxt else step  # gaps[hit]: the recovery
    around = gaps[hit + 1 : hit + 1 + AFTER]
    peer = [g for i, g in enumerate(gaps) if i and not step <= i <= hit + AFTER]
    detect = None if kill_t is None else watch.first(
        "leaving" if how == "SIGTERM" else "lost", victim, kill_t)
    return {"signal": how, "victim": victim, "step": step,
            "where": "between steps" if layer is None else f"before layer {layer}",
            "finished": finished, "identical": same,
            "lost": sorted({n for w, n, _ in watch.events[n_events:] if w == "lost"}),
            "removed_in_run": removed_in_run,
            "recomputed_tokens": watch.recomputed - rec0,
            "migrated_tokens": watch.migrated - mig0,
            "detect_s": detect, "removed_s": None if kill_t is None else watch.first(
                "removed", victim, kill_t),
            "recovery_s": (nxt[0] - kill_t) if nxt else None,
            "tpot_around_s": around, "tpot_peer_s": peer, "wall_s": wall}


def settle(cl: Cluster, proc, victim: str, how: str) -> None:
    """After a run: the victim's process gone and the cluster without it, a new node in."""
    if how == "SIGSTOP" and proc.running:  # not found hung (the cluster kills those)
        proc.kill()
    try:
        proc.proc.wait(60)
    except Exception:  # noqa: BLE001 - a leaving node past its deadline: stop it
        proc.kill()
    deadline = time.monotonic() + 30
    while victim in cl.clients and time.monotonic() < deadline:
        cl.begin_step()  # a boundary of no request notices it
        time.sleep(0.01)
    cl.add_node(wait=True)


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def injections(args) -> dict:
    model, ids, mask = model_and_prompts(args.seed)
    want = generate(model, ids, mask, args.new_tokens)
    rng = random.Random(args.seed)
    runs = []
    env = {"KFLUME_DRAIN_DEADLINE": str(args.drain_deadline)}
    with Cluster.for_model(args.nodes, model, capacity_tokens=2048, range_tokens=16,
                           page_size=4, timeout=args.timeout, env=env) as cl:
        watch = Watch(cl)
        kflume.patch(model, cl)
        generate(model, ids, mask, args.new_tokens)  # warm-up
        for i in range(args.runs):
            r = one_run(cl, watch, model, ids, mask, want, args, rng)
            runs.append(r)
            ms = (r["recovery_s"] or float("nan")) * 1e3
            print(f"run {i}: {r['signal']} {r['victim']} at token {r['step'] + 1} "
                  f"({r['where']}): {'identical' if r['identical'] else 'DIFFERENT'}, "
                  f"recovery {ms:.0f} ms, recomputed {r['recomputed_tokens']}, migrated "
                  f"{r['migrated_tokens']}", flush=True)
        kflume.unpatch(model)
    return {"runs": runs, "commit": git_rev(), "args": vars(args), "batch": ids.shape[0]}


def report(res: dict, args) -> None:
    runs = res["runs"]
    print(header(f"Fault injection: {len(runs)} runs, {args.nodes} node processes, "
                 f"{args.new_tokens} tokens x {res['batch']} requests each; commit "
                 f"{res['commit']}"))
    print("| signal | runs | finished | token-identical | tokens recomputed (runs) "
          "| tokens migrated | detection p50 / p99 ms | recovery p50 / p99 ms "
          f"| TPOT {AFTER} steps after p50 ms | peer: other steps p50 ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sig in args.signals:
        rs = [r for r in runs if r["signal"] == sig]
        if not rs:
            continue
        around = [x for r in rs for x in r["tpot_around_s"]]
        peer = [x for r in rs for x in r["tpot_peer_s"]]
        det, rec = [r["detect_s"] for r in rs], [r["recovery_s"] for r in rs]
        a, p = pct(around, .5), pct(peer, .5)
        print(f"| {sig} | {len(rs)} | {sum(r['finished'] for r in rs)} | "
              f"{sum(r['identical'] for r in rs)} | "
              f"{sum(r['recomputed_tokens'] for r in rs)} "
              f"({sum(r['recomputed_tokens'] > 0 for r in rs)}) | "
              f"{sum(r['migrated_tokens'] for r in rs)} | "
              f"{pct(det, .5) * 1e3:.0f} / {pct(det, .99) * 1e3:.0f} | "
              f"{pct(rec, .5) * 1e3:.0f} / {pct(rec, .99) * 1e3:.0f} | "
              f"{a * 1e3:.1f} | {p * 1e3:.1f} | {a / p:.2f} |")
    mid = sum(r["where"] != "between steps" for r in runs)
    print(f"faults in the middle of a step: {mid} of {len(runs)}")
    leaves = [r for r in runs if r["signal"] == "SIGTERM"]
    if leaves:
        moved = [r["removed_s"] for r in leaves if r["removed_in_run"]]
        print(f"SIGTERM: {len(moved)} of {len(leaves)} nodes moved off and removed within "
              f"their run (fault to removal p50 {pct(moved, .5) * 1e3:.0f} ms, p99 "
              f"{pct(moved, .99) * 1e3:.0f} ms); {sum(bool(r['lost']) for r in leaves)} "
              "reached their drain deadline or exited before removal")
    bad = [i for i, r in enumerate(runs) if not r["identical"]]
    print(f"goal 100 % finished and identical: {'met' if not bad else f'not met (runs {bad})'}")


def main() -> None:
    from kflume.cli import parser

    ap = parser("benchmarks/faults.py", __doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100, help="fault injections")
    ap.add_argument("--nodes", type=int, default=3, help="node processes at a time")
    ap.add_argument("--new-tokens", type=int, default=20, help="tokens each generation makes")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and of the faults")
    ap.add_argument("--signals", type=lambda s: s.split(","), default=["SIGKILL", "SIGTERM"],
                    help="comma-separated signals drawn at random: SIGKILL, SIGTERM, SIGSTOP")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="the cluster's deadline for every reply, in seconds")
    ap.add_argument("--drain-deadline", type=float, default=30.0,
                    help="the nodes' drain deadline after SIGTERM ($KFLUME_DRAIN_DEADLINE)")
    ap.add_argument("--soak", type=float, default=0,
                    help="run benchmarks/soak.py for this many seconds instead")
    ap.add_argument("--clients", type=int, default=3, help="clients in the soak")
    args = ap.parse_args()
    if args.soak:
        import soak

        sys.exit(soak.main(["--seconds", str(args.soak), "--clients", str(args.clients),
                            "--seed", str(args.seed)]))
    bad = set(args.signals) - {"SIGKILL", "SIGTERM", "SIGSTOP"}
    if bad:
        ap.error(f"--signals: unknown {sorted(bad)}; use SIGKILL, SIGTERM, SIGSTOP")
    res = injections(args)
    save_json("faults.json", res)
    report(res, args)


if __name__ == "__main__":
    main()
