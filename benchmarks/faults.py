"""Fault injection: attention nodes killed while a Hugging Face model generates on them.

Each run generates with a small random Llama (CPU) whose attention is on `kflume node`
processes over UCX, and kills a random node at a random step with SIGKILL or SIGTERM; a
new node then replaces it. The report: runs finished, runs whose tokens equal the
unpatched model's, tokens recomputed, recovery time (from the kill to the next token,
p50 / p99) and the time per token of the steps around it (the peer: the same run's
steps without a fault).

    python benchmarks/faults.py --runs 100
    python benchmarks/faults.py --soak 300      # several clients, joins, leaves, kills

The soak mode runs several clients (threads, each with its own cluster connected to the
same node processes) generating over and over while nodes join, leave (SIGTERM) and are
killed; it reports wrong outputs, lost requests, and each process's resident memory at
the start and the end.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, save_json  # noqa: E402

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402


def model_and_prompts(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                   eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, 256, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0  # left padding
    return model, ids * mask, mask


class Clock:
    """A StoppingCriteria that times every token and runs a fault at its step."""

    def __init__(self, fault_at: int = -1, fault=None):
        self.times, self.fault_at, self.fault, self.kill_time = [time.perf_counter()], \
            fault_at, fault, None

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        if len(self.times) - 1 == self.fault_at:
            self.kill_time = time.perf_counter()
            self.fault()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def generate(model, ids, mask, new: int, clock=None):
    from transformers import StoppingCriteriaList

    crit = StoppingCriteriaList([clock]) if clock else None
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                          do_sample=False, stopping_criteria=crit)


def one_run(cl: Cluster, model, ids, mask, want, new: int, rng: random.Random) -> dict:
    """A generation with one fault; the cluster gets a new node afterwards."""
    step = rng.randrange(1, new - 2)
    victim = rng.choice(sorted(cl.clients))
    how = rng.choice(["SIGKILL", "SIGTERM"])
    proc = cl.processes[victim]

    def fault() -> None:
        os.kill(proc.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)

    clock = Clock(step, fault)
    before = dict(cl.recovery.lost)
    t0 = time.perf_counter()
    try:
        out = generate(model, ids, mask, new, clock)
        finished, same = True, bool(torch.equal(out, want))
    except Exception as e:  # noqa: BLE001 - a failed run is counted, not fatal
        print(f"  run failed: {type(e).__name__}: {e}", flush=True)
        finished = same = False
    lost = [n for n in cl.recovery.lost if n not in before]
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    rec = None
    if clock.kill_time is not None:
        nxt = [t for t in clock.times if t > clock.kill_time]
        rec = (nxt[0] - clock.kill_time) if nxt else None
    around = gaps[max(0, step - 3) : step] + gaps[step + 1 : step + 4]
    cl.add_node(wait=True)  # the replacement
    return {"step": step, "victim": victim, "signal": how, "finished": finished,
            "identical": same, "lost": lost, "recovery_s": rec, "tpot_around_s": around,
            "tpot_s": statistics.median(gaps) if gaps else None,
            "wall_s": time.perf_counter() - t0}


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def injections(args) -> dict:
    model, ids, mask = model_and_prompts()
    want = generate(model, ids, mask, args.new_tokens)
    rng = random.Random(args.seed)
    runs = []
    with Cluster.for_model(args.nodes, model, capacity_tokens=2048, range_tokens=16,
                           page_size=4) as cl:
        restored = []
        kflume.patch(model, cl)
        orig = cl.recovery.restore

        def restore(plan):  # counts the tokens recomputed
            restored.extend(plan.restores)
            orig(plan)
        cl.recovery.restore = restore
        clean = Clock()
        generate(model, ids, mask, args.new_tokens, clean)  # the peer: no fault
        base = [b - a for a, b in zip(clean.times, clean.times[1:])]
        for i in range(args.runs):
            n0 = len(restored)
            r = one_run(cl, model, ids, mask, want, args.new_tokens, rng)
            r["recomputed_tokens"] = sum(x.end - x.start for x in restored[n0:])
            runs.append(r)
            print(f"run {i}: {r['signal']} {r['victim']} at step {r['step']}: "
                  f"{'identical' if r['identical'] else 'DIFFERENT'}, recovery "
                  f"{(r['recovery_s'] or 0) * 1e3:.0f} ms", flush=True)
        kflume.unpatch(model)
    return {"runs": runs, "tpot_no_fault_s": statistics.median(base)}


def report(res: dict, args) -> None:
    runs = res["runs"]
    print(header(f"Fault injection: {len(runs)} runs, {args.nodes} node processes, "
                 f"{args.new_tokens} tokens each"))
    rec = [r["recovery_s"] for r in runs if r["recovery_s"] is not None]
    around = [x for r in runs for x in r["tpot_around_s"]]
    print("| runs | finished | token-identical | tokens recomputed | recovery p50 / p99 ms "
          "| TPOT around a fault p50 ms | TPOT without faults p50 ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(runs)} | {sum(r['finished'] for r in runs)} | "
          f"{sum(r['identical'] for r in runs)} | "
          f"{sum(r['recomputed_tokens'] for r in runs)} | "
          f"{pct(rec, .5) * 1e3:.0f} / {pct(rec, .99) * 1e3:.0f} | "
          f"{statistics.median(around) * 1e3:.1f} | {res['tpot_no_fault_s'] * 1e3:.1f} |")
    kinds = {s: sum(r["signal"] == s for r in runs) for s in ("SIGKILL", "SIGTERM")}
    print(f"faults: {kinds}")


def main() -> None:
    from kflume.cli import parser

    ap = parser("benchmarks/faults.py", __doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100, help="fault injections")
    ap.add_argument("--nodes", type=int, default=3, help="node processes at a time")
    ap.add_argument("--new-tokens", type=int, default=20, help="tokens each generation makes")
    ap.add_argument("--seed", type=int, default=0, help="seed of the faults' steps and nodes")
    ap.add_argument("--soak", type=float, default=0,
                    help="seconds of the soak mode instead (several clients; kflume.soak)")
    ap.add_argument("--clients", type=int, default=3, help="clients in the soak mode")
    args = ap.parse_args()
    if args.soak:
        from soak import soak

        res = soak(args)
        save_json("soak.json", res)
        return
    res = injections(args)
    save_json("faults.json", res)
    report(res, args)


if __name__ == "__main__":
    main()
