"""Materialising a StepPlan as tensors in fixed-size buffers.

The router (kflume/router.py) is plain Python; this is where its plan becomes tensors.
`PlanBuffers` owns, for up to `max_nodes` nodes and `max_batch` rows, pinned host
buffers and device buffers of the same shapes; `load(plan)` fills the host side and
copies it to the device in place. The device tensors never move or change shape, so a
captured CUDA graph that reads them stays valid across routing changes; eager code uses
the `[:count]` views.

Layout, one row per node slot `i` (in `node_slots` order):

    rows[i, :n_i]        int64  batch rows whose KV node i partly holds
    kv_len[i, :n_i]      int32  history tokens node i holds for each of those rows
    append_rows[i, :a_i] int64  rows whose new token goes to node i
    append_off[i, :a_i]  int32  node-local offset of that token
    counts[i]            int32  (n_i, a_i)
    positions[:B]        int32  position of each row's new token
"""

from __future__ import annotations

import torch

from .router import StepPlan

__all__ = ["PlanBuffers"]


class PlanBuffers:
    """Fixed-size host and device buffers holding one step's plan."""

    def __init__(self, max_nodes: int, max_batch: int, device: str | torch.device = "cpu"):
        if max_nodes < 1 or max_batch < 1:
            raise ValueError("max_nodes and max_batch must be >= 1")
        self.max_nodes, self.max_batch = max_nodes, max_batch
        self.device = torch.device(device)
        pin = self.device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(shape, dtype=dtype, device=self.device)

        self._h_rows, self.rows = pair((max_nodes, max_batch), torch.int64)
        self._h_kv_len, self.kv_len = pair((max_nodes, max_batch), torch.int32)
        self._h_arows, self.append_rows = pair((max_nodes, max_batch), torch.int64)
        self._h_aoff, self.append_off = pair((max_nodes, max_batch), torch.int32)
        self._h_counts, self.counts = pair((max_nodes, 2), torch.int32)
        self._h_pos, self.positions = pair((max_batch,), torch.int32)
        self.node_slots: list[str] = []
        self.epoch = -1
        self.batch = 0
        self._copied = torch.cuda.Event() if pin else None  # host buffers free to rewrite
        self._n = [0] * max_nodes
        self._a = [0] * max_nodes

    def slot(self, node: str) -> int:
        """The buffer row of `node`, assigned on first sight and kept while it is routed."""
        if node not in self.node_slots:
            if len(self.node_slots) >= self.max_nodes:
                raise ValueError(f"more than max_nodes={self.max_nodes} attention nodes")
            self.node_slots.append(node)
        return self.node_slots.index(node)

    def load(self, plan: StepPlan) -> None:
        """Fill the buffers from `plan` (host side, then one in-place copy per buffer)."""
        if len(plan.requests) > self.max_batch:
            raise ValueError(f"batch of {len(plan.requests)} exceeds max_batch={self.max_batch}")
        if self._copied is not None:
            self._copied.synchronize()  # the last load's copies have read the host buffers
        live = {w.node for w in plan.nodes}
        self.node_slots = [n if n in live else "" for n in self.node_slots]
        for i, n in enumerate(self.node_slots):
            if n == "":
                self._n[i] = self._a[i] = 0
        for w in plan.nodes:
            if w.node not in self.node_slots:
                free = self.node_slots.index("") if "" in self.node_slots else None
                if free is None:
                    self.slot(w.node)
                else:
                    self.node_slots[free] = w.node
            i = self.node_slots.index(w.node)
            n, a = len(w.rows), len(w.append_rows)
            self._h_rows[i, :n] = torch.tensor(w.rows, dtype=torch.int64)
            self._h_kv_len[i, :n] = torch.tensor(w.kv_len, dtype=torch.int32)
            self._h_arows[i, :a] = torch.tensor(w.append_rows, dtype=torch.int64)
            self._h_aoff[i, :a] = torch.tensor(w.append_offsets, dtype=torch.int32)
            self._n[i], self._a[i] = n, a
        for i in range(self.max_nodes):
            self._h_counts[i, 0], self._h_counts[i, 1] = self._n[i], self._a[i]
        b = len(plan.requests)
        self._h_pos[:b] = torch.tensor(plan.positions, dtype=torch.int32)
        for host, dev in ((self._h_rows, self.rows), (self._h_kv_len, self.kv_len),
                          (self._h_arows, self.append_rows), (self._h_aoff, self.append_off),
                          (self._h_counts, self.counts), (self._h_pos, self.positions)):
            dev.copy_(host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.epoch, self.batch = plan.epoch, b

    def node_rows(self, node: str) -> torch.Tensor:
        """Device int64 batch rows node `node` attends for (a view, valid until next load)."""
        i = self.node_slots.index(node)
        return self.rows[i, : self._n[i]]

    def node_append_rows(self, node: str) -> torch.Tensor:
        i = self.node_slots.index(node)
        return self.append_rows[i, : self._a[i]]
