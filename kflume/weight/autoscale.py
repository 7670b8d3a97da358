"""A scaling policy driving a live cluster: `cluster.autoscale(policy)`.

The `Autoscaler` is called by the cluster at every token boundary, after the boundary's
plan (`Cluster.begin_step`). Each call it measures the cluster; at most every
`interval_s` it fills a `kflume.scale.ClusterState`, asks the policy, and applies the
`ScaleDecision` it returns, the same one the simulator applies (`kflume.sim`):

- **add n**: `cluster.add_node(wait=False)` n times, through the cluster's provider (a
  `WarmPool` hands out nodes already listening). A node joins at a later boundary once
  it listens and is prepared (kflume/weight/joining.py); no step waits for it.
- **drain names**: `router.drain_node(name)`, so that no new token goes to the node;
  at the first boundary where the other nodes have room for its ranges (and for every
  request's next token), `cluster.remove_node(name)`, whose ranges then migrate at the
  next boundary, ahead of the admissions queued with it; the node is stopped after.

What the state holds:

- `nodes`: every node of the router (capacity and free tokens from the router;
  draining if asked to drain), and every node in `cluster.joining` as starting (the
  capacity it was asked for, all free);
- `growth_tokens_per_s`: the change of the tokens held on all nodes between
  boundaries, per second, smoothed over `window_s` (net: finished requests count
  negative);
- `tpot_p50_ms`, `tpot_p99_ms`: over the last `window_s`, the times between boundaries
  that followed a plan with requests, or the step times given to `record_step()` once
  it is used; None with none;
- `queued_requests`, `queued_tokens`: what the caller says it holds back for lack of
  capacity (`set_queue()`); the router refuses an admission that does not fit instead
  of queueing it;
- `node_start_s`: the longest of the last four measured lead times (from `add_node` to
  the node in the routing table), `node_start_s` given here until one is measured;
- `idle_tokens`: per node, the tokens of requests parked between turns
  (kflume/weight/parking.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace

from ..plan import StepPlan
from ..scale import ClusterState, NodeState, ScaleDecision, ScalePolicy

__all__ = ["Autoscaler", "ScaleEvent"]

log = logging.getLogger("kflume.autoscale")


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A decision the autoscaler applied: when (`time.monotonic()`), the decision, the
    names of the nodes it asked for and of those it drained, and the state it read."""

    at_s: float
    decision: ScaleDecision
    added: tuple[str, ...]
    drained: tuple[str, ...]
    state: ClusterState


