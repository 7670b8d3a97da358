"""What an autoscaling policy reads: the attention nodes and the load, at one instant.

Plain dataclasses, no torch. A real cluster fills a `ClusterState` from its router and
nodes; the simulator (`kflume.sim`) fills the same one from its model. Units: tokens
are KV tokens, one token being its K and V in every layer of the model (what a node's
`capacity_tokens` counts); times are seconds on one monotonic clock, TPOT in ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ClusterState", "NodeState"]


@dataclass(frozen=True, slots=True)
class NodeState:
    """One attention node (or, for instance-level scaling, one model replica).

    name            unique id; a `ScaleDecision` names the nodes to drain by it.
    capacity_tokens KV tokens the node can hold in all (> 0).
    free_tokens     of those, how many hold nothing now (0 ≤ free ≤ capacity).
    idle_tokens     of the held ones, how many belong to sessions between calls: kept so
                    that the next call appends only its new tokens, but could be dropped
                    and recomputed (0 ≤ idle ≤ capacity − free).
    draining        asked to leave: takes no new tokens, its ranges are moving away.
    starting        asked for, not serving yet; counted as capacity that is on its way.
    """

    name: str
    capacity_tokens: int
    free_tokens: int
    idle_tokens: int = 0
    draining: bool = False
    starting: bool = False

    def __post_init__(self):
        if not self.name:
            raise ValueError("NodeState.name must be a non-empty string")
        if self.capacity_tokens <= 0:
            raise ValueError(f"node {self.name!r}: capacity_tokens must be > 0, "
                             f"got {self.capacity_tokens}")
        if not 0 <= self.free_tokens <= self.capacity_tokens:
            raise ValueError(f"node {self.name!r}: free_tokens must be in [0, capacity_tokens="
                             f"{self.capacity_tokens}], got {self.free_tokens}")
        if not 0 <= self.idle_tokens <= self.used_tokens:
            raise ValueError(f"node {self.name!r}: idle_tokens must be in [0, used_tokens="
                             f"{self.used_tokens}], got {self.idle_tokens}")
        if self.starting and self.used_tokens:
            raise ValueError(f"node {self.name!r} is starting but holds {self.used_tokens} "
                             "tokens; a starting node holds none")

    @property
    def used_tokens(self) -> int:
        """Tokens held (live requests and idle sessions)."""
        return self.capacity_tokens - self.free_tokens

    @property
    def live_tokens(self) -> int:
        """Tokens of requests being served now."""
        return self.used_tokens - self.idle_tokens


@dataclass(frozen=True, slots=True)
class ClusterState:
    """The cluster as an autoscaling policy sees it at time `now_s`.

    now_s                     the clock, seconds (any epoch; the same clock as the two
                              `last_scale_*_s` fields).
    nodes                     every node: serving, starting and draining.
    growth_tokens_per_s       net rate at which held KV grows, tokens per second: tokens
                              appended (one per request per decode step, plus prefilled
                              tokens) minus tokens freed, smoothed over the last tens of
                              seconds. A router's plans give it as Σ batch × steps/s; may
                              be negative.
    queued_requests           requests (or session calls) waiting for capacity.
    queued_tokens             KV tokens those need when admitted.
    tpot_p50_ms, tpot_p99_ms  time per output token over recent decode steps, ms; None
                              when nothing decoded recently.
    node_start_s              expected seconds from asking a provider for a node to the
                              node serving (its lead time).
    new_node_capacity_tokens  capacity of the node a provider would start; None means the
                              largest node's capacity.
    last_scale_up_s           when the cluster last asked for nodes (None: never).
    last_scale_down_s         when the cluster last drained nodes (None: never).
    """

    now_s: float
    nodes: tuple[NodeState, ...]
    growth_tokens_per_s: float = 0.0
    queued_requests: int = 0
    queued_tokens: int = 0
    tpot_p50_ms: float | None = None
    tpot_p99_ms: float | None = None
    node_start_s: float = 0.0
    new_node_capacity_tokens: int | None = None
    last_scale_up_s: float | None = None
    last_scale_down_s: float | None = None

    def __post_init__(self):
        if not isinstance(self.nodes, tuple):
            raise TypeError(f"ClusterState.nodes must be a tuple of NodeState, "
                            f"got {type(self.nodes).__name__}")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"ClusterState.nodes has duplicate names: {sorted(names)}")
        if not math.isfinite(self.now_s):
            raise ValueError(f"ClusterState.now_s must be finite, got {self.now_s}")
        if not math.isfinite(self.growth_tokens_per_s):
            raise ValueError("ClusterState.growth_tokens_per_s must be finite, "
                             f"got {self.growth_tokens_per_s}")
        if self.queued_requests < 0 or self.queued_tokens < 0:
            raise ValueError("queued_requests and queued_tokens must be >= 0, got "
                             f"{self.queued_requests} and {self.queued_tokens}")
        if self.node_start_s < 0:
            raise ValueError(f"node_start_s must be >= 0, got {self.node_start_s}")
        for name in ("tpot_p50_ms", "tpot_p99_ms"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {v}")
        if self.new_node_capacity_tokens is not None and self.new_node_capacity_tokens <= 0:
            raise ValueError("new_node_capacity_tokens must be > 0 or None, "
                             f"got {self.new_node_capacity_tokens}")
        if self.new_node_capacity_tokens is None and not self.nodes:
            raise ValueError("with no nodes, new_node_capacity_tokens must be given")

    @property
    def serving(self) -> tuple[NodeState, ...]:
        """Nodes that count as capacity: serving or starting, not draining."""
        return tuple(n for n in self.nodes if not n.draining)

    @property
    def new_node_capacity(self) -> int:
        if self.new_node_capacity_tokens is not None:
            return self.new_node_capacity_tokens
        return max(n.capacity_tokens for n in self.nodes)
