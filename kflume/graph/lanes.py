"""Lanes: which node each lane of a captured step's buffers serves, and how.

A captured step has `max_nodes` lanes (kflume/graph/buffers.py). A node gets a lane
when a plan first names it, or before that, when it is *prepared* while joining the
cluster (`prepare`, through `RemoteAttention.on_join`): a node of this host is then
handed the step's mailboxes (it will read the queries and deliver the replies itself)
and asked to capture its streams' graphs now, not while it serves (each capture holds a
node ~0.5 ms). A node of another host, or one that refuses the mailboxes, is served
with messages in the same lanes.
"""

from __future__ import annotations

import logging

from ..comm.base import RemoteError
from ..comm.mailbox import host_id
from ..plan import StepPlan
from ..weight.client import NodeClient, Pending

__all__ = ["Lanes"]

log = logging.getLogger("kflume.graph")


class Lanes:
    """Lane assignment and mailbox registration of one captured step (`cap`)."""

    def __init__(self, cap, count: int) -> None:
        self.cap = cap
        self.names: list[str] = [""] * count  # "" is a free lane
        self._reserved: set[str] = set()  # lanes of prepared nodes no plan named yet
        self._delivers: dict[str, tuple] = {}  # name -> (its client, takes mailboxes?)
        self._unsettled: list[Pending] = []  # answers to the preparations of `load`

    def load(self, plan: StepPlan) -> None:
        """Give every node of the plan a lane (a node first seen is prepared now: its
        answers are checked at the next loads); free the lanes of nodes gone."""
        live = [w.node for w in plan.nodes]
        self._settle()
        for n in live:  # first: nothing below changes if a node fails to answer
            self._register(n)
        self._reserved.difference_update(live)
        self._reserved.intersection_update(self.names)
        self.names = [n if n in live or n in self._reserved else "" for n in self.names]
        for n in live:
            if n not in self.names:
                if "" not in self.names and self._reserved:  # a live node first
                    self.names[self.names.index(self._reserved.pop())] = ""
                if "" not in self.names:
                    raise ValueError(f"more than max_nodes={len(self.names)} attention nodes")
                self.names[self.names.index("")] = n

    def prepare(self, name: str, client: NodeClient) -> list[Pending]:
        """Get node `name` (in no plan yet: a node joining) ready to serve this step at
        full speed from its first step: register the mailboxes with it, reserve it a
        lane, and have it capture that lane's stream graphs now. Returns its pending
        answers (none for a node that takes no mailboxes)."""
        cap = self.cap
        if not cap.mailboxes or client.info.get("host") != host_id():
            return []
        try:
            registered = client.register_mailbox(cap.mailboxes, wait=False)
        except Exception as e:  # noqa: BLE001 - its connection failed: messages, if any
            self._refused(name, e)
            self._delivers[name] = (client, False)
            return []
        self._delivers[name] = (client, registered)  # settled by delivers()
        if name not in self.names:
            if "" not in self.names:
                log.warning("node %s joins with no lane free in this step (max_nodes=%d): "
                            "not prepared", name, len(self.names))
                return [registered]
            self.names[self.names.index("")] = name
        self._reserved.add(name)  # until a plan names it
        lane = self.names.index(name)
        return [registered] + [cap.capture_ahead(client, lane, m)
                               for m in range(len(cap.micro))]

    def forget(self, name: str) -> None:
        """Node `name` was prepared but will not join, or has left: its lane is free."""
        if name in self._reserved:
            self._reserved.discard(name)
            self.names[self.names.index(name)] = ""
        self._delivers.pop(name, None)

    def delivers(self, name: str) -> bool:
        """Whether node `name` takes the mailboxes (known once a plan with it was loaded,
        or once it answered its preparation's registration)."""
        client, ok = self._delivers.get(name, (None, False))
        if isinstance(ok, Pending):  # sent by prepare(): its answer (waited for, if due)
            try:
                ok.result()
                ok = True
            except Exception as e:  # noqa: BLE001 - refused, or no answer in time
                self._refused(name, e)
                ok = False
            self._delivers[name] = (client, ok)
        return ok

    def _register(self, name: str) -> None:
        """A node of the plan not seen with this client yet (a node of the first plan,
        one that joined unprepared, or came back): prepared as a joining node is."""
        client = self.cap.remote.clients[name]
        if not self.cap.mailboxes or self._delivers.get(name, (None,))[0] is client:
            return
        self._unsettled += self.prepare(name, client)
        if self._delivers.get(name, (None,))[0] is not client:  # another host
            self._delivers[name] = (client, False)

    def _settle(self) -> None:
        """Log what the preparations answered so far refused."""
        left = []
        for p in self._unsettled:
            if not p.done:
                left.append(p)
                continue
            try:
                p.result(0)
            except Exception as e:  # noqa: BLE001 - it serves, its first steps slower
                log.warning("node %s was not prepared: %s", p.client.name, e)
        self._unsettled = left

    @staticmethod
    def _refused(name: str, e: BaseException) -> None:
        why = e.remote_message if isinstance(e, RemoteError) else str(e)
        log.warning("node %s did not take this weight node's mailboxes; its replies come as "
                    "messages: %s", name, why)
