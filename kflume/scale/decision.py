"""What an autoscaling policy decides: nodes to add, nodes to drain."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ScaleDecision"]


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """add: how many nodes to ask the provider for; drain: names of nodes to drain
    (emptiest first); reason: one line saying why, for logs. A decision never both adds
    and drains."""

    add: int = 0
    drain: tuple[str, ...] = ()
    reason: str = ""

    def __post_init__(self):
        if self.add < 0:
            raise ValueError(f"ScaleDecision.add must be >= 0, got {self.add}")
        if not isinstance(self.drain, tuple):
            raise TypeError("ScaleDecision.drain must be a tuple of node names")
        if self.add and self.drain:
            raise ValueError("a ScaleDecision either adds or drains, not both")
        if len(set(self.drain)) != len(self.drain):
            raise ValueError(f"ScaleDecision.drain names a node twice: {self.drain}")

    @property
    def noop(self) -> bool:
        return not self.add and not self.drain
