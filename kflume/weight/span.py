"""Attention of a span of new tokens over a request's history on the nodes (chunked prefill).

A span is tokens `[start, start + S)` of one request whose KV is not on the nodes yet:
the new tokens of a continued conversation, or a lost node's tokens being recomputed.
Token `start + i` attends over every token before `start` (on the nodes: each node
keeps a request's tokens in position order, so the ones before `start` are a prefix of
its local positions) and causally over the span's tokens up to itself (computed here).
The partials are merged by their log-sum-exp. In a sliding window of W tokens, token
`start + i` attends over positions `(start + i - W, start + i]` only; softcapped scores
and attention sinks enter as in decode (kflume/weight/remote.py). Once every layer's
k, v of the span are known, they go to the nodes the plan's routes name for the span,
in one message per node (`import`). With replicas, a prompt's and a span's KV also go to
the nodes that hold the second copies (`StepPlan.replicas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..comm.base import TransportError
from ..comm.wire import unpack_states
from ..kernels import merge_attention_states
from ..kernels.reference import softcap_scores
from ..plan import StepPlan, TokenRange
from ..turns import written
from .client import NodeClient, wait_all

__all__ = ["SpanWriter", "causal_states", "held_before", "scatter", "span_attention"]


def held_before(routes: tuple[TokenRange, ...], start: int) -> dict[str, int]:
    """Per node, how many of the request's tokens before `start` it holds."""
    held: dict[str, int] = {}
    for r in routes:
        if r.start < start:
            held[r.node] = held.get(r.node, 0) + min(r.end, start) - r.start
    return held


def scatter(plan: StepPlan, clients: dict[str, NodeClient], layer: int, request,
            k: torch.Tensor, v: torch.Tensor) -> None:
    """A prompt's KV `k, v [T, Hkv, D]` of `layer` to the nodes the plan's routes name
    for positions `[0, T)`, appended in order (acknowledged later). A node whose link is
    gone is skipped: it is found lost at the next boundary, where what it would have held
    is recomputed."""
    if request not in plan.routes:
        raise KeyError(f"request {request!r} is not in this step's plan")
    t = k.shape[0]
    local: dict[str, int] = {}
    for r in _holders(plan, request):
        a, b = r.start, min(r.end, t)
        if a >= b:
            continue
        off = local.get(r.node, 0)
        try:
            clients[r.node].append(layer, [request], [off], [a], k[None, a:b].contiguous(),
                                   v[None, a:b].contiguous())
        except TransportError:
            pass
        local[r.node] = off + b - a


def causal_states(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  window: int | None = None,
                  softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, lse)` of q `[S, Hq, D]` over k, v `[S, Hkv, D]`, token i over tokens
    `(i - window, i]` (all `<= i` without a window), scores softcapped when given; out
    in q's dtype, lse float32 `[S, Hq]` (docs/conventions.md)."""
    s, hq, d = q.shape
    hkv = k.shape[1]
    qf = q.float().view(s, hkv, hq // hkv, d)
    scores = torch.einsum("ihgd,jhd->hgij", qf, k.float()) * scale  # [Hkv, G, S, S]
    scores = softcap_scores(scores, softcap)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    scores = scores.masked_fill(~causal, -math.inf)
    lse = torch.logsumexp(scores, -1)  # [Hkv, G, S]
    out = torch.einsum("hgij,jhd->ihgd", torch.softmax(scores, -1), v.float())
    return out.reshape(s, hq, d).to(q.dtype), lse.permute(2, 0, 1).reshape(s, hq)


def span_attention(plan: StepPlan, clients: dict[str, NodeClient], layer: int, request,
                   q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                   scale: float, timeout: float, *, window: int | None = None,
                   softcap: float | None = None,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the span's queries q `[S, Hq, D]` (k, v `[S, Hkv, D]`: the span's
    own, RoPE applied) over the request's history before `start` and causally over the
    span (module docstring); returns `[S, Hq, D]`."""
    if request not in plan.routes:
        raise KeyError(f"request {request!r} is not in this step's plan")
    hkv = k.shape[1] if k.dim() == 3 else -1
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] \
            or q.shape[1] % max(hkv, 1) or q.shape[2] != k.shape[2]:
        raise ValueError(f"extend: q must be [S, Hq, D] and k, v [S, Hkv, D]; got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    s, hq, d = q.shape
    routes = plan.routes[request]
    firsts = [written(routes, max(0, start + i - window + 1)) if window else {}
              for i in range(s)]
    sent = []
    for node, n in held_before(routes, start).items():
        first = [min(f.get(node, 0), n) for f in firsts]
        if min(first) < n:  # some query's window reaches its tokens
            sent.append(clients[node].attend(
                layer, plan.epoch, [request] * s, [n] * s, q.contiguous(), scale=scale,
                kv_start=first if window else None, softcap=softcap))
    outs, lses = [], []
    for m in wait_all(sent, timeout):
        o, l = unpack_states(m.tensors[0], hq, d, q.dtype)
        outs.append(o)
        lses.append(l)
    o, l = causal_states(q, k, v, scale, window, softcap)
    if not outs and sinks is None:
        return o
    return merge_attention_states(torch.stack([o, *outs]), torch.stack([l, *lses]),
                                  sinks=sinks)[0]


@dataclass(slots=True)
class _Span:
    start: int
    k: list = field(default_factory=list)  # per layer [S, Hkv, D], filled in order
    v: list = field(default_factory=list)


class SpanWriter:
    """Collects a span's k, v layer by layer and sends them to the nodes once the last
    layer's are in (a node takes a span of every layer in one import)."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self._spans: dict[object, _Span] = {}

    def add(self, plan: StepPlan, clients: dict[str, NodeClient], layer: int, request,
            start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.layers:
            raise ValueError("RemoteAttention(num_layers=...) is needed for spans")
        # (keyed by start too: a lost span of the same request may be recomputed while
        # this one is half collected)
        span = self._spans.get((request, start))
        if span is None or layer == 0:
            span = self._spans[request, start] = _Span(start)
        if layer != len(span.k):
            raise ValueError(f"span of request {request!r} at {start}: layer {layer} came "
                             f"after {len(span.k)} layers (give them in order, from 0)")
        span.k.append(k.detach())
        span.v.append(v.detach())
        if len(span.k) == self.layers:
            del self._spans[request, start]
            kk, vv = torch.stack(span.k), torch.stack(span.v)  # [layers, S, Hkv, D]
            end = start + kk.shape[1]
            for r in _holders(plan, request):
                a, b = max(r.start, start), min(r.end, end)
                if a < b:
                    clients[r.node].import_range(request, a, kk[:, a - start : b - start]
                                                 .contiguous(), vv[:, a - start : b - start]
                                                 .contiguous())

    def drop(self) -> None:
        """Forget spans not complete (a step given up)."""
        self._spans.clear()


def _holders(plan: StepPlan, request) -> tuple[TokenRange, ...]:
    """The ranges of `request` the plan names, its second copies' too, in position order
    per node."""
    return plan.routes[request] + plan.replicas.get(request, ())
