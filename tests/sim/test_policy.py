"""kflume.scale: the state's checks, and HeadroomPolicy's decisions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflume.scale import ClusterState, HeadroomPolicy, NodeState, ScaleDecision, ScalePolicy

CAP = 1000


def node(name, free, idle=0, **kw):
    return NodeState(name, CAP, free, idle, **kw)


def state(*nodes, **kw):
    kw.setdefault("node_start_s", 2.0)
    kw.setdefault("new_node_capacity_tokens", CAP)
    return ClusterState(now_s=kw.pop("now_s", 1000.0), nodes=tuple(nodes), **kw)


# -- the state and decision check their input --------------------------------------------

@pytest.mark.parametrize("args, match", [
    (("a", 0, 0), "capacity_tokens must be > 0"),
    (("a", 10, 11), "free_tokens must be in"),
    (("a", 10, 5, 6), "idle_tokens must be in"),
    (("", 10, 5), "non-empty"),
])
def test_node_state_rejects_bad_fields(args, match):
    with pytest.raises(ValueError, match=match):
        NodeState(*args)


def test_starting_node_holds_nothing():
    with pytest.raises(ValueError, match="starting"):
        NodeState("a", 10, 5, starting=True)


def test_cluster_state_rejects_bad_fields():
    with pytest.raises(ValueError, match="duplicate"):
        state(node("a", 10), node("a", 20))
    with pytest.raises(TypeError, match="tuple"):
        ClusterState(now_s=0.0, nodes=[node("a", 1)])
    with pytest.raises(ValueError, match="queued"):
        state(node("a", 1), queued_tokens=-1)
    with pytest.raises(ValueError, match="new_node_capacity_tokens must be given"):
        ClusterState(now_s=0.0, nodes=())


def test_decision_is_add_or_drain():
    with pytest.raises(ValueError, match="either adds or drains"):
        ScaleDecision(add=1, drain=("a",))
    with pytest.raises(ValueError, match=">= 0"):
        ScaleDecision(add=-1)
    assert ScaleDecision().noop


@pytest.mark.parametrize("kw, match", [
    (dict(min_nodes=3, max_nodes=2), "min_nodes"),
    (dict(up_free_fraction=0.3, down_free_fraction=0.2), "hysteresis"),
    (dict(interval_s=0), "interval_s"),
    (dict(tpot_slo_ms=0), "tpot_slo_ms"),
    (dict(max_drain=0), "max_drain"),
])
def test_policy_rejects_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        HeadroomPolicy(**kw)


def test_headroom_policy_is_a_scale_policy():
    assert isinstance(HeadroomPolicy(), ScalePolicy)


# -- decisions ----------------------------------------------------------------------------

def test_adds_for_growth_over_the_lead_time_before_capacity_runs_out():
    p = HeadroomPolicy(interval_s=1.0, lead_factor=2.0, up_free_fraction=0.05)
    # 400 of 1000 free; growth 50 tokens/s over a lead of 2 x 2 s + 1 s = 250 tokens: fine
    assert p.decide(state(node("a", 400), growth_tokens_per_s=50.0)).noop
    # growth 100 tokens/s: 500 tokens over the lead, more than the 400 free -> add now
    d = p.decide(state(node("a", 400), growth_tokens_per_s=100.0))
    assert d.add == 1 and not d.drain


def test_adds_enough_nodes_for_a_queue():
    d = HeadroomPolicy().decide(state(node("a", 0), queued_tokens=2500, queued_requests=3))
    assert d.add == 3  # 1000 held + 2500 queued, 5 % free -> 3.7 nodes -> 3 more


def test_ceiling_and_floor():
    p = HeadroomPolicy(min_nodes=2, max_nodes=3)
    assert p.decide(state(node("a", 0), queued_tokens=10_000)).add == 2  # capped at 3
    assert p.decide(state(node("a", 1000))).add == 1  # floor of 2
    full = state(node("a", 0), node("b", 0), node("c", 0), queued_tokens=10_000)
    assert p.decide(full).noop


def test_drains_emptiest_first_after_the_cooldown_and_never_below_need():
    p = HeadroomPolicy(cooldown_down_s=60.0, down_free_fraction=0.25, max_drain=4)
    nodes = (node("a", 100), node("b", 900), node("c", 950), node("d", 1000))
    # held 1050 of 4000: three spare nodes would leave 1000 < 1050 -> drains d, c
    d = p.decide(state(*nodes, last_scale_up_s=0.0))
    assert d.drain == ("d", "c")
    assert not p.decide(state(*nodes, last_scale_up_s=990.0)).drain  # cooldown
    assert not p.decide(state(*nodes, last_scale_down_s=990.0)).drain
    assert not p.decide(state(*nodes, queued_requests=1, queued_tokens=1)).drain


def test_hysteresis_no_flapping_between_the_thresholds():
    p = HeadroomPolicy(up_free_fraction=0.05, down_free_fraction=0.25)
    # 2 nodes, 1500 held: 25 % free -> no add; draining one would leave -50 % -> no drain
    assert p.decide(state(node("a", 250), node("b", 250))).noop
    # a drain decision leaves a state that does not ask for a node back at once
    s = state(node("a", 1000), node("b", 950), node("c", 300))
    d = p.decide(s)
    assert d.drain
    left = tuple(n for n in s.nodes if n.name not in d.drain)
    assert p.decide(state(*left, last_scale_down_s=s.now_s, now_s=s.now_s + 1)).noop


def test_idle_sessions_count_only_when_kept():
    nodes = (node("a", 0, idle=900), node("b", 1000), node("c", 1000))
    keep = HeadroomPolicy(keep_idle=True, max_drain=4)
    cache = HeadroomPolicy(keep_idle=False, max_drain=4)
    assert keep.decide(state(*nodes)).drain == ("b",)  # 1000 held: one node spare
    assert cache.decide(state(*nodes)).drain == ("b", "c")  # only 100 live
    assert cache.decide(state(node("a", 0, idle=1000))).noop  # a full cache needs nothing


def test_tpot_rule_adds_and_blocks_drains():
    p = HeadroomPolicy(tpot_slo_ms=50.0, cooldown_up_s=10.0)
    nodes = (node("a", 800), node("b", 1000))
    assert p.decide(state(*nodes, tpot_p99_ms=80.0)).add == 1
    assert p.decide(state(*nodes, tpot_p99_ms=80.0, last_scale_up_s=995.0)).noop
    starting = NodeState("c", CAP, CAP, starting=True)
    assert p.decide(state(*nodes, starting, tpot_p99_ms=80.0)).noop  # one is on its way
    assert not p.decide(state(*nodes, tpot_p99_ms=45.0)).drain  # near the target
    assert p.decide(state(*nodes, tpot_p99_ms=20.0)).drain == ("b",)


def test_scale_to_zero_only_when_nothing_is_held():
    p = HeadroomPolicy(min_nodes=0)
    assert p.decide(state(node("a", 1000))).drain == ("a",)
    assert not p.decide(state(node("a", 999))).drain


def test_policy_drives_a_growing_then_shrinking_cluster_without_running_out():
    """A toy cluster: demand grows at 40 tokens/s, nodes serve 5 s after being asked for;
    the policy keeps demand under capacity throughout, then drains as demand falls."""
    p = HeadroomPolicy(interval_s=1.0, lead_factor=2.0, cooldown_down_s=30.0, max_drain=1)
    start_s, nodes, pending, demand = 5.0, {"n0": CAP}, [], 0.0
    last_up = last_down = None
    history = []
    for t in range(900):
        growth = 40.0 if t < 300 else -40.0
        demand = max(0.0, demand + growth)
        for ready_at, name in list(pending):
            if ready_at <= t:
                nodes[name] = CAP
                pending.remove((ready_at, name))
        cap = sum(nodes.values())
        assert demand <= cap, f"ran out of capacity at t={t}: {demand} > {cap}"
        held, states = demand, []
        for name in sorted(nodes):
            take = min(CAP, held)
            held -= take
            states.append(NodeState(name, CAP, int(CAP - take)))
        states += [NodeState(n, CAP, CAP, starting=True) for _, n in pending]
        d = p.decide(ClusterState(now_s=float(t), nodes=tuple(states), growth_tokens_per_s=growth,
                                  node_start_s=start_s, new_node_capacity_tokens=CAP,
                                  last_scale_up_s=last_up, last_scale_down_s=last_down))
        for i in range(d.add):
            pending.append((t + start_s, f"n{len(nodes) + len(pending) + t * 10 + i}"))
            last_up = float(t)
        for name in d.drain:
            del nodes[name]
            last_down = float(t)
        history.append(len(nodes))
    assert max(history) >= 12  # it grew with the demand
    assert history[-1] <= 2  # and drained, one a cooldown, as it fell to nothing


# -- properties ---------------------------------------------------------------------------

node_st = st.builds(
    lambda cap, used_frac, idle_frac, draining: (cap, int(cap * used_frac),
                                                 idle_frac, draining),
    st.integers(1, 10_000), st.floats(0, 1), st.floats(0, 1), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(node_st, min_size=1, max_size=8), st.floats(-1e4, 1e4), st.integers(0, 50_000),
       st.booleans(), st.integers(0, 3), st.integers(1, 12))
def test_decisions_keep_the_invariants(raw, growth, queued, keep_idle, lo, hi):
    hi = max(hi, lo, 1)
    p = HeadroomPolicy(min_nodes=lo, max_nodes=hi, keep_idle=keep_idle)
    nodes = tuple(NodeState(f"n{i}", cap, cap - used, int(used * idle), draining)
                  for i, (cap, used, idle, draining) in enumerate(raw))
    s = ClusterState(now_s=1e6, nodes=nodes, growth_tokens_per_s=growth, queued_tokens=queued,
                     queued_requests=int(queued > 0), node_start_s=3.0)
    d = p.decide(s)
    serving = s.serving
    assert not (d.add and d.drain)
    assert d.add <= max(0, hi - len(serving))
    by_name = {n.name: n for n in serving}
    assert set(d.drain) <= set(by_name)  # only serving nodes, each once
    if d.drain:
        assert len(serving) - len(d.drain) >= lo
        left = sum(n.capacity_tokens for n in serving if n.name not in d.drain)
        assert left >= p.needed_tokens(s) + p.reserve_tokens(s)  # never below what KV needs
        held = [n.used_tokens if keep_idle else n.live_tokens for n in serving]
        drained = sorted(by_name[x].used_tokens if keep_idle else by_name[x].live_tokens
                         for x in d.drain)
        assert drained == sorted(held)[:len(drained)]  # emptiest first
