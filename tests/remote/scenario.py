"""A decode run over attention nodes, checked step by step against local attention.

`Scenario` drives a TokenRangeRouter and a RemoteAttention through a prefill and decode
steps of a random attention stack (random q, k, v per layer: no weights needed), and
compares every layer's output with attention over each request's full KV
(kflume.testing.ReferenceKV). Node changes happen between steps through `on_step`.
"""

from __future__ import annotations

import torch

from kflume.router import FillThenLeastLoaded, TokenRangeRouter
from kflume.testing import TOLERANCE, ReferenceKV, rel_err
from kflume.weight import RemoteAttention
from kflume.weight.boundary import carry_out


class Scenario:
    def __init__(self, clients: dict, capacities: dict, *, layers=2, hq=8, hkv=2, d=64,
                 dtype=torch.float32, range_tokens=24, seed=0, device="cpu", timeout=30.0):
        self.clients, self.layers, self.hq, self.hkv, self.d = clients, layers, hq, hkv, d
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed)
        self.router = TokenRangeRouter(FillThenLeastLoaded(range_tokens=range_tokens))
        for name, cap in capacities.items():
            self.router.add_node(name, cap)
        self.remote = RemoteAttention(clients, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                      device=device, timeout=timeout)
        self.ref = ReferenceKV(layers)
        self.worst = 0.0
        self.steps_done = 0

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype)

    def prefill(self, prompts: dict) -> None:
        """Add requests with prompts of the given lengths and scatter their KV."""
        for rid, n in prompts.items():
            self.router.add_request(rid, n)
        plan = self.router.begin_step()
        carry_out(plan, self.clients, 30.0)
        self.remote.begin_step(plan)
        for layer in range(self.layers):
            for rid, n in prompts.items():
                k, v = self.rand(n, self.hkv, self.d), self.rand(n, self.hkv, self.d)
                self.remote.prefill(layer, rid, k, v)
                self.ref.extend(layer, rid, k, v)
        self.remote.end_step(wait=True)

    def step(self) -> float:
        """One decode step of every request; returns the worst relative error."""
        plan = self.router.begin_step()
        carry_out(plan, self.clients, 30.0)  # frees and migrations first
        self.remote.begin_step(plan)
        b = len(plan.requests)
        worst = 0.0
        for layer in range(self.layers):
            q = self.rand(b, self.hq, self.d)
            k, v = self.rand(b, self.hkv, self.d), self.rand(b, self.hkv, self.d)
            out = self.remote(layer, q, k, v)
            for i, rid in enumerate(plan.requests):
                self.ref.extend(layer, rid, k[i : i + 1], v[i : i + 1])
            ref = self.ref.attend(layer, plan.requests, q, self.remote.scale)
            err = rel_err(out, ref)
            assert err <= TOLERANCE[self.dtype], (
                f"step {self.steps_done} layer {layer}: relative error {err:.2e}\n{plan.table()}")
            worst = max(worst, err)
        self.remote.end_step()
        for rid in plan.requests:
            self.router.advance(rid)
        self.steps_done += 1
        self.worst = max(self.worst, worst)
        return worst

    def finish(self, rid) -> None:
        self.router.finish_request(rid)
        self.ref.forget(rid)
