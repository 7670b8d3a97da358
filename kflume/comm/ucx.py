"""UCX transport on ucxx's blocking API: shared memory or cuda_ipc on one host, TCP across.

Connecting: a plain TCP socket, bound where the node was told to listen (127.0.0.1 by
default), carries the handshake (kflume/comm/handshake.py): the cluster token is checked
before any UCX endpoint exists, and the two sides swap UCX worker addresses. Both then
create one UCX endpoint from the other's worker address, once, and reuse it. The socket
stays open: it is how a dead peer is noticed at once (UCX endpoints made from worker
addresses are not told).

Messages: tag matching in UCX is per worker, not per endpoint, so every tag carries the
receiving side's channel id (chosen by the receiver, unique in its worker) in its high
32 bits, and the message's sequence number and part (0 = header, 1.. = tensors) in its
low 32 bits. A receive posted for one sequence number can never take another message.

Progress: `"poll"` spins on `worker.progress()`; `"blocking"` arms the worker and sleeps
in `poll(2)` on its event fd and the sockets; `"hybrid"` spins for `spin_us` then sleeps;
`"thread"` runs ucxx's progress thread (for comparison: it costs a GIL hand-off per
message). benchmarks/transport.py measures them; shared/notes/ucx.md has the facts.

Small host tensors travel inside the header message (one message instead of several);
the rest go as their own messages, received straight into the caller's buffers when it
gave them (`post_recv(into=...)`), posted before the request was even sent. Parts
(`send_part`) are one tagged tensor each, under their message's sequence number.
"""

from __future__ import annotations

import math
import os
import secrets
import select
import socket
import time
from collections.abc import Sequence

import numpy as np
import torch

from . import handshake
from .base import (
    Connection,
    Listener,
    Message,
    Recv,
    Transport,
    TransportError,
    check_into,
    check_part,
)
from .handshake import parse_address
from .wire import (
    DTYPES,
    MAX_HEADER,
    Header,
    WireError,
    decode_with_end,
    empty_like_descriptor,
    encode,
)

__all__ = ["UcxTransport", "parse_address"]

_SEQ_MASK = (1 << 24) - 1
INLINE_BYTES = 1 << 20  # host tensors up to this total may travel inside the header message
SERVER_INLINE_BYTES = 16 << 10  # what a node inlines: its peers pre-post the rest


def _ucxx():
    """Import ucxx's blocking API lazily, with the UCX settings kflume relies on."""
    # Error handling on endpoints would otherwise move same-host traffic from shared
    # memory to TCP (shared/notes/ucx.md); the unused-variable warning is noise.
    os.environ.setdefault("UCX_MM_ERROR_HANDLING", "y")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        from ucxx._lib import libucxx
        from ucxx._lib.arr import Array
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the UCX transport needs ucxx: pip install 'kflume[ucx]' (ucxx-cu13 or ucxx-cu12, "
            "matching your CUDA major version)"
        ) from e
    return libucxx, Array


def _tag(channel: int, seq: int, part: int) -> int:
    return (channel << 32) | ((seq & _SEQ_MASK) << 8) | part


def _as_array(t: torch.Tensor, Array):
    """A ucxx Array over the tensor's bytes (ucxx does not check contiguity: we do).

    Returns the Array and the object that keeps the memory alive until the transfer ends.
    """
    if not t.is_contiguous():
        raise ValueError("tensors sent over UCX must be contiguous")
    if t.dim() == 0:
        t = t.reshape(1)
    raw = t.view(torch.uint8)  # bf16 has no numpy or CUDA-array-interface type
    if raw.is_cuda:
        return Array(raw), raw
    arr = raw.numpy()
    return Array(arr), arr


def _inline_plan(tensors, room: int) -> set[int]:
    """Which tensors travel inside the header message: host tensors, while they fit in
    the sender's `room` bytes."""
    out = set()
    for i, t in enumerate(tensors):
        n = t.numel() * t.element_size() + 16
        if not t.is_cuda and n <= room:
            out.add(i)
            room -= n
    return out


