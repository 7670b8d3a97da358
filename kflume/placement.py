"""Where a request's next tokens go: the placement policy a `TokenRangeRouter` asks.

Plain Python, no torch. A policy gets the request's tail range and the number of tokens
still to place, and returns a `Placement` on one node; the router applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from .plan import RequestId, TokenRange

if TYPE_CHECKING:
    from .router import TokenRangeRouter

__all__ = ["CapacityError", "FillThenLeastLoaded", "Placement", "PlacementPolicy", "RouterError"]


class RouterError(ValueError):
    """An edit the router cannot apply (unknown node or request, duplicate id...)."""


class CapacityError(RouterError):
    """No attention node has room for another token."""


class Placement(NamedTuple):
    """Put the next `tokens` tokens on `node`: extend the tail range, or open a new one."""

    node: str
    tokens: int
    extend_tail: bool


class PlacementPolicy(Protocol):
    """Decides where a request's next tokens go.

    `place` gets the request's tail range (None for a request with no range yet) and the
    number of tokens still to place, and returns a `Placement` of `1 <= n <= tokens` of
    them, at most `router.room(node, request)`. It reads the router only through
    `placeable_nodes()`, `least_loaded(request)`, `is_draining(node)`, `free_tokens(node)`,
    `room(node, request)` and `node_load(node)`; it raises `CapacityError` when no node
    fits.
    """

    def place(
        self, router: TokenRangeRouter, request: RequestId, tail: TokenRange | None, tokens: int
    ) -> Placement:
        ...


@dataclass(slots=True)
class FillThenLeastLoaded:
    """Fill the tail range up to `range_tokens`, then open a range on the least-loaded node.

    The least-loaded node is the one with the most free tokens (ties: the node that
    joined first). A tail whose node is draining or full is closed early.
    """

    range_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.range_tokens < 1:
            raise ValueError(f"range_tokens must be >= 1; got {self.range_tokens}")

    def place(
        self, router: TokenRangeRouter, request: RequestId, tail: TokenRange | None, tokens: int
    ) -> Placement:
        if tail is not None and len(tail) < self.range_tokens and not router.is_draining(
            tail.node
        ):
            room = min(self.range_tokens - len(tail), router.room(tail.node, request))
            if room > 0:
                return Placement(tail.node, min(tokens, room), extend_tail=True)
        node = router.least_loaded(request)
        room = 0 if node is None else router.room(node, request)
        if room <= 0:
            raise CapacityError(
                f"no attention node has room for request {request!r}: add a node or finish "
                "requests"
            )
        return Placement(node, min(tokens, room, self.range_tokens), False)
