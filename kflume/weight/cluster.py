"""Cluster: the attention nodes a weight node uses, and the router that places KV on them.

A cluster owns a transport, one `NodeClient` per node (`clients`), the
`TokenRangeRouter` (`router`) and, once the model's query heads are known, a
`RemoteAttention` (`remote`). Nodes join while requests run: `add_node()` starts or
connects a node, which enters the routing table at a token boundary (`begin_step`) once
it is ready (kflume/weight/joining.py), without stalling the steps in between.

    with Cluster.local(2, layers=32, kv_heads=8, head_dim=128, dtype="bfloat16") as cl:
        ...                               # two `kflume node` processes on loopback (UCX)
    cl = Cluster.in_process(3, ...)       # three AttentionNodes in this process
    cl = Cluster.connect({"a": "10.0.0.5:7000"}, ...)   # nodes started elsewhere
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings

from ..config import NodeConfig
from ..plan import StepPlan
from ..router import FillThenLeastLoaded, PlacementPolicy, TokenRangeRouter
from .client import NodeClient
from .joining import Joining
from .parking import Parking
from .recovery import Recovery, RequestsLost
from .remote import RemoteAttention

__all__ = ["Cluster"]

log = logging.getLogger("kflume.cluster")


def _no_modes(kwargs: dict) -> None:
    for name in ("graphs", "stream_graphs"):
        if kwargs.pop(name, None) is not None:
            warnings.warn(f"Cluster(..., {name}=) has no effect: CUDA nodes always replay "
                          "their attention as captured graphs", DeprecationWarning, stacklevel=3)


class Cluster:
    """Attention nodes + routing for one weight node.

    Args:
        transport: how to reach the nodes.
        geometry: the KV geometry every node must hold (capacity and device are per node;
            `q_heads`, if given, lets `remote` be made without `attention()`).
        provider: how `add_node()` starts a node (kflume/providers.py; None: by address).
        policy: where tokens go (default: ranges of `range_tokens`, least-loaded node).
        timeout: deadline in seconds for every reply.
        replicas: copies of each token, 1 or 2 (2: a lost node costs no recompute).
    """

    def __init__(self, transport, geometry: NodeConfig, *, provider=None,
                 policy: PlacementPolicy | None = None, range_tokens: int = 4096,
                 timeout: float = 30.0, replicas: int = 1) -> None:
        self.transport, self.geometry, self.timeout = transport, geometry, timeout
        self.router = TokenRangeRouter(policy or FillThenLeastLoaded(range_tokens), replicas)
        self.clients: dict[str, NodeClient] = {}
        self.processes: dict[str, object] = {}  # handles of the nodes it started
        self.provider = provider
        self.joining = Joining(self)
        self.recovery = Recovery(self)
        self.parking = Parking(self.router)  # requests parked between turns, their TTLs
        self._names = (f"node{i}" for i in itertools.count())
        self._remote: RemoteAttention | None = None
        self.autoscaler = None  # an Autoscaler once autoscale() attached one

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def local(cls, n: int, *, layers: int, kv_heads: int, head_dim: int,
              dtype: str = "float32", capacity_tokens: int = 1 << 16, device: str = "cpu",
              page_size: int = 16, token: str | None = None, env: dict | None = None,
              q_heads: int | None = None, **kwargs) -> Cluster:
        """Start `n` attention nodes as `kflume node` processes on loopback, over UCX; they
        stop with `close()`, a `with` block's end, interpreter exit, Ctrl-C, or this process."""
        import secrets

        from ..comm.ucx import UcxTransport
        from ..providers import ProcessProvider

        _no_modes(kwargs)
        token = token or secrets.token_hex(16)
        # Node processes share this host: without a cap, each one's torch thread pool
        # (and its spin-waiting) takes every core from the others and the weight node.
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (n + 1))), **(env or {})}
        geometry = NodeConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              capacity_tokens=capacity_tokens, dtype=dtype, device=device,
                              page_size=page_size, q_heads=q_heads)
        cluster = cls(UcxTransport(token=token), geometry,
                      provider=ProcessProvider(token, env), **kwargs)
        try:
            for j in [cluster.joining.start(next(cluster._names), capacity_tokens, None)
                      for _ in range(n)]:  # all started, then each waited for
                cluster.joining.wait_ready(j)
        except BaseException:
            cluster.close()
            raise
        return cluster

    @classmethod
    def in_process(cls, n: int, *, layers: int, kv_heads: int, head_dim: int,
                   dtype: str = "float32", capacity_tokens: int = 1 << 16,
                   device: str = "cpu", page_size: int = 16, q_heads: int | None = None,
                   **kwargs) -> Cluster:
        """`n` AttentionNodes served in this process (no network; tests and laptops). On
        CUDA they capture no graph while a step runs: `begin_step()` captures them."""
        from ..comm.inproc import InProcHub, InProcTransport
        from ..providers import InProcessProvider

        _no_modes(kwargs)
        geometry = NodeConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              capacity_tokens=capacity_tokens, dtype=dtype, device=device,
                              page_size=page_size, q_heads=q_heads)
        transport = InProcTransport(InProcHub())
        cluster = cls(transport, geometry, provider=InProcessProvider(transport), **kwargs)
        for _ in range(n):
            cluster.add_node(capacity_tokens)
        return cluster

    @classmethod
    def connect(cls, addresses: dict[str, str], *, layers: int, kv_heads: int, head_dim: int,
                dtype: str = "float32", token: str | None = None, q_heads: int | None = None,
                **kwargs) -> Cluster:
        """Nodes started elsewhere (`kflume node`), by name -> HOST:PORT."""
        from ..comm.ucx import UcxTransport

        geometry = NodeConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              capacity_tokens=1, dtype=dtype, q_heads=q_heads)
        cluster = cls(UcxTransport(token=token), geometry, **kwargs)
        try:
            for name, addr in addresses.items():
                cluster.joining.connect(name, addr, 0, None, wait=True)
        except BaseException:
            cluster.close()
            raise
        return cluster

    @classmethod
    def for_model(cls, n: int, model, *, kind: str = "local", **kwargs) -> Cluster:
        """A cluster whose KV geometry matches a Hugging Face model (or its config):
        `kind` is "local" (node processes over UCX) or "in_process"."""
        build = {"local": cls.local, "in_process": cls.in_process}.get(kind)
        if build is None:
            raise ValueError(f"kind must be 'local' or 'in_process'; got {kind!r}")
        return build(n, **_model_geometry(model, kwargs))

    # ---- membership ---------------------------------------------------------------------
    def add_node(self, capacity_tokens: int | None = None, *, address: str | None = None,
                 name: str | None = None, wait: bool = True, env: dict | None = None) -> str:
        """Add a node: connect to `address`, or start one (local / in-process clusters).

        The node enters the routing table at a token boundary once it is ready: started,
        connected, and prepared for the captured steps that use this cluster, so that its
        first steps run as fast as the rest. With `wait=False` that happens at the first
        boundary after, so running steps never wait for it; `wait=True` returns once it is
        ready. `env`: variables for a started process, over the cluster's (e.g.
        `{"CUDA_VISIBLE_DEVICES": "2,0"}`). Returns its name."""
        cap = capacity_tokens or self.geometry.capacity_tokens
        name = name or next(self._names)
        if name in self.clients or name in self.processes:
            raise ValueError(f"a node named {name!r} is already in this cluster")
        if address is not None:
            self.joining.connect(name, address, cap, None, wait)
            return name
        if self.provider is None:
            raise ValueError("this cluster has no node provider: give add_node an address")
        j = self.joining.start(name, cap, env)
        if wait:
            self.joining.wait_ready(j)
        else:
            self.joining.nodes.append(j)
        return name

    def remove_node(self, name: str) -> None:
        """Move the node's ranges to the others at the next boundary, then stop it."""
        if name not in self.clients:
            raise KeyError(f"no node {name!r} in this cluster")
        self.router.remove_node(name)

    def autoscale(self, policy, provider=None, **options):
        """Let `policy` (kflume.scale) add and drain nodes at token boundaries; `provider` (e.g.
        a `WarmPool`) becomes the cluster's. Returns the `Autoscaler` (`options`: its own)."""
        from .autoscale import Autoscaler

        self.provider = provider or self.provider
        self.autoscaler = Autoscaler(self, policy, **options)
        return self.autoscaler

    def forget(self, name: str, *, kill: bool = False) -> None:
        """A node that did not join, left, or was lost (`kill`: it may hang): stopped."""
        if (proc := self.processes.pop(name, None)) is not None:
            proc.kill() if kill else proc.stop()
        if self._remote is not None:
            self._remote.forget_node(name)

    # ---- steps --------------------------------------------------------------------------
    @property
    def remote(self) -> RemoteAttention:
        """The cluster's RemoteAttention (made on first use from the geometry's q_heads;
        `attention()` makes it with other settings)."""
        if self._remote is None and self.geometry.q_heads is None:
            raise ValueError("the cluster does not know the model's query heads: build it "
                             "with q_heads=..., or call cluster.attention(num_q_heads=...)")
        return self._remote or self.attention(num_q_heads=self.geometry.q_heads)

    def attention(self, *, num_q_heads: int, scale: float | None = None, device="cpu",
                  max_batch: int = 256) -> RemoteAttention:
        """The RemoteAttention of this cluster (made on the first call)."""
        if self._remote is None:
            self._remote = RemoteAttention(
                self.clients, num_q_heads=num_q_heads, num_kv_heads=self.geometry.kv_heads,
                head_dim=self.geometry.head_dim, scale=scale, device=device,
                max_batch=max_batch, timeout=self.timeout, num_layers=self.geometry.layers)
            self._remote.on_loss = self.recovery.recover
            if self.router.last_plan is not None:
                self._remote.begin_step(self.router.last_plan)
        return self._remote

    def begin_step(self) -> StepPlan:
        """A token boundary: admit nodes that became ready, lose those whose link broke,
        free parked requests past their time to live (parking.py), apply routing edits,
        carry out the plan's frees, truncations and migrations (boundary.py), hand the
        plan to RemoteAttention, recompute what lost nodes held, and call the autoscaler.
        The provider's `boundary()` runs first. Raises `RequestsLost` (the boundary done)
        if some requests could not be restored."""
        if hasattr(self.provider, "boundary"):
            self.provider.boundary()
        self.joining.advance()
        self.recovery.check()
        self.parking.expire()
        plan = self.router.begin_step()
        plan = self.recovery.carry_out(plan)  # (nodes lost on the way: restores added)
        if self._remote is not None:
            self._remote.begin_step(plan)
        for name in plan.removed_nodes:
            self._drop(name)
        self.recovery.restore(plan)
        if self.autoscaler is not None:
            self.autoscaler.boundary(plan)
        if plan.dropped:
            raise RequestsLost(plan.dropped, plan.lost_nodes)
        return plan

    @property
    def recompute(self):
        """`fn(restore)`, which recomputes a lost span (kflume/weight/recovery.py)."""
        return self.recovery.recompute

    @recompute.setter
    def recompute(self, fn) -> None:
        self.recovery.recompute = fn

    def lose_node(self, name: str) -> None:
        """Treat node `name` as lost: its KV is restored on the others (next boundary)."""
        self.recovery.lose(name, "lost on request")

    def end_step(self, wait: bool = False) -> None:
        """Check the nodes' acknowledgements of the last step's appends (`wait=True`:
        wait for all); raise any refusal."""
        if self._remote is not None:
            self._remote.end_step(wait)

    def _drop(self, name: str) -> None:
        if (client := self.clients.pop(name, None)) is not None:
            client.close()
        self.forget(name)
        log.info("node %s left the cluster", name)

    def table(self) -> str:
        """Nodes and their load, then the routing table of the last plan."""
        return _table(self)

    def close(self) -> None:
        """Disconnect and stop every node this cluster started."""
        for name in list(self.clients):
            self._drop(name)
        self.joining.close()
        for proc in self.processes.values():
            proc.stop()
        self.processes.clear()
        if hasattr(self.provider, "close"):  # e.g. a WarmPool's idle nodes
            self.provider.close()
        self.transport.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _table(c: Cluster) -> str:
    lines = ["nodes:"]
    for name in c.router.nodes():
        used, free = c.router.node_load(name), c.router.free_tokens(name)
        lines.append(f"  {name}: {used} tokens held, {free} free")
    lines += c.joining.lines()
    plan = c.router.last_plan
    if plan is not None:
        lines.append(plan.table())
    return "\n".join(lines)


def _model_geometry(model, kwargs: dict) -> dict:
    """`kwargs` with the layers, kv_heads, head_dim, q_heads and dtype of a Hugging Face
    model (or its config) where they are not given."""
    config = getattr(model, "config", model)
    cfg = config.get_text_config(decoder=True)
    if not getattr(cfg, "num_attention_heads", None):
        raise ValueError(f"{getattr(cfg, 'model_type', type(model).__name__)} has no attention "
                         "heads in its config: kflume serves attention layers")
    if "dtype" not in kwargs:
        params = getattr(model, "parameters", None)
        dtype = next(params()).dtype if params else getattr(model, "dtype", None)
        kwargs = {**kwargs, "dtype": str(dtype or "float32").replace("torch.", "")}
    return {"q_heads": cfg.num_attention_heads, **kwargs, "layers": cfg.num_hidden_layers,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "head_dim": getattr(cfg, "head_dim", None)
            or cfg.hidden_size // cfg.num_attention_heads}
