"""The autoscaler on real `kflume node` processes over UCX on loopback: a growing workload
gets a node from a warm pool before its node fills, within a second of asking; a
shrinking one drains it, its KV migrates, and its process stops. With cold starts
(slow), the policy asks early enough to cover a measured process start."""

from __future__ import annotations

import secrets
import time

import pytest

pytest.importorskip("ucxx", reason="node processes talk over UCX (the ucx extra)")

from kflume import Cluster  # noqa: E402
from kflume.config import NodeConfig  # noqa: E402
from kflume.providers import ProcessProvider, WarmPool  # noqa: E402
from kflume.scale import HeadroomPolicy  # noqa: E402

from .workload import HKV, HQ, LAYERS, D, Workload  # noqa: E402

CAP = 512


def geometry(cap: int = CAP) -> NodeConfig:
    return NodeConfig(layers=LAYERS, kv_heads=HKV, head_dim=D, capacity_tokens=cap,
                      page_size=16, q_heads=HQ, dtype="float32")


def wait_for(cond, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} within {seconds} s")
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_warm_pool_join_and_graceful_drain():
    token = secrets.token_hex(8)
    env = {"OMP_NUM_THREADS": "1"}
    pool = WarmPool(ProcessProvider(token, env), 1, geometry())  # starts now, beside...
    cl = Cluster.local(1, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,  # ...this one
                       capacity_tokens=CAP, token=token, env=env, range_tokens=64)
    with cl:
        policy = HeadroomPolicy(min_nodes=1, max_nodes=2, interval_s=0.05,
                                down_free_fraction=0.25, cooldown_down_s=1.0)
        scaler = cl.autoscale(policy, provider=pool, window_s=0.3, node_start_s=0.5)
        wait_for(lambda: pool.ready_count() == 1, 90, "the pool's node did not listen")
        w = Workload(cl)
        for rid in range(2):
            w.admit(rid, 64)
        w.run(30.0, pace_s=0.03, until=lambda: w.held() >= 1.2 * CAP, admit_every=4)
        assert w.held() >= 1.2 * CAP and len(cl.router.nodes()) == 2
        (add,) = [e for e in scaler.events if e.added]
        assert add.state.nodes[0].free_tokens > 0  # asked for before the node filled
        assert pool.stats.ready == 1  # ... and handed a node that already listened
        (lead,) = scaler.lead_times_s
        assert lead < 1.0, f"the pool's node served {lead:.2f} s after it was asked for"
        joined = add.added[0]
        spread = lambda rid: len({r.node for r in cl.router.ranges(rid)})  # noqa: E731
        keep = max(cl.router.requests(), key=spread)
        for rid in cl.router.requests():
            if rid != keep:
                w.finish(rid)
        handles = dict(cl.processes)
        w.run(20.0, pace_s=0.01, until=lambda: len(cl.router.nodes()) == 1)
        (drain,) = [e for e in scaler.events if e.drained]
        gone = drain.drained[0]
        assert cl.router.nodes() != (gone,) and gone in (joined, "node0")
        wait_for(lambda: not handles[gone].running, 15, f"node {gone} did not stop")
        assert handles[gone].proc.returncode == 0, "the drained node did not exit cleanly"
        w.run(0.3)  # the survivor's KV moved intact: outputs stay exact
        assert cl.router.requests() == (keep,)
    assert pool.idle == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cold_starts_join_before_the_node_fills():
    cl = Cluster.local(1, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                       capacity_tokens=1024, range_tokens=64)
    with cl:
        policy = HeadroomPolicy(min_nodes=1, max_nodes=3, interval_s=0.2, lead_factor=2.0)
        scaler = cl.autoscale(policy, window_s=2.0, node_start_s=5.0)
        w = Workload(cl)
        for rid in range(2):
            w.admit(rid, 100)
        # ~40 tokens/s: a node's 1024 tokens fill in ~20 s, a cold start takes ~3-8 s here
        w.run(90.0, pace_s=0.05, until=lambda: w.held() >= 1.1 * 1024)
        assert w.held() >= 1.1 * 1024
        adds = [e for e in scaler.events if e.added]
        assert adds and adds[0].state.nodes[0].free_tokens > 0
        assert scaler.lead_times_s and min(scaler.lead_times_s) > 0.5  # real process starts
