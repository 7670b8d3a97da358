"""What a token boundary asks of the nodes before the step attends: frees, truncations
and migrations.

`carry_out(plan, clients)` frees the requests the plan finished on each node (a node's
request that a migration copies from: once copied), truncates
the ones it cut short (kflume/turns.py), then moves
the ranges it migrates through this host (export from the old node, import into the new
one), and waits for nodes about to leave to acknowledge. A node handles these before
the step's attends: messages on one connection are handled in order.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..plan import StepPlan
from .client import NodeClient

__all__ = ["carry_out"]


def carry_out(plan: StepPlan, clients: Mapping[str, NodeClient], timeout: float) -> None:
    sources = {(m.request, m.src) for m in plan.migrations}
    _free(clients, [f for f in plan.freed if f not in sources])
    cuts: dict[str, tuple[list, list]] = {}
    for rid, node, keep in plan.truncated:
        rids, keeps = cuts.setdefault(node, ([], []))
        rids.append(rid)
        keeps.append(keep)
    for node, (rids, keeps) in cuts.items():
        if node in clients:
            clients[node].truncate(rids, keeps)
    for m in plan.migrations:
        k, v = clients[m.src].export_range(m.request, m.start, m.end)
        clients[m.dst].import_range(m.request, m.start, k, v)
    _free(clients, [f for f in plan.freed if f in sources])  # moved off: copied first
    for node in plan.removed_nodes:
        if node in clients:
            clients[node].flush(timeout)


def _free(clients: Mapping[str, NodeClient], freed: list) -> None:
    by_node: dict[str, list] = {}
    for rid, node in freed:
        by_node.setdefault(node, []).append(rid)
    for node, rids in by_node.items():
        if node in clients:
            clients[node].free(rids)
