"""Autoscaling policies: a `ScalePolicy` maps a `ClusterState` to a `ScaleDecision`.

`HeadroomPolicy` keeps enough free KV capacity to absorb the growth expected while a
new node starts, with hysteresis: it adds nodes when free capacity after that growth
falls below `up_free_fraction` of capacity, and drains (emptiest first) only while free
capacity after the drain stays above the larger `down_free_fraction`, no sooner than
`cooldown_down_s` after the last change. It never drains below what held and queued KV
need, never goes under `min_nodes` or over `max_nodes`. With a TPOT target it also adds
a node when the recent p99 TPOT is above it (more nodes spread the KV reads) and does
not drain while the p99 is near it.

Policies are frozen dataclasses and `decide` is a pure function of the state, so one
policy object can drive any number of clusters, real or simulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .decision import ScaleDecision
from .state import ClusterState, NodeState

__all__ = ["HeadroomPolicy", "ScalePolicy"]


@runtime_checkable
class ScalePolicy(Protocol):
    """Anything with `decide(state) -> ScaleDecision`; called every `interval_s`."""

    interval_s: float

    def decide(self, state: ClusterState) -> ScaleDecision: ...


@dataclass(frozen=True, slots=True)
class HeadroomPolicy:
    """Keep free capacity for the growth over a node's lead time, with hysteresis.

    min_nodes, max_nodes  floor and ceiling on serving + starting nodes.
    interval_s            how often the policy is asked (s); added to the lead time.
    lead_factor           growth is absorbed over lead_factor × node_start_s + interval_s.
    up_free_fraction      add nodes when capacity − need − growth·lead < this × capacity.
    down_free_fraction    drain while capacity' − need − growth·lead ≥ this × capacity'
                          (capacity' = after the drain); > up_free_fraction.
    cooldown_up_s         no TPOT-driven add within this long of the last add.
    cooldown_down_s       no drain within this long of the last add or drain.
    max_drain             at most this many nodes drained per decision.
    keep_idle             count idle sessions' KV as needed (kflume: sessions stay on the
                          attention nodes between calls); False treats it as evictable
                          (a replica's prefix cache).
    tpot_slo_ms           TPOT target; None turns the TPOT rule off.
    tpot_down_fraction    no drain while p99 TPOT ≥ this × tpot_slo_ms.
    """

    min_nodes: int = 1
    max_nodes: int = 64
    interval_s: float = 1.0
    lead_factor: float = 2.0
    up_free_fraction: float = 0.05
    down_free_fraction: float = 0.25
    cooldown_up_s: float = 10.0
    cooldown_down_s: float = 60.0
    max_drain: int = 2
    keep_idle: bool = True
    tpot_slo_ms: float | None = None
    tpot_down_fraction: float = 0.8

    def __post_init__(self):
        if not 0 <= self.min_nodes <= self.max_nodes or self.max_nodes < 1:
            raise ValueError("need 0 <= min_nodes <= max_nodes and max_nodes >= 1, got "
                             f"min_nodes={self.min_nodes}, max_nodes={self.max_nodes}")
        if not 0 <= self.up_free_fraction < self.down_free_fraction < 1:
            raise ValueError("hysteresis needs 0 <= up_free_fraction < down_free_fraction < 1, "
                             f"got {self.up_free_fraction} and {self.down_free_fraction}")
        for name in ("interval_s", "lead_factor", "cooldown_up_s", "cooldown_down_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.max_drain < 1:
            raise ValueError(f"max_drain must be >= 1, got {self.max_drain}")
        if self.tpot_slo_ms is not None and self.tpot_slo_ms <= 0:
            raise ValueError(f"tpot_slo_ms must be > 0 or None, got {self.tpot_slo_ms}")
        if not 0 < self.tpot_down_fraction <= 1:
            raise ValueError(f"tpot_down_fraction must be in (0, 1], got {self.tpot_down_fraction}")

    # -- the parts of a decision, each a pure function of the state -----------------

    def needed_tokens(self, s: ClusterState) -> int:
        """KV tokens the cluster must hold: live (+ idle if kept) on every node, draining
        ones included (their ranges move to the others), plus the queue's."""
        held = sum(n.used_tokens if self.keep_idle else n.live_tokens for n in s.nodes)
        return held + s.queued_tokens

    def reserve_tokens(self, s: ClusterState) -> float:
        """Growth expected before a node asked for now would serve."""
        lead = self.lead_factor * s.node_start_s + self.interval_s
        return max(0.0, s.growth_tokens_per_s) * lead

    def decide(self, s: ClusterState) -> ScaleDecision:
        serving = s.serving
        cap = sum(n.capacity_tokens for n in serving)
        want = self.needed_tokens(s) + self.reserve_tokens(s)
        add = self._capacity_adds(s, cap, want, len(serving))
        reason = f"need {want:.0f} tokens with {cap} of capacity"
        if add == 0 and self._tpot_high(s):
            add, reason = 1, f"p99 TPOT {s.tpot_p99_ms:.1f} ms above {self.tpot_slo_ms} ms"
        if len(serving) < self.min_nodes:
            add, reason = max(add, self.min_nodes - len(serving)), f"floor of {self.min_nodes}"
        add = min(add, self.max_nodes - len(serving))
        if add > 0:
            return ScaleDecision(add=add, reason=reason)
        drain = self._drains(s, serving, cap, want)
        if drain:
            return ScaleDecision(drain=drain, reason=f"{reason}: {len(drain)} node(s) spare")
        return ScaleDecision()

    def _capacity_adds(self, s: ClusterState, cap: int, want: float, n_serving: int) -> int:
        if cap - want >= self.up_free_fraction * cap and cap > 0:
            return 0
        target = want / (1.0 - self.up_free_fraction)
        return max(1, math.ceil((target - cap) / s.new_node_capacity))

    def _tpot_high(self, s: ClusterState) -> bool:
        if self.tpot_slo_ms is None or s.tpot_p99_ms is None:
            return False
        if s.tpot_p99_ms <= self.tpot_slo_ms or any(n.starting for n in s.nodes):
            return False
        return s.last_scale_up_s is None or s.now_s - s.last_scale_up_s >= self.cooldown_up_s

    def _may_drain(self, s: ClusterState) -> bool:
        if s.queued_requests or any(n.starting or n.draining for n in s.nodes):
            return False
        for last in (s.last_scale_up_s, s.last_scale_down_s):
            if last is not None and s.now_s - last < self.cooldown_down_s:
                return False
        if self.tpot_slo_ms is not None and s.tpot_p99_ms is not None:
            return s.tpot_p99_ms < self.tpot_down_fraction * self.tpot_slo_ms
        return True

    def _drains(self, s: ClusterState, serving: tuple[NodeState, ...], cap: int,
                want: float) -> tuple[str, ...]:
        if not self._may_drain(s):
            return ()

        def held(n: NodeState) -> int:
            return n.used_tokens if self.keep_idle else n.live_tokens

        drained: list[str] = []
        for n in sorted(serving, key=lambda n: (held(n), n.name)):  # emptiest first
            if len(serving) - len(drained) <= self.min_nodes or len(drained) >= self.max_drain:
                break
            after = cap - n.capacity_tokens
            if after - want < self.down_free_fraction * after or (after <= 0 < want):
                break
            drained.append(n.name)
            cap = after
        return tuple(drained)
