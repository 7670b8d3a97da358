"""A decode loop written by hand from kflume's pieces, in the spirit of gpt-fast.

A tiny Llama-style transformer (random weights) whose attention KV lives on attention
nodes: `TokenRangeRouter` decides which node holds which token range, `RemoteAttention`
sends each layer's queries there and merges the partial results. Midway a node dies
(`--kill-at`): the cluster recomputes what it held through the loop's recompute
callback, a chunked prefill of the lost tokens over the history before them. The same
model with a plain local KV cache generates the reference tokens.

    python examples/decode_loop.py                 # in-process attention nodes
    python examples/decode_loop.py --ucx           # kflume node processes over UCX
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kflume import Cluster


@dataclass
class Config:
    vocab: int = 512
    dim: int = 128
    layers: int = 3
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 256

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def init_weights(c: Config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g) * s[-1] ** -0.5  # noqa: E731
    hd = c.head_dim
    return {"embed": w(c.vocab, c.dim), "out": w(c.vocab, c.dim),
            "layers": [{"wq": w(c.heads * hd, c.dim), "wk": w(c.kv_heads * hd, c.dim),
                        "wv": w(c.kv_heads * hd, c.dim), "wo": w(c.dim, c.heads * hd),
                        "w1": w(c.ffn, c.dim), "w3": w(c.ffn, c.dim), "w2": w(c.dim, c.ffn)}
                       for _ in range(c.layers)]}


def rope(x, pos):  # x: [B, S, H, D]; pos: [B, S]
    d = x.shape[-1]
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[..., None].float() * freq  # [B, S, D/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def qkv(c: Config, lw: dict, x, pos):
    b, s, _ = x.shape
    h = rms(x)
    q = rope((h @ lw["wq"].T).view(b, s, c.heads, c.head_dim), pos)  # [B, S, Hq, D]
    k = rope((h @ lw["wk"].T).view(b, s, c.kv_heads, c.head_dim), pos)  # [B, S, Hkv, D]
    v = (h @ lw["wv"].T).view(b, s, c.kv_heads, c.head_dim)
    return q, k, v


def finish_layer(lw: dict, x, attn):  # attn: [B, S, Hq * D]
    x = x + attn @ lw["wo"].T
    h = rms(x)
    return x + (F.silu(h @ lw["w1"].T) * (h @ lw["w3"].T)) @ lw["w2"].T


def causal_attention(q, k, v):  # [B, S, H, D] each; GQA by repeating KV heads
    g = q.shape[2] // k.shape[2]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
                                       v.repeat_interleave(g, 2).transpose(1, 2), is_causal=True)
    return o.transpose(1, 2).flatten(2)


def generate_local(c: Config, w: dict, prompt, steps: int):
    """Reference: all KV in a local cache."""
    cache = [None] * c.layers
    tokens, x_ids = [], prompt
    for step in range(steps + 1):
        b, s = x_ids.shape
        start = 0 if step == 0 else prompt.shape[1] + step - 1
        pos = torch.arange(start, start + s).expand(b, s)
        x = w["embed"][x_ids]
        for i, lw in enumerate(w["layers"]):
            q, k, v = qkv(c, lw, x, pos)
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)
            cache[i] = (k, v)
            if step == 0:
                attn = causal_attention(q, k, v)
            else:  # one query over the whole history
                g = c.heads // c.kv_heads
                attn = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
                    v.repeat_interleave(g, 2).transpose(1, 2)).transpose(1, 2).flatten(2)
            x = finish_layer(lw, x, attn)
        x_ids = (rms(x[:, -1:]) @ w["out"].T).argmax(-1)  # [B, 1]
        tokens.append(x_ids)
    return torch.cat(tokens[:-1], 1)


def prefill(c: Config, w: dict, cluster: Cluster, prompt):
    """The prompt: attention computed here, its KV scattered to the nodes by range."""
    b, s = prompt.shape
    for r in range(b):
        cluster.router.add_request(r, s)
    cluster.begin_step()  # a token boundary: routes for the new requests
    remote = cluster.remote
    x = w["embed"][prompt]
    pos = torch.arange(s).expand(b, s)
    for i, lw in enumerate(w["layers"]):
        q, k, v = qkv(c, lw, x, pos)
        for r in range(b):  # k[r]: [S, Hkv, D]
            remote.prefill(i, r, k[r], v[r])
        x = finish_layer(lw, x, causal_attention(q, k, v))
    return (rms(x[:, -1:]) @ w["out"].T).argmax(-1)


def decode_one_token(c: Config, w: dict, cluster: Cluster, ids, position: int):
    """One step: q goes out first, the nodes attend over the history they hold."""
    remote = cluster.remote
    x = w["embed"][ids]  # [B, 1, dim]
    pos = torch.full(ids.shape, position)
    for i, lw in enumerate(w["layers"]):
        q, k, v = qkv(c, lw, x, pos)
        out = remote(i, q[:, 0], k[:, 0], v[:, 0])  # [B, Hq, D]
        x = finish_layer(lw, x, out.reshape(out.shape[0], 1, -1))
    return (rms(x) @ w["out"].T).argmax(-1)


def recompute(c: Config, w: dict, cluster: Cluster, tokens: dict):
    """The cluster's recompute callback: tokens [start, end) of a request lost with a node
    (`restore`, kflume.plan.Restore), run through the model on top of the history before
    them; `RemoteAttention.extend` attends over that history on the nodes and writes the
    span's KV where the router put it."""
    def run(restore) -> None:
        ids = torch.tensor(tokens[restore.request][restore.start : restore.end])[None]
        pos = torch.arange(restore.start, restore.end)[None]
        x = w["embed"][ids]
        for i, lw in enumerate(w["layers"]):
            q, k, v = qkv(c, lw, x, pos)
            out = cluster.remote.extend(i, restore.request, q[0], k[0], v[0], restore.start)
            x = finish_layer(lw, x, out.reshape(1, -1, c.heads * c.head_dim))
    return run


