"""The colocated peer of benchmarks/e2e.py: the same model with its KV on its own GPU.

`run_colocated(model, batch, context, args)` times, in one CUDA graph per step: SDPA
(cuDNN) attention over a `[B, Hkv, L, D]` cache per layer ("colocated"), and the weight
node's work alone, with 1 and 2 micro-batches ("local_compute_mb1/2": no attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import stats, timed

from kflume import LayerPipeline
from kflume.graph import warm_and_capture


class LocalKV:
    """The colocated peer's attention: SDPA (cuDNN) over a [B, Hkv, L, D] cache per layer."""

    def __init__(self, s, batch: int, context: int, device: str):
        g = torch.Generator(device=device).manual_seed(1)
        mk = lambda: torch.randn(batch, s.kv_heads, context, s.head_dim, generator=g,  # noqa
                                 device=device, dtype=torch.bfloat16)
        self.k, self.v, self.context = [mk() for _ in range(s.layers)], [
            mk() for _ in range(s.layers)], context

    def start(self, layer, q, k, v, rows=None):
        return (layer, q, k, v, rows if rows is not None else slice(None))

    def finish(self, h):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        layer, q, k, v, r = h
        self.k[layer][r, :, self.context - 1] = k  # the step's token, at a fixed slot
        self.v[layer][r, :, self.context - 1] = v
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            o = F.scaled_dot_product_attention(q[:, :, None], self.k[layer][r],
                                               self.v[layer][r], enable_gqa=True)
        return o[:, :, 0]


class NoAttention:
    """The weight node's work alone (attention output = zeros)."""

    start = staticmethod(lambda layer, q, k, v, rows=None: q)
    finish = staticmethod(torch.zeros_like)


def run_colocated(model, batch: int, context: int, args) -> dict:
    """The peer's TPOT on GPU0: SDPA over a local cache ("colocated"), and the weight
    node's work alone with 1 and 2 micro-batches ("local_compute_mb1/2")."""
    s = model.s
    ids = torch.zeros(batch, dtype=torch.long, device="cuda")
    pos = torch.full((batch,), context, dtype=torch.long, device="cuda")
    out = {}
    for label, attn, mb in (("colocated", LocalKV(s, batch, context, "cuda"), 1),
                            ("local_compute_mb1", NoAttention(), 1),
                            ("local_compute_mb2", NoAttention(), 2)):
        pipe = LayerPipeline(s.layers, model.before, model.after, attn, mb)
        rows = pipe.split(batch)

        def step(pipe=pipe, rows=rows):
            x, p = model.embed(ids, pos)
            final = pipe([(x[r], p[r]) for r in rows], rows)
            ids.copy_(model.head((torch.cat([f[0] for f in final]), p)))

        stream = torch.cuda.Stream()
        graph = warm_and_capture(step, stream)

        def one(graph=graph, stream=stream):
            with torch.cuda.stream(stream):
                graph.replay()
            stream.synchronize()
        timed(args.warmup, one)
        out[label] = stats(timed(args.steps, one))
    return out
