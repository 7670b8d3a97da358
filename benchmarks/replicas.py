"""What replicas cost and buy: one cluster with every token once (`replicas=1`, the peer)
and one with every token twice (`replicas=2`), in the same run.

A small random Llama (CPU) generates with its attention on `kflume node` processes over
UCX. Per setting: the tokens the nodes hold (their own `stats`), the time per output
token of generations without a fault (p50 / p99 over every step), and, for generations
where a node is killed with SIGKILL at a given step, the recovery time (from the kill to
the next token: the recompute of the lost tokens through the model with `replicas=1`,
the promotion and the copy of a second copy with `replicas=2`) and the tokens recomputed.

    python benchmarks/replicas.py
    python benchmarks/replicas.py --prompt-tokens 1024 --kills 5
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, save_json  # noqa: E402
from faults import Clock, generate, pct  # noqa: E402

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402


def model_and_prompts(tokens: int, batch: int = 3):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                   eos_token_id=None)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (batch, tokens), generator=g)
    return transformers.LlamaForCausalLM(cfg).eval(), ids, torch.ones_like(ids)


def held(cl: Cluster) -> int:
    """Tokens the nodes hold (every copy), by their own stats."""
    return sum(c.stats()["node_tokens_held"] for c in cl.clients.values())


def measure(replicas: int, args, model, ids, mask, want) -> dict:
    out: dict = {"replicas": replicas, "tpot_s": [], "recovery_s": [], "recomputed": 0,
                 "identical": 0, "runs": 0}
    with Cluster.for_model(args.nodes, model, capacity_tokens=1 << 15, range_tokens=64,
                           page_size=16, replicas=replicas) as cl:
        kflume.patch(model, cl)
        restored: list = []
        orig = cl.recovery.restore
        cl.recovery.restore = lambda plan: (restored.extend(plan.restores), orig(plan))
        generate(model, ids, mask, 4)  # warm-up
        for _ in range(args.runs):  # no fault: time per token, tokens held midway
            clock = Clock(args.new_tokens // 2, lambda: out.__setitem__("held", held(cl)))
            same = torch.equal(generate(model, ids, mask, args.new_tokens, clock), want)
            out["identical"] += same
            out["runs"] += 1
            out["tpot_s"] += [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
        for i in range(args.kills):  # a node killed at step `kill_at` of a generation
            victim = sorted(cl.clients)[i % len(cl.clients)]
            pid = cl.processes[victim].pid
            n0 = len(restored)
            clock = Clock(args.kill_at, lambda pid=pid: os.kill(pid, signal.SIGKILL))
            same = torch.equal(generate(model, ids, mask, args.new_tokens, clock), want)
            out["identical"] += same
            out["runs"] += 1
            out["recovery_s"].append(min(t for t in clock.times if t > clock.kill_time)
                                     - clock.kill_time)
            out["recomputed"] += sum(r.end - r.start for r in restored[n0:])
            cl.add_node(wait=True)  # the replacement, before the next generation
        kflume.unpatch(model)
    return out


def report(results: list[dict], args) -> None:
    print(header(f"Replicas: {args.nodes} node processes, batch 3 x {args.prompt_tokens} "
                 f"prompt tokens, {args.new_tokens} new tokens"))
    print("| replicas | tokens on the nodes midway | TPOT p50 / p99 ms | recovery p50 / max ms "
          "| tokens recomputed | identical runs |")
    print("|---|---|---|---|---|---|")
    peer = results[0]["held"]
    for r in results:
        print(f"| {r['replicas']}{' (peer)' if r['replicas'] == 1 else ''} | {r['held']} "
              f"({r['held'] / peer:.2f}x) | {pct(r['tpot_s'], .5) * 1e3:.2f} / "
              f"{pct(r['tpot_s'], .99) * 1e3:.2f} | "
              f"{statistics.median(r['recovery_s']) * 1e3:.0f} / "
              f"{max(r['recovery_s']) * 1e3:.0f} | {r['recomputed']} | "
              f"{r['identical']} / {r['runs']} |")


def main() -> None:
    from kflume.cli import parser

    ap = parser("benchmarks/replicas.py", __doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3, help="node processes")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="tokens of each prompt")
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens each generation makes")
    ap.add_argument("--runs", type=int, default=3, help="generations without a fault")
    ap.add_argument("--kills", type=int, default=3, help="generations with a node killed")
    ap.add_argument("--kill-at", type=int, default=8, help="the step a node is killed at")
    args = ap.parse_args()
    model, ids, mask = model_and_prompts(args.prompt_tokens)
    want = generate(model, ids, mask, args.new_tokens)
    t0 = time.perf_counter()
    results = [measure(r, args, model, ids, mask, want) for r in (1, 2)]
    save_json("replicas.json", {"args": vars(args), "results": results,
                                "wall_s": time.perf_counter() - t0})
    report(results, args)


if __name__ == "__main__":
    main()
