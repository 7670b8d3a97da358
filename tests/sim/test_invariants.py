"""Invariants of a simulated run: tokens conserved, capacities kept, cost = GPU time x
price, deterministic replay."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from kflume.sim import SimConfig, SimRun, build_workload, load_trace
from kflume.sim.disagg import KflumeSystem
from kflume.sim.engine import System
from kflume.sim.hardware import price_table
from kflume.sim.replicas import ReplicaSystem

from .conftest import SAMPLES

SYSTEMS = ("colocated", "instance", "kflume", "kflume-l40s")


@pytest.fixture(scope="module")
def work():
    trace = load_trace(SAMPLES / "kv_cache_tester_sample.csv")
    return build_workload(trace, session_rate=0.5, max_groups=20, seed=3)


def check_capacity(system: System) -> None:
    """No node holds more KV than it has room for; the pool's books balance."""
    if isinstance(system, ReplicaSystem):
        for s in system.servers:
            assert s.live_kv() + s.idle_tokens <= s.kv_capacity + 1e-6, s.name
            assert s.idle_tokens == sum(s.idle.values()) >= 0
    if isinstance(system, KflumeSystem):
        pool = system.pool
        for n in pool.nodes:
            assert 0 <= n.used <= n.capacity, n.name
            assert n.free == n.capacity - n.used
            assert n.used == sum(n.sessions.values())
            assert 0 <= n.idle <= n.used
        assert sum(n.used for n in pool.nodes) == sum(sum(p.values()) for p in pool.held.values())


@pytest.fixture()
def checked(monkeypatch):
    """Run check_capacity after every event of every system."""
    for cls in (ReplicaSystem, KflumeSystem):
        for name in ("on_server", "on_arrival", "on_ready", "on_release", "apply"):
            orig = getattr(cls, name)

            def wrapped(self, *a, _orig=orig, **kw):
                out = _orig(self, *a, **kw)
                check_capacity(self)
                return out
            monkeypatch.setattr(cls, name, wrapped)


def run(work, **kw):
    sim = SimRun(work, SimConfig(systems=SYSTEMS, **kw))
    return sim, sim.run()


def test_tokens_capacity_and_cost(work, checked):
    sim, results = run(work)
    prices = price_table()
    for name, r in results.items():
        rec = sim.recorders[name]
        served = [i for i in range(len(work)) if not rec.rejected[i]]
        # every call is served or rejected, and a served call produced all its tokens
        assert all(not math.isnan(rec.finish_s[i]) for i in served)
        assert [rec.generated[i] for i in served] == [work.out_tokens[i] for i in served]
        assert r.output_tokens == sum(work.out_tokens[i] for i in served)
        # cost is the sum of GPU time x price over the billed nodes
        assert r.dollars == pytest.approx(sum(n.gpus * (n.end_s - n.start_s) * prices[n.gpu] / 3600
                                              for n in rec.nodes))
        for gpu, hours in r.gpu_hours.items():
            assert hours == pytest.approx(sum(n.gpu_seconds for n in rec.nodes if n.gpu == gpu)
                                          / 3600)
        # the GPUs-over-time curve integrates to the same GPU time
        area = sum((t1 - t0) * sum(g.values())
                   for (t0, g), (t1, _) in zip(rec.timeline, rec.timeline[1:]))
        assert area == pytest.approx(sum(n.gpu_seconds for n in rec.nodes), rel=1e-9)
        assert r.dollars_per_mtok == pytest.approx(r.dollars / r.output_tokens * 1e6)
        assert 0 <= r.slo_attainment <= 1
        assert r.tpot_p50_ms <= r.tpot_p99_ms
    assert results["kflume-l40s"].gpu_hours.keys() == {"h200", "l40s"}


def test_replay_twice_gives_the_same_result(work):
    a = {k: r.to_dict() for k, r in run(work)[1].items()}
    b = {k: r.to_dict() for k, r in run(work)[1].items()}
    assert a == b


def test_preemption_and_recompute_keep_tokens(work, checked):
    # an 8B replica on one A6000 holds ~190K tokens: long sessions preempt and get rejected
    sim, results = run(work, gpu="a6000", replicas=1, slo_tpot_ms=1e4)  # admit by memory only
    r, rec = results["colocated"], sim.recorders["colocated"]
    assert r.preemptions > 0 and r.rejected_calls > 0
    served = [i for i in range(len(work)) if not rec.rejected[i]]
    assert [rec.generated[i] for i in served] == [work.out_tokens[i] for i in served]
    assert results["kflume"].rejected_calls == 0  # its KV spreads over attention nodes


def test_autoscaling_follows_the_load(work):
    sim, results = run(work)
    for name in ("instance", "kflume"):
        rec = sim.recorders[name]
        counts = [sum(g.values()) for _, g in rec.timeline]
        assert max(counts) > counts[0]  # scaled up as sessions piled in
        assert rec.timeline[-1][1] and sum(rec.timeline[-1][1].values()) == 0  # all released
        peak_at = max(range(len(counts)), key=counts.__getitem__)
        assert min(counts[peak_at:]) < max(counts)  # and drained as they left
    assert results["kflume"].queue_delay_p99_s < 3 * 10.8  # a few cold starts at most
    # sized for idle sessions too, the pool grows ahead of them: nothing is evicted
    _, kept = run(work, reserve_idle=True)
    assert kept["kflume"].evictions == 0 and kept["kflume"].queue_delay_p99_s < 3 * 10.8


def test_fixed_replicas_and_tpot_target(work):
    _, results = run(work, replicas=2, slo_tpot_ms=200.0)
    assert results["colocated"].config["replicas"] == 2
    assert results["colocated"].slo_attainment > 0.99


def test_config_checks():
    with pytest.raises(ValueError, match="unknown system"):
        SimConfig(systems=("kflume-tpu",))
    with pytest.raises(ValueError, match="unknown gpu"):
        SimConfig(gpu="v100")
    with pytest.raises(ValueError, match="min_nodes"):
        SimConfig(min_nodes=5, max_nodes=2)
    with pytest.raises(ValueError, match="slo_tpot_ms"):
        replace(SimConfig(), slo_tpot_ms=0)
