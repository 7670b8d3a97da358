"""NodeServer: an AttentionNode behind a transport.

One thread serves every connection: it keeps one receive posted per connection for the
peer's next sequence number, handles each message with the node, and answers every
message (a result, "ok", or an "error" that names the problem). A message the node
refuses changes nothing and the server goes on serving everyone. When a peer goes away,
the requests it opened are freed (and logged), so capacity is never lost silently.

An attend stream (kflume/client.py) is checked once, when its header comes; the
receives of all its layers' queries are posted then, into buffers reused from one of
the peer's streams to its next (a peer opens the next once it has the replies), and
each layer runs as soon as its query lands. A stream opened on a mailbox the peer
registered (kflume/comm/mailbox.py: a peer of this host) gets each layer's reply as a
copy into the peer's memory and a doorbell, both enqueued right behind the layer's
kernels, instead of a message sent once they are done. Such a stream may cover more
rows than its requests (`rows`: its place's, the rest padding), so that its buffers and
graphs stay the same while the batch changes, and a weight node may have the node
capture those graphs before any stream comes (op `prepare`). A stream the node refuses, or
that fails midway, is answered with an error at once and its remaining queries are
still received (and dropped), so the peer's sends complete; a stream whose queries stop
coming is given up after `stream_deadline` seconds.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .comm.base import MAX_PART, Connection, Listener, Recv, Transport
from .comm.mailbox import MailboxView
from .comm.wire import DTYPES, Header, WireError, state_row_bytes, transfer_empty
from .gcwatch import gc_pauses
from .node import AttentionNode, NodeCapacityError, UnknownRequestError

__all__ = ["NodeServer"]

log = logging.getLogger("kflume.node")

# Seconds between looks for new peers: a look costs a failed accept(2) (~7 us, the most
# of an idle loop), and the loop runs on every layer's critical path.
ACCEPT_EVERY = 0.001


@dataclass(slots=True)
class _Stream:
    """A peer's attend stream being served (module docstring)."""

    seq: int
    layers: range
    bufs: tuple  # queries [L, b, Hq, D], replies [L, b, row], their per-layer views,
    # per-layer events (what a layer's reply waits on) and the doorbell value (int64 [1],
    # read by the deliveries captured with the layers)
    key: tuple  # of the buffers' pool
    deadline: float
    run: Callable | None = None  # None: refused or failed; the rest is only drained
    recvs: list = field(default_factory=list)  # [layer] the query's receive
    next: int = 0  # layers received so far (handled in order)
    mail: tuple | None = None  # (MailboxView, byte offset, first word, value): replies
    # delivered into the peer's mailbox
    pull: tuple | None = None  # (query byte offset, first flag, flag stride, value): the
    # queries read from the peer's mailbox once its post flags say so


@dataclass(slots=True)
class _Peer:
    conn: Connection
    next_seq: int = 0
    recv: Recv | None = None
    requests: set = field(default_factory=set)
    streams: list[_Stream] = field(default_factory=list)
    # Free stream buffers by shape, per peer: a stream's last replies may still be on
    # their way (the peer pulls them) when it ends, and only this peer's next stream,
    # opened once it has them, may write the buffers again.
    stream_bufs: dict[tuple, list] = field(default_factory=dict)
    mailboxes: dict[int, MailboxView] = field(default_factory=dict)  # registered by id
    last_stream: float = -1e9  # when it last opened a stream (time.monotonic())


