"""Node providers: how a cluster gets a new attention node.

A `Cluster` asks its provider to start a node (`start(name, config, env)`) and gets a
handle back at once; the node joins once the handle is `ready()` (it listens at
`address`). The providers here:

- `ProcessProvider`: a `kflume node` process on this host (`NodeProcess`), UCX on
  loopback; what `Cluster.local` uses;
- `InProcessProvider`: an `AttentionNode` served in this process on the in-process
  transport; what `Cluster.in_process` uses;
- `CallbackProvider`: any launcher of yours: a function that starts a node somewhere
  (another host, a scheduler, a container) and returns its HOST:PORT, or a handle;
- `RayProvider`: nodes as Ray actors on the GPUs of a Ray cluster (the `ray` extra);
- `WarmPool`: any of these with nodes started ahead, so that a join waits for none.

A handle has `ready() -> bool` (raises if the node failed to start), `address`, `stop()`
and `kill()`; a `NodeProcess` is one. A provider may define `boundary()`, which the
cluster calls at every token boundary, `warm(config)`, which an autoscaler calls with
the config of the nodes it will ask for, and `close()`, which `Cluster.close()` calls.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from .config import NodeConfig

__all__ = ["CallbackProvider", "InProcessProvider", "NodeHandle", "NodeProvider", "PoolStats",
           "ProcessProvider", "RayProvider", "StartedNode", "WarmPool"]

log = logging.getLogger("kflume.cluster")
_POOL_NAMES = (f"warm{i}" for i in itertools.count())


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
        for name, (node, _) in self.nodes.items():
            try:
                node.capture_pending(None)
            except Exception:  # noqa: BLE001 - those shapes stay uncaptured; steps go on
                log.exception("node %s: capturing its graphs failed", name)


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


@dataclass(slots=True)
class PoolStats:
    """What a `WarmPool` handed out: `ready` nodes already listening, `starting` ones
    still on their way (none was ready yet), `cold` starts it could not serve (another
    config or env, or the pool empty), and pool nodes that `failed` to start."""

    ready: int = 0
    starting: int = 0
    cold: int = 0
    failed: int = 0


class WarmPool:
    """`size` nodes of `provider` kept started and listening, so that a join waits for no
    process start: `start()` hands out a ready one at once (none ready: the one started
    first) and starts a replacement, which comes up while the cluster runs.

    The pool's nodes are started with `config` and `env`; a start with another config or
    env is passed on to `provider` (a cold start). Without `config` the pool learns it
    from `warm(config)` (which `Cluster.autoscale` calls) or from its first `start()`.
    An idle node costs what a serving one does (its KV pools' memory; on a GPU, a core
    polling): `close()` stops them, and `Cluster.close()` calls it. A pool node that fails
    to start is logged and replaced after `retry_s`.
    """

    def __init__(self, provider, size: int, config: NodeConfig | None = None,
                 env: dict | None = None, retry_s: float = 5.0) -> None:
        if size < 1:
            raise ValueError(f"a WarmPool keeps at least one node started; got size={size}")
        self.provider, self.size, self.config = provider, size, config
        self.env, self.retry_s = dict(env or {}), retry_s
        self.idle: list = []  # handles, the first started first
        self.stats = PoolStats()
        self._retry_at = 0.0
        self._closed = False
        if config is not None:
            self.fill()

    def warm(self, config: NodeConfig) -> None:
        """Start the pool's nodes with `config`, unless it has one already."""
        self.config = self.config or config
        self.fill()

    def fill(self) -> None:
        """Drop pool nodes that failed, start nodes up to `size`."""
        for h in list(self.idle):
            self._ready(h)
        while (not self._closed and self.config is not None and len(self.idle) < self.size
               and time.monotonic() >= self._retry_at):
            self.idle.append(self.provider.start(next(_POOL_NAMES), self.config, self.env))

    def ready_count(self) -> int:
        """Pool nodes listening now."""
        return sum(self._ready(h) for h in list(self.idle))

    def start(self, name: str, config: NodeConfig, env: dict | None = None):
        self.config = self.config or config
        if config != self.config or dict(env or {}) != self.env or self._closed:
            self.stats.cold += 1
            return self.provider.start(name, config, env)
        ready = [h for h in list(self.idle) if self._ready(h)]
        pick = ready[0] if ready else (self.idle[0] if self.idle else None)
        if pick is None:
            self.stats.cold += 1
            pick = self.provider.start(name, config, env)
        else:
            self.idle.remove(pick)
            if ready:
                self.stats.ready += 1
            else:
                self.stats.starting += 1
        self.fill()
        return pick

    def boundary(self) -> None:
        if hasattr(self.provider, "boundary"):
            self.provider.boundary()
        self.fill()

    def close(self) -> None:
        """Stop the idle nodes; the pool starts no more."""
        self._closed = True
        for h in self.idle:
            h.stop()
        self.idle.clear()
        if hasattr(self.provider, "close"):
            self.provider.close()

    def _ready(self, h) -> bool:
        try:
            return bool(h.ready())
        except Exception as e:  # noqa: BLE001 - the pool goes on without it
            log.error("a warm pool node failed to start: %s; another starts in %.0f s", e,
                      self.retry_s)
            self.idle.remove(h)
            self.stats.failed += 1
            self._retry_at = time.monotonic() + self.retry_s
            try:
                h.stop()
            except Exception:  # noqa: BLE001 - already gone
                pass
            return False



