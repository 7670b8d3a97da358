"""RemoteAttention's variants against float64 attention over each request's whole KV:
sliding windows (nodes attend from a start position, or are left out), softcapping and
attention sinks, in decode steps and in spans, on CPU and (with a GPU) CUDA nodes."""

from __future__ import annotations

import math

import pytest
import torch

from kflume import Cluster
from kflume.testing import rel_err

LAYERS, HQ, HKV, D = 1, 8, 2, 32
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def reference(q, k, v, scale, window=None, softcap=None, sinks=None):
    """q [Hq, D] of the token at position len(k) - 1 over k, v [T, Hkv, D], float64."""
    t = k.shape[0]
    kk = k.double().repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("hd,thd->ht", q.double(), kk) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if window is not None:
        s[:, : max(0, t - window)] = -math.inf
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.device, torch.float64)[:, None]], 1)
    p = s.softmax(-1)[:, :t]
    return torch.einsum("ht,thd->hd", p, v.double().repeat_interleave(HQ // HKV, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,softcap,sinks", [(5, None, False), (None, 3.0, False),
                                                  (None, None, True), (7, 4.0, True)])
def test_decode_and_spans_with_variants(device, window, softcap, sinks):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    g = torch.Generator().manual_seed(0)
    cl = Cluster.in_process(3, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                            capacity_tokens=512, range_tokens=4, page_size=4, device=device)
    remote = cl.attention(num_q_heads=HQ, device=device)
    sink = torch.randn(HQ, generator=g).to(device) * 2 if sinks else None
    variant = dict(window=window, softcap=softcap, sinks=sink)
    hist = {"a": 19, "b": 3}
    kv = {r: (torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g))
          for r, n in hist.items()}
    for rid, n in hist.items():
        cl.router.add_request(rid, n)
    cl.begin_step()
    for rid, (k, v) in kv.items():
        remote.prefill(0, rid, k.to(device), v.to(device))
    cl.end_step(wait=True)
    worst = 0.0
    for step in range(9):
        plan = cl.begin_step()
        q = torch.randn(2, HQ, D, generator=g)
        kn, vn = torch.randn(2, HKV, D, generator=g), torch.randn(2, HKV, D, generator=g)
        out = remote(0, q.to(device), kn.to(device), vn.to(device), **variant)
        for i, rid in enumerate(plan.requests):
            k, v = kv[rid]
            kv[rid] = (torch.cat([k, kn[i : i + 1]]), torch.cat([v, vn[i : i + 1]]))
            want = reference(q[i], *kv[rid], remote.scale, window, softcap, sink)
            worst = max(worst, rel_err(out[i], want))
        cl.end_step()
        for rid in plan.requests:
            cl.router.advance(rid)
        if step == 4:  # a span of 6 new tokens for "a" (the next turn of a session)
            cl.router.extend("a", 6)
            plan = cl.begin_step()
            span = plan.spans[0]
            q = torch.randn(6, HQ, D, generator=g)
            ks, vs = torch.randn(6, HKV, D, generator=g), torch.randn(6, HKV, D, generator=g)
            b_q = torch.randn(1, HQ, D, generator=g)  # b decodes in the same step
            b_k, b_v = torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g)
            got = remote.extend(0, "a", q.to(device), ks.to(device), vs.to(device),
                                span.start, **variant)
            k0, v0 = kv["a"]
            for i in range(6):
                want = reference(q[i], torch.cat([k0, ks[: i + 1]]),
                                 torch.cat([v0, vs[: i + 1]]), remote.scale, window, softcap,
                                 sink)
                worst = max(worst, rel_err(got[i], want))
            kv["a"] = (torch.cat([k0, ks]), torch.cat([v0, vs]))
            # the plan's rows: a (its token after the span), b
            qa = torch.randn(1, HQ, D, generator=g)
            ka, va = torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g)
            out = remote(0, torch.cat([qa, b_q]).to(device), torch.cat([ka, b_k]).to(device),
                         torch.cat([va, b_v]).to(device), **variant)
            for i, (rid, qq, kk, vv) in enumerate((("a", qa, ka, va), ("b", b_q, b_k, b_v))):
                k, v = kv[rid]
                kv[rid] = (torch.cat([k, kk]), torch.cat([v, vv]))
                worst = max(worst, rel_err(out[i], reference(qq[0], *kv[rid], remote.scale,
                                                            window, softcap, sink)))
            cl.end_step()
            for rid in plan.requests:
                cl.router.advance(rid)
    assert worst < 1e-5
    if window is not None:  # nodes holding only tokens out of the window are not asked
        asked = lambda w: sum(len(s.rows.rows) for s in remote.shares(0, 2, w))  # noqa: E731
        assert asked(window) < asked(None)
    cl.close()