def generate(c: Config, w: dict, cluster: Cluster, prompt, steps: int, kill_at: int = -1):
    tokens = {r: prompt[r].tolist() for r in range(prompt.shape[0])}  # what each request fed
    cluster.recompute = recompute(c, w, cluster, tokens)
    ids, out = prefill(c, w, cluster, prompt), []
    for step in range(steps):
        out.append(ids)
        if step == steps - 1:
            break
        if step == kill_at:  # a node dies; found at the next boundary, its KV recomputed
            victim = cluster.router.ranges(0)[0].node
            cluster.processes[victim].kill()
            print(f"step {step}: killed {victim}, which held tokens of request 0")
        cluster.begin_step()  # boundary: routing edits (e.g. a node joining) apply here
        for r in range(prompt.shape[0]):
            tokens[r].append(int(ids[r, 0]))
        ids = decode_one_token(c, w, cluster, ids, prompt.shape[1] + step)
        for r in range(prompt.shape[0]):
            cluster.router.advance(r)  # the token just appended is history now
    cluster.end_step(wait=True)
    return torch.cat(out, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ucx", action="store_true", help="node processes over UCX")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kill-at", type=int, default=8, help="step at which a node dies (-1: none)")
    args = ap.parse_args()
    c, torch_gen = Config(), torch.Generator().manual_seed(1)
    w = init_weights(c)
    prompt = torch.randint(0, c.vocab, (2, 19), generator=torch_gen)
    geometry = dict(layers=c.layers, kv_heads=c.kv_heads, head_dim=c.head_dim,
                    capacity_tokens=1024, range_tokens=16)
    make = Cluster.local if args.ucx else Cluster.in_process
    with make(args.nodes, **geometry) as cluster:
        cluster.attention(num_q_heads=c.heads)
        tokens = generate(c, w, cluster, prompt, args.steps, args.kill_at)
        print(cluster.table())
        for name, why in cluster.recovery.lost.items():
            print(f"lost {name} ({why}); what it held was recomputed")
    ref = generate_local(c, w, prompt, args.steps)
    print("kflume:", tokens[0].tolist())
    print("local: ", ref[0].tolist())
    assert torch.equal(tokens, ref), "kflume's tokens differ from the local KV cache's"
    print(f"{args.steps} tokens x {prompt.shape[0]} requests: identical to the local cache")


if __name__ == "__main__":
    main()
