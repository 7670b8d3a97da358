"""The transport interface every kflume transport implements.

A `Connection` carries messages (a `Header` plus tensors, kflume/comm/wire.py) both ways
between two peers. Sending is non-blocking: `send` posts the message and the transport
keeps its buffers alive until it is gone. Receiving is posted ahead: `post_recv(seq,
into)` says which message (by sequence number) is expected and, where the sizes are
known, the buffers to land in, allocated once by the caller and reused. `Transport.wait`
progresses everything until the given receives complete, with a deadline on every wait;
a peer that dies or answers with an error raises here, naming the peer.

Parts: where both sides already agreed on a message's sizes (an attend stream,
kflume/weight/stream.py), its tensors go alone, with no header: `send_part` / `post_part_recv`
by (sequence number, part).

A refused call must leave a connection usable: `send` raises before any of the message
goes out, or sends all of it; a posted receive takes nothing until it is polled, so one
whose send was refused (or that nobody waits for) never takes a later message.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .wire import DTYPES, MAX_TENSORS, Header, WireError

__all__ = [
    "Connection",
    "DeadlineExceeded",
    "Message",
    "Recv",
    "RemoteError",
    "Transport",
    "TransportError",
    "Listener",
    "MAX_PART",
]

MAX_PART = MAX_TENSORS  # parts of one message: 1..MAX_PART (part 0 is its header)


class TransportError(ConnectionError):
    """The link to a peer failed (peer gone, connection refused, handshake refused)."""


class DeadlineExceeded(TimeoutError):
    """A wait passed its deadline."""


class RemoteError(RuntimeError):
    """The peer received the message and answered with an error (it keeps serving)."""

    def __init__(self, peer: str, op: str, message: str, kind: str = "error"):
        super().__init__(f"{peer}: {op} failed: {message}")
        self.peer, self.op, self.kind, self.remote_message = peer, op, kind, message


@dataclass(slots=True)
class Message:
    """A received header and its tensors. Tensors may live in the transport's receive
    buffers: call `release()` once they have been used (kernels reading them enqueued),
    so the buffers can take a later message."""

    header: Header
    tensors: list[torch.Tensor]
    release: Callable[[], None] = lambda: None


class Recv(ABC):
    """A posted receive of one message. `done` once its header and tensors arrived.
    `peer` names whom it is from (for errors)."""

    peer: str = "a peer"

    @property
    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def message(self) -> Message:
        """The received message; raises what went wrong if it failed."""

    def cancel(self) -> None:  # noqa: B027 -- optional for transports that can cancel
        """Give the receive up (after a deadline); the message, if it comes, is dropped."""


def check_into(header: Header, into: Sequence[torch.Tensor] | None, peer: str):
    """Tensors to receive into: the caller's buffers when they match the header, else new."""
    if into is None:
        return None
    if len(into) != len(header.tensors):
        raise WireError(f"{peer}: {header.op} carries {len(header.tensors)} tensors, "
                        f"expected {len(into)}")
    for t, (dtype, shape) in zip(into, header.tensors):
        if t.dtype != DTYPES[dtype] or tuple(t.shape) != tuple(shape):
            raise WireError(f"{peer}: {header.op} tensor {dtype}{list(shape)} does not match "
                            f"the buffer {t.dtype}{list(t.shape)}")
        if not t.is_contiguous():
            raise WireError(f"{peer}: receive buffers must be contiguous")
    return into


class Connection(ABC):
    """One peer. Messages from this side carry increasing sequence numbers.

    `header_check(header)`, when set, is called with each received header before
    buffers are allocated for its tensors; raising refuses the message (the receive
    fails with that error)."""

    peer: str
    header_check: Callable[[Header], None] | None = None

    @abstractmethod
    def send(self, header: Header, tensors: Sequence[torch.Tensor] = (),
             ready: bool = False) -> None:
        """Post `header` (its tensor descriptors filled from `tensors`) and the tensors.

        CUDA tensors are read by the transport without a stream: unless `ready`, the
        current stream is synchronised first."""

    @abstractmethod
    def post_recv(self, seq: int, into: Sequence[torch.Tensor] | None = None) -> Recv:
        """Expect the peer's message number `seq`; land its tensors in `into` if given."""

    @abstractmethod
    def send_part(self, seq: int, part: int, tensor: torch.Tensor, ready: bool = False,
                  static: bool = False) -> None:
        """Send one tensor without a header, as part `part` (1..MAX_PART) of this side's
        message `seq`; the peer knows its size from an earlier message and posted
        `post_part_recv` for it. `ready` as in `send`. `static`: the buffer is reused
        from call to call (the transport may keep what it made to send it)."""

    @abstractmethod
    def post_part_recv(self, seq: int, part: int, into: torch.Tensor) -> Recv:
        """Expect part `part` of the peer's message `seq`, exactly `into`'s bytes, in
        `into` (kept as the buffer of later calls too). The Recv's message is a
        "result" header and `[into]`."""

    def discard_parts(self, seq: int, parts: int) -> None:  # noqa: B027 - optional
        """Parts 1..`parts` of the peer's message `seq` will not be read (a refused
        stream): if they come, they are dropped."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...


def check_part(part: int, tensor: torch.Tensor) -> None:
    if not 1 <= part <= MAX_PART:
        raise ValueError(f"part must be in [1, {MAX_PART}]; got {part}")
    if not tensor.is_contiguous():
        raise ValueError("tensors sent or received as parts must be contiguous")


class Listener(ABC):
    """Accepts connections (after the token handshake) on `address`."""

    address: str

    @abstractmethod
    def accept(self) -> Connection | None:
        """A newly connected peer, or None; never blocks."""

    @abstractmethod
    def close(self) -> None: ...


class Transport(ABC):
    """Connects, listens and progresses; owns whatever the connections share."""

    @abstractmethod
    def connect(self, address: str, *, timeout: float = 30.0) -> Connection: ...

    @abstractmethod
    def listen(self, address: str) -> Listener: ...

    @abstractmethod
    def progress(self, timeout: float = 0.0) -> None:
        """Advance pending sends and receives; may sleep up to `timeout` seconds if idle."""

    def wait(self, recvs: Sequence[Recv], timeout: float, what: str = "reply") -> list[Message]:
        """Progress until every receive is done; their messages, in order.

        Raises DeadlineExceeded after `timeout` seconds, naming the peers that did not
        answer (the receives still pending are cancelled and listed in its `late`), and
        TransportError if a peer is gone. A peer's "error" reply is a message like any
        other: the caller (kflume/weight/client.py) turns it into a RemoteError.
        """
        deadline = time.monotonic() + timeout
        while not all(r.done for r in recvs):
            now = time.monotonic()
            if now > deadline:
                late = [r for r in recvs if not r.done]
                for r in late:
                    r.cancel()
                e = DeadlineExceeded(f"no {what} from "
                                     f"{', '.join(sorted({r.peer for r in late}))} within "
                                     f"{timeout:.3g} s")
                e.late = late  # the receives that timed out (cancelled)
                raise e
            self.progress(min(deadline - now, 0.01))
        return [r.message() for r in recvs]

    def close(self) -> None:  # noqa: B027
        pass
