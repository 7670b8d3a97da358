"""Nodes joining a cluster while requests run.

A node joins in stages, none of which holds up a decode step: its process starts (a
`kflume node`), it listens, the cluster connects to it and checks its geometry, the
captured steps that use the cluster prepare it (`RemoteAttention.on_join`: mailboxes
registered, its graphs captured before it serves), and once it has answered it enters
the routing table at a token boundary. `Joining` walks each node through them at every
boundary (`advance`); a node that fails a stage is stopped and logged, and the steps go
on without it.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..comm.base import RemoteError
from .client import NodeClient, Pending

__all__ = ["JoinHooks", "Joining", "JoiningNode"]

log = logging.getLogger("kflume.cluster")


@dataclass(slots=True)
class JoiningNode:
    name: str
    process: object | None  # the provider's handle (None: connected by address)
    capacity: int
    client: NodeClient | None = None  # once connected
    prepared: list[Pending] = field(default_factory=list)  # its pending answers
    deadline: float = 0.0  # for those answers (time.monotonic())


class Joining:
    """The nodes of `cluster` on their way in."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.nodes: list[JoiningNode] = []

    def start(self, name: str, capacity: int, env: dict | None) -> JoiningNode:
        """Have the cluster's provider start node `name` (kflume/providers.py); it joins
        once its handle is ready."""
        c = self.cluster
        handle = c.provider.start(name, replace(c.geometry, capacity_tokens=capacity), env)
        c.processes[name] = handle
        return JoiningNode(name, handle, capacity)

    def wait_ready(self, j: JoiningNode) -> None:
        """Block until `j`'s node listens, then connect it. A start is a process's, not a
        reply's: a handle with a start deadline of its own (`timeout`, e.g. a
        `NodeProcess`'s) is given that long, even when the cluster's reply deadline is
        shorter; other handles the cluster's timeout."""
        limit = max(self.cluster.timeout, getattr(j.process, "timeout", 0) or 0)
        deadline = time.monotonic() + limit
        while not j.process.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {j.name} did not listen within {limit:.0f} s")
            time.sleep(0.01)
        self.connect(j.name, j.process.address, j.capacity, j.process, wait=True)

    def connect(self, name: str, address: str, capacity: int, process, wait: bool) -> None:
        """Connect to a listening node, check it, have it prepared; admit it now (`wait`,
        or nothing to prepare) or at the first boundary after its answers. Raises
        (having closed the connection) if it cannot be connected or prepared."""
        c = self.cluster
        client = NodeClient.connect(name, c.transport, address, c.timeout)
        try:
            check_geometry(c.geometry, name, client)
            capacity = int(client.info.get("capacity_tokens", capacity))
            j = JoiningNode(name, process, capacity, client,
                            deadline=time.monotonic() + c.timeout)
            if c._remote is not None:
                j.prepared = c._remote.prepare_node(name, client)
            if wait:
                for p in j.prepared:
                    try:
                        p.result(c.timeout)
                    except RemoteError as e:
                        _unprepared(name, e)
                j.prepared = []
        except BaseException:
            client.close()
            raise
        if j.prepared:
            self.nodes.append(j)
        else:
            self.admit(j.name, j.client, j.capacity)

    def admit(self, name: str, client: NodeClient, capacity: int) -> None:
        """A ready node enters the routing table (at the next boundary)."""
        c = self.cluster
        c.clients[name] = client
        page = int(client.info.get("page_size", c.geometry.page_size))
        c.router.add_node(name, max(page, capacity), page_size=page)
        log.info("node %s joins with room for %d tokens", name, capacity)

    def advance(self) -> None:
        """At a token boundary: connect nodes that now listen, admit the prepared ones,
        drop those that failed (their processes stopped)."""
        c = self.cluster
        for j in list(self.nodes):
            if j.client is None:  # starting
                try:
                    if j.process.ready():
                        self.nodes.remove(j)
                        self.connect(j.name, j.process.address, j.capacity, j.process,
                                     wait=False)
                except Exception as e:  # noqa: BLE001 - the steps go on without it
                    log.error("node %s could not join: %s; stopped", j.name, e)
                    if j in self.nodes:
                        self.nodes.remove(j)
                    c.forget(j.name)
                continue
            ready = self._prepared(j)
            if ready is False:
                continue
            self.nodes.remove(j)
            if ready:
                self.admit(j.name, j.client, j.capacity)
            else:
                j.client.close()
                c.forget(j.name)

    def _prepared(self, j: JoiningNode) -> bool | None:
        """True: it answered (or refused) and may enter the routing; False: wait; None:
        drop it (its connection failed, or no answer in time)."""
        self.cluster.transport.progress(0.0)  # (answers complete as the transport is driven)
        if not j.client.conn.alive:
            log.error("node %s went away while being prepared: dropped", j.name)
            return None
        if not all(p.done for p in j.prepared):
            if time.monotonic() < j.deadline:
                return False
            log.error("node %s did not answer its preparation in %.0f s: dropped", j.name,
                      self.cluster.timeout)
            return None
        for p in j.prepared:
            try:
                p.result(0)
            except RemoteError as e:
                _unprepared(j.name, e)
            except Exception as e:  # noqa: BLE001 - the connection failed
                log.error("node %s failed while being prepared: %s; dropped", j.name, e)
                return None
        return True

    def close(self) -> None:
        for j in self.nodes:
            if j.client is not None:
                j.client.close()
        self.nodes.clear()

    def lines(self) -> list[str]:
        return [f"  {j.name}: " + ("starting" if j.client is None else "preparing")
                for j in self.nodes]


class JoinHooks:
    """What to call for a node about to join, before any plan names it: `prepare(name,
    client)` returns its pending answers (the node enters the routing once they are in);
    `forget(name)` for one that then did not join, or left. Bound methods of one object
    (a captured step's: kflume/graph/lanes.py), held weakly."""

    def __init__(self) -> None:
        self._pairs: list[tuple[weakref.WeakMethod, weakref.WeakMethod]] = []

    def add(self, prepare: Callable, forget: Callable) -> None:
        self._pairs.append((weakref.WeakMethod(prepare), weakref.WeakMethod(forget)))

    def _live(self, which: int) -> list[Callable]:
        self._pairs = [p for p in self._pairs if p[which]() is not None]
        return [f for p in self._pairs if (f := p[which]()) is not None]

    def prepare(self, name: str, client: NodeClient) -> list[Pending]:
        return [p for prepare in self._live(0) for p in prepare(name, client)]

    def forget(self, name: str) -> None:
        for forget in self._live(1):
            forget(name)


def _unprepared(name: str, e: RemoteError) -> None:
    log.warning("node %s refused to be prepared (it serves, its first steps slower): %s",
                name, e)


def check_geometry(g, name: str, client: NodeClient) -> None:
    """Refuse a node whose KV geometry (said in its handshake) is not the cluster's."""
    info = client.info
    for key, want in (("layers", g.layers), ("kv_heads", g.kv_heads),
                      ("head_dim", g.head_dim), ("dtype", g.dtype)):
        if key in info and info[key] != want:
            raise ValueError(f"node {name} holds {key}={info[key]!r} but this cluster "
                             f"needs {want!r}")
