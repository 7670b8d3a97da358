"""A step plan's rows, per node: what the eager and the captured paths send where.

`node_rows(plan, rows)` cuts the plan's batch rows `rows` (a micro-batch, or all of
them) into each node's share: the rows whose history the node partly holds, with how
many tokens it holds of each (it attends over those), and the rows whose new token it
stores (it appends them, at the node-local offset). Row indices are local to `rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import RequestId, StepPlan

__all__ = ["NodeRows", "node_rows"]


@dataclass(frozen=True, slots=True)
class NodeRows:
    """One node's share of a range of plan rows (row indices local to the range)."""

    node: str
    rows: tuple[int, ...]  # rows it attends for
    requests: tuple[RequestId, ...]  # their requests
    kv_len: tuple[int, ...]  # tokens of history it holds of each
    append_rows: tuple[int, ...]  # rows whose new token it stores
    append_requests: tuple[RequestId, ...]
    append_offsets: tuple[int, ...]  # node-local offsets of those tokens
    positions: tuple[int, ...]  # their global positions


def node_rows(plan: StepPlan, rows: slice | None = None) -> list[NodeRows]:
    """Each node's share of plan rows `rows` (all by default), in the plan's node order;
    nodes with nothing to do for these rows are left out."""
    a, b = (0, len(plan.requests)) if rows is None else rows.indices(len(plan.requests))[:2]
    out = []
    for w in plan.nodes:
        att = [(r - a, n) for r, n in zip(w.rows, w.kv_len) if a <= r < b]
        app = [(r - a, o) for r, o in zip(w.append_rows, w.append_offsets) if a <= r < b]
        if not att and not app:
            continue
        out.append(NodeRows(
            w.node, tuple(r for r, _ in att), tuple(plan.requests[r + a] for r, _ in att),
            tuple(n for _, n in att), tuple(r for r, _ in app),
            tuple(plan.requests[r + a] for r, _ in app), tuple(o for _, o in app),
            tuple(plan.positions[r + a] for r, _ in app)))
    return out
