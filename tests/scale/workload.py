"""A decode workload over a cluster whose context grows or shrinks, every layer's output
checked against float64 attention over each request's whole KV (kflume.testing.ReferenceKV).

`Workload.step()` is one token boundary and one decode step of every request: requests
admitted since the last step are prefilled at the boundary, then every layer attends.
A step that raises (a CapacityError, a lost request, a wrong output) fails the test.
"""

from __future__ import annotations

import time

import torch

from kflume import Cluster
from kflume.testing import ReferenceKV, rel_err

LAYERS, HQ, HKV, D = 2, 4, 1, 16


class Workload:
    def __init__(self, cluster: Cluster, seed: int = 0) -> None:
        self.cl, self.ref = cluster, ReferenceKV(LAYERS)
        self.g = torch.Generator().manual_seed(seed)
        self.prompts: dict = {}  # admitted, prefilled at the next boundary
        self.steps = 0

    def rand(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def admit(self, rid, prompt_tokens: int) -> None:
        self.cl.router.add_request(rid, prompt_tokens)
        self.prompts[rid] = prompt_tokens

    def finish(self, rid) -> None:
        self.cl.router.finish_request(rid)
        self.ref.forget(rid)

    def held(self) -> int:
        """Tokens held on all nodes."""
        return sum(self.cl.router.node_load(n) for n in self.cl.router.nodes())

    def step(self) -> None:
        plan = self.cl.begin_step()
        for rid in plan.prefill:
            n = self.prompts.pop(rid)
            for layer in range(LAYERS):
                k, v = self.rand(n, HKV, D), self.rand(n, HKV, D)
                self.cl.remote.prefill(layer, rid, k, v)
                self.ref.extend(layer, rid, k, v)
        b = len(plan.requests)
        if b:
            for layer in range(LAYERS):
                q, k, v = self.rand(b, HQ, D), self.rand(b, HKV, D), self.rand(b, HKV, D)
                out = self.cl.remote(layer, q, k, v)
                for i, rid in enumerate(plan.requests):
                    self.ref.extend(layer, rid, k[i : i + 1], v[i : i + 1])
                want = self.ref.attend(layer, plan.requests, q, D**-0.5)
                err = rel_err(out, want)
                assert err < 1e-5, f"step {self.steps} layer {layer}: {err:.1e}\n{plan.table()}"
            self.cl.end_step()
        for rid in plan.requests:
            self.cl.router.advance(rid)
        self.steps += 1

    def run(self, seconds: float, pace_s: float = 0.0, until=None, admit_every: int = 0,
            prompt_tokens: int = 48) -> None:
        """Steps for `seconds` (or until `until()`), at most one per `pace_s`; with
        `admit_every`, a new request of `prompt_tokens` every that many steps."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            t = time.monotonic()
            if admit_every and self.steps % admit_every == 0:
                self.admit(f"r{self.steps}", prompt_tokens)
            self.step()
            left = pace_s - (time.monotonic() - t)
            if left > 0:
                time.sleep(left)

    def idle(self, seconds: float, pace_s: float = 0.01) -> None:
        """Boundaries without decoding: nothing grows."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.cl.begin_step()
            time.sleep(pace_s)
