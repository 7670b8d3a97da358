"""In-process transport: attention nodes and the weight node in one process.

For tests of the layers above the transport and for one-process runs. Messages are
delivered into the peer's inbox with their tensors cloned (the sender may reuse its
buffers at once, as with a real transport). There are no threads: servers registered
with the hub (`InProcHub.add_driver`) are run whenever someone waits, so a whole
cluster runs deterministically in the caller's thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

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
from .wire import Header, WireError, decode, encode

__all__ = ["InProcHub", "InProcTransport"]


class InProcHub:
    """The in-process 'network': named listeners and the servers to run on waits."""

    def __init__(self) -> None:
        self.listeners: dict[str, _InProcListener] = {}
        self.drivers: list[Callable[[], object]] = []
        self._running = False

    def add_driver(self, fn: Callable[[], object]) -> None:
        self.drivers.append(fn)

    def remove_driver(self, fn: Callable[[], object]) -> None:
        if fn in self.drivers:
            self.drivers.remove(fn)

    def run(self) -> None:
        if self._running:  # a server waiting inside a driver must not re-enter
            return
        self._running = True
        try:
            for fn in list(self.drivers):
                fn()
        finally:
            self._running = False


DEFAULT_HUB = InProcHub()


class _InProcRecv(Recv):
    """A receive of whatever arrives in the connection's inbox under `key`: a message
    (key: its sequence number) or a part (key: (sequence number, part))."""

    def __init__(self, conn: _InProcConnection, key, into):
        self.conn, self.key, self.into, self.peer = conn, key, into, conn.peer
        self._cancelled = False

    @property
    def done(self) -> bool:
        return self.key in self.conn.inbox or not self.conn.alive or self._cancelled

    def _take(self):
        if self.key not in self.conn.inbox:
            raise TransportError(f"{self.conn.peer}: connection closed before {self.key} "
                                 "arrived")
        return self.conn.inbox.pop(self.key)

    def message(self) -> Message:
        header, tensors = self._take()
        if self.conn.header_check is not None:
            self.conn.header_check(header)
        if header.op == "error":  # an error reply carries no tensors: nothing lands
            return Message(header, [])
        into = check_into(header, self.into, self.conn.peer)
        if into is not None:
            for dst, src in zip(into, tensors):
                dst.copy_(src)
            tensors = list(into)
            _complete(tensors)
        return Message(header, tensors)

    def cancel(self) -> None:
        self._cancelled = True
        self.conn.dropped.add(self.key)
        self.conn.inbox.pop(self.key, None)


class _InProcPartRecv(_InProcRecv):
    def message(self) -> Message:
        src = self._take().reshape(-1).view(torch.uint8)
        dst = self.into.view(-1).view(torch.uint8)
        if src.numel() != dst.numel():  # what UCX reports as a truncated message
            raise WireError(f"{self.conn.peer}: part {self.key} has {src.numel()} bytes; the "
                            f"buffer {dst.numel()}")
        dst.copy_(src)
        _complete([self.into])
        return Message(Header("result", seq=self.key[0]), [self.into])


def _complete(tensors) -> None:
    """Buffers received into are complete, like a real transport's receive."""
    if any(t.is_cuda for t in tensors):
        torch.cuda.current_stream().synchronize()


class _InProcConnection(Connection):
    def __init__(self, peer: str):
        self.peer = peer
        # what arrived: messages by sequence number, parts by (sequence number, part)
        self.inbox: dict = {}
        self.dropped: set = set()  # keys of receives given up: what comes is dropped
        self.other: _InProcConnection | None = None
        self._alive = True

    def _deliver(self, key, value) -> None:
        if not self._alive or self.other is None or not self.other._alive:
            raise TransportError(f"{self.peer}: connection is closed")
        if key in self.other.dropped:
            self.other.dropped.discard(key)
            return
        self.other.inbox[key] = value

    def send(self, header: Header, tensors: Sequence[torch.Tensor] = (),
             ready: bool = False) -> None:
        header.describe(tensors)
        wire_header = decode(encode(header))  # what a real wire would deliver
        self._deliver(header.seq, (wire_header, [t.detach().contiguous().clone()
                                                 for t in tensors]))

    def post_recv(self, seq: int, into: Sequence[torch.Tensor] | None = None) -> Recv:
        return _InProcRecv(self, seq, into)

    def send_part(self, seq: int, part: int, tensor: torch.Tensor, ready: bool = False,
                  static: bool = False) -> None:
        check_part(part, tensor)
        self._deliver((seq, part), tensor.detach().clone())

    def post_part_recv(self, seq: int, part: int, into: torch.Tensor) -> Recv:
        check_part(part, into)
        return _InProcPartRecv(self, (seq, part), into)

    def discard_parts(self, seq: int, parts: int) -> None:
        for key in ((seq, i) for i in range(1, parts + 1)):
            if self.inbox.pop(key, None) is None:
                self.dropped.add(key)

    @property
    def alive(self) -> bool:
        return self._alive

    def close(self) -> None:
        self._alive = False
        if self.other is not None:
            self.other._alive = False


class _InProcListener(Listener):
    def __init__(self, hub: InProcHub, address: str):
        self.hub, self.address = hub, address
        self.backlog: list[_InProcConnection] = []

    def accept(self) -> Connection | None:
        return self.backlog.pop(0) if self.backlog else None

    def close(self) -> None:
        self.hub.listeners.pop(self.address, None)
        for conn in self.backlog:  # peers never accepted: their links break too
            conn.close()
        self.backlog.clear()


class InProcTransport(Transport):
    """Addresses are names: `listen("node-a")`, `connect("node-a")`."""

    _ids = itertools.count()

    def __init__(self, hub: InProcHub | None = None) -> None:
        self.hub = hub or DEFAULT_HUB

    def listen(self, address: str) -> Listener:
        if address in self.hub.listeners:
            raise TransportError(f"in-process address {address!r} is already listening")
        lis = self.hub.listeners[address] = _InProcListener(self.hub, address)
        return lis

    def connect(self, address: str, *, timeout: float = 30.0) -> Connection:
        lis = self.hub.listeners.get(address)
        if lis is None:
            raise TransportError(f"nothing listens at in-process address {address!r}")
        client = _InProcConnection(address)
        server = _InProcConnection(f"inproc-client-{next(self._ids)}")
        client.other, server.other = server, client
        lis.backlog.append(server)
        return client

    def progress(self, timeout: float = 0.0) -> None:
        self.hub.run()
