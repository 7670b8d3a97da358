"""Cluster: the attention nodes a weight node uses, and the router that places KV on them.

A cluster owns a transport, one `NodeClient` per node, a `TokenRangeRouter`, and (once
the model's attention geometry is known) a `RemoteAttention`. Nodes can join while
requests run: `add_node()` starts or connects a node, which enters the routing table at
the next token boundary (`begin_step`), without stalling the steps in between.

    with Cluster.local(2, layers=32, kv_heads=8, head_dim=128, dtype="bfloat16") as cl:
        ...                               # two `kflume node` processes on loopback (UCX)
    cl = Cluster.in_process(3, ...)       # three AttentionNodes in this process
    cl = Cluster.connect({"a": "10.0.0.5:7000"}, ...)   # nodes started elsewhere
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, replace

from .client import NodeClient
from .comm.base import Transport
from .node import NodeConfig
from .plan import StepPlan
from .remote import RemoteAttention
from .router import FillThenLeastLoaded, PlacementPolicy, TokenRangeRouter

__all__ = ["Cluster"]

log = logging.getLogger("kflume.cluster")


@dataclass(slots=True)
class _Joining:
    name: str
    process: object  # NodeProcess still starting
    capacity: int


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
                cluster._join(name, proc.address, capacity_tokens, proc)
        except BaseException:
            cluster.close()
            raise
        return cluster

    @classmethod
    def in_process(cls, n: int, *, layers: int, kv_heads: int, head_dim: int,
                   dtype: str = "float32", capacity_tokens: int = 1 << 16,
                   device: str = "cpu", page_size: int = 16, **kwargs) -> Cluster:
        """`n` AttentionNodes served in this process (no network; for tests and laptops).
        On CUDA they share this process's GPU, so they capture no graphs while a step runs
        (`NodeConfig.stream_graphs`)."""
        from .comm.inproc import InProcHub, InProcTransport

        geometry = NodeConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              capacity_tokens=capacity_tokens, dtype=dtype, device=device,
                              page_size=page_size, stream_graphs=False)
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
            client = NodeClient.connect(name, cluster.transport, addr, cluster.timeout)
            cap = int(client.info.get("capacity_tokens", 0))
            cluster._admit(name, client, cap)
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

        The node enters the routing table at the next token boundary. With `wait=False`
        a started process joins at the first boundary after it is ready, so running
        steps never wait for it to start. `env`: variables for a started process, over
        the cluster's (e.g. `{"CUDA_VISIBLE_DEVICES": "2,0"}` for a GPU of its own).
        """
        cap = capacity_tokens or self.geometry.capacity_tokens
        if address is not None:
            name = name or next(self._names)
            client = NodeClient.connect(name, self.transport, address, self.timeout)
            self._admit(name, client, int(client.info.get("capacity_tokens", cap)))
            return name
        if self._spawn is None:
            raise ValueError("this cluster cannot start nodes itself: give add_node an address")
        if self._spawn.get("inproc"):
            return self._add_in_process(cap, name)
        name, proc = self._start_process(cap, name, env)
        if wait:
            proc.wait_ready()
            self._join(name, proc.address, cap, proc)
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

    def _add_in_process(self, cap: int, name: str | None) -> str:
        from .node import AttentionNode
        from .server import NodeServer

        name = name or next(self._names)
        node = AttentionNode(replace(self.geometry, capacity_tokens=cap))
        server = NodeServer(node, self.transport, self.transport.listen(name))
        self.transport.hub.add_driver(server.poll)
        self._inproc[name] = (node, server)
        client = NodeClient.connect(name, self.transport, name, self.timeout)
        self._admit(name, client, node.stats()["capacity_tokens"])
        return name

    def _join(self, name: str, address: str, cap: int, proc) -> None:
        client = NodeClient.connect(name, self.transport, address, self.timeout)
        self._admit(name, client, int(client.info.get("capacity_tokens", cap)))

    def _admit(self, name: str, client: NodeClient, cap: int) -> None:
        info, g = client.info, self.geometry
        for key, want in (("layers", g.layers), ("kv_heads", g.kv_heads),
                          ("head_dim", g.head_dim), ("dtype", g.dtype)):
            if key in info and info[key] != want:
                client.close()
                raise ValueError(f"node {name} holds {key}={info[key]!r} but this cluster "
                                 f"needs {want!r}")
        self.clients[name] = client
        page = int(info.get("page_size", g.page_size))
        self.router.add_node(name, max(page, cap), page_size=page)
        log.info("node %s joins with room for %d tokens", name, cap)

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
        the plan to RemoteAttention (frees, migrations)."""
        for j in list(self._joining):
            if j.process.ready():
                self._joining.remove(j)
                self._join(j.name, j.process.address, j.capacity, j.process)
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
        proc = self.processes.pop(name, None)
        if proc is not None:
            proc.stop()
        log.info("node %s left the cluster", name)

    def table(self) -> str:
        """Nodes and their load, then the routing table of the last plan."""
        lines = ["nodes:"]
        for name in self.router.nodes():
            used, free = self.router.node_load(name), self.router.free_tokens(name)
            lines.append(f"  {name}: {used} tokens held, {free} free")
        for j in self._joining:
            lines.append(f"  {j.name}: starting")
        plan = self.router.last_plan
        if plan is not None:
            lines.append(plan.table())
        return "\n".join(lines)

    def close(self) -> None:
        """Disconnect and stop every node this cluster started."""
        for name in list(self.clients):
            self._drop(name)
        for j in self._joining:
            j.process.stop()
        self._joining.clear()
        for proc in self.processes.values():
            proc.stop()
        self.processes.clear()
        self.transport.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
