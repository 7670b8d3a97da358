"""CapturedRemoteAttention: remote attention inside one captured CUDA graph per step.

The graph holds everything that runs on the GPU: gathering each node's query rows and
the step's new k, v into fixed send buffers (kflume/graph/buffers.py), `GraphSignal.post`,
`GraphSignal.wait` and the LSE merge of the replies. The transport runs on the host,
outside the graph: `serve_step()` (kflume/graph/serve.py, from a thread of its own:
`StepServer`) waits for each posted point, has the nodes answer it, and releases it.

Each (node, micro-batch) is one attend stream a step (kflume/weight/stream.py), opened
before the first point is posted. A node of this host that took the step's mailboxes
(kflume/graph/lanes.py) reads each layer's queries from the send buffer once the
layer's post flag (in shared memory) is up, and writes its replies straight into the
reply buffer with a doorbell: the host sends nothing per layer and releases a point once
the doorbells are up. Other nodes get each layer's query as a message and answer into
the same reply buffer.

The step's new k, v are not on any point's critical path: a node needs them only at the
next step, and each layer merges its new token locally. The graph gathers them into a
buffer of every layer, and once a micro-batch's last layer is posted each tail node
gets them in one message. `serve_step` returns once the nodes have acknowledged them, so
the next replay may overwrite the buffer.

Plan / run: `load(plan)` is the host half (not capturable); `start` / `finish` are the
device half (capturable, no host sync, no allocation after the first call).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from ..comm.mailbox import SharedWords
from ..comm.mailbox import supported as mailboxes_supported
from ..kernels import merge_new_token
from ..plan import StepPlan
from ..weight.client import NodeClient, Pending
from ..weight.remote import RemoteAttention
from .buffers import MicroBatch
from .lanes import Lanes
from .serve import Serving
from .signal import GraphSignal

__all__ = ["CapturedRemoteAttention"]

log = logging.getLogger("kflume.graph")


@dataclass(frozen=True, slots=True)
class LayerHandle:
    """What `start` hands `finish`: the signal point and the micro-batch's inputs."""

    point: int
    micro: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class CapturedRemoteAttention:
    """Graph-capturable remote attention over `remote`'s nodes, for a fixed batch.

    Args:
        remote: the RemoteAttention whose clients, geometry and scale are used.
        batch: rows of every step (fixed for the graph).
        num_layers: layers per step.
        row_ranges: the micro-batches' row ranges (default: one range of all rows).
        max_nodes: lanes (nodes a step may use at once).
        dtype: of q, k, v.
    """

    def __init__(self, remote: RemoteAttention, *, batch: int, num_layers: int,
                 row_ranges: list[slice] | None = None, max_nodes: int = 4,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.remote, self.batch, self.num_layers = remote, batch, num_layers
        self.ranges = row_ranges or [slice(0, batch)]
        self.max_nodes, self.dtype = max_nodes, dtype
        dev = self.device = remote.device
        # Between polls the serving loop hands the GIL over. On a GPU host the cores are
        # free: os.sched_yield() (under a microsecond; time.sleep(0) costs ~55 us there,
        # Linux's timer slack); on CPU, where the nodes compute on the same cores, the
        # sleep is what leaves them a core.
        self.yield_ = os.sched_yield if dev.type == "cuda" else (lambda: time.sleep(0))
        m = len(self.ranges)
        # the post flags, in shared memory where nodes of this host read them (mailboxes)
        self._flags = (SharedWords(num_layers * m, cuda=dev.type == "cuda")
                       if mailboxes_supported(dev) else None)
        self.signal = GraphSignal(num_layers * m, dev,
                                  flag=None if self._flags is None else self._flags.tensor)
        self.micro = [MicroBatch.make(r, max_nodes, num_layers, remote.hq, remote.hkv,
                                      remote.d, dtype, dev, self._flags) for r in self.ranges]
        self.mailboxes = [mb.box for mb in self.micro if mb.box is not None]
        self.lanes = Lanes(self, max_nodes)
        self.serving = Serving(self)
        self.epoch = -1
        if self.mailboxes:
            remote.on_join(self.prepare, self.forget)

    @property
    def steps(self) -> int:
        """Steps served so far."""
        return self.serving.steps

    # ---- host half: between steps ------------------------------------------------------
    def load(self, plan: StepPlan) -> None:
        """Point the buffers at `plan` (in place; outside the graph, before its replay)."""
        if len(plan.requests) != self.batch:
            raise ValueError(f"the graph was captured for {self.batch} rows; the plan has "
                             f"{len(plan.requests)}")
        self.lanes.load(plan)
        for mb in self.micro:
            mb.load(plan, self.lanes.names)
        self.epoch = plan.epoch

    def prepare(self, name: str, client: NodeClient) -> list[Pending]:
        """A node about to join (`RemoteAttention.on_join`): kflume/graph/lanes.py."""
        return self.lanes.prepare(name, client)

    def forget(self, name: str) -> None:
        self.lanes.forget(name)

    def delivers(self, name: str) -> bool:
        """Whether node `name` reads queries from and writes replies into the mailboxes."""
        return self.lanes.delivers(name)

    def place(self, lane: int, m: int) -> dict:
        """Lane `lane`'s part of micro-batch m's mailbox, as `open_stream` takes it: its
        rows and doorbells, its first post flag and their stride (layer l's post of
        micro-batch m is flag l * M + m)."""
        n = self.micro[m].size
        return dict(mailbox=(self.micro[m].box, lane * n, lane * self.num_layers),
                    pull=(m, len(self.micro)))

    def capture_ahead(self, client: NodeClient, lane: int, m: int) -> Pending:
        """Have a node capture now the graphs of its streams at (lane, micro-batch m)."""
        r, place = self.remote, self.place(lane, m)
        return client.capture_ahead(range(self.num_layers), self.micro[m].size, r.hq, r.d,
                                    self.dtype, r.scale, **place)

    # ---- device half: inside the graph ---------------------------------------------------
    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rows: slice | None = None) -> LayerHandle:
        """Gather each node's rows into the send buffers and post the point. q
        `[b, Hq, D]`, k, v `[b, Hkv, D]` of micro-batch `rows`."""
        m = self.ranges.index(rows) if rows is not None else 0
        mb = self.micro[m]
        last = layer == self.num_layers - 1
        mb.gather_queries(q)
        if last:  # sent with this point: gathered before the post
            mb.keep_new_tokens(layer, k, v)
            mb.gather_new_tokens()
        point = layer * len(self.micro) + m
        self.signal.post(point)
        if not last:  # not needed before the last layer: off the point's critical path
            mb.keep_new_tokens(layer, k, v)
        return LayerHandle(point, m, q, k, v)

    def finish(self, h: LayerHandle) -> torch.Tensor:
        """Wait for the host's release of the point, then merge the replies with the new
        token's own partial. Returns `[b, Hq, D]` (a buffer reused by the next step)."""
        self.signal.wait(h.point)
        mb = self.micro[h.micro]  # one kernel: replies found by position, merged
        merge_new_token(h.q, h.k, h.v, mb.outs, mb.lses, mb.positions(), self.remote.scale,
                        out=mb.out, lse=mb.out_lse)
        return mb.out

    # ---- host half: during the replay ------------------------------------------------------
    def serve_step(self, timeout: float = 30.0) -> None:
        """Serve every point of one replay (kflume/graph/serve.py)."""
        self.serving.serve(timeout)

    def reset(self) -> None:
        """After `serve_step` raised and the failed replay finished: kflume/graph/serve.py."""
        self.serving.reset()

    def close(self) -> None:
        """Give the mailboxes' shared memory back (the graph must not run again). Nodes
        that join later are not prepared for it any more: close a step you are done with."""
        for box in self.mailboxes:
            box.close()
        self.mailboxes = []
        if self._flags is not None:
            self._flags.close()
            self._flags = None