class _UcxRecv(Recv):
    """Receive of one message: the header (with its inline tensors) on part 0, the other
    tensors on parts 1.. once the header says what they are (or at once, into `into`)."""

    def __init__(self, conn: UcxConnection, seq: int, into):
        self.conn, self.seq, self.into = conn, seq, into
        L = conn.transport.L
        self._hslot = conn._take_buffer()
        self._hreq = conn.ep.tag_recv(self._hslot[1], L.UCXXTag(_tag(conn.rx_channel, seq, 0)))
        self._header: Header | None = None
        self._treqs: list = []
        self._pre: dict[int, tuple] = {}
        self._tensors: list[torch.Tensor] | None = None
        self._keep_hslot = None  # header buffer whose views are handed out until release()
        self._error: BaseException | None = None
        if into is not None:
            # Sizes known: post now the receives of the tensors the sender will not inline
            # (its rule, applied to the same sizes; reconciled when the header comes).
            self._tensors = list(into)
            inline = _inline_plan(self._tensors, conn.peer_inline)
            for i, t in enumerate(self._tensors):
                if i not in inline:
                    self._pre[i] = self._post(t, i)

    def _post(self, t: torch.Tensor, i: int):
        transport = self.conn.transport
        arr, mem = transport._array(t, cached=self.into is not None)
        req = self.conn.ep.tag_recv(arr, transport.L.UCXXTag(_tag(self.conn.rx_channel, self.seq,
                                                                   i + 1)))
        return req, mem

    def _on_header(self) -> None:
        self._hreq.check_error()
        hbuf = self._hslot[0]
        h, end = decode_with_end(hbuf)
        self._header = h
        inline = set(h.inline)
        if self.into is not None and len(h.tensors) != len(self.into):
            self._tensors, self._pre = [], {}  # e.g. an error reply: drop the receives
        elif self.into is not None:
            check_into(h, self.into, self.conn.peer)
            for i, t in enumerate(self._tensors):
                if i in inline:
                    self._pre.pop(i, None)  # inlined after all: the receive is dropped
                else:
                    self._treqs.append(self._pre.pop(i) if i in self._pre else self._post(t, i))
        else:
            dev = self.conn.recv_device
            self._tensors = []
            for i, desc in enumerate(h.tensors):
                if i in inline:
                    self._tensors.append(None)
                    continue
                t = empty_like_descriptor(desc, dev)
                self._treqs.append(self._post(t, i))
                self._tensors.append(t)
        for i in sorted(inline):  # inline tensors follow the header, 16-byte aligned
            dtype, shape = h.tensors[i]
            n = DTYPES[dtype].itemsize * math.prod(shape)
            end = -(-end // 16) * 16
            src = hbuf[end : end + n]
            if self.into is None:  # zero copy: a view of the header buffer until release()
                self._tensors[i] = torch.from_numpy(src).view(DTYPES[dtype]).view(shape)
                self._keep_hslot = self._hslot
            elif self._tensors[i].is_cuda:
                self._tensors[i].view(-1).view(torch.uint8).copy_(torch.from_numpy(src))
            elif n:  # numpy: one thread (torch's copy may wake its thread pool)
                np.copyto(self._tensors[i].view(-1).view(torch.uint8).numpy(), src)
            end += n
        if self._keep_hslot is None:
            self.conn._give_buffer(self._hslot)
        self._hslot = None

    @property
    def done(self) -> bool:
        if self._error is not None:
            return True
        if not self.conn.alive:
            self._error = TransportError(f"{self.conn.peer}: peer is gone ({self.conn.why})")
            return True
        try:
            if self._header is None:
                if not self._hreq.completed:
                    return False
                self._on_header()
            return all(r.completed for r, _ in self._treqs)
        except Exception as e:  # noqa: BLE001 - kept and raised by message()
            self._error = e
            return True

    def message(self) -> Message:
        if not self.done:
            raise RuntimeError("message() before the receive completed")
        if self._error is not None:
            raise self._error
        for r, _ in self._treqs:
            r.check_error()
        return Message(self._header, self._tensors, release=self._release)

    def _release(self) -> None:
        if self._keep_hslot is not None:
            self.conn._give_buffer(self._keep_hslot)
            self._keep_hslot = None

    def cancel(self) -> None:
        # Dropping the last reference to a pending ucxx request cancels it (no cancel()).
        # The header buffer is not reused: a late message could still land in it.
        self._hreq = None
        self._treqs, self._pre = [], {}
        self._error = self._error or TransportError(f"{self.conn.peer}: receive cancelled")


class _UcxPartRecv(Recv):
    """Receive of one part (a header-less tensor) straight into the caller's buffer."""

    def __init__(self, conn: UcxConnection, seq: int, part: int, into: torch.Tensor):
        self.conn, self.seq, self.into = conn, seq, into
        arr, self._keep = conn.transport._array(into, cached=True)
        self._req = conn.ep.tag_recv(arr, conn.transport.L.UCXXTag(_tag(conn.rx_channel, seq,
                                                                       part)))
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        if self._error is None and not self.conn.alive:
            self._error = TransportError(f"{self.conn.peer}: peer is gone ({self.conn.why})")
        return self._error is not None or self._req.completed

    def message(self) -> Message:
        if not self.done:
            raise RuntimeError("message() before the receive completed")
        if self._error is not None:
            raise self._error
        try:
            self._req.check_error()
        except self.conn.transport.L.UCXMessageTruncatedError:
            raise WireError(f"{self.conn.peer}: part of message {self.seq} is larger than its "
                            f"{self.into.numel() * self.into.element_size()}-byte buffer"
                            ) from None
        return Message(Header("result", seq=self.seq), [self.into])

    def cancel(self) -> None:
        self._req = None  # dropping the request cancels it
        self._error = self._error or TransportError(f"{self.conn.peer}: receive cancelled")


class UcxConnection(Connection):
    def __init__(self, transport: UcxTransport, sock: socket.socket, rx_channel: int,
                 tx_channel: int, peer_address: bytes, peer: str, hello: dict):
        L = transport.L
        info = hello.get("info", {})
        self.peer_inline = hello.get("inline", 0)  # how many bytes of tensors the peer inlines
        if type(self.peer_inline) is not int or not 0 <= self.peer_inline <= INLINE_BYTES:
            raise WireError("bad inline size in the handshake")
        self.transport, self.sock, self.peer, self.info = transport, sock, peer, info
        self.rx_channel, self.tx_channel = rx_channel, tx_channel
        addr = L.UCXAddress.create_from_buffer(np.frombuffer(peer_address, dtype=np.uint8))
        self.ep = L.UCXEndpoint.create_from_worker_address(transport.worker, addr, True)
        self.recv_device = torch.device("cpu")
        self._pool: list = []  # header-message buffers, allocated once and reused
        self._send_pool: list = []
        self.why = ""
        self._alive = True
        sock.setblocking(False)

    def _take_buffer(self, pool=None):
        pool = self._pool if pool is None else pool
        if pool:
            return pool.pop()
        buf = np.empty(MAX_HEADER + INLINE_BYTES + 16 * 255, dtype=np.uint8)
        return buf, self.transport.Array(buf), pool

    def _give_buffer(self, slot) -> None:
        slot[2].append(slot)

    def send(self, header: Header, tensors: Sequence[torch.Tensor] = (),
             ready: bool = False) -> None:
        if not self.alive:
            raise TransportError(f"{self.peer}: peer is gone ({self.why})")
        if len(tensors) >= 255:
            raise ValueError("at most 254 tensors per message")
        L, Array = self.transport.L, self.transport.Array
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("tensors sent over UCX must be contiguous")
        header.describe(tensors)
        inline = _inline_plan(tensors, self.transport.inline_bytes)
        header.inline = sorted(inline)
        head = encode(header)
        slot = self._take_buffer(self._send_pool)  # header + inline tensors, packed
        buf, end = slot[0], len(head)
        buf[:end] = np.frombuffer(head, dtype=np.uint8)
        for i in header.inline:
            t = tensors[i]
            end = -(-end // 16) * 16
            n = t.numel() * t.element_size()
            if n:
                np.copyto(buf[end : end + n], t.reshape(-1).view(torch.uint8).numpy())
            end += n
        if not ready and any(t.is_cuda for t in tensors):
            torch.cuda.current_stream().synchronize()  # the array interface carries no stream
        req = self.ep.tag_send(Array(buf[:end]), L.UCXXTag(_tag(self.tx_channel, header.seq, 0)))
        inflight = self.transport._inflight
        inflight.append((req, slot, self, True))  # the buffer goes back to the pool once sent
        for i, t in enumerate(tensors):
            if i in inline:
                continue
            arr, keep = _as_array(t, Array)
            req = self.ep.tag_send(arr, L.UCXXTag(_tag(self.tx_channel, header.seq, i + 1)))
            inflight.append((req, keep, self, False))

    def post_recv(self, seq: int, into: Sequence[torch.Tensor] | None = None) -> Recv:
        return _UcxRecv(self, seq, into)

    def send_part(self, seq: int, part: int, tensor: torch.Tensor, ready: bool = False,
                  static: bool = False) -> None:
        if not self.alive:
            raise TransportError(f"{self.peer}: peer is gone ({self.why})")
        check_part(part, tensor)
        if tensor.is_cuda and not ready:
            torch.cuda.current_stream().synchronize()  # the array interface carries no stream
        arr, keep = self.transport._array(tensor, cached=static)
        req = self.ep.tag_send(arr, self.transport.L.UCXXTag(_tag(self.tx_channel, seq, part)))
        self.transport._inflight.append((req, keep, self, False))

    def post_part_recv(self, seq: int, part: int, into: torch.Tensor) -> Recv:
        check_part(part, into)
        return _UcxPartRecv(self, seq, part, into)

    @property
    def alive(self) -> bool:
        return self._alive

    def mark_dead(self, why: str) -> None:
        if self._alive:
            self._alive, self.why = False, why

    def close(self) -> None:
        self.mark_dead("closed by this side")
        self.transport._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass


class UcxListener(Listener):
    def __init__(self, transport: UcxTransport, address: str):
        self.transport = transport
        host, port = parse_address(address)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.setblocking(False)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        transport._poller.register(self.sock.fileno(), select.POLLIN)
        self.refused: list[str] = []  # handshakes refused, for logs

    def accept(self) -> Connection | None:
        try:
            sock, peer = self.sock.accept()
        except BlockingIOError:
            return None
        peer_name = f"{peer[0]}:{peer[1]}"
        try:
            return self.transport._handshake_server(sock, peer_name)
        except Exception as e:  # noqa: BLE001 - a bad peer must not stop the server
            self.refused.append(f"{peer_name}: {e}")
            try:
                sock.close()
            except OSError:
                pass
            return None

    def close(self) -> None:
        try:
            self.transport._poller.unregister(self.sock.fileno())
        except (KeyError, ValueError):
            pass
        self.sock.close()


class UcxTransport(Transport):
    """UCX over ucxx. One worker per transport; use it from one thread only.

    token: the cluster token both sides must present (default `$KFLUME_TOKEN`, else
    none). progress: "poll" (default: a weight node waiting for replies has nothing
    else to do), "hybrid" (after the last call with `timeout=0`, i.e. with work in
    flight, spin `spin_us`, then sleep), "blocking" (sleep at once: the default of a
    `kflume node` on CPU, whose cores the computation needs),
    "blocking" or "thread". inline_bytes: how many bytes of host tensors may ride in a
    message's header part (nodes use SERVER_INLINE_BYTES: their replies' large tensors
    land directly in the buffers the weight node posted).
    """

    def __init__(self, *, token: str | None = None, progress: str = "poll",
                 spin_us: float = 2000.0, info: dict | None = None,
                 inline_bytes: int = INLINE_BYTES) -> None:
        if progress not in ("hybrid", "poll", "blocking", "thread"):
            raise ValueError(f"progress must be hybrid, poll, blocking or thread; got {progress}")
        self.L, self.Array = _ucxx()
        L = self.L
        self.token = token if token is not None else os.environ.get("KFLUME_TOKEN", "")
        self.mode, self.spin_s = progress, spin_us * 1e-6
        self.info = info or {}
        if not 0 <= inline_bytes <= INLINE_BYTES:
            raise ValueError(f"inline_bytes must be in [0, {INLINE_BYTES}]")
        self.inline_bytes = inline_bytes
        self.ctx = L.UCXContext({}, (L.Feature.TAG, L.Feature.WAKEUP))
        self.worker = L.UCXWorker(self.ctx)
        self._poller = select.poll()
        if progress in ("hybrid", "blocking"):
            self.worker.init_blocking_progress_mode()
            self._poller.register(self.worker.epoll_file_descriptor, select.POLLIN)
        elif progress == "thread":
            self.worker.start_progress_thread(polling_mode=False)
        self._inflight: list = []
        self._arrays: dict[tuple, tuple] = {}  # Arrays of reused buffers (bounded)
        self._conns: dict[int, UcxConnection] = {}
        self._last_busy = time.monotonic()
        self._last_check = 0.0

    def _array(self, t: torch.Tensor, cached: bool):
        """(Array, keep-alive) for a tensor. Buffers that callers reuse (`into`, static
        parts) keep their Array: making one costs as much as posting the receive."""
        if not cached:
            return _as_array(t, self.Array)
        key = (t.data_ptr(), t.numel() * t.element_size(), t.device)
        hit = self._arrays.get(key)
        if hit is None:
            if len(self._arrays) >= 1024:  # (an attend stream keeps one per layer)
                self._arrays.pop(next(iter(self._arrays)))
            hit = self._arrays[key] = _as_array(t, self.Array)
        return hit

    # ---- connections ----------------------------------------------------------
    def _new_channel(self) -> int:
        while True:
            c = secrets.randbits(31) | 1
            if c not in self._conns:
                return c

    def _fields(self, rx: int) -> dict:
        """What this side tells a peer in the handshake."""
        return {"chan": rx, "addr": self.worker.address.tobytes(), "info": self.info,
                "inline": self.inline_bytes}

    def connect(self, address: str, *, timeout: float = 30.0) -> Connection:
        host, port = parse_address(address)
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise TransportError(f"cannot connect to {address}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rx = self._new_channel()
        try:
            reply = handshake.hello(sock, self.token, self._fields(rx), deadline, address)
        except BaseException:
            sock.close()
            raise
        conn = UcxConnection(self, sock, rx, int(reply["chan"]), bytes(reply["addr"]), address,
                             reply)
        self._adopt(conn)
        return conn

    def _handshake_server(self, sock: socket.socket, peer: str) -> UcxConnection:
        sock.setblocking(True)
        rx = self._new_channel()
        hello = handshake.answer(sock, self.token, self._fields(rx))
        conn = UcxConnection(self, sock, rx, int(hello["chan"]), hello["addr"], peer,
                             hello)
        self._adopt(conn)
        return conn

    def _adopt(self, conn: UcxConnection) -> None:
        self._conns[conn.rx_channel] = conn
        self._poller.register(conn.sock.fileno(), select.POLLIN)

    def _forget(self, conn: UcxConnection) -> None:
        self._conns.pop(conn.rx_channel, None)
        try:
            self._poller.unregister(conn.sock.fileno())
        except (KeyError, ValueError):
            pass

    def listen(self, address: str) -> Listener:
        return UcxListener(self, address)

    # ---- progress ---------------------------------------------------------------
    def _reap(self) -> None:
        if not self._inflight:
            return
        keep = []
        for entry in self._inflight:
            req, buf, conn, pooled = entry
            if not req.completed:
                keep.append(entry)
                continue
            try:
                req.check_error()
            except Exception as e:  # noqa: BLE001
                conn.mark_dead(f"send failed: {e}")
            if pooled:
                conn._give_buffer(buf)  # a header buffer, free for the next message
        self._inflight = keep

    def _check_sockets(self, timeout_ms: int) -> None:
        """Wait on the sockets (and the worker's event fd); a readable peer socket is EOF."""
        for fd, _ in self._poller.poll(timeout_ms):
            for conn in list(self._conns.values()):
                if conn.sock.fileno() == fd:
                    try:
                        if conn.sock.recv(1, socket.MSG_PEEK) == b"":
                            conn.mark_dead("peer closed its connection (process gone?)")
                            self._forget(conn)
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        conn.mark_dead(f"socket error: {e}")
                        self._forget(conn)

    def progress(self, timeout: float = 0.0) -> None:
        L = self.L
        if self.mode != "thread":
            self.worker.progress()
        self._reap()
        now = time.monotonic()
        if timeout <= 0:  # the caller has work in flight: "hybrid" keeps spinning a while
            self._last_busy = now
        if self.mode == "poll" or self.mode == "thread" or timeout <= 0 or (
            self.mode == "hybrid" and now - self._last_busy < self.spin_s
        ):
            if now - self._last_check > 1e-3:  # liveness of peers, every millisecond
                self._last_check = now
                self._check_sockets(0)
            if self.mode == "thread":
                time.sleep(0)  # let the progress thread have the GIL
            return
        del L
        if self.worker.arm():  # nothing pending: safe to sleep until an event
            self._check_sockets(max(1, int(timeout * 1000)))
        else:
            self._check_sockets(0)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()
        if self.mode == "thread":
            self.worker.stop_progress_thread()
