"""How many weight nodes the simulated kflume runs, beside the attention-node policy.

A weight node holds the weights and runs the decode steps and the prefill (its dense
part; the prefill's attention runs on the attention nodes). One node per
`target_batch` requests, and enough that they spend at most `prefill_utilization` of
their time with prefill waiting (`prefill_load`: nodes' worth of such time, recently),
whichever needs more; one node fewer once the demand has fallen `down_fraction` of a
node below the count, no sooner than `cooldown_s` after the last change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WeightNodeRule"]


@dataclass(frozen=True, slots=True)
class WeightNodeRule:
    target_batch: int
    prefill_utilization: float
    min_nodes: int = 0
    max_nodes: int = 512
    down_fraction: float = 0.75
    cooldown_s: float = 60.0

    def __post_init__(self):
        if self.target_batch < 1 or not 0 < self.prefill_utilization <= 1:
            raise ValueError("target_batch must be >= 1 and prefill_utilization in (0, 1], "
                             f"got {self.target_batch} and {self.prefill_utilization}")
        if not 0 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"need 0 <= min_nodes <= max_nodes, got {self.min_nodes}, "
                             f"{self.max_nodes}")

    def demand(self, requests: int, prefill_load: float) -> float:
        """Weight nodes' worth of work: requests (running and waiting) and prefill."""
        return max(requests / self.target_batch, prefill_load / self.prefill_utilization)

    def change(self, live: int, requests: int, prefill_load: float, since_change_s: float) -> int:
        """Nodes to add (> 0), 1 to drain (-1), or 0; `live` counts serving and starting
        nodes, `since_change_s` the time since the last add or drain."""
        demand = self.demand(requests, prefill_load)
        target = min(self.max_nodes, max(self.min_nodes, math.ceil(demand - 1e-9)))
        if requests and not target:
            target = 1
        if target > live:
            return target - live
        if (live > target and demand <= (live - 1) * self.down_fraction
                and since_change_s >= self.cooldown_s):
            return -1
        return 0
