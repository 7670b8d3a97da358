"""The autoscaler on in-process nodes: what it reads from the cluster, and a workload that
grows, holds and shrinks, scaled by a HeadroomPolicy without a request failing."""

from __future__ import annotations

import logging
import time

import pytest

from kflume import Cluster
from kflume.scale import HeadroomPolicy, ScaleDecision

from .workload import HKV, HQ, LAYERS, D, Workload

CAP = 512  # tokens per node


def cluster(n: int = 1, **kwargs) -> Cluster:
    return Cluster.in_process(n, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                              capacity_tokens=CAP, page_size=16, range_tokens=64, **kwargs)


class Never:
    """A policy that never changes anything (the autoscaler only measures)."""

    interval_s = 0.01

    def decide(self, state):
        self.last = state
        return ScaleDecision()


def test_state_reads_the_cluster():
    with cluster(2) as cl:
        policy = Never()
        scaler = cl.autoscale(policy, window_s=2.0, node_start_s=3.0)
        w = Workload(cl)
        for rid in range(4):
            w.admit(rid, 47)  # a page (16 tokens) and one token short of three
        w.run(0.3)
        w.run(5.0, until=lambda: scaler.growth_tokens_per_s > 0)
        s = scaler.state()
        assert [n.name for n in s.nodes] == ["node0", "node1"]
        for n in s.nodes:
            assert n.capacity_tokens == CAP
            assert n.free_tokens == cl.router.free_tokens(n.name)
            assert not n.starting and not n.draining and n.idle_tokens == 0
        assert sum(n.used_tokens for n in s.nodes) == w.held()
        # 4 requests, one token each a step: held tokens grow, by ~4 / step time
        assert s.growth_tokens_per_s > 0
        assert s.tpot_p50_ms is not None and 0 < s.tpot_p50_ms <= s.tpot_p99_ms
        assert s.node_start_s == 3.0 and s.new_node_capacity_tokens == CAP
        assert s.queued_requests == 0 and scaler.events == []
        # a node asked for shows as starting until it joins; a drain shows at once
        name = cl.add_node(wait=False)
        cl.router.drain_node("node1")
        s = scaler.state()
        assert [(n.name, n.starting, n.draining) for n in s.nodes][-1] == (name, True, False)
        w.step()
        s = scaler.state()
        assert {n.name: n.draining for n in s.nodes} == {"node0": False, "node1": True,
                                                          name: False}
        scaler.set_queue(3, 300)
        scaler.record_step(0.05)
        s = scaler.state()
        assert (s.queued_requests, s.queued_tokens) == (3, 300)
        assert s.tpot_p99_ms == pytest.approx(50.0)  # reported steps replace measured ones
        assert policy.last.now_s > 0
        # a request parked between turns: its tokens are idle where they lie
        cl.parking.park([0])
        w.step()
        s = scaler.state()
        parked = {}
        for r in cl.router.ranges(0):
            parked[r.node] = parked.get(r.node, 0) + len(r)
        assert {n.name: n.idle_tokens for n in s.nodes} == {
            n.name: parked.get(n.name, 0) for n in s.nodes}
        assert sum(parked.values()) == cl.router.length(0) > 0


def test_grows_holds_and_shrinks_without_a_failed_request(caplog):
    caplog.set_level(logging.INFO, logger="kflume")
    policy = HeadroomPolicy(min_nodes=1, max_nodes=4, interval_s=0.05, lead_factor=2.0,
                            up_free_fraction=0.05, down_free_fraction=0.25,
                            cooldown_down_s=1.0)
    with cluster(1) as cl:
        scaler = cl.autoscale(policy, window_s=0.3, node_start_s=0.2)
        w = Workload(cl)
        for rid in range(2):
            w.admit(rid, 64)
        # grow: every request a token a step, and a new one of 48 every 4 steps (a step
        # every 30 ms at most: ~600 tokens/s), past what one node holds
        w.run(30.0, pace_s=0.03, until=lambda: w.held() >= 1.3 * CAP, admit_every=4)
        assert w.held() >= 1.3 * CAP, "the workload did not grow past one node"
        assert len(cl.router.nodes()) >= 2
        adds = [e for e in scaler.events if e.added]
        assert adds and all(not e.drained for e in scaler.events)
        # the first add came while the node still had room: before capacity ran out
        assert adds[0].state.nodes[0].free_tokens > 0
        assert all(lead < 1.0 for lead in scaler.lead_times_s)  # in-process: one boundary
        # hold: no growth, held tokens inside the hysteresis band: nothing changes
        n_events, nodes = len(scaler.events), cl.router.nodes()
        w.idle(1.5)
        assert len(scaler.events) == n_events and cl.router.nodes() == nodes
        # shrink: all requests but one finish, the one on most nodes decodes on; nodes
        # drain, its ranges migrate, the nodes leave
        spread = lambda rid: len({r.node for r in cl.router.ranges(rid)})  # noqa: E731
        keep = max(cl.router.requests(), key=spread)
        assert spread(keep) > 1
        t_shrink = time.monotonic()
        for rid in cl.router.requests():
            if rid != keep:
                w.finish(rid)
        w.run(10.0, pace_s=0.01, until=lambda: len(cl.router.nodes()) == 1)
        assert len(cl.router.nodes()) == 1
        drains = [e for e in scaler.events if e.drained]
        assert drains and all(e.at_s >= t_shrink for e in drains)
        assert drains[0].at_s - max(e.at_s for e in adds) >= policy.cooldown_down_s
        assert all(not e.added for e in scaler.events[n_events:]), "it added after a drain"
        w.run(0.3)  # the survivor's KV moved intact: outputs stay exact
        assert cl.router.requests() == (keep,) and spread(keep) == 1
    assert "drained and stopped" in caplog.text


def test_autoscale_needs_a_provider_and_a_policy():
    with cluster(1) as cl:
        with pytest.raises(TypeError, match="decide"):
            cl.autoscale(object())
        with pytest.raises(ValueError, match="interval_s > 0"):
            cl.autoscale(HeadroomPolicy(), interval_s=0)
        cl.provider = None
        with pytest.raises(ValueError, match="no node provider"):
            cl.autoscale(HeadroomPolicy())
