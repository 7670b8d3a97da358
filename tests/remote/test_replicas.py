"""Replicas: with every token on two nodes, a node's loss recomputes nothing. A decode
loop of our own stays exact against float64 attention when a node dies between steps or
in the middle of one, over in-process nodes and `kflume node` processes (SIGKILL); the
survivors hold two copies again where there is room; both copies lost falls back to
recomputing; sessions, removals, joins and captured steps keep working."""

from __future__ import annotations

import pytest
import torch

from kflume import CapturedStep, Cluster

from .test_captured_step import LAYERS as MODEL_LAYERS
from .test_captured_step import TinyModel, eager, prefill
from .test_recovery import HKV, HQ, LAYERS, D, Loop
from .test_turns import decode, extend, held


def cluster(n=3, cap=1024, **kw):
    return Cluster.in_process(n, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                              capacity_tokens=cap, range_tokens=8, page_size=4, replicas=2,
                              **kw)


def tokens_on_nodes(cl) -> int:
    """Tokens the nodes hold, every copy (their own `stats`)."""
    return sum(c.stats()["node_tokens_held"] for c in cl.clients.values())


def tokens_routed(cl) -> int:
    return sum(len(r) for rid in cl.router.requests() for r in cl.router.ranges(rid))


def two_copies(cl) -> bool:
    st = cl.router.replica_stats()
    return st.unreplicated_tokens == 0 and st.tokens_held == 2 * tokens_routed(cl)


def test_every_token_is_held_twice():
    cl = cluster()
    loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
    for _ in range(3):
        loop.step()
    cl.end_step(wait=True)
    # written tokens, each on two nodes (the slot of the next token is not written yet)
    assert tokens_on_nodes(cl) == 2 * (33 + 16 + 24)
    assert two_copies(cl) and not loop.recomputed
    cl.close()


@pytest.mark.parametrize("victim", ["primary", "replica"])
def test_a_node_dies_between_steps_and_nothing_is_recomputed(victim):
    cl = cluster()
    loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
    for _ in range(2):
        loop.step()
    ranges = cl.router.ranges if victim == "primary" else cl.router.replica_ranges
    name = ranges("a")[0].node
    cl.processes[name].kill()
    for _ in range(4):
        loop.step()
    assert name in cl.recovery.lost and not loop.recomputed
    assert len(cl.router.nodes()) == 2 and two_copies(cl)  # copied again, on the third
    cl.end_step(wait=True)
    assert tokens_on_nodes(cl) == 2 * tokens_routed(cl) == 2 * (36 + 19 + 27)
    cl.close()


@pytest.mark.parametrize("victim", ["tail", "replica of the tail"])
def test_a_node_dies_in_the_middle_of_a_step_and_nothing_is_recomputed(victim):
    cl = cluster()
    loop = Loop(cl, {"a": 40, "b": 9, "c": 17}, seed=1)
    loop.step()
    ranges = cl.router.ranges if victim == "tail" else cl.router.replica_ranges
    name = ranges("a")[-1].node
    loop.step(between_layers=lambda: cl.processes[name].kill())
    assert name in cl.recovery.lost and not loop.recomputed
    for _ in range(3):
        loop.step()
    assert two_copies(cl)
    cl.close()


def test_both_copies_lost_at_once_are_recomputed():
    cl = cluster(4)
    loop = Loop(cl, {"a": 50, "b": 33, "c": 11}, seed=2)
    loop.step()
    first = cl.router.ranges("a")[0]
    for name in (first.node, cl.router.replica_ranges("a")[0].node):
        cl.processes[name].kill()
    for _ in range(3):
        loop.step()
    assert any(r == "a" and s == 0 for r, s, _ in loop.recomputed)
    assert two_copies(cl)  # two nodes left: every request on both
    cl.close()


def test_remove_and_join_keep_two_copies_without_recompute():
    cl = cluster(3)
    loop = Loop(cl, {"a": 40, "b": 19}, seed=3)
    loop.step()
    cl.remove_node("node0")
    loop.step()
    assert "node0" not in cl.router.nodes() and two_copies(cl)
    cl.add_node()
    loop.step()
    cl.processes["node1"].kill()  # its copies are made again on the node that joined
    for _ in range(2):
        loop.step()
    assert "node3" in {r.node for rid in "ab" for r in cl.router.ranges(rid)
                       + cl.router.replica_ranges(rid)}
    assert not loop.recomputed and two_copies(cl)
    cl.close()


