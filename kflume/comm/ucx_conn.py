"""A UCX connection: its messages and parts, sent and received (kflume/comm/ucx.py).

Every tag carries the receiving side's channel id (unique in its worker) in its high 32
bits and the message's sequence number and part (0 = header, 1.. = tensors) in its low
32 bits: a receive posted for one sequence number can never take another message. Small
host tensors ride inside the header message; the rest go as their own messages,
received straight into the caller's buffers when it gave them.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence

import numpy as np
import torch

from .base import Connection, Message, Recv, TransportError, check_into, check_part
from .wire import (
    DTYPES,
    MAX_HEADER,
    Header,
    WireError,
    decode_with_end,
    empty_like_descriptor,
    encode,
)

__all__ = ["INLINE_BYTES", "UcxConnection", "as_array"]

_SEQ_MASK = (1 << 24) - 1
INLINE_BYTES = 1 << 20  # host tensors up to this total may travel inside the header message


def _tag(channel: int, seq: int, part: int) -> int:
    return (channel << 32) | ((seq & _SEQ_MASK) << 8) | part


def as_array(t: torch.Tensor, Array):
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
        self.conn, self.seq, self.into, self.peer = conn, seq, into, conn.peer
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
        self.conn, self.seq, self.into, self.peer = conn, seq, into, conn.peer
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
    """One peer, after the handshake (kflume/comm/ucx.py): `peer_address` is its UCX
    worker address, already checked (kflume/comm/ucx_address.py); `peer_inline` how
    many bytes of tensors it inlines."""

    def __init__(self, transport, sock: socket.socket, rx_channel: int,
                 tx_channel: int, peer_address: bytes, peer: str, hello: dict,
                 peer_inline: int):
        L = transport.L
        self.peer_inline = peer_inline
        self.transport, self.sock, self.peer = transport, sock, peer
        self.info = hello.get("info") or {}
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
            arr, keep = as_array(t, Array)
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