def _to_device(tensors: list[torch.Tensor], device) -> tuple[list, list]:
    """Host tensors (views of a receive buffer, reused once the message is handled) to
    the node's GPU through pinned copies: no stream sync, so the kernels of the previous
    message (another micro-batch) keep running meanwhile. Returns the device tensors and
    the pinned copies, which must live until the stream has passed the copies."""
    out, staged = [], []
    for t in tensors:
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        if t.numel():
            np.copyto(pinned.view(-1).view(torch.uint8).numpy(),
                      t.reshape(-1).view(torch.uint8).numpy())
        staged.append(pinned)
        out.append(pinned.to(device, non_blocking=True))
    return out, staged


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a CUDA tensor, ordered on the current stream (the reply is
    deferred until the stream's event says the copy is done)."""
    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return h.copy_(t, non_blocking=True)


def _error_kind(e: BaseException) -> str:
    if isinstance(e, NodeCapacityError):
        return "capacity"
    if isinstance(e, UnknownRequestError):
        return "unknown_request"
    if isinstance(e, (ValueError, WireError, TypeError)):
        return "bad_request"
    if isinstance(e, TimeoutError):
        return "timeout"
    return "internal"


class NodeServer:
    """Serve `node` on `listener` (made by `transport`). Call `serve()` or `poll()`."""

    def __init__(self, node: AttentionNode, transport: Transport, listener: Listener,
                 stream_deadline: float = 60.0, captures_per_stream: int = 2) -> None:
        self.node, self.transport, self.listener = node, transport, listener
        self.stream_deadline = stream_deadline
        self.captures_per_stream = captures_per_stream
        self.peers: list[_Peer] = []
        self.stopped = False
        self.handled = 0
        self.streams_served = 0
        # On a GPU node, replies that carry results wait for their event (kernels done with
        # the message's tensors and the reply's), while the loop goes on receiving: the
        # next message's overhead hides the kernel. Entries: (event, send, what it keeps
        # alive, timing).
        self._deferred: list[tuple] = []
        # Per attend message or stream layer (the last 4096): (arrival seen, kernels
        # launched, reply sent) in time.perf_counter() seconds, the message's sequence
        # number and layer ("stats": medians, and the entries themselves on request).
        self.timings: deque[tuple] = deque(maxlen=4096)
        self.op_timings: deque[tuple] = deque(maxlen=512)  # the other messages' (op for layer)
        self.gc = gc_pauses()  # the process's collector pauses (stats)
        self._next_accept = 0.0

    @property
    def address(self) -> str:
        return self.listener.address

    # ---- the loop -------------------------------------------------------------------
    def poll(self) -> int:
        """Accept new peers and handle every message that has arrived. Never blocks."""
        now = time.monotonic()
        if now >= self._next_accept:  # a joining peer waits at most ACCEPT_EVERY
            self._next_accept = now + ACCEPT_EVERY
            self._accept()
        self._send_deferred()
        handled = 0
        for peer in list(self.peers):
            while not self.stopped:
                if peer.recv is None:
                    peer.recv = peer.conn.post_recv(peer.next_seq)
                if not peer.recv.done:
                    break
                recv, peer.recv = peer.recv, None
                peer.next_seq += 1
                try:
                    msg = recv.message()
                except Exception as e:  # noqa: BLE001 - the peer is gone or sent garbage
                    if not peer.conn.alive:
                        self._drop(peer, str(e))
                        break
                    log.warning("%s: unreadable message %d: %s", peer.conn.peer,
                                peer.next_seq - 1, e)
                    self._reply_error(peer, Header("error", seq=peer.next_seq - 1), e)
                    continue
                t0 = time.perf_counter()
                try:
                    self._handle(peer, msg.header, msg.tensors, t0)
                finally:
                    msg.release()
                handled += 1
            if peer in self.peers:
                handled += self._serve_streams(peer)
        self.handled += handled
        return handled

    def _accept(self) -> None:
        while (conn := self.listener.accept()) is not None:
            if hasattr(conn, "recv_device"):
                conn.recv_device = self.node.device
            self.peers.append(_Peer(conn))
            log.info("peer %s joined (%d connected)", conn.peer, len(self.peers))
        refused = getattr(self.listener, "refused", None)
        while refused:
            log.warning("refused a peer: %s", refused.pop(0))

    def serve(self, should_stop=lambda: False, idle_sleep: float = 0.001) -> None:
        """Serve until a "shutdown" message or `should_stop()` returns True."""
        while not self.stopped and not should_stop():
            handled = self.poll()
            # Never sleep while a reply waits on its kernel, or a pulling stream on a
            # post flag (which wakes nothing): poll again at once.
            busy = handled or self._deferred or any(
                st.pull is not None for p in self.peers for st in p.streams)
            self.transport.progress(0.0 if busy else idle_sleep)
        while self._deferred:  # replies already computed still go out
            self._send_deferred()
            self.transport.progress(0.0)
        log.info("server at %s stopped", self.address)

    def close(self) -> None:
        for peer in self.peers:
            self._close_mailboxes(peer)
            peer.conn.close()
        self.peers.clear()
        self.listener.close()

    def _drop(self, peer: _Peer, why: str) -> None:
        self.peers.remove(peer)
        for st in peer.streams:
            for r in st.recvs:
                if r is not None:
                    r.cancel()
        freed = self.node.free(sorted(peer.requests, key=str))
        level = logging.WARNING if peer.requests else logging.INFO
        log.log(level, "peer %s left (%s); freed its %d requests (%d tokens)", peer.conn.peer,
                why, len(peer.requests), freed)
        self._close_mailboxes(peer)
        peer.conn.close()

    def _close_mailboxes(self, peer: _Peer) -> None:
        if peer.mailboxes and self.node.device.type == "cuda":
            torch.cuda.synchronize(self.node.device)  # no delivery still on its way there
        for box in peer.mailboxes.values():
            box.close()
        peer.mailboxes.clear()

    # ---- messages ----------------------------------------------------------------------
    def _reply_error(self, peer: _Peer, h: Header, e: BaseException) -> None:
        try:
            peer.conn.send(Header("error", seq=h.seq, error=f"{type(e).__name__}: {e}",
                                  info={"kind": _error_kind(e), "op": h.op}))
        except Exception as send_error:  # noqa: BLE001
            log.warning("could not report an error to %s: %s", peer.conn.peer, send_error)

    def _handle(self, peer: _Peer, h: Header, tensors: list[torch.Tensor],
                t0: float = 0.0) -> None:
        staged: list[torch.Tensor] = []
        try:
            handler = getattr(self, f"_op_{h.op}", None)
            if handler is None:
                raise WireError(f"op {h.op!r} is not a request a node serves")
            if self.node.device.type == "cuda" and tensors and not any(
                t.is_cuda for t in tensors
            ):
                tensors, staged = _to_device(tensors, self.node.device)
            reply, out = handler(peer, h, tensors)
            if reply is None:  # a stream: answered once its layers are
                return
            if staged:  # a message that came through host memory is answered the same way
                out = [_to_host(t) if t.is_cuda else t for t in out]
        except Exception as e:  # noqa: BLE001 - refuse this message, keep serving
            if _error_kind(e) == "internal":
                log.exception("%s: %s failed", peer.conn.peer, h.op)
            else:
                log.info("%s: refused %s: %s", peer.conn.peer, h.op, e)
            self._reply_error(peer, h, e)
            return
        reply.seq = h.seq
        timing = (t0, time.perf_counter(), h.seq, h.layer, h.op)
        if out:  # results: sent once the kernels that write them are done
            self._defer(lambda: peer.conn.send(reply, out, ready=True), (tensors, staged),
                        timing, peer)
            return
        # An acknowledgement (append, import, control) goes at once: nothing after this
        # can refuse the message, and the peer's next messages run behind its kernels on
        # this node's stream. Its tensors stay referenced until those kernels are done.
        if tensors and self.node.device.type == "cuda":
            self._defer(lambda: None, (tensors, staged), None, peer)
        self._send_now(lambda: peer.conn.send(reply, out), timing, peer)

    def _defer(self, send: Callable[[], None], keep, timing: tuple | None,
               peer: _Peer, event: torch.cuda.Event | None = None) -> None:
        """Send once the kernels enqueued so far are done (at once on CPU). Kernels may
        still read a message's tensors and write its reply's: both stay referenced
        (`keep`) until the stream passes the event, since a received CUDA buffer that went
        back to the allocator could take the next message (written by UCX, outside
        stream order) while a kernel still reads it. `timing`: (arrival seen, launched,
        seq, layer, op) of a message, recorded with the send. `event`: one to reuse (free
        once its last send went out)."""
        if self.node.device.type == "cuda":
            event = event or torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.node.device))
            self._deferred.append((event, send, keep, timing, peer))
        else:
            self._send_now(send, timing, peer)

    def _send_now(self, send, timing, peer) -> None:
        if peer.conn.alive:
            send()
        if timing is not None:
            t0, t1, seq, layer, op = timing
            (self.timings if op == "attend" else self.op_timings).append(
                (t0, t1, time.perf_counter(), seq, op if op != "attend" else layer))

    def _send_deferred(self) -> None:
        while self._deferred and self._deferred[0][0].query():
            _, send, _, timing, peer = self._deferred.pop(0)
            self._send_now(send, timing, peer)

    # ---- attend streams ----------------------------------------------------------------
    def _serve_streams(self, peer: _Peer) -> int:
        """Run each layer whose query has landed; finish streams that are done."""
        handled = 0
        for st in list(peer.streams):
            if st.pull is not None:
                handled += self._serve_pull(peer, st)
                continue
            while st.next < len(st.recvs) and st.recvs[st.next].done:
                i = st.next
                recv, st.recvs[i] = st.recvs[i], None
                st.next += 1
                t0 = time.perf_counter()
                try:
                    recv.message()  # raises what went wrong (a truncated part, ...)
                    if st.run is None:
                        continue  # drained
                    st.run(i)  # a mailbox stream's delivery included
                    res = st.bufs[3][i]
                except Exception as e:  # noqa: BLE001 - refuse the stream, keep serving
                    if not peer.conn.alive:
                        self._drop(peer, str(e))
                        return handled
                    self._stream_failed(peer, st, e)
                    continue
                handled += 1
                if st.mail is not None:  # delivered behind the layer's kernels
                    t1 = time.perf_counter()
                    self.timings.append((t0, t1, t1, st.seq, st.layers[i]))
                    continue
                self._defer(lambda s=st.seq, p=i + 1, r=res: peer.conn.send_part(
                    s, p, r, ready=True, static=True), None,
                    (t0, time.perf_counter(), st.seq, st.layers[i], "attend"), peer,
                    st.bufs[4][i])
            if st.next == len(st.recvs):
                peer.streams.remove(st)
                t = time.perf_counter()
                self._defer(lambda st=st: self._stream_done(peer, st), None,
                            (t, t, st.seq, None, "stream"), peer)
            elif time.monotonic() > st.deadline:
                peer.streams.remove(st)
                for r in st.recvs:
                    if r is not None:
                        r.cancel()  # its buffers are not reused: a late part may land there
                log.warning("%s: stream %d got %d of %d queries in %.0f s; given up",
                            peer.conn.peer, st.seq, st.next, len(st.recvs),
                            self.stream_deadline)
                if st.run is not None:
                    self._stream_failed(peer, st, TimeoutError(
                        f"stream {st.seq}: {len(st.recvs) - st.next} queries never came"))
        return handled

    def _serve_pull(self, peer: _Peer, st: _Stream) -> int:
        """A stream whose queries this node reads from the peer's mailbox: each layer
        once its post flag is up, in order; the reply delivered into the mailbox."""
        box = st.mail[0]
        _, flag, stride, fvalues = st.pull
        handled = 0
        while st.run is not None and st.next < len(st.layers):
            i = st.next
            try:
                if not box.posted(flag + i * stride, fvalues[i]):
                    break
                st.next += 1
                t0 = time.perf_counter()
                st.run(i)  # fetch, attend, deliver: one replay once captured
            except Exception as e:  # noqa: BLE001 - refuse the stream, keep serving
                self._stream_failed(peer, st, e)
                break
            t1 = time.perf_counter()
            self.timings.append((t0, t1, t1, st.seq, st.layers[i]))
            handled += 1
        if st.run is not None and st.next < len(st.layers) and time.monotonic() > st.deadline:
            log.warning("%s: stream %d saw %d of %d queries posted in %.0f s; given up",
                        peer.conn.peer, st.seq, st.next, len(st.layers), self.stream_deadline)
            self._stream_failed(peer, st, TimeoutError(
                f"stream {st.seq}: {len(st.layers) - st.next} queries never posted"))
        if st.run is None or st.next == len(st.layers):  # pooled (acknowledged if not
            peer.streams.remove(st)  # failed) once the kernels enqueued are done
            t = time.perf_counter()  # (op_trace: its last layer launched, ack sent)
            self._defer(lambda: self._stream_done(peer, st), None,
                        (t, t, st.seq, None, "stream"), peer)
        return handled

    def _stream_failed(self, peer: _Peer, st: _Stream, e: BaseException) -> None:
        if st.run is None:
            return  # already answered
        st.run = None
        if _error_kind(e) == "internal":
            log.error("%s: stream %d failed", peer.conn.peer, st.seq, exc_info=e)
        else:
            log.info("%s: refused stream %d: %s", peer.conn.peer, st.seq, e)
        if st.mail is not None:  # answered once the deliveries enqueued are done: after
            # the answer, nothing of the stream lands in the peer's mailbox
            self._defer(lambda: self._reply_error(peer, Header("stream", seq=st.seq), e),
                        None, None, peer)
            return
        self._reply_error(peer, Header("stream", seq=st.seq), e)

    def _stream_done(self, peer: _Peer, st: _Stream) -> None:
        """Every layer answered (and the kernels done with the buffers): acknowledge the
        stream and pool its buffers."""
        if st.run is not None:
            peer.conn.send(Header("ok", seq=st.seq))
            self.streams_served += 1
        free = peer.stream_bufs.setdefault(st.key, [])
        if len(free) < 4:
            free.append(st.bufs)
        if len(peer.stream_bufs) > 8:
            peer.stream_bufs.pop(next(iter(peer.stream_bufs)))
        # Between the peer's steps: a few graphs for the layers served without one (a
        # capture that fails leaves its layer on the per-shape graph; serving goes on).
        # Not for a node that captures only when its owner says (NodeConfig).
        if not self.node.config.capture_while_serving:
            return
        try:
            self.node.capture_pending(self.captures_per_stream)
        except Exception:  # noqa: BLE001
            log.exception("capturing stream graphs failed; those layers stay uncaptured")

    def _stream_buffers(self, peer: _Peer, key: tuple) -> tuple:
        free = peer.stream_bufs.get(key)
        if free:
            return free.pop()
        layers, b, hq, d, dtype = key[:5]
        dev = self.node.device
        q = transfer_empty((layers, b, hq, d), dtype, dev)
        res = transfer_empty((layers, b, state_row_bytes(hq, d, dtype)), torch.uint8, dev)
        events = [torch.cuda.Event() if dev.type == "cuda" else None for _ in range(layers)]
        value = torch.zeros(1, dtype=torch.int64, device=dev)
        return q, res, list(q.unbind(0)), list(res.unbind(0)), events, value

    @staticmethod
    def _ints(h: Header, name: str, n: int) -> list[int]:
        v = h.ints.get(name)
        if v is None or len(v) != n:
            raise ValueError(f"{h.op}: ints[{name!r}] must list {n} values")
        return v

    @staticmethod
    def _tensors(h: Header, tensors, n: int) -> list[torch.Tensor]:
        if len(tensors) != n:
            raise ValueError(f"{h.op} carries {len(tensors)} tensors; it needs {n}")
        return tensors

    def _op_attend(self, peer, h: Header, tensors):
        (q,) = self._tensors(h, tensors, 1)
        scale = h.info.get("scale")
        if scale is not None and not isinstance(scale, float):
            raise ValueError(f"attend: scale must be a float; got {scale!r}")
        states = self.node.attend(h.layer, h.requests, self._ints(h, "kv_len", len(h.requests)),
                                  q, scale=scale, packed=True)
        return Header("result", layer=h.layer, epoch=h.epoch), [states]

    def _stream_spec(self, h: Header, b: int) -> tuple:
        """A stream's (or a prepare's) info, checked: (layers, rows, heads, head_dim,
        dtype, scale, mailbox, pull, the key of its buffers' pool). Its rows: `b`, or
        info["rows"] (>= b, with a mailbox: padding rows, so that the buffers and graphs
        of a mailbox place stay the same while its batch changes)."""
        layers, hq, d = (h.info.get(k) for k in ("layers", "heads", "head_dim"))
        dtype, rows = DTYPES.get(h.info.get("dtype")), h.info.get("rows", b)
        if not (all(type(x) is int for x in (layers, hq, d, rows)) and 1 <= layers <= MAX_PART
                and 0 < hq <= 1024 and 0 < d <= 1024 and max(b, 1) <= rows <= 65536
                and dtype is not None and dtype.is_floating_point):
            raise ValueError(f"{h.op}: info must give layers (1..{MAX_PART}), heads, head_dim "
                             f"and a float dtype, for 1..65536 rows (>= {b} requests); got "
                             f"{h.info}")
        scale = h.info.get("scale")
        if scale is not None and not isinstance(scale, float):
            raise ValueError(f"{h.op}: scale must be a float; got {scale!r}")
        mail, pull = h.info.get("mailbox"), h.info.get("pull")
        if mail is not None and not (isinstance(mail, list) and len(mail) == 4 and all(
                type(x) is int for x in mail) and 0 <= mail[3] < 2**63):
            raise ValueError(f"{h.op}: mailbox must be [id, offset, word, value]; got {mail!r}")
        if pull is not None and not (
                isinstance(pull, list) and len(pull) == 4
                and all(type(x) is int and x >= 0 for x in pull[:3]) and pull[2] > 0
                and isinstance(pull[3], list) and len(pull[3]) == layers
                and all(type(v) is int and v > 0 for v in pull[3]) and mail is not None):
            raise ValueError(f"{h.op}: pull must be [query offset, flag, stride > 0, [a value "
                             f"> 0 per layer]] with a mailbox; got {pull!r}")
        if rows != b and mail is None:
            raise ValueError(f"{h.op}: padding rows (rows={rows} for {b} requests) need a "
                             "mailbox")
        # A mailbox stream's buffers are kept for its place in the mailbox (the graphs
        # captured on them fetch and deliver there): the same buffers every step.
        place = None if mail is None else (tuple(mail[:3]),
                                           None if pull is None else (pull[0],))
        return (layers, rows, hq, d, dtype, scale, mail, pull,
                (layers, rows, hq, d, dtype, place))

    def _mailbox_around(self, peer: _Peer, op: str, spec: tuple, bufs: tuple) -> tuple:
        """A mailbox stream's (registered) box, checked against the stream's rows and
        flags, and what its layers run around their kernels."""
        layers, rows, hq, d, dtype, _, mail, pull, _ = spec
        box = peer.mailboxes.get(mail[0])
        if box is None:
            raise ValueError(f"{op}: mailbox {mail[0]} was not registered")
        box.check(mail[1], rows * state_row_bytes(hq, d, dtype), mail[2], layers)
        if pull is not None:
            box.check_pull(pull[0], bufs[2][0].nbytes, pull[1] + pull[2] * (layers - 1))
        return box, self._around(box, bufs, mail[1], mail[2],
                                 None if pull is None else pull[0])

    def _check_geometry(self, op: str, d: int, dtype) -> None:
        c = self.node.config
        if d != c.head_dim or dtype != self.node.dtype:
            raise ValueError(f"{op}: q is {dtype} with head_dim {d}; this node holds {c.dtype} "
                             f"KV with head_dim {c.head_dim}")

    def _op_stream(self, peer, h: Header, tensors):
        self._tensors(h, tensors, 0)
        b = len(h.requests)
        spec = self._stream_spec(h, b)
        layers, _, _, d, dtype, scale, mail, pull, key = spec
        if b > len(self.node.requests):  # before allocating buffers for it
            raise UnknownRequestError(f"stream names {b} requests; this node holds "
                                      f"{len(self.node.requests)}")
        bufs = self._stream_buffers(peer, key)
        peer.last_stream = time.monotonic()
        st = _Stream(h.seq, range(h.layer, h.layer + layers), bufs, key,
                     peer.last_stream + self.stream_deadline)
        if pull is None:
            st.recvs = [peer.conn.post_part_recv(h.seq, i + 1, q)
                        for i, q in enumerate(bufs[2])]
        peer.streams.append(st)  # received from now on, whatever the checks below say
        around = None
        if mail is not None:  # [mailbox id, byte offset, first word, doorbell value]
            if mail[3] == 0:
                raise ValueError("stream: the mailbox's doorbell value must be > 0")
            box, around = self._mailbox_around(peer, "stream", spec, bufs)
            st.pull = None if pull is None else tuple(pull)
            st.mail = (box, mail[1], mail[2], mail[3])
            bufs[5].fill_(mail[3])  # ordered before the layers' deliveries
        self._check_geometry("stream", d, dtype)
        st.run = self.node.attend_batch(st.layers, h.requests, self._ints(h, "kv_len", b),
                                        bufs[0], bufs[1], scale=scale, around=around)
        return None, []

    def _op_prepare(self, peer, h: Header, tensors):
        """Capture the graphs of a mailbox place's streams before any comes (info: a
        stream's, with no requests, `rows` and a mailbox, doorbell value 0; pull: its
        query offset and flags): `AttentionNode.prepare_batch`. Their buffers go to the
        place's pool, where the place's first stream takes them. For a node that is not
        serving yet: it holds up this loop ~0.5 ms a layer, so a node that served another
        peer's stream in the last second leaves them to `capture_pending` instead, a few
        at each stream's end."""
        self._tensors(h, tensors, 0)
        if h.requests or "rows" not in h.info or "mailbox" not in h.info:
            raise ValueError("prepare: give info rows and mailbox, and no requests")
        spec = self._stream_spec(h, 0)
        layers, _, _, d, dtype, scale, _, _, key = spec
        self._check_geometry("prepare", d, dtype)
        bufs = self._stream_buffers(peer, key)
        try:
            _, around = self._mailbox_around(peer, "prepare", spec, bufs)  # (registering
            # the mailbox loaded its kernels)
            busy = any(p is not peer and time.monotonic() - p.last_stream < 1.0
                       for p in self.peers)
            n = self.node.prepare_batch(range(h.layer, h.layer + layers), bufs[0], bufs[1],
                                        scale=scale, around=around, now=not busy)
        finally:
            peer.stream_bufs.setdefault(key, []).append(bufs)
        return Header("ok", info={"captured": n}), []

    @staticmethod
    def _around(box: MailboxView, bufs: tuple, offset: int, word: int,
                query_offset: int | None) -> tuple:
        """What each layer of a mailbox stream runs around its kernels, captured with them
        into its graph: the query fetched from the mailbox (pulling), and the reply
        delivered with the doorbell value of whichever stream replays it (`bufs[5]`)."""
        qs, results, value = bufs[2], bufs[3], bufs[5]

        def before(i: int) -> None:
            box.pull(qs[i], query_offset)

        def after(i: int) -> None:
            box.deliver(results[i], offset, word + i, value)
        return ((box, offset, word, query_offset), None if query_offset is None else before,
                after)

    def _op_append(self, peer, h: Header, tensors):
        k, v = self._tensors(h, tensors, 2)
        n, layers = len(h.requests), h.info.get("layers")
        new = [r for r in h.requests if r not in self.node.requests]
        args = (h.requests, self._ints(h, "offsets", n), self._ints(h, "positions", n), k, v)
        if layers is None:
            self.node.append(h.layer, *args)
        elif isinstance(layers, int):
            self.node.append_layers(range(h.layer, h.layer + layers), *args)
        else:
            raise ValueError(f"append: info['layers'] must be an int; got {layers!r}")
        self._joined(peer, new)
        return Header("ok"), []

    def _op_mailbox(self, peer, h: Header, tensors):
        """Map the peer's mailboxes (info["mailboxes"]: [[id, description], ...]);
        refused as a whole, naming why, if any cannot be (the peer then takes replies as
        messages)."""
        boxes = h.info.get("mailboxes")
        if not (isinstance(boxes, list) and all(
                isinstance(e, list) and len(e) == 2 and type(e[0]) is int for e in boxes)):
            raise ValueError("mailbox: info['mailboxes'] must list [id, description] pairs")
        opened: dict[int, MailboxView] = {}
        try:
            for k, desc in boxes:
                opened[k] = MailboxView(desc, self.node.device)
        except BaseException:
            for box in opened.values():
                box.close()
            raise
        if any(k in peer.mailboxes for k in opened) and self.node.device.type == "cuda":
            torch.cuda.synchronize(self.node.device)  # no delivery still on its way there
        for k, box in opened.items():
            old = peer.mailboxes.pop(k, None)
            if old is not None:
                old.close()
            peer.mailboxes[k] = box
        log.info("%s: mailboxes %s registered", peer.conn.peer, sorted(opened))
        return Header("ok"), []

    def _op_cancel(self, peer, h: Header, tensors):
        """The peer gives a stream up: it is answered with an error once what was
        enqueued for it is done (mailbox streams), and not served further."""
        seq = h.info.get("stream")
        if type(seq) is not int:
            raise ValueError("cancel: info['stream'] must be a stream's sequence number")
        for st in peer.streams:
            if st.seq == seq:
                self._stream_failed(peer, st, TimeoutError(f"stream {seq}: given up by the "
                                                           "peer"))
        return Header("ok"), []

    def _op_open(self, peer, h: Header, tensors):
        new = [r for r in h.requests if r not in self.node.requests]
        self.node.open(h.requests, self._ints(h, "tokens", len(h.requests)))
        self._joined(peer, new)
        return Header("ok"), []

    def _op_free(self, peer, h: Header, tensors):
        freed = self.node.free(h.requests)
        peer.requests.difference_update(h.requests)
        if h.requests:
            s = self.node.stats()
            log.info("freed %d requests (%d tokens); %d of %d pages free", len(h.requests), freed,
                     s["pages_free"], s["pages_total"])
        return Header("ok", info={"freed_tokens": freed}), []

    def _op_export(self, peer, h: Header, tensors):
        if len(h.requests) != 1:
            raise ValueError("export takes one request")
        start, end = self._ints(h, "start", 1)[0], self._ints(h, "end", 1)[0]
        k, v = self.node.export_range(h.requests[0], start, end)
        return Header("result"), [k, v]

    def _op_import(self, peer, h: Header, tensors):
        if len(h.requests) != 1:
            raise ValueError("import takes one request")
        k, v = self._tensors(h, tensors, 2)
        new = [r for r in h.requests if r not in self.node.requests]
        self.node.import_range(h.requests[0], self._ints(h, "start", 1)[0], k, v)
        self._joined(peer, new)
        return Header("ok"), []

    def _op_stats(self, peer, h: Header, tensors):
        info = self.node.stats()
        info["attend_streams"] = self.streams_served
        info["gc_collections"] = self.gc.count
        if self.timings:  # medians over the last attend messages, microseconds
            t = self.timings
            info["attend_handle_us"] = statistics.median(e[1] - e[0] for e in t) * 1e6
            info["attend_reply_us"] = statistics.median(e[2] - e[1] for e in t) * 1e6
            info["attend_messages"] = len(t)
        n = h.info.get("trace", 0)
        if type(n) is not int or not 0 <= n <= 512:
            raise ValueError("stats: trace must be an int in [0, 512]")
        if n:  # the last n entries: [seq, layer, seen, launched, sent] (perf_counter s)
            info["attend_trace"] = [[e[3], e[4], e[0], e[1], e[2]]
                                    for e in list(self.timings)[-n:]]
            # and of the other messages answered (appends, control), and of the streams'
            # acknowledgements (op "stream": seen = launched = its last layer's launch,
            # then the ack sent): [seq, op, seen, launched, sent]
            info["op_trace"] = [[e[3], e[4], e[0], e[1], e[2]]
                                for e in list(self.op_timings)[-n:]]
            # and the process's last collector pauses: [began, seconds, generation]
            info["gc_trace"] = [list(p) for p in list(self.gc.recent)[-n:]]
        if h.info.get("reset_timings"):
            self.timings.clear()
            self.op_timings.clear()
        return Header("ok", info=info), []

    def _op_shutdown(self, peer, h: Header, tensors):
        log.info("shutdown asked by %s", peer.conn.peer)
        self.stopped = True
        return Header("ok"), []

    def _joined(self, peer: _Peer, new: list) -> None:
        if not new:
            return
        peer.requests.update(new)
        s = self.node.stats()
        log.info("requests joined: %s; %d requests, %d of %d pages free", new, s["requests"],
                 s["pages_free"], s["pages_total"])

