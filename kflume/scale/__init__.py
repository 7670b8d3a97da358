"""kflume.scale: when to add or drain attention nodes.

One policy object, two users: a real cluster and the simulator (`kflume.sim`) both fill
a `ClusterState` and apply the `ScaleDecision` a `ScalePolicy` returns. Torch-free.

    from kflume.scale import ClusterState, HeadroomPolicy, NodeState
    policy = HeadroomPolicy(min_nodes=1, max_nodes=8)
    state = ClusterState(now_s=0.0, nodes=(NodeState("a", 1000, 20),),
                         growth_tokens_per_s=50.0, node_start_s=2.0)
    policy.decide(state)   # ScaleDecision(add=1, ...)
"""

from .decision import ScaleDecision
from .policy import HeadroomPolicy, ScalePolicy
from .state import ClusterState, NodeState

__all__ = ["ClusterState", "HeadroomPolicy", "NodeState", "ScaleDecision", "ScalePolicy"]
