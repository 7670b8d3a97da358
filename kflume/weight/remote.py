"""RemoteAttention: the weight node's side of core attention, one layer at a time.

For a decode step planned by the router (kflume/router.py):

1. query-first dispatch: q of the rows each node holds KV for goes out to every node of
   the plan, before anything else is computed;
2. the new k, v are sent to the node that owns each request's tail range, where the next
   step will find them (the new token's own partial, attention of q over the new k, v
   alone: out = v, lse = scale * q.k, is part of the merge);
3. the nodes' partials `(out, lse)` come back, one node's after another in one reply
   buffer, and are merged with the local one by their log-sum-exp, each row's found by
   position (kflume.kernels.merge_new_token: one kernel).

Prefill: a prompt's KV, computed on the weight node, is scattered by range to the nodes.
Output equals attention over the whole KV (docs/conventions.md); tests check it over the
in-process transport and over UCX between processes. Captured steps use the same plan
cut (kflume/weight/rows.py) through kflume/graph/.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..comm.base import DeadlineExceeded, RemoteError, TransportError
from ..comm.wire import state_row_bytes, transfer_empty, unpack_states
from ..kernels import merge_new_token
from ..plan import StepPlan
from .client import NodeClient, Pending, wait_all
from .joining import JoinHooks
from .rows import NodeRows, node_rows
from .span import SpanWriter, scatter, span_attention

__all__ = ["RemoteAttention"]


class RemoteAttention:
    """Attention over KV held by attention nodes, from the weight node.

    Args:
        clients: node name -> NodeClient, the nodes the router may name (the mapping
            is read at every step, so nodes added to it join at the next step).
        num_q_heads, num_kv_heads, head_dim: the model's attention geometry.
        scale: score scale (default head_dim ** -0.5).
        max_batch: the largest batch (checked at every step).
        timeout: deadline in seconds for every reply.
    """

    def __init__(self, clients: Mapping[str, NodeClient], *, num_q_heads: int,
                 num_kv_heads: int, head_dim: int, scale: float | None = None,
                 device: str | torch.device = "cpu", max_batch: int = 256,
                 timeout: float = 30.0, num_layers: int | None = None) -> None:
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads "
                             f"{num_kv_heads}")
        self.clients, self.hq, self.hkv, self.d = clients, num_q_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.device = torch.device(device)
        self.timeout = timeout
        self.max_batch = max_batch
        self.plan: StepPlan | None = None
        self._shares: dict[tuple, list[_Share]] = {}  # per (first row, stop, window)
        # per row range and window: [k, row] -> the row's k-th partial's place in the
        # replies, -1
        self._positions: dict[tuple, torch.Tensor] = {}
        self.join_hooks = JoinHooks()
        self.spans = SpanWriter(num_layers or 0)  # (spans need num_layers)
        # Called with the names of nodes found lost during a layer (their link broken or
        # silent past the deadline); it makes a new plan without them, whose lost spans
        # are recomputed, and hands it to `begin_step` (kflume/weight/recovery.py). Then
        # the layer is run again. None: the failure is raised.
        self.on_loss: Callable[[list[str]], None] | None = None
        self._step_tokens: dict[tuple[int, int, int], tuple] = {}  # this step's new k, v

    # ---- nodes joining (kflume/weight/joining.py) -----------------------------------------
    def on_join(self, prepare: Callable[[str, NodeClient], list[Pending]],
                forget: Callable[[str], None]) -> None:
        """Have `prepare(name, client)` called for every node about to join, before any
        plan names it, and `forget(name)` for one that then did not join (`JoinHooks`)."""
        self.join_hooks.add(prepare, forget)

    def prepare_node(self, name: str, client: NodeClient) -> list[Pending]:
        return self.join_hooks.prepare(name, client)

    def forget_node(self, name: str) -> None:
        self.join_hooks.forget(name)

    def _client(self, node: str) -> NodeClient:
        try:
            return self.clients[node]
        except KeyError:
            raise KeyError(f"the plan names node {node!r}, which RemoteAttention has no "
                           "client for") from None

    # ---- step boundaries ---------------------------------------------------------------
    def begin_step(self, plan: StepPlan, same_step: bool = False) -> None:
        """Take the plan of this step (its frees and migrations are the cluster's to carry
        out first: kflume/weight/boundary.py). `same_step`: a plan made in the middle of
        a step (a recovery), whose tokens already sent are kept to send again."""
        if len(plan.requests) > self.max_batch:
            raise ValueError(f"the plan has {len(plan.requests)} requests; max_batch is "
                             f"{self.max_batch}")
        if not same_step:  # (a span is written within its step: one left was given up)
            self._step_tokens = {}
            self.spans.drop()
        self.plan = plan
        self._shares = {}
        self._positions = {}

    def end_step(self, wait: bool = False) -> None:
        """Check the nodes' acknowledgements of appends; raise any refusal.

        wait=False looks only at what has arrived (no stall); wait=True waits for all.
        """
        if self.plan is None:
            return
        for w in self.plan.nodes:
            c = self.clients.get(w.node)
            if c is None:
                continue
            try:
                c.flush(self.timeout) if wait else c.check()
            except TransportError:
                if c.conn.alive:
                    raise
                c.outstanding.clear()  # its link is gone: lost (and recovered) at the boundary

    def _plan(self) -> StepPlan:
        if self.plan is None:
            raise RuntimeError("call begin_step(plan) before attending")
        return self.plan

    # ---- prefill --------------------------------------------------------------------------
    def prefill(self, layer: int, request, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter one request's prompt KV `k, v [T, Hkv, D]` of `layer` to the nodes that
        the plan's routes name for positions `[0, T)` (kflume/weight/span.py)."""
        if k.dim() != 3 or tuple(k.shape[1:]) != (self.hkv, self.d) or v.shape != k.shape:
            raise ValueError(f"prefill k, v must be [T, {self.hkv}, {self.d}]; got "
                             f"{list(k.shape)} and {list(v.shape)}")
        scatter(self._plan(), self.clients, layer, request, k, v)

    # ---- decode -----------------------------------------------------------------------------
    def _recv_buffer(self, rows: int, dtype) -> torch.Tensor:
        """A reply buffer (the layout of `wire.pack_states`) that the transport may write
        outside stream order (`wire.transfer_empty`); `finish` hands it back to the
        allocator behind the kernels that read it."""
        return transfer_empty((rows, state_row_bytes(self.hq, self.d, dtype)), torch.uint8,
                              self.device)

    def shares(self, start: int, stop: int, window: int | None = None) -> list[_Share]:
        """Each node's part of plan rows [start, stop), with their row indices on the
        device; built once per step, range and window (kflume/weight/rows.py)."""
        key = (start, stop, window)
        if key not in self._shares:
            idx = lambda rs: torch.tensor(rs, dtype=torch.long, device=self.device)  # noqa
            self._shares[key] = [_Share(r, idx(list(r.rows)), idx(list(r.append_rows)))
                                 for r in node_rows(self._plan(), slice(start, stop), window)]
        return self._shares[key]

    def start(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
              rows: slice | None = None, *, window: int | None = None,
              softcap: float | None = None, sinks: torch.Tensor | None = None) -> _Handle:
        """Send q of plan rows `rows` (all by default) to the nodes that hold their KV, and
        the new k, v to their tail nodes; returns the handle `finish` waits on.

        q `[b, Hq, D]`, k_new, v_new `[b, Hkv, D]` (RoPE applied): the rows of `rows`, in
        the plan's order. Queries go out first; appends are acknowledged later. A layer
        may attend over a sliding `window` of tokens, cap its scores (`softcap`, Gemma2)
        and have attention `sinks [Hq]` (GPT-OSS): one more partial in the merge.
        """
        plan = self._plan()
        a, b = (0, len(plan.requests)) if rows is None else rows.indices(len(plan.requests))[:2]
        if q.dim() != 3 or q.shape[0] != b - a or tuple(q.shape[1:]) != (self.hq, self.d):
            raise ValueError(f"q must be [{b - a}, {self.hq}, {self.d}] (plan rows {a}..{b}); "
                             f"got {list(q.shape)}")
        want = (b - a, self.hkv, self.d)
        if tuple(k_new.shape) != want or tuple(v_new.shape) != want:
            raise ValueError(f"k_new and v_new must be {list(want)}; got {list(k_new.shape)} "
                             f"and {list(v_new.shape)}")
        shares = self.shares(a, b)
        attend = [s for s in self.shares(a, b, window) if s.rows.requests]
        # one reply buffer, the nodes' replies one after another
        buf = self._recv_buffer(sum(len(s.rows.requests) for s in attend), q.dtype)
        self._step_tokens[layer, a, b] = (k_new, v_new)
        sent, lost, off = [], [], 0
        for s in attend:  # query first
            r = s.rows
            try:
                sent.append(self._client(r.node).attend(
                    layer, plan.epoch, r.requests, r.kv_len, q.index_select(0, s.index),
                    buf[off : off + len(r.requests)], self.scale, kv_start=r.kv_start,
                    softcap=softcap))
            except TransportError:  # the link is gone: found lost at finish()
                lost.append(r.node)
            off += len(r.requests)
        for s in shares:  # then the new tokens, off the critical path
            r = s.rows
            if r.append_requests and r.node not in lost:
                k = k_new.index_select(0, s.append_index)[:, None]  # [a, 1, Hkv, D]
                v = v_new.index_select(0, s.append_index)[:, None]
                try:
                    self._client(r.node).append(layer, r.append_requests, r.append_offsets,
                                                r.positions, k, v)
                except TransportError:
                    lost.append(r.node)
        return _Handle(sent, buf, self._position(a, b, window, attend), q, k_new, v_new,
                       layer, slice(a, b), plan.epoch, lost, window, softcap, sinks)

    def _position(self, a: int, b: int, window, attend: list[_Share]) -> torch.Tensor:
        key = (a, b, window)
        if key not in self._positions:
            self._positions[key] = _positions(b - a, attend).to(self.device)
        return self._positions[key]

    def finish(self, h: _Handle) -> torch.Tensor:
        """Wait for the nodes' partials and merge them with the new token's own partial.
        A node lost on the way (link broken, or silent past the deadline) is handed to
        `on_loss`, and the layer is run again on the plan that follows."""
        for _ in range(8):
            if h.epoch != self._plan().epoch:  # planned before a recovery: run it again
                h = self._restart(h)
                continue
            try:
                if h.lost:
                    raise TransportError(f"nodes {h.lost} are gone")
                wait_all(h.sent, self.timeout)  # the replies are in h.replies
                break
            except RemoteError:
                self.end_step()  # an append a node refused (e.g. full) is the likelier cause
                raise
            except (TransportError, DeadlineExceeded) as e:
                lost = sorted(set(h.lost) | set(_lost(h.sent, e)))
                if self.on_loss is None or not lost:
                    raise
                self.on_loss(lost)
                self._reappend()
        else:
            raise TransportError("nodes kept failing while a layer was run again")
        if h.replies.is_cuda:  # reused only once the merge below has run
            h.replies.record_stream(torch.cuda.current_stream(h.replies.device))
        out, lse = unpack_states(h.replies, self.hq, self.d, h.q.dtype)
        k = h.positions.shape[0]  # every k-th partial is read from the same buffer
        return merge_new_token(h.q, h.k_new, h.v_new, out.expand(k, *out.shape),
                               lse.expand(k, *lse.shape), h.positions, self.scale,
                               softcap=h.softcap, sinks=h.sinks)[0]

    def _restart(self, h: _Handle) -> _Handle:
        for p in h.sent:
            p.cancel()
        return self.start(h.layer, h.q, h.k_new, h.v_new, h.rows, window=h.window,
                          softcap=h.softcap, sinks=h.sinks)

    def _reappend(self) -> None:
        """After a recovery: this step's new tokens of the layers already run go to the
        new plan's tail nodes (a node rewrites what it already had)."""
        for (layer, a, b), (k_new, v_new) in list(self._step_tokens.items()):
            for s in self.shares(a, b):
                r = s.rows
                if r.append_requests:  # (a link that broke meanwhile: found at finish)
                    self._client(r.node).append(
                        layer, r.append_requests, r.append_offsets, r.positions,
                        k_new.index_select(0, s.append_index)[:, None],
                        v_new.index_select(0, s.append_index)[:, None])

    # ---- spans: chunked prefill over the history ------------------------------------------
    def extend(self, layer: int, request, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               start: int, *, window: int | None = None, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of a span of new tokens at positions `[start, start + S)` of
        `request`: q `[S, Hq, D]`, k, v `[S, Hkv, D]` (RoPE applied). Each token attends
        over the history before `start` (on the nodes) and causally over the span (within
        its `window`, with `softcap` and `sinks` as in `start`); the span's k, v go to the
        nodes the plan's routes name once every layer's are in (give the layers in
        order). Returns `[S, Hq, D]` (kflume/weight/span.py); a loss: as in `finish`."""
        out = _span(self, lambda plan: span_attention(
            plan, self.clients, layer, request, q, k, v, start, self.scale, self.timeout,
            window=window, softcap=softcap, sinks=sinks))
        self.spans.add(self._plan(), self.clients, layer, request, start, k, v)
        return out

    def __call__(self, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor, **variant) -> torch.Tensor:
        """Decode attention of one layer for the plan's whole batch: q `[B, Hq, D]`, k_new,
        v_new `[B, Hkv, D]` (RoPE applied), rows in the plan's order; `variant`: window,
        softcap, sinks (`start`). Returns `[B, Hq, D]`."""
        return self.finish(self.start(layer, q, k_new, v_new, **variant))


@dataclass(slots=True)
class _Share:
    """One node's part of a range of plan rows, with its row indices on the device."""

    rows: NodeRows
    index: torch.Tensor  # rows.rows
    append_index: torch.Tensor  # rows.append_rows


@dataclass(slots=True)
class _Handle:
    sent: list  # one Pending per node with rows
    replies: torch.Tensor  # [reply rows of every node, bytes], the nodes one after another
    positions: torch.Tensor  # [k, row]: a row's k-th partial's place in `replies`, -1: none
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    layer: int
    rows: slice
    epoch: int
    lost: list  # nodes whose link was gone when the layer was sent
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None


def _span(ra: RemoteAttention, attend: Callable[[StepPlan], torch.Tensor]) -> torch.Tensor:
    """`attend(plan)` (a span's attention, `RemoteAttention.extend`), run again on the plan
    that follows a node's loss (`on_loss`); the span's k, v then go where it puts them."""
    for _ in range(8):
        try:
            return attend(ra._plan())
        except (TransportError, DeadlineExceeded) as e:
            lost = sorted({n for n, c in ra.clients.items() if not c.conn.alive}
                          | set(getattr(e, "nodes", ())))
            if ra.on_loss is None or not lost:
                raise
            ra.on_loss(lost)
    raise TransportError("nodes kept failing while a span was run again")


def _lost(sent: list[Pending], e: BaseException) -> list[str]:
    """The nodes among `sent`'s whose link is gone, or, past the deadline, those that did
    not answer (named by the error: the wait cancelled their receives, so they read as
    done)."""
    gone = sorted({p.client.name for p in sent if not p.client.conn.alive})
    if gone or not isinstance(e, DeadlineExceeded):
        return gone
    return sorted(getattr(e, "nodes", None) or {p.client.name for p in sent if not p.done})


def _positions(rows: int, attend: list[_Share]) -> torch.Tensor:
    """`[k, row]`: where in the reply buffer a row's k-th partial sits (the nodes'
    replies one after another), -1 past its last; k up to the most nodes any row is
    spread over."""
    places: list[list[int]] = [[] for _ in range(rows)]
    off = 0
    for s in attend:
        for j, row in enumerate(s.rows.rows):
            places[row].append(off + j)
        off += len(s.rows.requests)
    pos = torch.full((max(map(len, places), default=0), rows), -1, dtype=torch.long)
    for row, ps in enumerate(places):
        pos[: len(ps), row] = torch.tensor(ps, dtype=torch.long)
    return pos
