"""A decode loop of our own with turns: a request parked between calls keeps its KV on
the nodes, resumes with new tokens (a span over its history), is truncated, and expires
after its time to live; attention stays exact throughout."""

from __future__ import annotations

import time

import pytest
import torch

from kflume.testing import ReferenceKV, rel_err
from kflume.weight.parking import Expired

from .test_recovery import HQ, LAYERS, D, Loop, cluster, kv_of


def held(cl, rid) -> int:
    """Tokens of `rid` the nodes hold (every layer holds the same)."""
    return sum(node.pages.held(key) for node, _ in cl.provider.nodes.values()
               for key in node.pages.requests if key[1] == rid)  # (RequestKey: peer, id)


def extend(loop: Loop, plan, rid) -> None:
    """Write the plan's span of `rid` through `RemoteAttention.extend`, checking each
    token's attention over the history before it and the span up to it."""
    span = next(s for s in plan.spans if s.request == rid)
    for layer in range(LAYERS):
        k, v = kv_of(rid, layer, span.start, span.end)
        q = torch.randn(span.end - span.start, HQ, D, generator=loop.g)
        out = loop.cl.remote.extend(layer, rid, q, k, v, span.start)
        loop.ref.extend(layer, rid, k, v)
        for i in range(span.end - span.start):
            ref = ReferenceKV(1)
            n = span.start + i + 1
            ref.extend(0, 0, loop.ref.k[layer][rid][:n], loop.ref.v[layer][rid][:n])
            want = ref.attend(0, [0], q[i : i + 1], D**-0.5)
            assert rel_err(out[i : i + 1], want) < 1e-5, f"span token {span.start + i}"


def decode(loop: Loop, plan) -> None:
    """One decode step of the plan's requests (already begun), checked."""
    for layer in range(LAYERS):
        q = torch.randn(len(plan.requests), HQ, D, generator=loop.g)
        kv = [kv_of(r, layer, p, p + 1) for r, p in zip(plan.requests, plan.positions)]
        k, v = torch.cat([x[0] for x in kv]), torch.cat([x[1] for x in kv])
        out = loop.cl.remote(layer, q, k, v)
        for i, rid in enumerate(plan.requests):
            loop.ref.extend(layer, rid, k[i : i + 1], v[i : i + 1])
        assert rel_err(out, loop.ref.attend(layer, plan.requests, q, D**-0.5)) < 1e-5
    loop.cl.end_step()
    for rid in plan.requests:
        loop.cl.router.advance(rid)


def test_park_resume_with_new_tokens_and_truncate():
    cl = cluster(3)
    loop = Loop(cl, {"a": 21, "b": 9})
    for _ in range(3):
        loop.step()
    cl.parking.park(["a"])  # a's turn ends: its tool runs, b goes on
    for _ in range(4):
        plan = cl.begin_step()
        assert plan.requests == ("b",)
        decode(loop, plan)
    assert held(cl, "a") == 24 and cl.router.length("a") == 24
    cl.parking.resume("a", 6)  # a's next call: 6 new tokens, in the same step as b's decode
    plan = cl.begin_step()
    assert plan.requests == ("a", "b") and plan.positions[0] == 30
    extend(loop, plan, "a")
    decode(loop, plan)  # a's first decode token at 30, b's next
    for _ in range(2):
        loop.step()
    assert held(cl, "a") == 33
    cl.router.truncate("a", 27)  # a speculation rejected: drop the last 6
    for layer in range(LAYERS):
        loop.ref.k[layer]["a"] = loop.ref.k[layer]["a"][:27]
        loop.ref.v[layer]["a"] = loop.ref.v[layer]["a"][:27]
    loop.step()
    assert held(cl, "a") == 28  # (the router confirms the 28th at the next boundary)
    loop.step()
    cl.close()


def test_a_parked_request_lost_with_a_node_is_restored_when_resumed():
    cl = cluster(3)
    loop = Loop(cl, {"a": 40, "b": 9})
    loop.step()
    cl.parking.park(["a"])
    decode(loop, cl.begin_step())
    victim = next(r.node for r in cl.router.ranges("a") if r.start > 0)
    cl.processes[victim].kill()
    decode(loop, cl.begin_step())  # the boundary restores a's lost spans too
    assert any(r == "a" for r, _, _ in loop.recomputed)
    cl.parking.resume("a", 0)
    loop.step()
    loop.step()
    cl.close()


def test_an_idle_request_expires_and_says_so():
    cl = cluster(2)
    loop = Loop(cl, {"a": 30, "b": 5})
    loop.step()
    cl.parking.park(["a"], ttl=0.05)
    decode(loop, cl.begin_step())
    time.sleep(0.1)
    decode(loop, cl.begin_step())  # this boundary frees it
    assert "a" not in cl.router.requests() and held(cl, "a") == 0
    with pytest.raises(Expired, match=r"request 'a' was idle .* time to live of 0.05 s"):
        cl.parking.resume("a", 3)
    with pytest.raises(ValueError, match="ttl must be > 0"):
        cl.parking.park(["b"], ttl=0)
    cl.close()
