"""CapturedRemoteAttention: remote attention inside one captured CUDA graph per step.

The graph holds everything that runs on the GPU: gathering each node's query rows and
new k, v into send buffers, `GraphSignal.post`, `GraphSignal.wait` and the LSE merge of
the replies. The transport runs on the host, outside the graph:
`serve_step()` (in any thread) waits for each posted slot, sends that slot's queries to
the nodes, receives out/lse into registered reply buffers and releases the slot; run it
from a thread of its own (`StepServer`), since launching a large graph can block until
its first slots are served. With `stage="host"` the buffers the transport touches are
pinned host memory, copied across inside the graph (one copy per direction and
micro-batch).

Each (node, micro-batch) is one attend stream a step (kflume/client.py): `serve_step`
opens them before the first slot is posted, so a slot sends its queries alone and its
replies land straight in the reply buffers, one message each way per node and layer.
`streams=False` sends each slot as an attend message instead (header and q out, header
and reply back), as the staged path does.

Nodes of this host put their stream replies straight into the reply buffers: each
micro-batch's reply buffer is a `Mailbox` (kflume/comm/mailbox.py) registered with such
a node when it first appears in a plan, and the host releases a slot once the node's
doorbells for it are up, with no reply message. A node that cannot map it (or one on
another host) answers with messages, into the same buffers. With `pull` (the default
there, unless posts are memops, which write no sequence number), such a node also reads
each layer's queries from the mailbox's query buffer once the layer's post flag (shared
memory, `SharedWords`) reaches the value the stream named, so no query is sent either.

A mailbox stream covers its node slot's whole part of the buffers (`rows`: the rows
past the node's requests are padding), so the node serves every step's stream at that
place from one set of graphs. A node joining the cluster is prepared before it enters
the routing (`prepare`, through `RemoteAttention.on_join`): it gets the mailboxes and a
node slot, and captures the graphs of that slot's streams then, not while it serves.

The step's new k, v are not on any slot's critical path: the node does not need them
until the next step (each layer merges its new token locally). The graph gathers them
into a buffer of every layer, and once a micro-batch's last layer is posted, each tail
node gets them in one message (one kernel at the node), instead of one message per
layer. `serve_step` returns once the nodes have acknowledged them, so the next replay
may overwrite the buffer.

Every buffer has a fixed address and shape (per micro-batch, sized for its rows, with a
part per node slot); `load(plan)` rewrites their index buffers in place between steps, so
a routing change (a node joining, ranges moving) needs no recapture. Rows a node does
not hold are padding: gathered from row 0, never sent (a pulling node reads them with
the rest of its part, and attends over nothing for them), and their position is -1, so
the merge (`merge_new_token`: replies found by position, and the new token's own
partial, in one kernel) never reads them.

Plan / run: `load(plan)` is the host half (not capturable); `start` / `finish` are the
device half (capturable, no host sync, no allocation after the first call).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from .client import AttendStream, NodeClient, Pending
from .comm.base import RemoteError
from .comm.mailbox import Mailbox, SharedWords, host_id
from .comm.mailbox import supported as mailbox_supported
from .comm.wire import state_row_bytes, unpack_states
from .graph import GraphSignal, SignalTimeout, default_mechanism
from .kernels import merge_new_token
from .plan import StepPlan
from .remote import RemoteAttention

__all__ = ["CapturedRemoteAttention", "StepServer"]

log = logging.getLogger("kflume.captured")


@dataclass(slots=True)
class _Slot:
    """What the host sends for one (node, micro-batch) in the current plan."""

    node: str = ""
    requests: list = field(default_factory=list)
    kv_len: list = field(default_factory=list)
    append_requests: list = field(default_factory=list)
    append_offsets: list = field(default_factory=list)
    positions: list = field(default_factory=list)


class CapturedRemoteAttention:
    """Graph-capturable remote attention over `remote`'s nodes, for a fixed batch.

    Args:
        remote: the RemoteAttention whose clients, geometry and plan are used.
        batch: rows of every step (fixed for the graph).
        num_layers: layers per step.
        row_ranges: the micro-batches' row ranges (default: one range of all rows).
        max_nodes: node slots in the graph.
        mechanism: GraphSignal mechanism ("memop", "kernel"; "host" on CPU).
        dtype: of q, k, v.
        stage: "device" (default) sends the CUDA buffers themselves (CUDA IPC on one
            host). "host" (CUDA only) copies each micro-batch's outgoing q, k, v for all
            node slots to pinned host memory in one copy inside the graph, and the
            replies back in one copy, so the transport moves host memory (small
            tensors ride inline with the header). On 2xH200 it was slower end to end
            (docs/benchmarks.md): the node's staging in Python costs more than CUDA IPC.
        streams: attend streams (default, device stage) or one message per slot (the
            staged path's only way: a node receives stream queries into its own memory).
        mailbox: let nodes of this host deliver stream replies into the reply buffers
            (default with streams where mailboxes work: Linux, CUDA or x86 host memory;
            module docstring). False: replies are messages.
        pull: with mailboxes, nodes of this host also read the queries themselves from
            the send buffers once the post flags (in shared memory) say they are there,
            so the host sends no query (default, except with memop signals).
    """

    def __init__(self, remote: RemoteAttention, *, batch: int, num_layers: int,
                 row_ranges: list[slice] | None = None, max_nodes: int = 4,
                 mechanism: str | None = None, dtype=torch.bfloat16,
                 stage: str = "device", streams: bool | None = None,
                 mailbox: bool | None = None, pull: bool | None = None) -> None:
        if stage not in ("host", "device"):
            raise ValueError(f"stage must be 'host' or 'device'; got {stage!r}")
        self.remote, self.batch, self.num_layers = remote, batch, num_layers
        self.ranges = row_ranges or [slice(0, batch)]
        self.max_nodes, self.dtype = max_nodes, dtype
        dev = self.device = remote.device
        self.staged = dev.type == "cuda" and stage == "host"
        # Between polls the serving loop hands the GIL over. On a GPU host the cores are
        # free: os.sched_yield() (under a microsecond). time.sleep(0) costs ~55 us there
        # (Linux's timer slack), a delay each step of each reply's progress paid (reply
        # one way 141-165 us at 8x32K, docs/benchmarks.md); on CPU, where the nodes
        # compute on the same cores, that sleep is what leaves them a core.
        self._yield = os.sched_yield if dev.type == "cuda" else (lambda: time.sleep(0))
        if streams and self.staged:
            raise ValueError("attend streams need stage='device'")
        self.streams = not self.staged if streams is None else streams
        self._open: dict[tuple[int, int], AttendStream] = {}  # (node slot, micro-batch)
        self._stream_q: list[list] = []  # [micro-batch] (stream, its q buffer) per node
        hq, hkv, d = remote.hq, remote.hkv, remote.d
        m = len(self.ranges)
        if mailbox and not self.streams:
            raise ValueError("mailboxes take attend streams' replies: streams=True")
        boxes = self.streams and (mailbox_supported(dev) if mailbox is None else mailbox)
        mech = mechanism or default_mechanism(dev)
        # Nodes read the queries themselves where posts write sequence numbers (not memop)
        self.pull = bool(boxes) and (pull if pull is not None else mech != "memop")
        if self.pull and mech == "memop":
            raise ValueError("pull needs a signal whose posts count (mechanism kernel or host)")
        if pull and not boxes:
            raise ValueError("pull needs mailboxes")
        # the post flags, in shared memory when nodes read them
        self._flags = SharedWords(num_layers * m, cuda=dev.type == "cuda") if self.pull else None
        self.signal = GraphSignal(num_layers * m, dev, mech,
                                  flag=None if self._flags is None else self._flags.tensor)
        self.node_slots: list[str] = [""] * max_nodes
        sizes = [r.stop - r.start for r in self.ranges]
        z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
        # Per micro-batch, one buffer for the queries going out to every node slot
        # ([node slot][row] q), one for what comes back ([node slot][row] out | lse
        # bytes) and one for the step's new k, v; fixed for the graph's lifetime. The
        # views below are what the kernels and the transport touch. Staged: the
        # transport's side lives in pinned host memory.
        row = state_row_bytes(hq, d, dtype)  # replies: kflume/comm/wire.py's layout
        qrow = hq * d * torch.empty(0, dtype=dtype).element_size()
        self._boxes = ([Mailbox(max_nodes * n, row, max_nodes * num_layers, dev,
                                query_row_bytes=qrow if self.pull else 0, flags=self._flags)
                        for n in sizes] if boxes else [])
        self._recv_dev = ([b.buffer.view(max_nodes, n, row) for b, n in zip(self._boxes, sizes)]
                          or [z(max_nodes, n, row, dt=torch.uint8) for n in sizes])
        self._send_dev = ([b.queries.view(dtype).view(max_nodes, n, hq, d)
                           for b, n in zip(self._boxes, sizes)] if self.pull
                          else [z(max_nodes, n, hq, d) for n in sizes])
        # per node name: (its client, whether it delivers into the mailboxes)
        self._delivers: dict[str, tuple] = {}
        self._settling: list[AttendStream] = []  # given-up mailbox streams (reset waits)
        # [node slot][k | v][row][layer]: the step's new tokens, sent once a step
        self._kv_dev = [z(max_nodes, 2, n, num_layers, 1, hkv, d) for n in sizes]
        host = lambda t: (torch.zeros(t.shape, dtype=t.dtype, pin_memory=True)  # noqa: E731
                          if self.staged else t)
        self._send_host = [host(t) for t in self._send_dev]
        self._recv_host = [host(t) for t in self._recv_dev]
        self._kv_host = [host(t) for t in self._kv_dev]

        def per_slot(bufs, view=lambda t: t):
            return [[view(bufs[m][i]) for m in range(len(sizes))] for i in range(max_nodes)]

        # What the transport touches: [node slot][micro-batch] -> q [n, Hq, D] /
        # (k, v) [n, layers, 1, Hkv, D] / packed replies [n, row]; the first rows of
        # each are one contiguous tensor, which is what it sends or receives. (The graph
        # writes and reads all node slots of a micro-batch at once.)
        self.outgoing = per_slot(self._send_host)
        self.outgoing_kv = per_slot(self._kv_host, lambda t: (t[0], t[1]))
        self.incoming = per_slot(self._recv_host)
        # Per micro-batch, one index buffer [gather | position | append gather], each
        # part [node slot][row] flattened, so that one kernel serves every node slot and
        # one copy a step refreshes them: gather -> the row of q (and of k, v) that goes
        # out as the slot's j-th row; position -> where row b's reply sits among the
        # slot's rows, -1 for none (the merge kernel's index).
        self.index = [torch.zeros(3, max_nodes * n, dtype=torch.long, device=dev)
                      for n in sizes]
        # the replies as [node slot, row] (out, lse) views: what the merge reads
        self._reply_views = [
            (o.view(max_nodes, n, hq, d), s.view(max_nodes, n, hq))
            for n, (o, s) in ((n, unpack_states(t.view(-1, row), hq, d, dtype))
                              for n, t in zip(sizes, self._recv_dev))]
        # the step's new k, v, layer by layer ([layer, row, k | v, Hkv, D]): one kernel a
        # layer; gathered into the nodes' send buffers once, at the last layer
        self._kv_step = [z(num_layers, n, 2, hkv, d) for n in sizes]
        self.out = [z(n, hq, d) for n in sizes]
        self.out_lse = [z(n, hq, dt=torch.float32) for n in sizes]
        self.plan_slots: list[list[_Slot]] = [[_Slot() for _ in sizes] for _ in range(max_nodes)]
        self.epoch = -1
        self.steps = 0
        # Per served slot: (slot, posted->sent, sent->answered, answered->released) in
        # seconds, then (sent, answered) in time.perf_counter() seconds, the layer and the
        # micro-batch's stream sequence numbers (to match a node's `stats(trace=n)`), for
        # the last `trace_steps` steps (0: off).
        self.trace: list[tuple] = []
        # Per traced step: (serving began, last slot released, appends and streams
        # acknowledged) in time.perf_counter() seconds: the last part is the step's wait
        # for its nodes' acknowledgements after its last reply.
        self.step_trace: list[tuple] = []
        self.trace_steps = 0
        self._reserved: set[str] = set()  # node slots of prepared nodes not in a plan yet
        self._unsettled: list[Pending] = []  # answers to _register's preparations
        if self._boxes:
            remote.on_join(self.prepare, self.forget)

    # ---- host half: between steps ------------------------------------------------------
    def load(self, plan: StepPlan) -> None:
        """Point the buffers at `plan` (in place; outside the graph, before its replay)."""
        if len(plan.requests) != self.batch:
            raise ValueError(f"the graph was captured for {self.batch} rows; the plan has "
                             f"{len(plan.requests)}")
        live = [w.node for w in plan.nodes]
        self._settle()
        for n in live:  # first: nothing below changes if a node fails to answer
            self._register(n)
        self._reserved.difference_update(live)
        self._reserved.intersection_update(self.node_slots)
        self.node_slots = [n if n in live or n in self._reserved else ""
                           for n in self.node_slots]
        for n in live:
            if n not in self.node_slots:
                if "" not in self.node_slots and self._reserved:  # a live node first
                    self.node_slots[self.node_slots.index(self._reserved.pop())] = ""
                if "" not in self.node_slots:
                    raise ValueError(f"more than max_nodes={self.max_nodes} attention nodes")
                self.node_slots[self.node_slots.index("")] = n
        by_node = {w.node: w for w in plan.nodes}
        for m, r in enumerate(self.ranges):
            size = r.stop - r.start
            gather, position, agather = [], [], []
            for i, name in enumerate(self.node_slots):
                slot = _Slot(name)
                g, pos, ag = [0] * size, [-1] * size, [0] * size  # padding, none
                w = by_node.get(name)
                if w is not None:
                    for row, n in zip(w.rows, w.kv_len):
                        if r.start <= row < r.stop:
                            g[len(slot.requests)] = row - r.start
                            pos[row - r.start] = len(slot.requests)
                            slot.requests.append(plan.requests[row])
                            slot.kv_len.append(n)
                    for row, off in zip(w.append_rows, w.append_offsets):
                        if r.start <= row < r.stop:
                            ag[len(slot.append_requests)] = row - r.start
                            slot.append_requests.append(plan.requests[row])
                            slot.append_offsets.append(off)
                            slot.positions.append(plan.positions[row])
                self.plan_slots[i][m] = slot
                gather += g
                position += pos
                agather += ag
            self.index[m].copy_(torch.tensor([gather, position, agather], dtype=torch.long))
        self.epoch = plan.epoch

    def prepare(self, name: str, client: NodeClient) -> list[Pending]:
        """Get node `name` (reached through `client`, in no plan yet: a node joining)
        ready to serve this graph's streams at full speed from its first step: register
        the mailboxes with it, keep it a node slot, and have it capture the graphs of
        that slot's streams now (`NodeClient.prepare_stream`), rather than a few a step
        once it serves (each capture holds a node ~0.5 ms). Returns its pending answers
        (none for a node that takes no mailbox). Called through `RemoteAttention.on_join`
        by a Cluster, which routes to the node once they are answered."""
        if not self._boxes or client.info.get("host") != host_id():
            return []
        try:
            registered = client.register_mailbox(self._boxes, wait=False)
        except Exception as e:  # noqa: BLE001 - its connection failed: messages, if any
            self._refused(name, e)
            self._delivers[name] = (client, False)
            return []
        self._delivers[name] = (client, registered)  # settled by delivers()
        if name not in self.node_slots:
            if "" not in self.node_slots:
                log.warning("node %s joins with no node slot free in this graph (max_nodes="
                            "%d): not prepared", name, self.max_nodes)
                return [registered]
            self.node_slots[self.node_slots.index("")] = name
        self._reserved.add(name)  # until a plan names it (load)
        i, r = self.node_slots.index(name), self.remote
        return [registered] + [client.prepare_stream(range(self.num_layers), self._rows(m),
                                                     r.hq, r.d, self.dtype, r.scale,
                                                     **self._place(i, m))
                               for m in range(len(self.ranges))]

    def forget(self, name: str) -> None:
        """Node `name` was prepared but will not join (or has left): its reserved slot
        is free again, its registration forgotten."""
        if name in self._reserved:
            self._reserved.discard(name)
            self.node_slots[self.node_slots.index(name)] = ""
        self._delivers.pop(name, None)

    def _rows(self, m: int) -> int:
        return self.ranges[m].stop - self.ranges[m].start

    def _place(self, i: int, m: int) -> dict:
        """Node slot i's part of micro-batch m's mailbox, as `open_stream` takes it: its
        rows and doorbells, and (pulling) its first post flag and their stride."""
        place = dict(mailbox=(self._boxes[m], i * self._rows(m), i * self.num_layers))
        if self.pull:  # layer l's post: flag l * M + m
            place["pull"] = (m, len(self.ranges))
        return place

    def _register(self, name: str) -> None:
        """A node of the plan this graph has not seen yet (a new client: a node of the
        first plan, or one that joined without `prepare`, or came back): prepared as a
        joining node is, its answers checked at the next loads (a node of this host
        captures its streams' graphs then, before serving this graph's first stream)."""
        client = self.remote.clients[name]
        if not self._boxes or self._delivers.get(name, (None,))[0] is client:
            return
        self._unsettled += self.prepare(name, client)
        if self._delivers.get(name, (None,))[0] is not client:  # another host
            self._delivers[name] = (client, False)

    def _settle(self) -> None:
        """Log what `_register`'s preparations that were answered refused."""
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

    def delivers(self, name: str) -> bool:
        """Whether node `name` puts its replies into the mailboxes (known once a plan
        with it was loaded, or once it answered `prepare`'s registration)."""
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

    # ---- device half: inside the graph ---------------------------------------------------
    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rows: slice | None = None):
        """Gather each node's rows into its send buffers and post the slot. q `[b, Hq, D]`,
        k, v `[b, Hkv, D]` of micro-batch `rows`."""
        m = self.ranges.index(rows) if rows is not None else 0
        last = layer == self.num_layers - 1
        send = self._send_dev[m]  # every node slot's rows, one kernel
        torch.index_select(q, 0, self.index[m][0], out=send.view(-1, *send.shape[2:]))
        if last:  # sent with this slot: gathered before the post
            torch.stack((k, v), 1, out=self._kv_step[m][layer])
            self._gather_kv(m)
        if self.staged:  # one copy for every node slot; the post below comes after it
            self._send_host[m].copy_(self._send_dev[m], non_blocking=True)
            if last:
                self._kv_host[m].copy_(self._kv_dev[m], non_blocking=True)
        slot = layer * len(self.ranges) + m
        self.signal.post(slot)
        if not last:  # not needed before the last layer: off the slot's critical path
            torch.stack((k, v), 1, out=self._kv_step[m][layer])
        return (slot, m, q, k, v)

    def _gather_kv(self, m: int) -> None:
        """Every layer's new k, v of every node slot's rows into the send buffers."""
        step = self._kv_step[m]  # [layer, row, k | v, Hkv, D]
        rows = step.index_select(1, self.index[m][2])  # [layer, slot * row, k | v, ...]
        rows = rows.view(step.shape[0], self.max_nodes, -1, *step.shape[2:])
        self._kv_dev[m][:, :, :, :, 0].copy_(rows.permute(1, 3, 2, 0, 4, 5))

    def finish(self, handle) -> torch.Tensor:
        """Wait for the host's release of the slot, then merge the replies with the new
        token's own partial. Returns `[b, Hq, D]` (a buffer reused by the next step)."""
        slot, m, q, k, v = handle
        self.signal.wait(slot)
        if self.staged:
            self._recv_dev[m].copy_(self._recv_host[m], non_blocking=True)
        outs, lses = self._reply_views[m]  # one kernel: replies found by position, merged
        merge_new_token(q, k, v, outs, lses, self.index[m][1].view(self.max_nodes, -1),
                        self.remote.scale, out=self.out[m], lse=self.out_lse[m])
        return self.out[m]

    # ---- host half: during the replay ------------------------------------------------------
    def _send(self, slot: int, appends: list[Pending]) -> list[Pending]:
        """Queries to every node holding rows of this slot. After a micro-batch's last
        layer, also its new k, v of every layer to their tail nodes (into `appends`)."""
        layer, m = divmod(slot, len(self.ranges))
        if self.streams:  # the replies' receives were posted ahead
            pend = [st.expect(layer) if st.pull else st.attend(layer, q, ready=True)
                    for st, q in self._stream_q[m]]
        else:
            pend = []
            for i, name in enumerate(self.node_slots):
                s = self.plan_slots[i][m]
                if name and s.requests:
                    b = len(s.requests)
                    pend.append(self.remote.clients[name].attend(
                        layer, self.epoch, s.requests, s.kv_len, self.outgoing[i][m][:b],
                        self.incoming[i][m][:b], self.remote.scale, ready=True))
        if layer == self.num_layers - 1:
            for i, name in enumerate(self.node_slots):
                s = self.plan_slots[i][m]
                if name and s.append_requests:
                    a = len(s.append_requests)
                    k, v = self.outgoing_kv[i][m]
                    appends.append(self.remote.clients[name].append(
                        0, s.append_requests, s.append_offsets, s.positions, k[:a], v[:a],
                        ready=True))
        return pend

    def reset(self) -> None:
        """After `serve_step` raised and the failed replay has finished (its stream
        synchronised): release the signal's abort so that the next step can run. Streams
        on mailboxes were sent their remaining queries (or, pulling ones, cancelled) when
        the step failed: this waits
        (each with the client's deadline) for the nodes to acknowledge them, after which
        nothing of the failed step lands in the reply buffers, and raises RuntimeError if
        a node does not answer. The failed step's other streams are given up at the
        nodes after their stream deadline; its new k, v may not have reached every node,
        so the caller re-plans (and, for requests whose token is missing, re-runs the
        step) before the next replay."""
        self.signal.reset()
        settling, self._settling = self._settling, []
        for st in settling:  # until acknowledged, a node may still deliver into the rows
            try:
                st.ack.result()
            except Exception as e:  # noqa: BLE001 - answered (with an error): settled
                if not st.ack.done:  # no answer: the rows cannot be trusted
                    raise RuntimeError(
                        f"node {st.client.name} did not acknowledge a given-up stream; its "
                        "deliveries may still land in this graph's reply buffers: build a "
                        "new CapturedRemoteAttention") from e
        self._open.clear()

    def close(self) -> None:
        """Give the mailboxes' shared memory back (the graph must not run again). Nodes
        that join later are not prepared for it any more: close a graph you are done
        with."""
        for b in self._boxes:
            b.close()
        self._boxes = []
        if self._flags is not None:
            self._flags.close()
            self._flags = None

    def _open_streams(self) -> list[Pending]:
        """One attend stream per (node, micro-batch) with rows; their acknowledgements."""
        self._open.clear()
        self._stream_q = [[] for _ in self.ranges]
        r = self.remote
        for i, name in enumerate(self.node_slots):
            for m in range(len(self.ranges)):
                s = self.plan_slots[i][m]
                if name and s.requests:
                    # A mailbox stream covers the node slot's whole part (its rows past
                    # the requests' are padding): the node keeps one set of buffers and
                    # graphs for it however many requests it holds (`prepare`).
                    b = len(s.requests) if not self.delivers(name) else None
                    where = (dict(self._place(i, m), rows=self._rows(m))
                             if b is None else dict(into=self.incoming[i][m][:b]))
                    if self.pull and b is None:
                        mm = len(self.ranges)
                        where["pull"] = (*where["pull"],
                                         [self.signal.next_value(layer * mm + m)
                                          for layer in range(self.num_layers)])
                    st = self._open[i, m] = r.clients[name].open_stream(
                        range(self.num_layers), self.epoch, s.requests, s.kv_len, r.hq, r.d,
                        self.dtype, r.scale, **where)
                    self._stream_q[m].append((st, self.outgoing[i][m][:b]))
        return [st.ack for st in self._open.values()]

    def serve_step(self, timeout: float = 30.0) -> None:
        """Serve every slot of one replay: send when posted, release when answered.

        Slots are dispatched as soon as the graph posts them (so a node can work on the
        next micro-batch while the previous one's reply travels) and released in order.
        It returns once the nodes acknowledged the step's appends and streams. On any
        error every slot is released (the graph finishes, its results invalid) and the
        error is raised; `reset()` then makes the graph usable again.
        """
        total = self.signal.slots
        deadline = time.monotonic() + timeout
        inflight: dict[int, list[Pending]] = {}
        sent = released = 0
        transport = next(iter(self.remote.clients.values())).transport
        tr = self.trace_steps > 0
        began = last = time.perf_counter() if tr else 0.0
        times: dict[int, list[float]] = {}
        appends: list[Pending] = []
        try:
            acks = self._open_streams() if self.streams else []
            while released < total or not all(p.done for p in appends + acks):
                if sent < total and self.signal.posted(sent):
                    t0 = time.perf_counter() if tr else 0.0
                    self.signal.wait_posted(sent, 0.0)
                    inflight[sent] = self._send(sent, appends)
                    if tr:
                        times[sent] = [t0, time.perf_counter()]
                    sent += 1
                elif released < sent and all(p.done for p in inflight[released]):
                    if tr:
                        times[released].append(time.perf_counter())
                    for p in inflight.pop(released):
                        p.result(0.0)  # raises a node's refusal
                    self.signal.release(released)
                    if tr:
                        a, b, c = times.pop(released)
                        layer, m = divmod(released, len(self.ranges))
                        seqs = tuple(st.seq for (_, mm), st in self._open.items() if mm == m)
                        last = time.perf_counter()
                        self.trace.append((released, b - a, c - b, last - c, b, c, layer, seqs))
                    released += 1
                else:
                    transport.progress(0.0)
                    self._yield()  # hand the GIL over: the launching thread may need it
                    if time.monotonic() > deadline:
                        raise SignalTimeout(f"step not served within {timeout} s ({sent} of "
                                            f"{total} slots sent, {released} released, "
                                            f"{sum(p.done for p in appends + acks)} of "
                                            f"{len(appends + acks)} appends and streams "
                                            "acknowledged)")
            for p in acks:
                p.result(0.0)  # a stream refused after its last reply (appends: client.check)
        except BaseException:
            self.signal.abort()
            # No reply of this step may land later in the reply buffers the next step
            # (after reset()) uses: cancel every receive still posted.
            for pend in inflight.values():
                for p in pend:
                    p.cancel()
            for (i, m), st in self._open.items():
                st.close()
                if st.mailbox is None:
                    continue
                # the node answers every layer (or gives the stream up) and then acks;
                # reset() waits for that: nothing of this step lands after it
                try:
                    if st.pull:
                        st.cancel()
                    else:
                        st.send_unsent(self.outgoing[i][m][: st.shape[0]])
                except Exception:  # noqa: BLE001 - the link is gone: the ack says so
                    pass
                self._settling.append(st)
            raise
        self.steps += 1
        if tr:
            self.trace = self.trace[-self.trace_steps * total :]
            self.step_trace.append((began, last, time.perf_counter()))
            del self.step_trace[: -self.trace_steps]


class StepServer:
    """A host thread that serves replays of `cap`'s graph: `begin()` before launching the
    replay, `end()` after it (waits, with a deadline, and raises what serving raised).

    Launching a large graph can block the launching thread until the GPU has room for
    it, and the GPU makes room only once the host releases the slots it waits on: so
    the slots are served from this thread, never from the one that launches.
    """

    def __init__(self, cap: CapturedRemoteAttention, timeout: float = 30.0) -> None:
        self.cap, self.timeout = cap, timeout
        self._go, self._done = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kflume-serve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            if self._closed:
                return
            try:
                self.cap.serve_step(self.timeout)
            except BaseException as e:  # noqa: BLE001 - handed to end()
                self._error = e
            self._done.set()

    def begin(self) -> None:
        if self._closed:
            raise RuntimeError("StepServer is closed")
        self._done.clear()
        self._go.set()

    def end(self) -> None:
        if not self._done.wait(self.timeout + 5.0):
            raise SignalTimeout(f"the step was not served within {self.timeout + 5.0} s")
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def close(self) -> None:
        self._closed = True
        self._go.set()
        self._thread.join(5.0)

    def __enter__(self) -> StepServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