def test_with_no_room_for_a_second_copy_decoding_goes_on_with_one(caplog):
    cl = cluster(2)
    loop = Loop(cl, {"a": 30, "b": 13}, seed=4)
    loop.step()
    cl.processes["node1"].kill()
    with caplog.at_level("WARNING", logger="kflume.cluster"):
        loop.step()
    assert "no other node has room for a second copy" in caplog.text
    st = cl.router.replica_stats()
    assert st.unreplicated_requests == 2 and st.unreplicated_tokens == 32 + 15
    assert not loop.recomputed
    cl.add_node()  # room again: the next boundary copies everything there
    for _ in range(2):
        loop.step()
    assert two_copies(cl) and cl.router.replica_stats().copied_tokens >= 32 + 15
    cl.close()


def test_sessions_park_extend_truncate_and_a_loss_while_parked():
    cl = cluster(3)
    loop = Loop(cl, {"a": 21, "b": 9})
    loop.step()
    cl.parking.park(["a"])
    decode(loop, cl.begin_step())
    assert held(cl, "a") == 2 * 22  # parked: both copies kept
    cl.processes[cl.router.ranges("a")[0].node].kill()
    decode(loop, cl.begin_step())
    cl.parking.resume("a", 6)
    plan = cl.begin_step()
    extend(loop, plan, "a")
    decode(loop, plan)
    loop.step()
    cl.router.truncate("a", 25)
    for layer in range(LAYERS):
        loop.ref.k[layer]["a"] = loop.ref.k[layer]["a"][:25]
        loop.ref.v[layer]["a"] = loop.ref.v[layer]["a"][:25]
    loop.step()
    cl.end_step(wait=True)
    assert held(cl, "a") == 2 * 26 and two_copies(cl)
    cl.router.forget_before("a", 16)
    loop.step()
    assert not loop.recomputed
    cl.close()


@pytest.mark.parametrize("when", ["between steps", "mid-step"])
def test_captured_steps_lose_a_node_and_recompute_nothing(when):
    cl = Cluster.in_process(3, layers=MODEL_LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                            capacity_tokens=2048, range_tokens=7, replicas=2)
    cl.recompute = lambda r: pytest.fail(f"recomputed {r}")
    prefill(cl, {"a": 30, "b": 7, "c": 45}, seed=1)
    model = TinyModel(2)
    step = CapturedStep(cl, num_layers=MODEL_LAYERS, before=model.before,
                        after=model.after, embed=model.embed, head=model.head,
                        microbatches=2, max_nodes=3, timeout=10)
    g = torch.Generator().manual_seed(3)
    for i in range(8):
        plan = step.boundary()
        b = len(plan.requests)
        ids, scale = torch.randint(0, 32, (b,), generator=g), torch.rand(b, generator=g) + .5
        want = eager(cl, model, ids, scale)
        if i == 4:
            victim = plan.routes["c"][0].node
            if when == "between steps":
                cl.processes[victim].kill()
            else:
                def kill(layer, victim=victim):
                    if layer == 1 and victim in cl.processes:
                        cl.processes[victim].kill()
                model.on_layer = kill
        got = step(ids, scale)
        model.on_layer = None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cl.recovery.lost and two_copies(cl)
    step.close()
    cl.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["between steps", "mid-step"])
def test_node_processes_killed_recompute_nothing(when):
    """The same over UCX with `kflume node` processes, one killed with SIGKILL."""
    pytest.importorskip("ucxx", reason="node processes talk UCX")
    with Cluster.local(3, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                       capacity_tokens=1024, range_tokens=8, page_size=4,
                       replicas=2) as cl:
        loop = Loop(cl, {"a": 40, "b": 13, "c": 21}, seed=5)
        for _ in range(2):
            loop.step()
        name = cl.router.ranges("a")[-1].node
        if when == "between steps":
            cl.processes[name].kill()
            loop.step()
        else:
            loop.step(between_layers=lambda: cl.processes[name].kill())
        for _ in range(3):
            loop.step()
        assert name in cl.recovery.lost and not loop.recomputed
        assert two_copies(cl)
        cl.end_step(wait=True)
        assert tokens_on_nodes(cl) == 2 * tokens_routed(cl)
