"""Losing a node costs time, not tokens: recovery of the KV a lost node held.

A node is lost when its link breaks (its process is gone: the connection's socket tells
at once), when its process exits, or when it does not answer within the deadline. The
cluster then forgets it at a token boundary (`lose`): the router places its ranges on
the surviving nodes (`TokenRangeRouter.lose_node`), and each lost span is recomputed
there, in position order, by the cluster's `recompute` callback: the ranges before a
lost span are intact, so a chunked prefill over the span (`RemoteAttention.extend`)
gives its KV again, exactly. `kflume.patch` installs one for `generate()`; in a decode
loop of your own, give the cluster one (`cluster.recompute = fn`, `fn(restore)` with
`restore.request`, `.start`, `.end`: kflume/plan.py's `Restore`).

A loss found in the middle of a step (a layer whose node does not answer) is recovered
at once, in a plan made for the rest of that step (`RemoteAttention.on_loss`); the step
then goes on. Requests that no surviving node has room for are dropped, and the boundary
raises `RequestsLost` naming them once the others are set to continue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from ..comm.base import TransportError
from ..placement import CapacityError
from ..plan import Restore, StepPlan
from .boundary import LostInMove, carry_out

__all__ = ["Recovery", "RequestsLost"]

log = logging.getLogger("kflume.cluster")


class RequestsLost(CapacityError):
    """Requests whose lost tokens no surviving node had room for: they are gone from the
    cluster (the other requests continue)."""

    def __init__(self, requests, nodes) -> None:
        self.requests, self.nodes = tuple(requests), tuple(nodes)
        super().__init__(f"requests {list(self.requests)} could not be restored after losing "
                         f"{list(self.nodes)}: no surviving node has room for their tokens; "
                         "add nodes (the other requests continue)")


class Recovery:
    """The lost nodes of `cluster`, and the recomputation of what they held."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.recompute: Callable[[Restore], None] | None = None
        self.lost: dict[str, str] = {}  # every node lost, and why
        self.leaving: dict[str, bool] = {}  # nodes that said they leave: removal queued?
        self.restoring: tuple[str, ...] = ()  # while recomputing: the nodes lost

    def lose(self, name: str, why: str) -> None:
        """Forget node `name` (its ranges restored at the next boundary)."""
        c = self.cluster
        if name not in c.clients or name in self.lost:
            return
        log.warning("node %s lost (%s): its KV is restored on the others%s", name, why,
                    " (from replicas where they hold it)" if c.router.replicas > 1 else "")
        self.lost[name] = why
        c.router.lose_node(name)
        client = c.clients.pop(name)
        client.close()
        c.forget(name, kill=True)  # a hung process would hold up a graceful stop

    def check(self) -> None:
        """Lose the nodes whose link broke or whose process exited; move off the ones that
        said they leave (a node told to drain, `kflume node` on SIGTERM): drained at once,
        removed (their ranges migrated) at the first boundary the others have room.
        The transport is driven first: a link that broke while the cluster was idle is
        found before the plan places tokens on its node."""
        c = self.cluster
        c.transport.progress(0.0)
        for name, client in list(c.clients.items()):
            proc = c.processes.get(name)
            if not client.conn.alive:
                self.lose(name, client.conn.why if hasattr(client.conn, "why") else "link gone")
            elif proc is not None and getattr(proc, "running", True) is False:
                self.lose(name, "its process exited")
            elif client.leaving and name not in self.leaving:
                log.info("node %s is leaving: its ranges move to the others", name)
                c.router.drain_node(name)
                self.leaving[name] = False
        for name, queued in list(self.leaving.items()):
            if name not in c.clients:
                del self.leaving[name]
            elif not queued and c.router.can_remove(name):
                c.router.remove_node(name)
                self.leaving[name] = True

    def note_copies(self, plan: StepPlan) -> None:
        """Log the requests a boundary left with a single copy of some tokens (replicas)."""
        if plan.unreplicated:
            log.warning("requests %s hold some tokens on one node only: no other node has "
                        "room for a second copy (%d tokens with one copy); they get one once "
                        "a node has room", list(plan.unreplicated),
                        self.cluster.router.replica_stats().unreplicated_tokens)

    def carry_out(self, plan: StepPlan) -> StepPlan:
        """The plan's frees, truncations and migrations (kflume/weight/boundary.py); the
        plan to go on with, which recomputes what nodes lost on the way did not move."""
        c = self.cluster
        lost = carry_out(plan, c.clients, c.timeout)
        return self.lost_in_move(plan, lost) if lost.nodes else plan

    def lost_in_move(self, plan: StepPlan, lost: LostInMove) -> StepPlan:
        """Nodes lost while the boundary moved their ranges off (`carry_out`): the plan
        already places those ranges on other nodes; the ones not moved are recomputed
        there, as a lost node's spans are. A request whose first tokens a sliding window
        freed cannot be recomputed (that would attend over them): it is dropped, as a
        lost node's would be. Returns the plan to go on with."""
        c = self.cluster
        for name in sorted(lost.nodes):
            self.lost[name] = "lost while its ranges were moved off"
            c.forget(name, kill=True)  # (dropped from the cluster with the plan's removals)
        moved = [m for m in lost.migrations if m.end > m.start]
        cut = tuple(sorted({m.request for m in moved
                            if c.router.ranges(m.request)[0].start > 0}, key=str))
        if cut:  # a plan without them: the step must not attend over their missing KV
            for rid in cut:
                c.router.finish_request(rid)
            later = c.router.begin_step(only=("finish_request",))
            for rid, node in later.freed:
                if node in c.clients and node not in lost.nodes:
                    c.clients[node].free([rid])
            plan = replace(later, migrations=plan.migrations, removed_nodes=plan.removed_nodes,
                           restores=tuple(r for r in plan.restores if r.request not in cut),
                           lost_nodes=plan.lost_nodes, dropped=plan.dropped + cut)
        restores = tuple(Restore(m.request, m.start, m.end, m.dst) for m in moved
                         if m.request not in cut)
        return replace(plan, restores=plan.restores + restores,
                       lost_nodes=plan.lost_nodes + tuple(sorted(lost.nodes)))

    def restore(self, plan: StepPlan) -> None:
        """Recompute the plan's lost spans (per request, in position order), then check
        that the nodes took them; log its requests left with a single copy."""
        self.note_copies(plan)
        if not plan.restores:
            return
        if self.recompute is None:
            reqs = sorted({r.request for r in plan.restores}, key=str)
            raise TransportError(
                f"nodes {list(plan.lost_nodes)} were lost with tokens of requests {reqs}; "
                "give the cluster a recompute callback (cluster.recompute) to restore them")
        self.restoring = plan.lost_nodes
        try:
            for r in sorted(plan.restores, key=lambda r: (str(r.request), r.start)):
                self.recompute(r)
        finally:
            self.restoring = ()
        for node in {r.dst for r in plan.restores}:
            self.cluster.clients[node].flush()

    def recover(self, nodes: list[str]) -> StepPlan:
        """Nodes lost in the middle of a step: a plan for the rest of the step without
        them, their spans recomputed (`RemoteAttention.on_loss`). The spans the step in
        flight extends its requests by are its own to write (where the new plan puts
        them): only the history before them is recomputed."""
        c = self.cluster
        if self.restoring:
            raise TransportError(f"nodes {list(nodes)} were lost while what nodes "
                                 f"{list(self.restoring)} held was being recomputed")
        for name in nodes:
            self.lose(name, "no answer within the deadline" if name in c.clients and
                      c.clients[name].conn.alive else "link gone")
        spans = ()
        if c.remote.plan is not None:
            spans = c.remote.plan.spans
            rewind(c.remote.plan, c.clients)  # the step in flight, on the survivors
        plan = c.router.begin_step(only=("lose_node",))
        if spans:
            plan = replace(plan, spans=spans, restores=_before_spans(plan.restores, spans))
        c.remote.begin_step(plan, same_step=True)
        self.finish(plan)
        return plan

    def finish(self, plan: StepPlan) -> None:
        """After a plan with lost nodes: its frees, its restores, and the dropped
        requests raised."""
        c = self.cluster
        for rid, node in plan.freed:
            if node in c.clients:
                c.clients[node].free([rid])
        self.restore(plan)
        if plan.dropped:
            raise RequestsLost(plan.dropped, plan.lost_nodes)


def _before_spans(restores, spans) -> tuple[Restore, ...]:
    """`restores` cut to the history before each request's span in flight."""
    start = {s.request: s.start for s in spans}
    out = []
    for r in restores:
        end = min(r.end, start.get(r.request, r.end))
        if r.start < end:
            out.append(Restore(r.request, r.start, end, r.dst))
    return tuple(out)


def rewind(plan: StepPlan, clients) -> None:
    """Every node of `plan` (the step in flight) back to its history of the plan's
    requests: the step's tokens that some layers had appended are dropped (the step sends
    them again), so that restores can merge spans in place. A request extended by a span
    is left as it is: the span is written only once all its layers are in."""
    spans = {s.request for s in plan.spans}
    for w in plan.nodes:
        if w.node not in clients:
            continue
        held = {r: n for r, n in zip(w.rows, w.kv_len) if plan.requests[r] not in spans}
        held.update((r, n) for r, n in zip(w.append_rows, w.append_offsets)
                    if plan.requests[r] not in spans)
        if held:
            clients[w.node].truncate([plan.requests[r] for r in held], list(held.values()))
