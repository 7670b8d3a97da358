"""NodeServer: an AttentionNode behind a transport.

One thread serves every connection: it keeps one receive posted per connection for the
peer's next sequence number, handles each message with the node (kflume/node/ops.py,
attend streams in kflume/node/streams.py), and answers every message: a result, "ok",
or an "error" that names the problem. A message the node refuses changes nothing and
the server goes on serving everyone. A header's tensors are checked against the node
before buffers are allocated for them (`checks.message`); a peer's request ids are its
own (kflume/node/peer.py). When a peer goes away, the requests it opened are freed (and
logged), so capacity is never lost silently. New peers' handshakes never block this
loop (kflume/comm/ucx_accept.py).

On a GPU node, replies that carry results wait for an event (the kernels done with the
message's tensors and the reply's), while the loop goes on receiving.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..comm.base import Listener, Transport
from ..comm.wire import Header, WireError
from ..gcwatch import gc_pauses
from . import checks, ops
from .node import AttentionNode
from .pages import NodeCapacityError, UnknownRequestError
from .peer import Peer
from .streams import Streams

__all__ = ["NodeServer"]

log = logging.getLogger("kflume.node")

# Seconds between looks for new peers: a look costs a failed accept(2) (~7 us, most of an
# idle loop), and the loop runs on every layer's critical path.
ACCEPT_EVERY = 0.001
# A leaving node that holds nothing still waits this long for messages: tokens a cluster
# placed on it before it learned that the node leaves are on their way (moved off, not
# recomputed, once they arrive); every message starts the wait again.
LEAVE_QUIET = 2.0


@dataclass(slots=True)
class Timing:
    """When a message (or stream layer) was seen, its kernels launched and its reply
    sent (time.perf_counter() seconds), its sequence number and its layer (attend) or
    op (the others; "stream": a stream's acknowledgement)."""

    seen: float
    launched: float
    sent: float
    seq: int
    what: int | str


@dataclass(slots=True)
class _Deferred:
    event: torch.cuda.Event
    send: Callable[[], None]
    keep: object  # tensors kernels may still read or write until the event
    timing: tuple | None
    peer: Peer


def error_kind(e: BaseException) -> str:
    if isinstance(e, NodeCapacityError):
        return "capacity"
    if isinstance(e, UnknownRequestError):
        return "unknown_request"
    if isinstance(e, (ValueError, WireError, TypeError)):
        return "bad_request"
    if isinstance(e, TimeoutError):
        return "timeout"
    return "internal"


def _to_device(tensors: list[torch.Tensor], device) -> tuple[list, list]:
    """Host tensors (views of a receive buffer, reused once the message is handled) to
    the node's GPU through pinned copies: no stream sync, so the kernels of the previous
    message keep running meanwhile. Returns the device tensors and the pinned copies,
    which must live until the stream has passed the copies."""
    out, staged = [], []
    for t in tensors:
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        if t.numel():
            np.copyto(pinned.view(-1).view(torch.uint8).numpy(),
                      t.reshape(-1).view(torch.uint8).numpy())
        staged.append(pinned)
        out.append(pinned.to(device, non_blocking=True))
    return out, staged


class NodeServer:
    """Serve `node` on `listener` (made by `transport`). Call `serve()` or `poll()`."""

    error_kind = staticmethod(error_kind)

    def __init__(self, node: AttentionNode, transport: Transport, listener: Listener,
                 stream_deadline: float = 60.0, captures_per_stream: int = 2) -> None:
        self.node, self.transport, self.listener = node, transport, listener
        self.streams = Streams(self, stream_deadline, captures_per_stream)
        self.peers: list[Peer] = []
        self.stopped = False
        self.leaving: float | None = None  # drain deadline (time.monotonic), once leaving
        self._quiet_from = 0.0  # leaving: since then no message came (time.monotonic)
        self.handled = 0
        self._deferred: deque[_Deferred] = deque()
        self.timings: deque[Timing] = deque(maxlen=4096)  # attend messages, stream layers
        self.op_timings: deque[Timing] = deque(maxlen=512)  # the other messages answered
        self.gc = gc_pauses()  # the process's collector pauses (stats)
        self._next_accept = 0.0
        self._peer_ids = itertools.count(1)

    @property
    def address(self) -> str:
        return self.listener.address

    # ---- the loop ----------------------------------------------------------------------
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
                        self.drop(peer, str(e))
                        break
                    log.warning("%s: unreadable message %d: %s", peer.conn.peer,
                                peer.next_seq - 1, e)
                    self.reply_error(peer, Header("error", seq=peer.next_seq - 1), e)
                    continue
                try:
                    self._handle(peer, msg.header, msg.tensors, time.perf_counter())
                finally:
                    msg.release()
                handled += 1
            if peer in self.peers:
                handled += self.streams.serve(peer)
        self.handled += handled
        if handled and self.leaving is not None:
            self._quiet_from = time.monotonic()
        return handled

    def leave(self, deadline_s: float) -> None:
        """Drain: replies say the node is leaving, so its clusters move its ranges off;
        `serve` returns once it holds nothing and no peer has sent anything for
        `LEAVE_QUIET` s (or none is connected), or after `deadline_s` s (what is left
        then is recomputed by the clusters that lose it)."""
        if self.leaving is None:
            self._quiet_from = time.monotonic()
            self.leaving = self._quiet_from + deadline_s
            log.info("leaving: %d requests to move off within %.0f s",
                     len(self.node.requests), deadline_s)

    def drained(self) -> bool:
        """Leaving, and empty and quiet (`leave`), or past the deadline."""
        if self.leaving is None:
            return False
        now = time.monotonic()
        return now > self.leaving or not self.node.requests and (
            not self.peers or now - self._quiet_from >= LEAVE_QUIET)

    def serve(self, should_stop: Callable[[], bool] = lambda: False,
              idle_sleep: float = 0.001) -> None:
        """Serve until a "shutdown" message, `should_stop()` returns True, or a node that
        is leaving has drained (`leave`)."""
        while not self.stopped and not should_stop() and not self.drained():
            handled = self.poll()
            # never sleep while a reply waits on its kernel, or a stream on a post flag
            busy = handled or self._deferred or self.streams.busy()
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

    def _accept(self) -> None:
        while (conn := self.listener.accept()) is not None:
            if hasattr(conn, "recv_device"):
                conn.recv_device = self.node.device
            peer = Peer(conn, uid=next(self._peer_ids))
            # every header's tensors checked against this node before buffers exist
            conn.header_check = lambda h: checks.message(self.node, h)
            self.peers.append(peer)
            log.info("peer %s joined (%d connected)", conn.peer, len(self.peers))
        refused = getattr(self.listener, "refused", None)
        while refused:
            log.warning("refused a peer: %s", refused.popleft())

    def drop(self, peer: Peer, why: str) -> None:
        """A peer went away: cancel its receives, free its requests (once)."""
        if peer not in self.peers:  # (a poll re-entered through the transport)
            return
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

    def _close_mailboxes(self, peer: Peer) -> None:
        if peer.mailboxes and self.node.device.type == "cuda":
            torch.cuda.synchronize(self.node.device)  # no delivery still on its way there
        for box in peer.mailboxes.values():
            box.close()
        peer.mailboxes.clear()

    # ---- messages ----------------------------------------------------------------------
    def _handle(self, peer: Peer, h: Header, tensors: list[torch.Tensor], t0: float) -> None:
        staged: list[torch.Tensor] = []
        try:
            handler = ops.handler(h.op)
            if self.node.device.type == "cuda" and tensors and not any(
                    t.is_cuda for t in tensors):
                tensors, staged = _to_device(tensors, self.node.device)
            reply = handler(self, peer, h, tensors)
            if reply is None:  # a stream: answered once its layers are
                return
            out = reply.tensors
            if staged:  # came through host memory: answered the same way
                out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                    t, non_blocking=True) if t.is_cuda else t for t in out]
        except Exception as e:  # noqa: BLE001 - refuse this message, keep serving
            if error_kind(e) == "internal":
                log.exception("%s: %s failed", peer.conn.peer, h.op)
            else:
                log.info("%s: refused %s: %s", peer.conn.peer, h.op, e)
            self.reply_error(peer, h, e)
            return
        header = reply.header
        header.seq = h.seq
        if self.leaving is not None:
            header.info = {**header.info, "leaving": True}
        timing = (t0, time.perf_counter(), h.seq, h.layer if h.op == "attend" else h.op)
        if out:  # results: sent once the kernels that write them are done
            self.defer(lambda: peer.conn.send(header, out, ready=True), peer,
                       keep=(tensors, staged), timing=timing)
            return
        # An acknowledgement goes at once: nothing after this can refuse the message,
        # and the peer's next messages run behind its kernels on this node's stream.
        # Its tensors stay referenced until those kernels are done.
        if tensors and self.node.device.type == "cuda":
            self.defer(lambda: None, peer, keep=(tensors, staged))
        self._send_now(lambda: peer.conn.send(header, out), timing, peer)

    def reply_error(self, peer: Peer, h: Header, e: BaseException) -> None:
        info = {"kind": error_kind(e), "op": h.op}
        if self.leaving is not None:
            info["leaving"] = True
        try:
            peer.conn.send(Header("error", seq=h.seq, error=f"{type(e).__name__}: {e}",
                                  info=info))
        except Exception as send_error:  # noqa: BLE001
            log.warning("could not report an error to %s: %s", peer.conn.peer, send_error)

    def defer(self, send: Callable[[], None], peer: Peer, keep=None,
              timing: tuple | None = None, event: torch.cuda.Event | None = None) -> None:
        """Send once the kernels enqueued so far are done (at once on CPU). Kernels may
        still read a message's tensors and write its reply's: both stay referenced
        (`keep`) until the stream passes the event, since a received CUDA buffer back in
        the allocator could take the next message (written by UCX, outside stream order)
        while a kernel still reads it. `timing`: (seen, launched, seq, layer or op),
        recorded with the send. `event`: one to reuse (free once its send went out)."""
        if self.node.device.type == "cuda":
            event = event or torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.node.device))
            self._deferred.append(_Deferred(event, send, keep, timing, peer))
        else:
            self._send_now(send, timing, peer)

    def _send_now(self, send: Callable[[], None], timing: tuple | None, peer: Peer) -> None:
        if peer.conn.alive:
            send()
        if timing is not None:
            self.record(timing[0], timing[1], time.perf_counter(), timing[2], timing[3])

    def _send_deferred(self) -> None:
        while self._deferred and self._deferred[0].event.query():
            d = self._deferred.popleft()
            self._send_now(d.send, d.timing, d.peer)

    def record(self, seen: float, launched: float, sent: float, seq: int,
               what: int | str) -> None:
        """A message's (or stream layer's) times, for `stats`."""
        (self.op_timings if isinstance(what, str) else self.timings).append(
            Timing(seen, launched, sent, seq, what))

    # ---- helpers for the handlers ------------------------------------------------------
    @staticmethod
    def ints(h: Header, name: str, n: int) -> list[int]:
        v = h.ints.get(name)
        if v is None or len(v) != n:
            raise ValueError(f"{h.op}: ints[{name!r}] must list {n} values")
        return v

    def stats(self, trace: int = 0, reset: bool = False) -> dict:
        """The node's state and its serving times: medians over the attend messages and
        stream layers since the last reset (µs), and with `trace=n` the last n entries:
        `attend_trace` and `op_trace` as [seq, layer or op, seen, launched, sent]
        (perf_counter seconds), `gc_trace` as [began, seconds, generation]."""
        info = self.node.stats()
        info["attend_streams"] = self.streams.served
        info["gc_collections"] = self.gc.count
        t = self.timings
        if t:
            info["attend_handle_us"] = statistics.median(e.launched - e.seen for e in t) * 1e6
            info["attend_reply_us"] = statistics.median(e.sent - e.launched for e in t) * 1e6
            info["attend_messages"] = len(t)
        if trace:
            row = lambda e: [e.seq, e.what, e.seen, e.launched, e.sent]  # noqa: E731
            info["attend_trace"] = [row(e) for e in list(t)[-trace:]]
            info["op_trace"] = [row(e) for e in list(self.op_timings)[-trace:]]
            info["gc_trace"] = [list(p) for p in list(self.gc.recent)[-trace:]]
        if reset:
            self.timings.clear()
            self.op_timings.clear()
        return info
