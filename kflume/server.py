"""NodeServer: an AttentionNode behind a transport.

One thread serves every connection: it keeps one receive posted per connection for the
peer's next sequence number, handles each message with the node, and answers every
message (a result, "ok", or an "error" that names the problem). A message the node
refuses changes nothing and the server goes on serving everyone. When a peer goes away,
the requests it opened are freed (and logged), so capacity is never lost silently.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .comm.base import Connection, Listener, Recv, Transport
from .comm.wire import Header, WireError
from .node import AttentionNode, NodeCapacityError, UnknownRequestError

__all__ = ["NodeServer"]

log = logging.getLogger("kflume.node")


@dataclass(slots=True)
class _Peer:
    conn: Connection
    next_seq: int = 0
    recv: Recv | None = None
    requests: set = field(default_factory=set)


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
    return "internal"


class NodeServer:
    """Serve `node` on `listener` (made by `transport`). Call `serve()` or `poll()`."""

    def __init__(self, node: AttentionNode, transport: Transport, listener: Listener) -> None:
        self.node, self.transport, self.listener = node, transport, listener
        self.peers: list[_Peer] = []
        self.stopped = False
        self.handled = 0
        # On a GPU node, replies wait for their event (kernels done with the message's
        # tensors and the reply's), while the loop goes on receiving: the next message's
        # overhead hides the kernel.
        self._deferred: list[tuple] = []
        # Per attend message (the last 4096): seconds from its arrival being seen to its
        # kernels being launched, and from there to its reply being sent ("stats").
        self.timings: deque[tuple[float, float]] = deque(maxlen=4096)

    @property
    def address(self) -> str:
        return self.listener.address

    # ---- the loop -------------------------------------------------------------------
    def poll(self) -> int:
        """Accept new peers and handle every message that has arrived. Never blocks."""
        while (conn := self.listener.accept()) is not None:
            if hasattr(conn, "recv_device"):
                conn.recv_device = self.node.device
            self.peers.append(_Peer(conn))
            log.info("peer %s joined (%d connected)", conn.peer, len(self.peers))
        refused = getattr(self.listener, "refused", None)
        while refused:
            log.warning("refused a peer: %s", refused.pop(0))
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
        self.handled += handled
        return handled

    def serve(self, should_stop=lambda: False, idle_sleep: float = 0.001) -> None:
        """Serve until a "shutdown" message or `should_stop()` returns True."""
        while not self.stopped and not should_stop():
            if self.poll() == 0:
                # Never sleep while a reply waits on its kernel: poll again at once.
                self.transport.progress(0.0 if self._deferred else idle_sleep)
        while self._deferred:  # replies already computed still go out
            self._send_deferred()
            self.transport.progress(0.0)
        log.info("server at %s stopped", self.address)

    def close(self) -> None:
        for peer in self.peers:
            peer.conn.close()
        self.peers.clear()
        self.listener.close()

    def _drop(self, peer: _Peer, why: str) -> None:
        self.peers.remove(peer)
        freed = self.node.free(sorted(peer.requests, key=str))
        level = logging.WARNING if peer.requests else logging.INFO
        log.log(level, "peer %s left (%s); freed its %d requests (%d tokens)", peer.conn.peer,
                why, len(peer.requests), freed)
        peer.conn.close()

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
        t1 = time.perf_counter()
        if self.node.device.type == "cuda":
            # Kernels may still read this message's tensors and write the reply's. Both stay
            # referenced until the stream passes this event: a received CUDA buffer that went
            # back to the allocator now could take the next message (written by UCX, outside
            # stream order) while a kernel still reads it.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.node.device))
            self._deferred.append((event, peer, reply, out, (tensors, staged, h.op, t0, t1)))
        else:
            peer.conn.send(reply, out)
            if h.op == "attend":
                self.timings.append((t1 - t0, time.perf_counter() - t1))

    def _send_deferred(self) -> None:
        while self._deferred and self._deferred[0][0].query():
            _, peer, reply, out, (_, _, op, t0, t1) = self._deferred.pop(0)
            if peer.conn.alive:
                peer.conn.send(reply, out, ready=True)
            if op == "attend":
                self.timings.append((t1 - t0, time.perf_counter() - t1))

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
        if self.timings:  # medians over the last attend messages, microseconds
            info["attend_handle_us"] = statistics.median(a for a, _ in self.timings) * 1e6
            info["attend_reply_us"] = statistics.median(b for _, b in self.timings) * 1e6
            info["attend_messages"] = len(self.timings)
        if h.info.get("reset_timings"):
            self.timings.clear()
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

