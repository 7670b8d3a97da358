"""Cluster: the attention nodes a weight node uses, and the router that places KV on them.

A cluster owns a transport, one `NodeClient` per node, a `TokenRangeRouter`, and (once
the model's attention geometry is known) a `RemoteAttention`. Nodes can join while
requests run: `add_node()` starts or connects a node, which enters the routing table at
a token boundary (`begin_step`) once it is ready and prepared for the captured steps
that use the cluster (`RemoteAttention.on_join`), without stalling the steps in between.

    with Cluster.local(2, layers=32, kv_heads=8, head_dim=128, dtype="bfloat16") as cl:
        ...                               # two `kflume node` processes on loopback (UCX)
    cl = Cluster.in_process(3, ...)       # three AttentionNodes in this process
    cl = Cluster.connect({"a": "10.0.0.5:7000"}, ...)   # nodes started elsewhere
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field, replace

from .client import NodeClient
from .comm.base import RemoteError, Transport
from .node import NodeConfig
from .plan import StepPlan
from .remote import RemoteAttention
from .router import FillThenLeastLoaded, PlacementPolicy, TokenRangeRouter

__all__ = ["Cluster"]

log = logging.getLogger("kflume.cluster")


@dataclass(slots=True)
class _Joining:
    name: str
    process: object  # NodeProcess still starting (None: connected, being prepared)
    capacity: int
    client: NodeClient | None = None  # once connected
    prepared: list = field(default_factory=list)  # the node's pending answers
    deadline: float = 0.0  # for those answers (time.monotonic())


class Cluster:
    """Attention nodes + routing for one weight node.

    Args:
        transport: how to reach the nodes.
        geometry: the KV geometry every node must hold (NodeConfig; capacity and device
            are per node and ignored here).
        policy: where tokens go (default: fill ranges of `range_tokens`, then the
            least-loaded node).
        timeout: deadline in seconds for every reply.
    """

    def __init__(self, transport: Transport, geometry: NodeConfig, *,
                 policy: PlacementPolicy | None = None, range_tokens: int = 4096,
                 timeout: float = 30.0, spawn: dict | None = None) -> None:
        self.transport, self.geometry, self.timeout = transport, geometry, timeout
        self.router = TokenRangeRouter(policy or FillThenLeastLoaded(range_tokens=range_tokens))
        self.clients: dict[str, NodeClient] = {}
        self.processes: dict[str, object] = {}
        self._joining: list[_Joining] = []
        self._spawn = spawn  # how add_node() starts a node process (Cluster.local)
        self._names = (f"node{i}" for i in itertools.count())
        self._inproc: dict[str, tuple] = {}
        self.remote: RemoteAttention | None = None

    # ---- constructors -----------------------------------------------------------------
    @classmethod
    def local(cls, n: int, *, layers: int, kv_heads: int, head_dim: int,
              dtype: str = "float32", capacity_tokens: int = 1 << 16, device: str = "cpu",
              page_size: int = 16, token: str | None = None, env: dict | None = None,
              q_heads: int | None = None, graphs: bool = True, stream_graphs: bool = True,
              **kwargs) -> Cluster:
        """Start `n` attention nodes as `kflume node` processes on loopback, over UCX.
        `graphs=False`: CUDA nodes launch their kernels per message (NodeConfig.graphs);
        `stream_graphs=False`: for nodes on the GPU of this process's captured step
        (NodeConfig.stream_graphs).

        They stop with `close()`, at the end of a `with` block, at interpreter exit, on
        Ctrl-C, and when this process dies.
        """
        import secrets

        from .comm.ucx import UcxTransport

        token = token or secrets.token_hex(16)
        env = dict(env or {})
        # Node processes share this host: without a cap, each one's torch thread pool
        # (and its spin-waiting) takes every core from the others and from the weight node.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (n + 1))))
        geometry = NodeConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              capacity_tokens=capacity_tokens, dtype=dtype, device=device,
                              page_size=page_size, q_heads=q_heads, graphs=graphs,
                              stream_graphs=stream_graphs)
        cluster = cls(UcxTransport(token=token), geometry,
                      spawn={"token": token, "env": env}, **kwargs)
        try:
            starting = [cluster._start_process(capacity_tokens) for _ in range(n)]
            for name, proc in starting:
                proc.wait_ready()
                cluster._connect(name, proc.address, capacity_tokens, proc, wait=True)
        except BaseException:
            cluster.close()
            raise
        return cluster

    @classmethod
    def in_process(cls, n: int, *, layers: int, kv_heads: int, head_dim: int,
                   dtype: str = "float32", capacity_tokens: int = 1 << 16,
                   device: str = "cpu", page_size: int = 16, **kwargs) -> Cluster:
        """`n` AttentionNodes served in this process (no network; for tests and laptops).
        On CUDA they share this process's GPU, so they capture no graphs while a step runs:
        `begin_step()` captures what they served uncaptured
        (`NodeConfig.capture_while_serving`); one graph per batch shape
        (`NodeConfig.stream_graphs`)."""
        from .comm.inproc import InProcHub, InProcTransport

        geometry = NodeConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              capacity_tokens=capacity_tokens, dtype=dtype, device=device,
                              page_size=page_size, stream_graphs=False,
                              capture_while_serving=False)
        cluster = cls(InProcTransport(InProcHub()), geometry, spawn={"inproc": True}, **kwargs)
        for _ in range(n):
            cluster.add_node(capacity_tokens)
        return cluster

    @classmethod
    def connect(cls, addresses: dict[str, str], *, layers: int, kv_heads: int, head_dim: int,
                dtype: str = "float32", token: str | None = None, **kwargs) -> Cluster:
        """Nodes started elsewhere (`kflume node`), by name -> HOST:PORT."""
        from .comm.ucx import UcxTransport

        geometry = NodeConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              capacity_tokens=1, dtype=dtype)
        cluster = cls(UcxTransport(token=token), geometry, **kwargs)
        for name, addr in addresses.items():
            cluster._connect(name, addr, 0, None, wait=True)
        return cluster

    @classmethod
    def for_model(cls, n: int, model, *, kind: str = "local", **kwargs) -> Cluster:
        """A cluster whose KV geometry matches a Hugging Face model (or its config):
        `kind` is "local" (node processes over UCX) or "in_process"."""
        config = getattr(model, "config", model)
        cfg = config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if "dtype" not in kwargs:
            params = getattr(model, "parameters", None)
            dtype = next(params()).dtype if params else getattr(cfg, "dtype", None)
            kwargs["dtype"] = str(dtype or "float32").replace("torch.", "")
        if kind == "local":
            kwargs.setdefault("q_heads", cfg.num_attention_heads)
        build = {"local": cls.local, "in_process": cls.in_process}[kind]
        return build(n, layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim,
                     **kwargs)

    # ---- membership ----------------------------------------------------------------------
    def add_node(self, capacity_tokens: int | None = None, *, address: str | None = None,
                 name: str | None = None, wait: bool = True, env: dict | None = None) -> str:
        """Add a node: connect to `address`, or start one (local / in-process clusters).

        The node enters the routing table at a token boundary once it is ready: started,
        connected, and prepared for the captured steps that use this cluster (their
        graphs captured on the node: `RemoteAttention.on_join`), so that its first steps
        run as fast as the rest. With `wait=False` that happens at the first boundary
        after, so running steps never wait for it; `wait=True` returns once it is ready.
        `env`: variables for a started process, over the cluster's (e.g.
        `{"CUDA_VISIBLE_DEVICES": "2,0"}` for a GPU of its own).
        """
        cap = capacity_tokens or self.geometry.capacity_tokens
        if address is not None:
            name = name or next(self._names)
            self._connect(name, address, cap, None, wait)
            return name
        if self._spawn is None:
            raise ValueError("this cluster cannot start nodes itself: give add_node an address")
        if self._spawn.get("inproc"):
            return self._add_in_process(cap, name)
        name, proc = self._start_process(cap, name, env)
        if wait:
            proc.wait_ready()
            self._connect(name, proc.address, cap, proc, wait=True)
        else:
            self._joining.append(_Joining(name, proc, cap))
        return name

    def remove_node(self, name: str) -> None:
        """Move the node's ranges to the others at the next boundary, then stop it."""
        if name not in self.clients:
            raise KeyError(f"no node {name!r} in this cluster")
        self.router.remove_node(name)

    def _start_process(self, cap: int, name: str | None = None, env: dict | None = None):
        from .launch import NodeProcess

        name = name or next(self._names)
        config = replace(self.geometry, capacity_tokens=cap)
        proc = NodeProcess(config, token=self._spawn["token"],
                           env={**(self._spawn["env"] or {}), **(env or {})}, wait=False)
        self.processes[name] = proc
        return name, proc

    def _connect(self, name: str, address: str, cap: int, proc, wait: bool) -> None:
        """Connect to a ready node, check it, have it prepared; admit it now (`wait`, or
        nothing to prepare) or at the first boundary after its answers (`begin_step`).
        Raises (having closed the connection) if it cannot be connected or prepared."""
        client = NodeClient.connect(name, self.transport, address, self.timeout)
        try:
            self._check(name, client)
            cap = int(client.info.get("capacity_tokens", cap))
            j = _Joining(name, proc, cap, client, deadline=time.monotonic() + self.timeout)
            if self.remote is not None:
                j.prepared = self.remote.prepare_node(name, client)
            if wait:
                for p in j.prepared:
                    try:
                        p.result(self.timeout)
                    except RemoteError as e:
                        self._unprepared(name, e)
                j.prepared = []
        except BaseException:
            client.close()
            raise
        if j.prepared:
            self._joining.append(j)
        else:
            self._admit(j)

    def _prepared(self, j: _Joining) -> bool | None:
        """Whether a node being prepared may enter the routing (True: it answered, or
        refused), waits (False), or must be dropped (None: its connection failed, or no
        answer in time)."""
        self.transport.progress(0.0)  # (answers complete only as the transport is driven)
        if not j.client.conn.alive:
            log.error("node %s went away while being prepared: dropped", j.name)
            return None
        if not all(p.done for p in j.prepared):
            if time.monotonic() < j.deadline:
                return False
            log.error("node %s did not answer its preparation in %.0f s: dropped", j.name,
                      self.timeout)
            return None
        for p in j.prepared:
            try:
                p.result(0)
            except RemoteError as e:
                self._unprepared(j.name, e)
            except Exception as e:  # noqa: BLE001 - the connection failed
                log.error("node %s failed while being prepared: %s; dropped", j.name, e)
                return None
        return True

    @staticmethod
    def _unprepared(name: str, e: RemoteError) -> None:
        log.warning("node %s refused to be prepared (it serves, its first steps slower): %s",
                    name, e)

    def _add_in_process(self, cap: int, name: str | None) -> str:
        from .node import AttentionNode
        from .server import NodeServer

        name = name or next(self._names)
        node = AttentionNode(replace(self.geometry, capacity_tokens=cap))
        server = NodeServer(node, self.transport, self.transport.listen(name))
        self.transport.hub.add_driver(server.poll)
        self._inproc[name] = (node, server)
        self._connect(name, name, node.stats()["capacity_tokens"], None, wait=True)
        return name

    def _check(self, name: str, client: NodeClient) -> None:
        info, g = client.info, self.geometry
        for key, want in (("layers", g.layers), ("kv_heads", g.kv_heads),
                          ("head_dim", g.head_dim), ("dtype", g.dtype)):
            if key in info and info[key] != want:
                client.close()
                raise ValueError(f"node {name} holds {key}={info[key]!r} but this cluster "
                                 f"needs {want!r}")

    def _forget(self, name: str) -> None:
        """A node that did not join, or left: its process stopped, captured steps told."""
        proc = self.processes.pop(name, None)
        if proc is not None:
            proc.stop()
        self._inproc.pop(name, None)
        if self.remote is not None:
            self.remote.forget_node(name)

    def _admit(self, j: _Joining) -> None:
        self.clients[j.name] = j.client
        page = int(j.client.info.get("page_size", self.geometry.page_size))
        self.router.add_node(j.name, max(page, j.capacity), page_size=page)
        log.info("node %s joins with room for %d tokens", j.name, j.capacity)

    # ---- steps ------------------------------------------------------------------------------
    def attention(self, *, num_q_heads: int, scale: float | None = None, device="cpu",
                  max_batch: int = 256) -> RemoteAttention:
        """The RemoteAttention of this cluster (made on first call)."""
        if self.remote is None:
            self.remote = RemoteAttention(
                self.clients, num_q_heads=num_q_heads, num_kv_heads=self.geometry.kv_heads,
                head_dim=self.geometry.head_dim, scale=scale, device=device,
                max_batch=max_batch, timeout=self.timeout)
        return self.remote

    def begin_step(self) -> StepPlan:
        """A token boundary: admit nodes that became ready, apply routing edits, and hand
        the plan to RemoteAttention (frees, migrations). In-process nodes capture here
        the graphs of the batch shapes they served uncaptured (no step of this process
        waits on them now)."""
        for name, (node, _) in self._inproc.items():
            try:
                node.capture_pending(None)
            except Exception:  # noqa: BLE001 - those shapes stay uncaptured; steps go on
                log.exception("node %s: capturing its graphs failed", name)
        for j in list(self._joining):
            if j.client is None:  # starting
                try:
                    if j.process.ready():
                        self._joining.remove(j)
                        self._connect(j.name, j.process.address, j.capacity, j.process,
                                      wait=False)
                except Exception as e:  # noqa: BLE001 - the steps go on without it
                    log.error("node %s could not join: %s; stopped", j.name, e)
                    if j in self._joining:
                        self._joining.remove(j)
                    self._forget(j.name)
                continue
            ready = self._prepared(j)
            if ready is not None and not ready:
                continue
            self._joining.remove(j)
            if ready:
                self._admit(j)
            else:
                j.client.close()
                self._forget(j.name)
        plan = self.router.begin_step()
        if self.remote is not None:
            self.remote.begin_step(plan)
        for name in plan.removed_nodes:
            self._drop(name)
        return plan

    def _drop(self, name: str) -> None:
        client = self.clients.pop(name, None)
        if client is not None:
            client.close()
        self._forget(name)
        log.info("node %s left the cluster", name)

    def table(self) -> str:
        """Nodes and their load, then the routing table of the last plan."""
        lines = ["nodes:"]
        for name in self.router.nodes():
            used, free = self.router.node_load(name), self.router.free_tokens(name)
            lines.append(f"  {name}: {used} tokens held, {free} free")
        for j in self._joining:
            lines.append(f"  {j.name}: " + ("starting" if j.client is None else "preparing"))
        plan = self.router.last_plan
        if plan is not None:
            lines.append(plan.table())
        return "\n".join(lines)

    def close(self) -> None:
        """Disconnect and stop every node this cluster started."""
        for name in list(self.clients):
            self._drop(name)
        for j in self._joining:
            if j.client is not None:
                j.client.close()
        self._joining.clear()
        for proc in self.processes.values():
            proc.stop()
        self.processes.clear()
        self.transport.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
