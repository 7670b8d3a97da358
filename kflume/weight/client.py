"""NodeClient: the weight node's handle on one attention node.

Every call posts its reply receive first, then sends, and returns a `Pending` at once,
so callers can dispatch to many nodes before waiting on any (query-first dispatch).
Replies nobody waits for on the critical path (appends, imports) are kept as
outstanding acknowledgements and checked later (`check`, `flush`): a node's refusal is
raised, never dropped. A call refused here (a tensor the wire cannot carry, a header
too large, a reply buffer that does not fit) raises before anything is sent and leaves
the client as it was; every timeout names the node, its address and the operation.
Attend streams: kflume/weight/stream.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..comm.base import (
    MAX_PART,
    Connection,
    DeadlineExceeded,
    Message,
    Recv,
    RemoteError,
    Transport,
    TransportError,
)
from ..comm.mailbox import Mailbox
from ..comm.wire import Header, dtype_name, state_row_bytes
from .stream import AttendStream, MailPlace, check_into

__all__ = ["NodeClient", "Pending", "wait_all"]

DEFAULT_TIMEOUT = 30.0


class Pending:
    """A reply on its way. `result()` waits (with a deadline) and returns the message."""

    def __init__(self, client: NodeClient, op: str, recv: Recv):
        self.client, self.op, self.recv = client, op, recv
        self._message: Message | None = None

    @property
    def done(self) -> bool:
        return self._message is not None or self.recv.done

    def cancel(self) -> None:
        """Give the reply up: its receive is cancelled (nothing lands after this)."""
        if not self.done:
            self.recv.cancel()

    def peek(self) -> Message:
        """The message, error or not (once `done`)."""
        if self._message is None:
            self._message = self.recv.message()
        return self._message

    def result(self, timeout: float | None = None) -> Message:
        """The reply; raises RemoteError (the node refused), TransportError (the link
        failed) or DeadlineExceeded, each naming the node and the operation."""
        if self._message is None:
            t = self.client.timeout if timeout is None else timeout
            try:
                (self._message,) = self.client.transport.wait(
                    [self.recv], t, what=f"reply to {self.op}")
            except DeadlineExceeded:
                e = DeadlineExceeded(f"node {self.client.name} ({self.client.conn.peer}): no "
                                     f"reply to {self.op} within {t:.3g} s")
                e.nodes = (self.client.name,)  # who did not answer
                raise e from None
        return _raise_if_error(self.client, self.op, self._message)


def _raise_if_error(client: NodeClient, op: str, msg: Message) -> Message:
    if msg.header.info.get("leaving"):  # the node drains (SIGTERM): its cluster moves off
        client.leaving = True
    if msg.header.op == "error":
        raise RemoteError(f"node {client.name} ({client.conn.peer})", op, msg.header.error,
                          str(msg.header.info.get("kind", "error")))
    return msg


def wait_all(pendings: Sequence[Pending], timeout: float) -> list[Message]:
    """Wait for replies from several nodes at once; one deadline for all."""
    if not pendings:
        return []
    transport = pendings[0].client.transport
    try:
        msgs = transport.wait([p.recv for p in pendings], timeout, what="replies")
    except DeadlineExceeded as e:
        late = {id(r) for r in getattr(e, "late", ())}
        silent = [p for p in pendings if id(p.recv) in late]
        names = sorted({f"node {p.client.name} ({p.client.conn.peer}) to {p.op}"
                        for p in silent})
        err = DeadlineExceeded(f"no reply within {timeout:.3g} s from {', '.join(names)}")
        err.nodes = tuple(sorted({p.client.name for p in silent}))  # who did not answer
        raise err from None
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
        self.leaving = False  # the node said it is leaving (its replies carry "leaving")
        self.outstanding: list[Pending] = []
        self._mailboxes: dict[int, int] = {}  # id(Mailbox) -> the id the node knows it by
        self._mailbox_refs: list = []

    @classmethod
    def connect(cls, name: str, transport: Transport, address: str,
                timeout: float = DEFAULT_TIMEOUT) -> NodeClient:
        """Connect to the node at `address`; errors name it (`name`, `address`)."""
        try:
            conn = transport.connect(address, timeout=timeout)
        except (DeadlineExceeded, TransportError) as e:
            text = str(e).removeprefix(f"{address}: ")
            raise type(e)(f"node {name} ({address}): {text}") from None
        return cls(name, transport, conn, timeout)

    @property
    def info(self) -> dict:
        """What the node said about itself in the handshake (geometry), if anything."""
        return getattr(self.conn, "info", {}) or {}

    def call(self, header: Header, tensors: Sequence[torch.Tensor] = (),
             into: Sequence[torch.Tensor] | None = None, ready: bool = False) -> Pending:
        """Post the reply's receive, then send. `ready=True`: CUDA tensors are known to be
        written (e.g. a captured graph posted them), so the current stream is not synced.

        What can refuse the call is checked before anything goes out: the receive
        (`into` buffers) when posted, the message (dtypes, contiguity, header size) by
        `send` before it sends. A receive whose send was refused takes nothing (one
        is only read when waited on), and the sequence number is taken once sent, so a
        refused call leaves the client in step with the node."""
        recv = self.conn.post_recv(self._seq, into)  # posted before the send
        header.seq = self._seq
        self.conn.send(header, tensors, ready=ready)
        self._seq += 1
        return Pending(self, header.op, recv)

    # ---- the data path ----------------------------------------------------------------
    def attend(self, layer: int, epoch: int, requests: Sequence, kv_len: Sequence[int],
               q: torch.Tensor, into: torch.Tensor | None = None,
               scale: float | None = None, ready: bool = False,
               kv_start: Sequence[int] | None = None, softcap: float | None = None) -> Pending:
        """q `[b, Hq, D]` -> one reply tensor holding out `[b, Hq, D]` and lse `[b, Hq]`
        (`kflume.comm.wire.unpack_states` gives views of them), received into `into` when
        given (uint8 `[b, state_row_bytes]`). Each request's first `kv_len` tokens on the
        node are attended, from its `kv_start`-th on (a sliding window); `softcap` caps
        the scores (Gemma2). `ready`: q is known to be written."""
        info = {} if scale is None else {"scale": float(scale)}
        if softcap is not None:
            info["softcap"] = float(softcap)
        ints = {"kv_len": list(kv_len)}
        if kv_start is not None:
            ints["kv_start"] = list(kv_start)
        if q.dim() != 3:
            raise ValueError(f"q must be [b, Hq, D]; got {list(q.shape)}")
        if into is not None:
            check_into(into, tuple(q.shape), q.dtype)
            if not into.is_contiguous():
                raise ValueError("into must be contiguous")
        return self.call(Header("attend", layer=layer, epoch=epoch, requests=list(requests),
                                ints=ints, info=info), [q],
                         None if into is None else [into], ready=ready)

    def open_stream(self, layers: range, epoch: int, requests: Sequence,
                    kv_len: Sequence[int], q_heads: int, head_dim: int, dtype: torch.dtype,
                    scale: float | None = None, *, into: torch.Tensor | None = None,
                    mailbox: tuple | None = None, pull: tuple | None = None,
                    rows: int | None = None) -> AttendStream:
        """Attention of `requests` over their first `kv_len` tokens at every layer of
        `layers` (at most MAX_PART), q `[b, q_heads, head_dim]` in `dtype`
        (kflume/weight/stream.py). `into`: one reply buffer for every layer (receives
        posted ahead). `mailbox=(box, row, word)` with `pull=(flag, stride, values)`:
        replies go to rows `row ..` of a mailbox registered with this node, layer i's
        doorbell is word `word + i` (lowered here, before the node can raise it, then
        raised to a value of this stream's own), and the node reads layer i's q from
        the mailbox's query rows `row ..` once post flag `flag + i * stride` reaches
        `values[i]` (> 0). `rows` (>= b, mailbox streams): the stream's place is rows
        `row .. row + rows`, which the node reads and writes whole (rows past the
        requests' are padding), so that its buffers and graphs stay the same while the
        batch changes."""
        if mailbox is not None and into is not None:
            raise ValueError("give into or mailbox, not both")
        if (mailbox is None) != (pull is None):
            raise ValueError("a mailbox stream needs both mailbox and pull")
        if rows is not None and mailbox is None:
            raise ValueError("rows needs a mailbox")
        b = len(requests)
        info = _stream_info(layers, b if rows is None else rows, b, q_heads, head_dim,
                                 dtype, scale)
        shape = (info["rows"], int(q_heads), int(head_dim))  # each layer's q (padded)
        if into is not None:  # before the node opens the stream
            check_into(into, shape, dtype)
        mail = None
        if mailbox is not None:
            box, row, word = mailbox
            info.update(_mail_info(self, box, row, word, info["rows"], layers, q_heads,
                                        head_dim, dtype, pull))
            box.clear(word, word + len(layers))
            mail = MailPlace(box, row, word, box.next_value())
            info["mailbox"].append(mail.value)
        if rows is None:
            del info["rows"]
        h = Header("stream", layer=layers.start, epoch=epoch, requests=list(requests),
                   ints={"kv_len": list(kv_len)}, info=info)
        ack = self.call(h)
        return AttendStream(self, h.seq, layers, ack, shape, dtype, into, mail)

    def capture_ahead(self, layers: range, rows: int, q_heads: int, head_dim: int,
                      dtype: torch.dtype, scale: float | None = None, *, mailbox: tuple,
                      pull: tuple) -> Pending:
        """Ask the node to capture now the graphs its streams on this mailbox place will
        replay (`open_stream` with the same `layers`, `rows`, heads, dtype, scale,
        `mailbox=(box, row, word)` and `pull=(flag, stride)`), so that the first of them
        runs at full speed. It holds the node ~0.5 ms a layer: for a node that takes no
        traffic yet (one joining). Its answer's info["captured"] counts the graphs."""
        info = _stream_info(layers, rows, 0, q_heads, head_dim, dtype, scale)
        box, row, word = mailbox
        info.update(_mail_info(self, box, row, word, rows, layers, q_heads, head_dim, dtype,
                                    (*pull, [1] * len(layers))))
        info["mailbox"].append(0)
        return self.call(Header("capture", layer=layers.start, info=info))

    def register_mailbox(self, boxes: Sequence[Mailbox], wait: bool = True) -> Pending | None:
        """Let the node read queries from and deliver replies into these mailboxes (this
        host); blocking, with the client's deadline. Raises RemoteError if the node
        cannot map them (another host, a GPU it cannot reach): use message streams then.
        `wait=False`: returns the pending answer at once; later messages may name the
        mailboxes already (the node handles them in order; if it refused, it refuses
        those too)."""
        ids = {id(b): i for i, b in enumerate(boxes, start=len(self._mailboxes))}
        pending = self.call(Header("mailbox", info={"mailboxes": [
            [ids[id(b)], b.describe()] for b in boxes]}))
        if wait:
            pending.result()
        self._mailboxes.update(ids)
        self._mailbox_refs.extend(boxes)  # ids stay unique while registered
        return None if wait else pending

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

    def truncate(self, requests: Sequence, tokens: Sequence[int]) -> Pending:
        """Keep only the first `tokens[i]` tokens the node holds of `requests[i]`; the
        acknowledgement is kept outstanding."""
        p = self.call(Header("truncate", requests=list(requests),
                             ints={"tokens": [int(t) for t in tokens]}))
        self.outstanding.append(p)
        return p

    def export_range(self, request, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.call(Header("export", requests=[request], ints={"start": [start],
                                                                "end": [end]})).result()
        return m.tensors[0], m.tensors[1]

    def import_range(self, request, start: int, k: torch.Tensor, v: torch.Tensor) -> Pending:
        p = self.call(Header("import", requests=[request], ints={"start": [start]}), [k, v])
        self.outstanding.append(p)
        return p

    def stats(self, reset_timings: bool = False, trace: int = 0) -> dict:
        """The node's state and serving times (`NodeServer.stats`): medians over the
        attend messages and stream layers since the last reset, `attend_handle_us`
        (arrival to kernels launched) and `attend_reply_us` (launch to reply sent, or to
        a mailbox delivery enqueued); `trace=n` (<= 512) also the last n entries, in the
        node's `time.perf_counter()` seconds (one clock for the processes of a host)."""
        info = {"reset_timings": True} if reset_timings else {}
        if trace:
            info["trace"] = trace
        return dict(self.call(Header("stats", info=info)).result().header.info)

    def shutdown(self) -> None:
        self.call(Header("shutdown")).result()

    # ---- acknowledgements -------------------------------------------------------------
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


def _stream_info(layers: range, rows: int, b: int, q_heads: int, head_dim: int,
                 dtype: torch.dtype, scale: float | None) -> dict:
    if not 1 <= len(layers) <= MAX_PART or layers.step != 1:
        raise ValueError(f"a stream covers 1 to {MAX_PART} consecutive layers; got "
                         f"{layers}")
    if not max(b, 1) <= rows:
        raise ValueError(f"rows ({rows}) must be at least 1 and the requests' {b}")
    info = {"layers": len(layers), "heads": int(q_heads), "head_dim": int(head_dim),
            "dtype": dtype_name(dtype), "rows": int(rows)}
    if scale is not None:
        info["scale"] = float(scale)
    return info

def _mail_info(client: NodeClient, box: Mailbox, row: int, word: int, rows: int, layers: range,
               q_heads: int, head_dim: int, dtype: torch.dtype, pull: tuple) -> dict:
    """The mailbox and pull part of a stream's info, less the doorbell value."""
    box_id = client._mailboxes.get(id(box))
    if box_id is None:
        raise ValueError(f"node {client.name}: this mailbox was not registered with it")
    if box.row_bytes != state_row_bytes(q_heads, head_dim, dtype):
        raise ValueError(f"the mailbox's rows hold {box.row_bytes} bytes; this "
                         f"stream's replies {state_row_bytes(q_heads, head_dim, dtype)}")
    if row + rows > box.rows or word + len(layers) > box.words:
        raise ValueError("the stream's rows or words do not fit in the mailbox")
    flag, stride, values = pull
    values = [int(v) for v in values]
    if len(values) != len(layers) or min(values) <= 0:
        raise ValueError("pull needs one value > 0 per layer")
    qrow = int(q_heads) * int(head_dim) * torch.empty(0, dtype=dtype).element_size()
    if box.queries is None or box.flags is None or box.query_row_bytes != qrow:
        raise ValueError(f"pull needs a mailbox with query rows of {qrow} bytes and "
                         "post flags")
    if flag + stride * (len(layers) - 1) >= box.flags.count:
        raise ValueError("the stream's post flags do not fit in the mailbox's")
    return {"mailbox": [box_id, row * box.row_bytes, word],
            "pull": [row * qrow, flag, stride, values]}
