"""A UCX connection: its messages and parts, sent and received (kflume/comm/ucx.py).

Every tag carries the receiving side's channel id (unique in its worker) in its high 32
bits and the message's sequence number and part (0 = header, 1.. = tensors) in its low
32 bits: a receive for one sequence number can never take another message. Small host
tensors ride inside the header message; the rest go as their own messages, received
straight into the caller's buffers when it gave them (receives: kflume/comm/ucx_recv.py).
Sending checks everything that can refuse a message before any of it goes out.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np
import torch

from .base import MAX_PART, Connection, Recv, TransportError, check_part
from .ucx_recv import INLINE_BYTES, UcxPartRecv, UcxRecv, _inline_plan, as_array, tag
from .wire import MAX_HEADER, Header, encode

__all__ = ["INLINE_BYTES", "UcxConnection", "as_array", "tag"]

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
        self.header_check = None
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
        if len(tensors) > MAX_PART:
            raise ValueError(f"at most {MAX_PART} tensors per message; got {len(tensors)}")
        L, Array = self.transport.L, self.transport.Array
        tensors = [t.detach() for t in tensors]  # (what is sent is the data)
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("tensors sent over UCX must be contiguous")
        header.describe(tensors)
        inline = _inline_plan(tensors, self.transport.inline_bytes)
        header.inline = sorted(inline)
        head = encode(header)
        parts = [(i, *as_array(t, Array)) for i, t in enumerate(tensors) if i not in inline]
        # Everything that can refuse the message is done: from here on it is only sent.
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
        req = self.ep.tag_send(Array(buf[:end]), L.UCXXTag(tag(self.tx_channel, header.seq, 0)))
        inflight = self.transport._inflight
        inflight.append((req, slot, self, True))  # the buffer goes back to the pool once sent
        for i, arr, keep in parts:
            req = self.ep.tag_send(arr, L.UCXXTag(tag(self.tx_channel, header.seq, i + 1)))
            inflight.append((req, keep, self, False))

    def post_recv(self, seq: int, into: Sequence[torch.Tensor] | None = None) -> Recv:
        return UcxRecv(self, seq, into)

    def send_part(self, seq: int, part: int, tensor: torch.Tensor, ready: bool = False,
                  static: bool = False) -> None:
        if not self.alive:
            raise TransportError(f"{self.peer}: peer is gone ({self.why})")
        check_part(part, tensor)
        if tensor.is_cuda and not ready:
            torch.cuda.current_stream().synchronize()  # the array interface carries no stream
        arr, keep = self.transport._array(tensor, cached=static)
        req = self.ep.tag_send(arr, self.transport.L.UCXXTag(tag(self.tx_channel, seq, part)))
        self.transport._inflight.append((req, keep, self, False))

    def post_part_recv(self, seq: int, part: int, into: torch.Tensor) -> Recv:
        check_part(part, into)
        return UcxPartRecv(self, seq, part, into)

    def discard_parts(self, seq: int, parts: int) -> None:
        self.transport.discard([tag(self.rx_channel, seq, i) for i in range(1, parts + 1)])

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
