"""A whole decode step in one CUDA graph: `kflume.CapturedStep` on a small Llama.

The weight node keeps a (random, small) Hugging Face Llama; its KV lives on attention
nodes. The prompt is prefilled on the weight node and its KV scattered to the nodes;
then every token is one call of a `CapturedStep` built from the model's own modules:
embed, then per layer norm + QKV + RoPE (`before`), remote attention, output projection
+ MLP (`after`), then norm + LM head + argmax (`head`), with two micro-batches
interleaved. On a GPU the step is captured once per batch size and replayed; on CPU it
runs eagerly, served the same way. A node joins mid-run. The tokens are checked against
`model.generate` without kflume.

    python examples/captured_decode.py                  # CPU, in-process nodes
    python examples/captured_decode.py --ucx            # node processes over UCX
    python examples/captured_decode.py --device cuda    # captured (CUDA graphs)
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kflume


def build_model(device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=1024,
                                   eos_token_id=None)  # the captured loop never stops early
    return transformers.LlamaForCausalLM(cfg).to(device, dtype).eval()


class LlamaStep:
    """The model's halves as `CapturedStep` takes them (state: hidden x, positions)."""

    def __init__(self, model):
        self.m, self.cfg = model.model, model.config
        self.lm_head = model.lm_head
        self.hd = self.cfg.hidden_size // self.cfg.num_attention_heads

    def embed(self, ids, pos):
        return self.m.embed_tokens(ids), pos

    def before(self, layer, state):  # -> q [b, Hq, D], k, v [b, Hkv, D], RoPE applied
        x, pos = state
        attn, b = self.m.layers[layer].self_attn, x.shape[0]
        h = self.m.layers[layer].input_layernorm(x)
        q = attn.q_proj(h).view(b, -1, 1, self.hd)
        k = attn.k_proj(h).view(b, -1, 1, self.hd)
        v = attn.v_proj(h).view(b, -1, self.hd)
        cos, sin = self.m.rotary_emb(x, pos[:, None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q[:, :, 0], k[:, :, 0], v

    def after(self, layer, state, out):  # out [b, Hq, D]
        x, pos = state
        lyr = self.m.layers[layer]
        x = x + lyr.self_attn.o_proj(out.reshape(x.shape[0], -1))
        return x + lyr.mlp(lyr.post_attention_layernorm(x)), pos

    def head(self, state):
        return self.lm_head(self.m.norm(state[0])).argmax(-1)


def prefill(model, cluster, ids) -> torch.Tensor:
    """The prompt through the model on the weight node; its KV (after RoPE) scattered
    to the attention nodes, one request per row. Returns the first new tokens."""
    for row in range(ids.shape[0]):
        cluster.router.add_request(row, ids.shape[1])
    cluster.begin_step()
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    for layer in range(model.config.num_hidden_layers):
        k, v = cache.layers[layer].keys, cache.layers[layer].values  # [B, Hkv, T, D]
        for row in range(ids.shape[0]):
            cluster.remote.prefill(layer, row, k[row].transpose(0, 1).contiguous(),
                                   v[row].transpose(0, 1).contiguous())
    cluster.end_step(wait=True)
    return out.logits[:, -1].argmax(-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the weight node)")
    ap.add_argument("--ucx", action="store_true", help="node processes over UCX")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    dtype = torch.float32
    model = build_model(args.device, dtype)
    ids = torch.randint(3, 512, (4, 21), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]
    kind = "local" if args.ucx else "in_process"
    node_device = "cuda" if args.device == "cuda" else "cpu"
    with kflume.Cluster.for_model(2, model, kind=kind, capacity_tokens=4096, range_tokens=16,
                                  device=node_device) as cluster:
        cluster.attention(num_q_heads=8, device=args.device)
        first = prefill(model, cluster, ids)
        halves = LlamaStep(model)
        step = kflume.CapturedStep(cluster, num_layers=3, before=halves.before,
                                   after=halves.after, embed=halves.embed, head=halves.head,
                                   microbatches=2, device=args.device)
        pos = torch.full((ids.shape[0],), ids.shape[1], device=args.device)
        got, times = [first], []
        with torch.no_grad(), step:
            for t in range(args.new_tokens - 1):
                if t == 4:
                    cluster.add_node(wait=False)  # joins at a later token boundary
                t0 = time.perf_counter()
                got.append(step(got[-1], pos))
                times.append((time.perf_counter() - t0) * 1e3)
                pos += 1
        print(cluster.table())
    got = torch.stack(got, 1)
    mode = "captured CUDA graph" if args.device == "cuda" else "eager (CPU)"
    print(f"{args.new_tokens} tokens for {ids.shape[0]} requests, step as {mode}: "
          f"median {sorted(times)[len(times) // 2]:.2f} ms a token")
    same = torch.equal(got, want)
    print(f"same tokens as model.generate without kflume: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