class Autoscaler:
    """Adds and drains the nodes of `cluster` as `policy` decides (module docstring).

    Args:
        cluster: the `Cluster` (it calls `boundary(plan)` at every token boundary).
        policy: a `kflume.scale` policy (`decide(ClusterState) -> ScaleDecision`).
        interval_s: at most one decision per this many seconds (default: the policy's).
        capacity_tokens: capacity of the nodes it asks for (default: the cluster's).
        window_s: growth and TPOT are measured over about this long.
        node_start_s: lead time assumed until a start is measured.
    """

    def __init__(self, cluster, policy: ScalePolicy, *, interval_s: float | None = None,
                 capacity_tokens: int | None = None, window_s: float = 30.0,
                 node_start_s: float = 5.0) -> None:
        if not isinstance(policy, ScalePolicy):
            raise TypeError("policy must have decide(ClusterState) -> ScaleDecision and "
                            f"interval_s (e.g. kflume.scale.HeadroomPolicy); got {policy!r}")
        if cluster.provider is None:
            raise ValueError("this cluster has no node provider to start nodes with: "
                             "give autoscale(policy, provider=...)")
        self.interval_s = policy.interval_s if interval_s is None else interval_s
        if not self.interval_s > 0 or not window_s > 0 or node_start_s < 0:
            raise ValueError(f"need interval_s > 0, window_s > 0, node_start_s >= 0; got "
                             f"{self.interval_s}, {window_s}, {node_start_s}")
        self.cluster, self.policy, self.window_s = cluster, policy, window_s
        self.capacity_tokens = capacity_tokens or cluster.geometry.capacity_tokens
        self.events: list[ScaleEvent] = []
        self.growth_tokens_per_s = 0.0
        self._default_start_s = node_start_s
        self._leads: deque[float] = deque(maxlen=4)
        self._starts: dict[str, float] = {}  # node asked for -> when
        self._draining: dict[str, bool] = {}  # node asked to drain -> removal queued
        self._held: tuple[float, int] | None = None
        self._steps: deque[tuple[float, float]] = deque()  # (when, seconds)
        self._reported = False
        self._last_boundary: tuple[float, bool] | None = None
        self._queue = (0, 0)
        self._last_up: float | None = None
        self._last_down: float | None = None
        self._next_decision = -math.inf
        warm = getattr(cluster.provider, "warm", None)
        if warm is not None:
            warm(replace(cluster.geometry, capacity_tokens=self.capacity_tokens))

    # ---- what callers tell it --------------------------------------------------------
    def set_queue(self, requests: int, tokens: int) -> None:
        """Requests (and the KV tokens they need) that the caller holds back until the
        cluster has room for them."""
        if requests < 0 or tokens < 0:
            raise ValueError(f"queued requests and tokens must be >= 0; got {requests}, {tokens}")
        self._queue = (requests, tokens)

    def record_step(self, seconds: float) -> None:
        """A decode step's time (one token of each request), measured by the caller; from
        the first call on, TPOT comes from these instead of the times between boundaries."""
        if not self._reported:
            self._reported = True
            self._steps.clear()  # the times between boundaries measured so far
        self._steps.append((time.monotonic(), seconds))

    @property
    def node_start_s(self) -> float:
        """The lead time the policy is told: the longest of the last four measured."""
        return max(self._leads) if self._leads else self._default_start_s

    @property
    def lead_times_s(self) -> tuple[float, ...]:
        """The last measured lead times, seconds from `add_node` to serving."""
        return tuple(self._leads)

    # ---- at each boundary ------------------------------------------------------------
    def boundary(self, plan: StepPlan) -> None:
        """Measure, move drains on, and at most every `interval_s` decide and apply. A
        failure here is logged and leaves the cluster serving as it is."""
        now = time.monotonic()
        try:
            self._measure(plan, now)
            self._remove_drained()
            if now >= self._next_decision:
                self._next_decision = now + self.interval_s
                state = self.state(now)
                self._apply(self.policy.decide(state), state, now)
        except Exception:  # noqa: BLE001 - scaling must never fail a step
            log.exception("autoscaler: this boundary's scaling failed; the cluster serves on")

    def state(self, now: float | None = None) -> ClusterState:
        """The cluster as the policy sees it now (module docstring)."""
        now = time.monotonic() if now is None else now
        router = self.cluster.router
        nodes, idle = [], {}
        for rid in router.requests():
            if router.is_parked(rid):
                for r in router.ranges(rid):
                    idle[r.node] = idle.get(r.node, 0) + len(r)
        for name in router.nodes():
            free = router.free_tokens(name)
            nodes.append(NodeState(name, free + router.node_load(name), free,
                                   draining=router.is_draining(name) or name in self._draining,
                                   idle_tokens=idle.get(name, 0)))
        for j in self.cluster.joining.nodes:
            cap = max(1, j.capacity)
            nodes.append(NodeState(j.name, cap, cap, starting=True))
        self._trim(now)
        times = sorted(s for _, s in self._steps)
        p50 = _rank(times, 0.50)
        p99 = _rank(times, 0.99)
        return ClusterState(
            now_s=now, nodes=tuple(nodes), growth_tokens_per_s=self.growth_tokens_per_s,
            queued_requests=self._queue[0], queued_tokens=self._queue[1],
            tpot_p50_ms=None if p50 is None else p50 * 1e3,
            tpot_p99_ms=None if p99 is None else p99 * 1e3, node_start_s=self.node_start_s,
            new_node_capacity_tokens=self.capacity_tokens, last_scale_up_s=self._last_up,
            last_scale_down_s=self._last_down)

    def _measure(self, plan: StepPlan, now: float) -> None:
        router, c = self.cluster.router, self.cluster
        held = sum(router.node_load(n) for n in router.nodes())
        if self._held is not None and now > self._held[0]:
            dt = now - self._held[0]
            a = dt / (dt + self.window_s)
            self.growth_tokens_per_s += a * ((held - self._held[1]) / dt - self.growth_tokens_per_s)
        self._held = (now, held)
        if not self._reported and self._last_boundary is not None and self._last_boundary[1]:
            self._steps.append((now, now - self._last_boundary[0]))
        self._last_boundary = (now, bool(plan.requests))
        joined = set(router.nodes())
        joining = {j.name for j in c.joining.nodes}
        for name, asked in list(self._starts.items()):
            if name in joined:
                self._leads.append(now - asked)
                del self._starts[name]
                log.info("node %s serves, %.2f s after it was asked for", name, now - asked)
            elif name not in joining and name not in c.clients:
                del self._starts[name]  # it did not join (joining.py logged why)
        for name in [n for n in self._draining if n not in joined]:
            del self._draining[name]
            log.info("node %s drained and stopped", name)

    def _remove_drained(self) -> None:
        """Queue the removal of each draining node whose ranges the others have room for."""
        router, clients = self.cluster.router, self.cluster.clients
        for name, queued in self._draining.items():
            if (not queued and name in clients and router.is_draining(name)
                    and router.can_remove(name)):
                self.cluster.remove_node(name)
                self._draining[name] = True

    def _apply(self, d: ScaleDecision, state: ClusterState, now: float) -> None:
        c, added, drained = self.cluster, [], []
        for _ in range(d.add):
            try:
                name = c.add_node(self.capacity_tokens, wait=False)
            except Exception as e:  # noqa: BLE001 - the next decision asks again
                log.error("autoscaler: the provider could not start a node: %s", e)
                break
            self._starts[name] = now
            added.append(name)
        for name in d.drain:
            if name in c.clients and name not in self._draining:
                c.router.drain_node(name)
                self._draining[name] = False
                drained.append(name)
        self._last_up = now if added else self._last_up
        self._last_down = now if drained else self._last_down
        if added or drained:
            self.events.append(ScaleEvent(now, d, tuple(added), tuple(drained), state))
            log.info("autoscaler: %s%s (%s)", f"adding {added}" if added else "",
                     f"draining {drained}" if drained else "", d.reason)

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()


def _rank(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank quantile `q` of sorted values (None for none)."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
