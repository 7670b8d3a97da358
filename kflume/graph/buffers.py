"""The fixed buffers of a captured step, one set per micro-batch.

Every buffer a captured graph reads or writes has a fixed address and shape for the
graph's lifetime; between replays the host rewrites their contents in place
(`MicroBatch.load`), so a routing change needs no recapture. Each micro-batch has a
*lane* per node the step may use (`max_nodes` of them): a lane is one node's part of the
micro-batch's buffers.

- `send [lanes, n, Hq, D]`: the queries going out, gathered by one kernel for every lane;
- `recv [lanes, n, row]`: the replies coming back (kflume/comm/wire.py's layout);
- `kv [lanes, 2, n, layers, 1, Hkv, D]`: the step's new k, v of every layer, sent to
  each lane's node once a step; `kv_step [layers, n, 2, Hkv, D]` collects them layer by
  layer inside the graph;
- `index [3, lanes * n]` (long): gather (the row of q, k, v that goes out as a lane's
  j-th row), position (where row b's reply sits among its lane's rows, -1 for none: the
  merge kernel's index) and append gather (the rows whose new token a lane stores);
- `out`, `out_lse`: the merged attention of the micro-batch.

Where nodes of this host take mailboxes, `send` and `recv` are the micro-batch's
`Mailbox` (kflume/comm/mailbox.py): the nodes read the queries and write the replies
themselves. Rows a lane's node does not hold are padding: gathered from row 0, never
sent, and their position is -1, so the merge never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..comm.mailbox import Mailbox, SharedWords
from ..comm.wire import state_row_bytes, unpack_states
from ..weight.rows import NodeRows, node_rows

__all__ = ["MicroBatch"]


@dataclass(slots=True)
class MicroBatch:
    """Micro-batch `rows` of a captured step: its buffers and what each lane sends."""

    rows: slice
    lanes: int
    box: Mailbox | None
    send: torch.Tensor
    recv: torch.Tensor
    kv: torch.Tensor
    kv_step: torch.Tensor
    index: torch.Tensor
    outs: torch.Tensor  # [lanes, n, Hq, D] views of recv: what the merge reads
    lses: torch.Tensor  # [lanes, n, Hq]
    out: torch.Tensor
    out_lse: torch.Tensor
    shares: list[NodeRows | None] = field(default_factory=list)  # [lane] this step's

    @classmethod
    def make(cls, rows: slice, lanes: int, layers: int, hq: int, hkv: int, d: int,
             dtype: torch.dtype, device: torch.device,
             flags: SharedWords | None) -> MicroBatch:
        """Buffers for `lanes` nodes; in a `Mailbox` (with query rows) when `flags`, the
        step's post flags in shared memory, are given."""
        n = rows.stop - rows.start
        z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        row = state_row_bytes(hq, d, dtype)
        qrow = hq * d * torch.empty(0, dtype=dtype).element_size()
        box = None
        if flags is not None:
            box = Mailbox(lanes * n, row, lanes * layers, device, query_row_bytes=qrow,
                          flags=flags)
            recv = box.buffer.view(lanes, n, row)
            send = box.queries.view(dtype).view(lanes, n, hq, d)
        else:
            recv, send = z(lanes, n, row, dt=torch.uint8), z(lanes, n, hq, d)
        outs, lses = unpack_states(recv.view(-1, row), hq, d, dtype)
        return cls(rows, lanes, box, send, recv, z(lanes, 2, n, layers, 1, hkv, d),
                   z(layers, n, 2, hkv, d), z(3, lanes * n, dt=torch.long),
                   outs.view(lanes, n, hq, d), lses.view(lanes, n, hq), z(n, hq, d),
                   z(n, hq, dt=torch.float32), [None] * lanes)

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start

    def load(self, plan, lanes: list[str]) -> None:
        """Point the buffers at `plan` for nodes in `lanes` (host half: not capturable)."""
        n = self.size
        by_node = {r.node: r for r in node_rows(plan, self.rows)}
        gather, position, agather = [], [], []
        for i, name in enumerate(lanes):
            share = by_node.get(name) if name else None
            g, pos, ag = [0] * n, [-1] * n, [0] * n  # padding, none
            if share is not None:
                for j, row in enumerate(share.rows):
                    g[j] = row
                    pos[row] = j
                for j, row in enumerate(share.append_rows):
                    ag[j] = row
            self.shares[i] = share
            gather += g
            position += pos
            agather += ag
        self.index.copy_(torch.tensor([gather, position, agather], dtype=torch.long))

    # ---- device half: inside the graph ----------------------------------------------------
    def gather_queries(self, q: torch.Tensor) -> None:
        """Every lane's rows of q into `send`, one kernel."""
        torch.index_select(q, 0, self.index[0], out=self.send.view(-1, *self.send.shape[2:]))

    def keep_new_tokens(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        torch.stack((k, v), 1, out=self.kv_step[layer])

    def gather_new_tokens(self) -> None:
        """Every layer's new k, v of every lane's append rows into `kv`."""
        step = self.kv_step  # [layer, row, k | v, Hkv, D]
        rows = step.index_select(1, self.index[2])  # [layer, lane * row, k | v, ...]
        rows = rows.view(step.shape[0], self.lanes, -1, *step.shape[2:])
        self.kv[:, :, :, :, 0].copy_(rows.permute(1, 3, 2, 0, 4, 5))

    def positions(self) -> torch.Tensor:
        """`[lanes, n]`: where each row's partial sits among a lane's replies, -1: none."""
        return self.index[1].view(self.lanes, -1)
