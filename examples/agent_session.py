"""One real agentic session replayed on attention nodes: its KV stays there between calls.

The session is `trace_0001` of callanjfox/kv-cache-tester (a Claude Code session, 41 LLM
calls; shipped in kflume/data/traces, Apache-2.0). Each call sends the whole context so
far plus what the tool returned; here the model is a small random Llama and the tokens
are random, but the call sizes are the session's: per call, the new tokens (the part of
its input past the context the session already holds), its output length, and the
prefix it keeps (the last call starts over from a shorter prefix: the cache is cropped
to it). Think times are shortened to `--think` of the real ones, capped at 0.2 s.

The KV lives on `kflume node` processes (UCX on loopback). Between calls the session is
parked: its tokens stay on the nodes and the weight node holds none; the next call
prefills only its new tokens. When the context is about to outgrow the nodes, a node is
added. Every call is checked against the unpatched model with a DynamicCache used the
same way.

    python examples/agent_session.py                # token counts / 512, about a minute
    python examples/agent_session.py --scale 1      # the session's full token counts
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StoppingCriteria

import kflume
from kflume import Cluster

TRACE = (Path(kflume.__file__).parent / "data" / "traces"
         / "kv_cache_tester_trace_0001.json.gz")
BLOCK = 64  # the trace's hash block size, in tokens


def calls(trace: dict, scale: int) -> list[dict]:
    """Per call: the prefix of the previous context it keeps, its new tokens, its output
    length, and the think time before it (token counts divided by `scale`)."""
    out, prev_ids, held = [], [], 0
    for r in trace["requests"]:
        ids = r["hash_ids"]
        same = next((i for i, (a, b) in enumerate(zip(prev_ids, ids)) if a != b),
                    min(len(prev_ids), len(ids)))
        # (the previous context's last block was partial: its hash changes as it fills)
        keep = held if same >= len(prev_ids) - 1 else min(held, same * BLOCK // scale)
        new = max(1, r["in"] // scale - keep)
        n_out = max(2, r["out"] // scale)
        out.append(dict(keep=keep, new=new, out=n_out, think=r.get("think_time", 0.0)))
        prev_ids, held = ids, keep + new + n_out
    return out


class FirstToken(StoppingCriteria):
    """Times the first token (TTFT) and the ones after it (TPOT); never stops."""

    def __init__(self):
        self.start, self.first, self.last, self.n = time.perf_counter(), None, None, 0

    def __call__(self, input_ids, scores, **kwargs):
        now = time.perf_counter()
        self.first = self.first or now
        self.last, self.n = now, self.n + 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def where(cluster: Cluster, requests) -> dict[str, int]:
    """Tokens of `requests` on each node."""
    held = dict.fromkeys(cluster.router.nodes(), 0)
    for rid in requests:
        for r in cluster.router.ranges(rid):
            held[r.node] += len(r)
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--scale", type=int, default=512,
                    help="divide the session's token counts by this (1: the full counts)")
    ap.add_argument("--think", type=float, default=1e-3,
                    help="fraction of each real think time to wait between calls")
    ap.add_argument("--calls", type=int, default=None, help="replay only the first N calls")
    ap.add_argument("--node-tokens", type=int, default=None,
                    help="KV capacity of a node (default: 60%% of the longest context, at "
                    "least the first call's)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the unpatched model's run (the reference tokens)")
    args = ap.parse_args()
    # (transformers 5 names the argument `cache`; `past_key_values` works in 4 and 5)
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)

    plan = calls(json.loads(gzip.decompress(TRACE.read_bytes())), args.scale)[: args.calls]
    longest = max(c["keep"] + c["new"] + c["out"] for c in plan)
    first = plan[0]["new"] + plan[0]["out"] + 32
    node_tokens = args.node_tokens or -(-max(first, int(0.6 * longest)) // 16) * 16
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=longest + 64, pad_token_id=0,
                         eos_token_id=None, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    news = [torch.randint(3, 512, (1, c["new"]), generator=gen) for c in plan]

    def replay(cache, on_call=None) -> list[torch.Tensor]:
        context, outs = torch.zeros(1, 0, dtype=torch.long), []
        for i, (c, new) in enumerate(zip(plan, news)):
            if c["keep"] < context.shape[1]:  # the call starts over from a shorter prefix
                context = context[:, : c["keep"]]
                cache.crop(c["keep"] - cache.get_seq_length())
            timer = FirstToken()
            out = model.generate(torch.cat([context, new], 1), past_key_values=cache,
                                 max_new_tokens=c["out"], do_sample=False,
                                 stopping_criteria=[timer])
            outs.append(out)
            if on_call is not None:
                on_call(i, c, context.shape[1], out, timer)
            context = out
        return outs

    want = None if args.no_check else replay(DynamicCache(config=config))
    print(f"session trace_0001: {len(plan)} calls, token counts / {args.scale}, nodes of "
          f"{node_tokens} tokens")
    print(f"{'call':>4} {'context':>8} {'sent':>6} {'out':>5} {'TTFT ms':>8} {'TPOT ms':>8}"
          f"  KV on the nodes (tokens per node)")
    with Cluster.for_model(1, model, capacity_tokens=node_tokens, range_tokens=64) as cluster:
        kflume.patch(model, cluster)
        cache = kflume.KflumeCache(cluster, model.config)
        len_before = [0]

        def on_call(i, c, before, out, timer):
            nodes = where(cluster, cache.session.requests)
            held = sum(nodes.values())
            assert held == out.shape[1] - 1  # every token fed, on the nodes; none here
            assert cluster.router.last_plan.requests == ()  # parked between calls
            ttft = (timer.first - timer.start) * 1e3
            tpot = (timer.last - timer.first) * 1e3 / max(1, timer.n - 1)
            note = f"  (kept {c['keep']} tokens: the context starts over)" if i and \
                c["keep"] < len_before[0] else ""
            len_before[0] = out.shape[1]
            print(f"{i:>4} {out.shape[1]:>8} {c['new'] + (before > 0):>6} {c['out']:>5} "
                  f"{ttft:>8.1f} {tpot:>8.1f}  "
                  + " ".join(f"{n}:{t}" for n, t in nodes.items()) + note)
            if i + 1 < len(plan):
                nxt = plan[i + 1]
                need = nxt["keep"] + nxt["new"] + nxt["out"] + 16 - held
                free = sum(cluster.router.free_tokens(n) for n in cluster.router.nodes())
                if need > free:  # the context outgrows the nodes: one more, now
                    name = cluster.add_node()
                    print(f"     node {name} added: the next call needs {need} more tokens, "
                          f"{free} free")
                time.sleep(min(0.2, nxt["think"] * args.think))

        got = replay(cache, on_call)
        cache.close()
    if want is not None:
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        print(f"every call identical to the unpatched model with a DynamicCache: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
