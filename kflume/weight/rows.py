"""A step plan's rows, per node: what the eager and the captured paths send where.

`node_rows(plan, rows)` cuts the plan's batch rows `rows` (a micro-batch, or all of
them) into each node's share: the rows whose history the node partly holds, with how
many tokens it holds of each (it attends over those), and the rows whose new token it
stores (it appends them, at the node-local offset). Row indices are local to `rows`.
With a sliding `window` of W tokens, a row's new token at position p attends over
positions `(p - W, p]` only: each node attends from the first of its tokens in that
window (`kv_start`), and a node with none of them there is left out for that row.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import RequestId, StepPlan
from ..turns import written

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
    kv_start: tuple[int, ...] | None = None  # per attended row, its first local token


def node_rows(plan: StepPlan, rows: slice | None = None,
              window: int | None = None) -> list[NodeRows]:
    """Each node's share of plan rows `rows` (all by default), in the plan's node order;
    nodes with nothing to do for these rows are left out. `window`: a sliding window's
    tokens (module docstring)."""
    a, b = (0, len(plan.requests)) if rows is None else rows.indices(len(plan.requests))[:2]
    out = []
    firsts = {}  # per row, the tokens each node holds before its window
    if window is not None:
        for r in range(a, b):
            rid, p = plan.requests[r], plan.positions[r]
            firsts[r] = written(plan.routes[rid], max(0, p - window + 1))
    for w in plan.nodes:
        att = [(r - a, n) for r, n in zip(w.rows, w.kv_len) if a <= r < b
               and firsts.get(r, {}).get(w.node, 0) < n]
        app = [(r - a, o) for r, o in zip(w.append_rows, w.append_offsets) if a <= r < b]
        if not att and not app:
            continue
        out.append(NodeRows(
            w.node, tuple(r for r, _ in att), tuple(plan.requests[r + a] for r, _ in att),
            tuple(n for _, n in att), tuple(r for r, _ in app),
            tuple(plan.requests[r + a] for r, _ in app), tuple(o for _, o in app),
            tuple(plan.positions[r + a] for r, _ in app),
            None if window is None else tuple(firsts[r + a].get(w.node, 0) for r, _ in att)))
    return out
