"""Losing a node costs time, not tokens: a decode loop of our own keeps computing exact
attention when nodes die between steps, in the middle of a step, two at once, or while
another joins; what cannot be restored is named, and the rest goes on."""

from __future__ import annotations

import pytest
import torch

from kflume import Cluster
from kflume.comm import TransportError
from kflume.testing import ReferenceKV, rel_err
from kflume.weight.recovery import RequestsLost

LAYERS, HQ, HKV, D = 2, 8, 2, 32


def kv_of(rid, layer: int, start: int, end: int):
    """The KV of positions [start, end) of a request: a function of (request, layer,
    position) alone, so that a recomputation gives it again exactly."""
    rows = []
    for pos in range(start, end):
        g = torch.Generator().manual_seed(hash((str(rid), layer, pos)) % 2**31)
        rows.append(torch.randn(2, HKV, D, generator=g))
    t = torch.stack(rows) if rows else torch.zeros(0, 2, HKV, D)
    return t[:, 0].contiguous(), t[:, 1].contiguous()


class Loop:
    """Requests decoding over a cluster, every layer's output checked against float64
    attention over each request's whole KV."""

    def __init__(self, cl: Cluster, prompts: dict, seed: int = 0):
        self.cl, self.ref, self.g = cl, ReferenceKV(LAYERS), torch.Generator().manual_seed(seed)
        self.recomputed: list = []
        cl.recompute = self.recompute
        for rid, n in prompts.items():
            cl.router.add_request(rid, n)
        cl.begin_step()
        for layer in range(LAYERS):
            for rid, n in prompts.items():
                k, v = kv_of(rid, layer, 0, n)
                cl.remote.prefill(layer, rid, k, v)
                self.ref.extend(layer, rid, k, v)
        cl.end_step(wait=True)

    def recompute(self, r) -> None:
        """A lost span's KV again, through `extend`: its queries attend over the history
        before it and causally over it (checked here too)."""
        self.recomputed.append((r.request, r.start, r.end))
        for layer in range(LAYERS):
            k, v = kv_of(r.request, layer, r.start, r.end)
            q = torch.randn(r.end - r.start, HQ, D, generator=self.g)
            out = self.cl.remote.extend(layer, r.request, q, k, v, r.start)
            hist_k, hist_v = self.ref.k[layer][r.request], self.ref.v[layer][r.request]
            for i in range(r.end - r.start):  # token start + i sees [0, start + i]
                ref = ReferenceKV(1)
                n = r.start + i + 1
                ref.extend(0, 0, hist_k[:n], hist_v[:n])
                want = ref.attend(0, [0], q[i : i + 1], D**-0.5)
                assert rel_err(out[i : i + 1], want) < 1e-5, f"span token {r.start + i}"

    def step(self, between_layers=None) -> None:
        plan = self.cl.begin_step()
        b = len(plan.requests)
        for layer in range(LAYERS):
            if layer and between_layers is not None:
                between_layers()
            q = torch.randn(b, HQ, D, generator=self.g)
            kv = [kv_of(rid, layer, p, p + 1) for rid, p in zip(plan.requests, plan.positions)]
            k, v = torch.cat([x[0] for x in kv]), torch.cat([x[1] for x in kv])
            out = self.cl.remote(layer, q, k, v)
            for i, rid in enumerate(plan.requests):
                self.ref.extend(layer, rid, k[i : i + 1], v[i : i + 1])
            want = self.ref.attend(layer, plan.requests, q, D**-0.5)
            assert rel_err(out, want) < 1e-5, f"layer {layer}\n{plan.table()}"
        self.cl.end_step()
        for rid in plan.requests:
            self.cl.router.advance(rid)


def cluster(n=3, cap=1024):
    return Cluster.in_process(n, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                              capacity_tokens=cap, range_tokens=8, page_size=4)


def holders(cl, rid):
    return {r.node for r in cl.router.ranges(rid)}


def test_a_node_dies_between_steps_and_its_spans_are_recomputed():
    cl = cluster()
    loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
    for _ in range(3):
        loop.step()
    victim = "node1"
    assert any(victim in holders(cl, r) for r in "abc")
    cl.processes[victim].kill()  # its server closes: the link breaks
    for _ in range(4):
        loop.step()
    assert victim not in cl.router.nodes() and victim not in cl.clients
    assert loop.recomputed and all(victim not in holders(cl, r) for r in "abc")
    # spans in position order per request, each a range the node held
    assert all(e > s for _, s, e in loop.recomputed)
    cl.close()


def test_a_node_dies_in_the_middle_of_a_step_and_the_step_goes_on():
    cl = cluster()
    loop = Loop(cl, {"a": 40, "b": 9, "c": 17}, seed=1)
    loop.step()
    tail = cl.router.ranges("a")[-1].node  # the node taking this step's new token of "a"
    loop.step(between_layers=lambda: cl.processes[tail].kill())
    assert tail in cl.recovery.lost and loop.recomputed
    for _ in range(3):
        loop.step()
    cl.close()


def test_two_nodes_die_and_one_joins():
    cl = cluster(4)
    loop = Loop(cl, {"a": 50, "b": 33, "c": 11, "d": 26}, seed=2)
    loop.step()
    cl.processes["node0"].kill()
    cl.processes["node3"].kill()
    cl.add_node()  # joins at the same boundary the two are lost at
    for _ in range(4):
        loop.step()
    assert set(cl.router.nodes()) == {"node1", "node2", "node4"}
    cl.close()


def test_requests_that_do_not_fit_are_named_and_the_others_go_on():
    cl = cluster(2, cap=64)
    loop = Loop(cl, {"big": 70, "small": 10}, seed=3)  # "big" spans both nodes
    loop.step()
    lost = "node1"
    assert lost in holders(cl, "big")
    cl.processes[lost].kill()
    with pytest.raises(RequestsLost, match=r"requests \['big'\] could not be restored") as e:
        cl.begin_step()
    assert e.value.requests == ("big",) and e.value.nodes == (lost,)
    assert cl.router.requests() == ("small",)  # restored if it was there, and going on
    assert cl.clients["node0"].stats()["requests"] == 1  # "big" freed on the survivor
    loop.ref.forget("big")
    for _ in range(2):
        loop.step()
    cl.close()


def test_without_a_recompute_callback_the_loss_is_raised_naming_it():
    cl = cluster()
    Loop(cl, {"a": 30, "b": 20})
    cl.recompute = None
    victim = cl.router.ranges("a")[0].node
    cl.processes[victim].kill()
    with pytest.raises(TransportError, match=f"nodes \\['{victim}'\\] were lost with tokens "
                                             "of requests"):
        cl.begin_step()
    cl.close()
