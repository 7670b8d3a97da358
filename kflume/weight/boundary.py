"""What a token boundary asks of the nodes before the step attends: frees, truncations
and migrations.

`carry_out(plan, clients)` frees the requests the plan finished on each node (a node's
request that a migration copies from: once copied), truncates the ones it cut short
(kflume/turns.py), moves the ranges it migrates through this host (export from the old
node, import into the new one), frees what a node about to leave held, and waits for
it to acknowledge. A node handles these before the step's attends: messages on one
connection are handled in order.

A node being removed can be lost on the way (its link breaks, or it does not answer
within the deadline): what it did not export is returned (`LostInMove`), for the cluster
to recompute where the plan put it (kflume/weight/recovery.py). A destination lost on
the way is found at the next boundary, and its ranges, the imported ones too, recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..comm.base import DeadlineExceeded, TransportError
from ..plan import Migration, StepPlan
from .client import NodeClient

__all__ = ["LostInMove", "carry_out"]

log = logging.getLogger("kflume.cluster")


@dataclass(slots=True)
class LostInMove:
    """Nodes lost while the plan moved their ranges off, and the migrations from them that
    did not happen."""

    nodes: set[str] = field(default_factory=set)
    migrations: list[Migration] = field(default_factory=list)


def _lost(client: NodeClient, e: Exception) -> bool:
    """Whether `e`, from a call to `client`, means its node is gone or silent."""
    return isinstance(e, DeadlineExceeded) or not client.conn.alive


def carry_out(plan: StepPlan, clients: Mapping[str, NodeClient],
              timeout: float) -> LostInMove:
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
    lost = LostInMove()
    for m in plan.migrations:
        if m.src not in lost.nodes:
            try:
                k, v = clients[m.src].export_range(m.request, m.start, m.end)
            except (TransportError, DeadlineExceeded) as e:
                if not _lost(clients[m.src], e):
                    raise
                log.warning("node %s lost while its ranges were moved off: %s", m.src, e)
                lost.nodes.add(m.src)
        if m.src in lost.nodes:
            lost.migrations.append(m)
            continue
        try:
            clients[m.dst].import_range(m.request, m.start, k, v)
        except TransportError:
            if clients[m.dst].conn.alive:
                raise  # (gone: lost at the next boundary, this range with the rest)
    moved = [f for f in plan.freed if f in sources and f[1] not in lost.nodes]
    _free(clients, [f for f in moved if f[1] not in plan.removed_nodes])  # once copied
    for node in plan.removed_nodes:  # it holds nothing of this cluster's requests now
        if node in clients and node not in lost.nodes:
            held = [*plan.routes, *(rid for rid, n in moved if n == node),
                    *(m.request for m in plan.migrations if m.src == node)]
            try:
                clients[node].free(list(dict.fromkeys(held)))  # (unknown ids are ignored)
                clients[node].flush(timeout)
            except (TransportError, DeadlineExceeded) as e:
                if not _lost(clients[node], e):
                    raise
                if isinstance(e, DeadlineExceeded):  # silent: stopped as a lost node is
                    log.warning("node %s lost once its ranges were moved off: %s", node, e)
                    lost.nodes.add(node)  # (everything exported: nothing to recompute)
                else:  # a leaving node exits once it holds nothing
                    log.info("node %s left as it was removed: %s", node, e)
    return lost


def _free(clients: Mapping[str, NodeClient], freed: list) -> None:
    by_node: dict[str, list] = {}
    for rid, node in freed:
        by_node.setdefault(node, []).append(rid)
    for node, rids in by_node.items():
        if node in clients:
            clients[node].free(rids)
