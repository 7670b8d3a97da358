"""The order in which a token boundary applies the routing edits queued since the last
one (`TokenRangeRouter.begin_step`)."""

from __future__ import annotations

__all__ = ["order_edits"]

_PLACES = ("add_request", "extend")  # edits that place new tokens on nodes
_NODE_EDITS = ("add_node", "drain_node", "remove_node", "lose_node")


def order_edits(edits: list[tuple]) -> list[tuple]:
    """The order a boundary applies queued edits in. Advances first: they confirm the
    previous plan's tokens, so that a node removed at this boundary migrates those too.
    Then the edits in the order they came, except that new tokens (a request added, a span
    extended), with the edits of their request queued after them, wait for the edits of
    nodes: none lands on a node lost, drained or removed at this boundary, and none is
    migrated or "restored" before its KV exists."""
    first = [e for e in edits if e[0] == "advance"]
    now, later, placed = [], [], set()
    for e in edits:
        if e[0] == "advance":
            continue
        if e[0] in _PLACES or (e[0] not in _NODE_EDITS and e[1] in placed):
            placed.add(e[1])
            later.append(e)
        else:
            now.append(e)
    return first + now + later
