"""NodeClient: the weight node's handle on one attention node.

Every call posts its reply receive first, then sends, and returns a `Pending` at once,
so callers can dispatch to many nodes before waiting on any (query-first dispatch).
Replies that nobody waits for on the critical path (appends, imports) are kept as
outstanding acknowledgements and checked later (`check`, `flush`): a node's refusal is
raised, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .comm.base import Connection, DeadlineExceeded, Message, Recv, RemoteError, Transport
from .comm.wire import Header

__all__ = ["NodeClient", "Pending"]

DEFAULT_TIMEOUT = 30.0


class Pending:
    """A reply on its way. `result()` waits (with a deadline) and returns the message."""

    def __init__(self, client: NodeClient, op: str, recv: Recv):
        self.client, self.op, self.recv = client, op, recv
        self._message: Message | None = None

    @property
    def done(self) -> bool:
        return self._message is not None or self.recv.done

    def result(self, timeout: float | None = None) -> Message:
        if self._message is None:
            t = self.client.timeout if timeout is None else timeout
            try:
                (self._message,) = self.client.transport.wait(
                    [self.recv], t, what=f"reply to {self.op} from node {self.client.name}")
            except DeadlineExceeded as e:
                raise DeadlineExceeded(f"node {self.client.name} ({self.client.conn.peer}): "
                                       f"{e}") from None
        return _raise_if_error(self.client, self.op, self._message)


def _raise_if_error(client: NodeClient, op: str, msg: Message) -> Message:
    if msg.header.op == "error":
        raise RemoteError(f"node {client.name} ({client.conn.peer})", op, msg.header.error,
                          str(msg.header.info.get("kind", "error")))
    return msg


def wait_all(pendings: Sequence[Pending], timeout: float) -> list[Message]:
    """Wait for replies from several nodes at once; one deadline for all."""
    if not pendings:
        return []
    transport = pendings[0].client.transport
    msgs = transport.wait([p.recv for p in pendings], timeout, what="replies from nodes")
    out = []
    for p, m in zip(pendings, msgs):
        p._message = m
        out.append(_raise_if_error(p.client, p.op, m))
    return out


class NodeClient:
    """Typed requests to one attention node over a connection."""

    def __init__(self, name: str, transport: Transport, conn: Connection,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name, self.transport, self.conn, self.timeout = name, transport, conn, timeout
        self._seq = 0
        self.outstanding: list[Pending] = []

    @classmethod
    def connect(cls, name: str, transport: Transport, address: str,
                timeout: float = DEFAULT_TIMEOUT) -> NodeClient:
        return cls(name, transport, transport.connect(address, timeout=timeout), timeout)

    @property
    def info(self) -> dict:
        """What the node said about itself in the handshake (geometry), if anything."""
        return getattr(self.conn, "info", {}) or {}

    def call(self, header: Header, tensors: Sequence[torch.Tensor] = (),
             into: Sequence[torch.Tensor] | None = None, ready: bool = False) -> Pending:
        """Post the reply's receive, then send. `ready=True`: CUDA tensors are known to be
        written (e.g. a captured graph posted them), so the current stream is not synced."""
        header.seq = self._seq
        self._seq += 1
        recv = self.conn.post_recv(header.seq, into)  # posted before the send
        self.conn.send(header, tensors, ready=ready)
        return Pending(self, header.op, recv)

    # ---- the data path ----------------------------------------------------------------
    def attend(self, layer: int, epoch: int, requests: Sequence, kv_len: Sequence[int],
               q: torch.Tensor, into: torch.Tensor | None = None,
               scale: float | None = None, ready: bool = False) -> Pending:
        """q `[b, Hq, D]` -> one reply tensor holding out `[b, Hq, D]` and lse `[b, Hq]`
        (`kflume.comm.wire.unpack_states` gives views of them), received into `into` when
        given (uint8 `[b, state_row_bytes]`). `ready`: q is known to be written (e.g. a
        captured graph posted it)."""
        into = None if into is None else [into]
        info = {} if scale is None else {"scale": float(scale)}
        return self.call(Header("attend", layer=layer, epoch=epoch, requests=list(requests),
                                ints={"kv_len": list(kv_len)}, info=info), [q], into,
                         ready=ready)

    def append(self, layer: int, requests: Sequence, offsets: Sequence[int],
               positions: Sequence[int], k: torch.Tensor, v: torch.Tensor,
               ready: bool = False) -> Pending:
        """k, v `[b, T, Hkv, D]` of `layer` at local offsets, or `[b, L, T, Hkv, D]` of
        layers `layer .. layer + L - 1` (one message and one kernel for a step's new
        tokens of every layer). The acknowledgement is kept outstanding."""
        info = {"layers": k.shape[1]} if k.dim() == 5 else {}
        p = self.call(Header("append", layer=layer, requests=list(requests),
                             ints={"offsets": list(offsets), "positions": list(positions)},
                             info=info), [k, v], ready=ready)
        self.outstanding.append(p)
        return p

    # ---- control (blocking, with the client's deadline) --------------------------------
    def open(self, requests: Sequence, tokens: Sequence[int]) -> None:
        self.call(Header("open", requests=list(requests), ints={"tokens": list(tokens)})).result()

    def free(self, requests: Sequence) -> int:
        m = self.call(Header("free", requests=list(requests))).result()
        return int(m.header.info.get("freed_tokens", 0))

    def export_range(self, request, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.call(Header("export", requests=[request], ints={"start": [start],
                                                                "end": [end]})).result()
        return m.tensors[0], m.tensors[1]

    def import_range(self, request, start: int, k: torch.Tensor, v: torch.Tensor) -> Pending:
        p = self.call(Header("import", requests=[request], ints={"start": [start]}), [k, v])
        self.outstanding.append(p)
        return p

    def stats(self, reset_timings: bool = False) -> dict:
        """The node's state; with its serving times (medians over the attend messages
        since the last reset: `attend_handle_us`, arrival to kernels launched, and
        `attend_reply_us`, launch to reply sent)."""
        info = {"reset_timings": True} if reset_timings else {}
        return dict(self.call(Header("stats", info=info)).result().header.info)

    def shutdown(self) -> None:
        self.call(Header("shutdown")).result()

    # ---- acknowledgements -------------------------------------------------------------------
    def check(self) -> None:
        """Raise the first refusal among acknowledgements that have arrived; never waits."""
        still = []
        for i, p in enumerate(self.outstanding):
            if not p.done:
                still.append(p)
                continue
            try:
                p.result(0.0)
            except Exception:
                self.outstanding = still + self.outstanding[i + 1 :]
                raise
        self.outstanding = still

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every outstanding acknowledgement; raise the first refusal."""
        pending, self.outstanding = self.outstanding, []
        wait_all(pending, self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self.conn.close()
