"""What a token boundary asks of the nodes before the step attends: frees, truncations
and migrations.

`carry_out(plan, clients)` frees the requests the plan finished on each node (a node's
request that a migration copies from: once copied), truncates the ones it cut short
(kflume/turns.py), moves the ranges it migrates through this host (export from the old
node, import into the new one), frees what a node about to leave held, and waits for
it to acknowledge. A node handles these before the step's attends: messages on one
connection are handled in order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..comm import TransportError
from ..plan import StepPlan
from .client import NodeClient

__all__ = ["carry_out"]

log = logging.getLogger("kflume.cluster")


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
    moved = [f for f in plan.freed if f in sources]  # moved off: freed once copied
    _free(clients, [f for f in moved if f[1] not in plan.removed_nodes])
    for node in plan.removed_nodes:  # it holds nothing of this cluster's requests now
        if node in clients:
            held = [*plan.routes, *(rid for rid, n in moved if n == node),
                    *(m.request for m in plan.migrations if m.src == node)]
            try:
                clients[node].free(list(dict.fromkeys(held)))  # (unknown ids are ignored)
                clients[node].flush(timeout)
            except TransportError as e:  # a leaving node exits once it holds nothing
                log.info("node %s left as it was removed: %s", node, e)


def _free(clients: Mapping[str, NodeClient], freed: list) -> None:
    by_node: dict[str, list] = {}
    for rid, node in freed:
        by_node.setdefault(node, []).append(rid)
    for node, rids in by_node.items():
        if node in clients:
            clients[node].free(rids)
