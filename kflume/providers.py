"""Node providers: how a cluster gets a new attention node.

A `Cluster` asks its provider to start a node (`start(name, config, env)`) and gets a
handle back at once; the node joins once the handle is `ready()` (it listens at
`address`). The providers here:

- `ProcessProvider`: a `kflume node` process on this host (`NodeProcess`), UCX on
  loopback; what `Cluster.local` uses;
- `InProcessProvider`: an `AttentionNode` served in this process on the in-process
  transport; what `Cluster.in_process` uses;
- `CallbackProvider`: any launcher of yours: a function that starts a node somewhere
  (another host, a scheduler, a container) and returns its HOST:PORT, or a handle.

A handle has `ready() -> bool` (raises if the node failed to start), `address`, `stop()`
and `kill()`; a `NodeProcess` is one. A provider may define `boundary()`, which the
cluster calls at every token boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from .config import NodeConfig

__all__ = ["CallbackProvider", "InProcessProvider", "NodeHandle", "NodeProvider",
           "ProcessProvider", "StartedNode"]


class NodeHandle(Protocol):
    address: str | None

    def ready(self) -> bool: ...

    def stop(self) -> object: ...

    def kill(self) -> None: ...


class NodeProvider(Protocol):
    def start(self, name: str, config: NodeConfig, env: dict | None = None) -> NodeHandle:
        """Start node `name` with `config` (non-blocking); its handle."""
        ...


@dataclass(slots=True)
class StartedNode:
    """A handle for a node started elsewhere: ready as soon as its address is known."""

    address: str | None
    on_stop: Callable[[], object] | None = None

    def ready(self) -> bool:
        return self.address is not None

    def wait_ready(self) -> str:
        return self.address

    def stop(self) -> object:
        if self.on_stop is not None:
            stop, self.on_stop = self.on_stop, None
            return stop()
        return None

    kill = stop


@dataclass(slots=True)
class ProcessProvider:
    """`kflume node` processes on this host, with the cluster token and `env` (e.g.
    `OMP_NUM_THREADS`, `CUDA_VISIBLE_DEVICES`)."""

    token: str
    env: dict = field(default_factory=dict)

    def start(self, name: str, config: NodeConfig, env: dict | None = None):
        from .node.process import NodeProcess

        return NodeProcess(config, token=self.token, env={**self.env, **(env or {})},
                           wait=False)


class InProcessProvider:
    """AttentionNodes served in this process, on `transport` (an `InProcTransport`).
    They share this process's GPU with a captured step that waits on the thread serving
    them, so they capture no graph while serving: `boundary()` captures what they served
    uncaptured."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self.nodes: dict[str, tuple] = {}  # name -> (AttentionNode, NodeServer)

    def start(self, name: str, config: NodeConfig, env: dict | None = None) -> StartedNode:
        from .node import AttentionNode, NodeServer

        node = AttentionNode(replace(config, capture_while_serving=False))
        server = NodeServer(node, self.transport, self.transport.listen(name))
        self.transport.hub.add_driver(server.poll)
        self.nodes[name] = (node, server)
        return StartedNode(name, lambda: self._stop(name))

    def _stop(self, name: str) -> None:
        entry = self.nodes.pop(name, None)
        if entry is not None:
            self.transport.hub.remove_driver(entry[1].poll)
            entry[1].close()

    def boundary(self) -> None:
        import logging

        for name, (node, _) in self.nodes.items():
            try:
                node.capture_pending(None)
            except Exception:  # noqa: BLE001 - those shapes stay uncaptured; steps go on
                logging.getLogger("kflume.cluster").exception(
                    "node %s: capturing its graphs failed", name)


class CallbackProvider:
    """Nodes started by `start(name, config, env)`, a function of yours that returns
    the node's HOST:PORT once it listens, or a handle (`NodeHandle`) at once."""

    def __init__(self, start: Callable[[str, NodeConfig, dict | None], object]) -> None:
        self._start = start

    def start(self, name: str, config: NodeConfig, env: dict | None = None):
        got = self._start(name, config, env)
        if isinstance(got, str):
            return StartedNode(got)
        if not hasattr(got, "ready"):
            raise TypeError(f"a node provider's start() must return HOST:PORT or a handle with "
                            f"ready(), address and stop(); got {type(got).__name__}")
        return got
