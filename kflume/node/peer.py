"""What a node server keeps per connected weight node (a peer), and per attend stream.

Request ids belong to the peer that names them: the node keeps each request under a
`RequestKey` (the peer's number, its id), so two weight nodes that use the same ids
never touch each other's KV, and no peer can name another's requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..comm.base import Connection, Recv
from ..comm.mailbox import MailboxView

__all__ = ["MailTarget", "Peer", "PullSpec", "RequestKey", "ServedStream", "StreamBuffers",
           "StreamSpec"]


class RequestKey(tuple):
    """A request as a node keeps it: (its peer's number, the peer's id for it). Shown
    as the peer's id, so that errors name requests the way their peer knows them."""

    __slots__ = ()

    def __new__(cls, peer: int, rid) -> RequestKey:
        return tuple.__new__(cls, (peer, rid))

    def __repr__(self) -> str:
        return repr(self[1])

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class MailTarget:
    """Where a mailbox stream's replies go: `box`'s bytes from `offset`, layer i's
    doorbell word `word + i` raised to `value`."""

    box: MailboxView
    offset: int
    word: int
    value: int


@dataclass(frozen=True, slots=True)
class PullSpec:
    """Where a mailbox stream's queries come from: the mailbox's query bytes from
    `offset`, layer i's once post flag `flag + i * stride` reaches `values[i]`."""

    offset: int
    flag: int
    stride: int
    values: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A stream's (or a capture's) header, checked (kflume/node/streams.py)."""

    layers: int
    rows: int  # the requests', or a mailbox place's (>= the requests': padding rows)
    heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float | None
    mailbox: list | None  # [mailbox id, byte offset, first word, doorbell value]
    pull: PullSpec | None

    @property
    def key(self) -> tuple:
        """Names the stream's buffer pool: a mailbox stream's buffers are kept for its
        place in the mailbox (the graphs captured on them fetch and deliver there)."""
        place = None if self.mailbox is None else (tuple(self.mailbox[:3]), self.pull.offset)
        return (self.layers, self.rows, self.heads, self.head_dim, self.dtype, place)


@dataclass(slots=True)
class StreamBuffers:
    """A stream's buffers on the node's device, reused from one of a peer's streams to
    its next: queries `[L, rows, Hq, D]`, replies `[L, rows, row]` (uint8), their
    per-layer views, per-layer events (what a layer's reply send waits on) and the
    doorbell value (int64 `[1]`, read by the deliveries captured with the layers)."""

    q: torch.Tensor
    result: torch.Tensor
    q_layers: list[torch.Tensor]
    result_layers: list[torch.Tensor]
    events: list
    bell: torch.Tensor


@dataclass(slots=True)
class ServedStream:
    """A peer's attend stream being served."""

    seq: int
    layers: range
    bufs: StreamBuffers
    key: tuple  # of the buffers' pool
    deadline: float  # time.monotonic() past which missing queries give it up
    run: Callable[[int], None] | None = None  # None: refused or failed; only drained
    recvs: list = field(default_factory=list)  # [layer] the query's receive (messages)
    next: int = 0  # layers served so far (in order)
    mail: MailTarget | None = None
    pull: PullSpec | None = None


@dataclass(slots=True)
class Peer:
    """One connected weight node; `uid` numbers it among the server's peers."""

    conn: Connection
    uid: int = 0
    next_seq: int = 0
    recv: Recv | None = None
    requests: set = field(default_factory=set)  # the request ids it opened here
    streams: list[ServedStream] = field(default_factory=list)
    # Free stream buffers by pool key, per peer: a stream's last replies may still be on
    # their way when it ends, and only this peer's next stream (opened once it has
    # them) may write the buffers again.
    stream_bufs: dict[tuple, list[StreamBuffers]] = field(default_factory=dict)
    mailboxes: dict[int, MailboxView] = field(default_factory=dict)  # registered, by id
    last_stream: float = -1e9  # when it last opened a stream (time.monotonic())
    _keys: dict = field(default_factory=dict)  # its ids' keys, made once

    def scope(self, requests) -> list[RequestKey]:
        """The node's keys of this peer's request ids."""
        keys = self._keys
        if len(keys) > 1 << 16:  # (ids of requests long gone)
            keys.clear()
        out = []
        for rid in requests:
            k = keys.get(rid)
            if k is None:
                k = keys[rid] = RequestKey(self.uid, rid)
            out.append(k)
        return out
