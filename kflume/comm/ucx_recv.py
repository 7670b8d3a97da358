"""The UCX transport's receives (kflume/comm/ucx_conn.py sends): a message (its header,
inline tensors and tensor parts) or a header-less part.

A receive is a probe until its message comes (UCX then says how many bytes it is), and
the message is then received whole into a buffer chosen for it: a header's declared
length and its inline tensors must account for exactly the bytes received, and every
tensor must be exactly the bytes its descriptor (or the agreed size of a part) says, so
that nothing is ever read from a reused buffer's earlier bytes. A receive nobody polls
takes nothing: a call refused after its receive was made leaves the numbering in step.
Messages given up (cancelled, refused) are discarded if they come later.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Message, Recv, TransportError, check_into
from .wire import DTYPES, Header, WireError, decode_with_end, empty_like_descriptor

__all__ = ["INLINE_BYTES", "UcxPartRecv", "UcxRecv", "as_array", "tag"]

_SEQ_MASK = (1 << 24) - 1
INLINE_BYTES = 1 << 20  # host tensors up to this total may travel inside the header message


def tag(channel: int, seq: int, part: int) -> int:
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


class _Tagged:
    """One tagged message, received once it has come: probed first (its length is then
    known, and the buffer chosen for it), then received whole."""

    __slots__ = ("tag", "req", "length")

    def __init__(self, tag: int) -> None:
        self.tag, self.req, self.length = tag, None, -1

    def poll(self, transport, array_for) -> bool:
        """True once received (successfully or not: `req.check_error()` says)."""
        if self.req is None:
            probe = transport.probe(self.tag)
            if probe is None:
                return False
            self.length = probe.length
            self.req = transport.recv_probed(array_for(probe.length), probe)
        return self.req.completed


def _check_length(conn, t: _Tagged, nbytes: int, what: str) -> None:
    """A received message of `nbytes` agreed bytes: exactly that many came."""
    try:
        t.req.check_error()
    except conn.transport.L.UCXMessageTruncatedError:
        pass  # (longer than its buffer: the length says so below)
    if t.length != nbytes:
        raise WireError(f"{conn.peer}: {what} has {t.length} bytes; {nbytes} expected")


class UcxRecv(Recv):
    """Receive of one message: the header (with its inline tensors) on part 0, the other
    tensors on parts 1.. as the header describes them, each checked to be exactly the
    bytes it says (into `into` when given)."""

    def __init__(self, conn, seq: int, into):
        self.conn, self.seq, self.into, self.peer = conn, seq, into, conn.peer
        # the buffers' arrays made now: a buffer that cannot take a message fails here
        self._into = None if into is None else [conn.transport._array(t, cached=True)[0]
                                                for t in into]
        self._head = _Tagged(tag(conn.rx_channel, seq, 0))
        self._hslot = None
        self._header: Header | None = None
        self._parts: list[tuple[_Tagged, int, object]] = []  # (message, bytes, array)
        self._tensors: list[torch.Tensor] | None = None
        self._keep: list = []  # arrays of the tensors received into
        self._keep_hslot = None  # header buffer whose views are handed out until release()
        self._error: BaseException | None = None

    def _header_array(self, n: int):
        self._hslot = self.conn._take_buffer()
        return self._hslot[1]

    def _on_header(self) -> None:
        conn, seq, n = self.conn, self.seq, self._head.length
        cap = len(self._hslot[0])
        if n > cap:
            raise WireError(f"{conn.peer}: message {seq} of {n} bytes exceeds {cap}")
        self._head.req.check_error()
        hbuf = self._hslot[0][:n]
        h, end = decode_with_end(hbuf)
        places = {}  # inline tensors follow the header, 16-byte aligned
        for i in sorted(h.inline):
            dtype, shape = h.tensors[i]
            end = -(-end // 16) * 16
            places[i] = (end, DTYPES[dtype].itemsize * math.prod(shape))
            end += places[i][1]
        try:
            if h.seq != seq:
                raise WireError(f"{conn.peer}: message {seq} carries sequence number {h.seq}")
            if end != n:
                raise WireError(f"{conn.peer}: message {seq}: its header and inline tensors "
                                f"take {end} bytes; {n} received")
            if conn.header_check is not None:
                conn.header_check(h)  # before a buffer is allocated for its tensors
        except Exception:  # refused: its tensors, if they come, are discarded
            conn.transport.discard([tag(conn.rx_channel, seq, i + 1)
                                    for i in range(len(h.tensors)) if i not in places])
            raise
        self._header = h
        if self.into is not None and h.op == "error":
            self._tensors = []  # an error reply carries no tensors (any sent: discarded)
            conn.transport.discard([tag(conn.rx_channel, seq, i + 1)
                                    for i in range(len(h.tensors)) if i not in places])
        elif self.into is not None:
            check_into(h, self.into, conn.peer)
            self._tensors = list(self.into)
            arrays = self._into
        else:
            self._tensors, arrays = [], []
            for i, desc in enumerate(h.tensors):
                t = None if i in places else empty_like_descriptor(desc, conn.recv_device)
                arr, keep = (None, None) if t is None else as_array(t, conn.transport.Array)
                self._tensors.append(t)
                arrays.append(arr)
                self._keep.append(keep)
        for i, t in enumerate(self._tensors):
            if i not in places:
                nbytes = t.numel() * t.element_size()
                self._parts.append((_Tagged(tag(conn.rx_channel, seq, i + 1)), nbytes,
                                    arrays[i]))
                continue
            at, nbytes = places[i]
            src = hbuf[at : at + nbytes]
            if self.into is None:  # zero copy: a view of the header buffer until release()
                dtype, shape = h.tensors[i]
                self._tensors[i] = torch.from_numpy(src).view(DTYPES[dtype]).view(shape)
                self._keep_hslot = self._hslot
            elif t.is_cuda:
                t.view(-1).view(torch.uint8).copy_(torch.from_numpy(src))
            elif nbytes:  # numpy: one thread (torch's copy may wake its thread pool)
                np.copyto(t.view(-1).view(torch.uint8).numpy(), src)
        if self._keep_hslot is None:
            conn._give_buffer(self._hslot)
        self._hslot = None

    @property
    def done(self) -> bool:
        if self._error is not None:
            return True
        if not self.conn.alive:
            self._error = TransportError(f"{self.conn.peer}: peer is gone ({self.conn.why})")
            return True
        try:
            t = self.conn.transport
            if self._header is None:
                if not self._head.poll(t, self._header_array):
                    return False
                self._on_header()
            return all(m.poll(t, lambda n, a=a: a) for m, _, a in self._parts)
        except Exception as e:  # noqa: BLE001 - kept and raised by message()
            self._fail(e)
            return True

    def _fail(self, e: BaseException) -> None:
        self._error = e
        if self._hslot is not None and self._head.req is not None and self._head.req.completed:
            self.conn._give_buffer(self._hslot)  # received whole: nobody writes it now
            self._hslot = None
        self.cancel()

    def message(self) -> Message:
        if not self.done:
            raise RuntimeError("message() before the receive completed")
        if self._error is not None:
            raise self._error
        for i, (m, nbytes, _) in enumerate(self._parts):
            _check_length(self.conn, m, nbytes, f"tensor {i} of message {self.seq}")
        return Message(self._header, self._tensors, release=self._release)

    def _release(self) -> None:
        if self._keep_hslot is not None:
            self.conn._give_buffer(self._keep_hslot)
            self._keep_hslot = None

    def cancel(self) -> None:
        """Nothing more is received for it: what comes later is discarded, and buffers
        a receive under way still writes stay alive (not reused) until it is done."""
        t, tags = self.conn.transport, []
        if self._head.req is None:
            tags.append(self._head.tag)
            tags += [tag(self.conn.rx_channel, self.seq, i + 1)
                     for i in range(len(self.into or ()))]
            self._head.req = _NEVER
        elif not self._head.req.completed:
            t._inflight.append((self._head.req, self._hslot, None, False))
            self._hslot = None
        for m, _, a in self._parts:
            if m.req is None:
                tags.append(m.tag)
                m.req = _NEVER
            elif not m.req.completed:
                t._inflight.append((m.req, a, None, False))
        t.discard(tags)
        self._error = self._error or TransportError(f"{self.conn.peer}: receive cancelled")


class _Never:
    completed = False


_NEVER = _Never()


class UcxPartRecv(Recv):
    """Receive of one part (a header-less tensor) into the caller's buffer: exactly its
    bytes, or an error."""

    def __init__(self, conn, seq: int, part: int, into: torch.Tensor):
        self.conn, self.seq, self.into, self.peer = conn, seq, into, conn.peer
        self._arr, self._keep = conn.transport._array(into, cached=True)
        self._msg = _Tagged(tag(conn.rx_channel, seq, part))
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        if self._error is None and not self.conn.alive:
            self._error = TransportError(f"{self.conn.peer}: peer is gone ({self.conn.why})")
        return self._error is not None or self._msg.poll(self.conn.transport,
                                                         lambda n: self._arr)

    def message(self) -> Message:
        if not self.done:
            raise RuntimeError("message() before the receive completed")
        if self._error is not None:
            raise self._error
        nbytes = self.into.numel() * self.into.element_size()
        _check_length(self.conn, self._msg, nbytes, f"part {self._msg.tag & 0xFF} of message "
                                                     f"{self.seq}")
        return Message(Header("result", seq=self.seq), [self.into])

    def cancel(self) -> None:
        if self._msg.req is None:
            self.conn.transport.discard([self._msg.tag])
            self._msg.req = _NEVER
        elif not self._msg.req.completed:  # written until done
            self.conn.transport._inflight.append((self._msg.req, self._keep, None, False))
        self._error = self._error or TransportError(f"{self.conn.peer}: receive cancelled")