def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("RayProvider needs Ray: pip install 'kflume[ray]'") from None
    return ray


class RayProvider:
    """Attention nodes as Ray actors: each actor takes `num_gpus` GPUs (and `num_cpus`
    CPUs) of a Ray cluster, starts a `kflume node` process on its host (on the GPU Ray
    gave it: device "cuda" when `num_gpus` > 0, else the config's), and reports the
    address the node listens on (the host's IP, a free port). The node stops with its
    actor. kflume must be importable on the Ray workers.

    Args:
        token: the cluster token (the weight node's transport must present it).
        num_gpus, num_cpus: resources each actor asks for.
        env: variables for the node processes (over the actor's environment).
        address: a Ray cluster to join (`ray.init(address)`) if Ray is not initialised
            yet (None: a local instance, or $RAY_ADDRESS).
        actor_options: more `.options()` for the actors (e.g. a placement group or
            `resources`).
        timeout: seconds for an actor to be placed and its node to listen.
    """

    def __init__(self, token: str, *, num_gpus: float = 1, num_cpus: float = 1,
                 env: dict | None = None, address: str | None = None,
                 actor_options: dict | None = None, timeout: float = 300.0) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address)
        self.token, self.num_gpus, self.num_cpus = token, num_gpus, num_cpus
        self.env, self.timeout = dict(env or {}), timeout
        self.options = {"num_gpus": num_gpus, "num_cpus": num_cpus, "max_restarts": 0,
                        **(actor_options or {})}
        self._actor = ray.remote(_NodeActor)

    def start(self, name: str, config: NodeConfig, env: dict | None = None) -> RayNode:
        if self.num_gpus:
            config = replace(config, device="cuda")  # the GPU Ray gave the actor
        actor = self._actor.options(**self.options).remote(
            config, self.token, {**self.env, **(env or {})}, self.timeout)
        return RayNode(name, actor, actor.address.remote(), self.timeout, self.options)


class RayNode:
    """A handle (`NodeHandle`) on a node that a Ray actor runs."""

    def __init__(self, name: str, actor, address_ref, timeout: float, options: dict) -> None:
        self.name, self.actor, self.timeout = name, actor, timeout
        self.address: str | None = None
        self._ref, self._options = address_ref, options
        self._started = time.monotonic()

    def ready(self) -> bool:
        if self.address is not None:
            return True
        ray = _ray()
        done, _ = ray.wait([self._ref], timeout=0)
        if not done:
            if time.monotonic() - self._started > self.timeout:
                self.kill()
                raise RuntimeError(
                    f"node {self.name}: its Ray actor did not report a listening node within "
                    f"{self.timeout:.0f} s; does the Ray cluster have a worker with "
                    f"num_gpus={self._options['num_gpus']}, num_cpus={self._options['num_cpus']} "
                    "free?")
            return False
        try:
            self.address = ray.get(self._ref)
        except Exception as e:
            self.kill()
            raise RuntimeError(f"node {self.name}: its Ray actor failed to start it: {e}") from e
        return True

    def wait_ready(self) -> str:
        while not self.ready():
            time.sleep(0.05)
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the node (a clean shutdown), then its actor."""
        ray = _ray()
        try:
            ray.get(self.actor.stop.remote(), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - the actor is killed below either way
            log.warning("node %s: its Ray actor did not stop it cleanly: %s", self.name, e)
        ray.kill(self.actor, no_restart=True)

    def kill(self) -> None:
        """Kill the actor (its node process dies with it), as a crash would."""
        _ray().kill(self.actor, no_restart=True)


class _NodeActor:
    """Runs in a Ray worker: one `kflume node` process on this host, stopped with the
    actor (the process dies with its parent)."""

    def __init__(self, config: NodeConfig, token: str, env: dict, timeout: float) -> None:
        import ray

        from .node.process import NodeProcess

        self.host = ray.util.get_node_ip_address()
        self.proc = NodeProcess(config, listen="0.0.0.0:0", token=token, env=env,
                                timeout=timeout, wait=False)

    def address(self) -> str:
        port = self.proc.wait_ready().rpartition(":")[2]
        return f"{self.host}:{port}"

    def stop(self) -> int:
        return self.proc.stop()
