"""NodeClient: the weight node's handle on one attention node.

Every call posts its reply receive first, then sends, and returns a `Pending` at once,
so callers can dispatch to many nodes before waiting on any (query-first dispatch).
Replies that nobody waits for on the critical path (appends, imports) are kept as
outstanding acknowledgements and checked later (`check`, `flush`): a node's refusal is
raised, never dropped.

An attend stream (`open_stream`) is attention of one batch at every layer of a step:
one header says the batch once, then each layer's q goes alone and its reply comes back
alone (`Connection.send_part`), with the receives posted ahead on both sides: one
message each way per layer instead of two, and nothing to decode. The node answers the
stream's header once it has replied to every layer, or with an error as soon as it
refuses (the layers not yet answered then raise it). A stream opened on a mailbox this
client registered with the node (kflume/comm/mailbox.py, one host) gets its replies
there instead: no receive is posted, and a layer is answered once its doorbell is up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .comm.base import (
    MAX_PART,
    Connection,
    DeadlineExceeded,
    Message,
    Recv,
    RemoteError,
    Transport,
)
from .comm.wire import Header, dtype_name, state_row_bytes

__all__ = ["AttendStream", "MailReply", "NodeClient", "Pending", "StreamReply"]

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

    def _peek(self) -> Message:
        """The message, error or not (once `done`)."""
        if self._message is None:
            self._message = self.recv.message()
        return self._message

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


class AttendStream:
    """The weight node's side of an attend stream (`NodeClient.open_stream`).

    `attend(layer, q, into)` once for each layer of the stream, in any order; `ack` is
    the node's answer to the whole stream (check it once every layer is answered).
    Every layer must be sent: the node waits for each (until its stream deadline).
    Open a connection's next stream of the same shape only once this one's replies are
    in: the node answers it from the same buffers.

    A stream opened with `into` (one reply buffer for every layer) posts each layer's
    reply receive ahead: the first at once, the next right after a layer's query is
    sent, so that a layer's send is the send alone. `attend` then takes no `into`, and
    the caller must have read a layer's reply before it sends the next layer's query.

    A stream opened on a mailbox (`NodeClient.open_stream(mailbox=...)`) has its replies put
    there by the node; `attend` then takes no `into` and returns a `MailReply`.
    """

    def __init__(self, client: NodeClient, seq: int, layers: range, ack: Pending,
                 shape: tuple[int, int, int], dtype: torch.dtype,
                 into: torch.Tensor | None = None, mailbox: tuple | None = None,
                 pull: bool = False) -> None:
        self.client, self.seq, self.layers, self.ack = client, seq, layers, ack
        self.shape, self.dtype = shape, dtype
        self._sent: set[int] = set()
        self._into = into
        self.mailbox, self.pull = mailbox, pull
        self._ahead: dict[int, Recv] = {}  # pre-posted reply receives, by layer
        if into is not None:
            _check_into(into, shape, dtype)
            self._post_ahead(layers.start)

    def _post_ahead(self, layer: int) -> None:
        if layer in self.layers and layer not in self._sent and layer not in self._ahead:
            self._ahead[layer] = self.client.conn.post_part_recv(
                self.seq, layer - self.layers.start + 1, self._into)

    def attend(self, layer: int, q: torch.Tensor, into: torch.Tensor | None = None,
               ready: bool = False) -> StreamReply | MailReply:
        """Send `layer`'s q `[b, Hq, D]` (a mailbox stream's: `[rows, Hq, D]`); its reply
        (the layout of kflume/comm/wire.py, uint8 `[b, row]`) lands in `into` (the
        stream's, if it was opened with one, or its mailbox). `ready` as in
        `NodeClient.attend`; q and `into` should be buffers reused from step to step (the
        transport keeps their registration)."""
        if layer not in self.layers or layer in self._sent:
            raise ValueError(f"layer {layer} is not an unsent layer of the stream "
                             f"{self.layers}")
        if tuple(q.shape) != self.shape or q.dtype != self.dtype:
            raise ValueError(f"q must be {self.dtype} {list(self.shape)}; got {q.dtype} "
                             f"{list(q.shape)}")
        if self.pull:
            raise ValueError("the node reads this stream's queries itself: expect(layer)")
        if self.mailbox is not None:
            if into is not None:
                raise ValueError("a mailbox stream's replies land in its mailbox: no into")
            self._sent.add(layer)
            self.client.conn.send_part(self.seq, layer - self.layers.start + 1, q,
                                       ready=ready, static=True)
            box, _, word, value = self.mailbox
            return MailReply(self, layer, box, word + layer - self.layers.start, value)
        if (into is None) == (self._into is None):
            raise ValueError("give into for each layer, or once to open_stream")
        if into is not None:
            _check_into(into, self.shape, self.dtype)
        self._sent.add(layer)
        part = layer - self.layers.start + 1
        conn = self.client.conn
        recv = self._ahead.pop(layer, None)
        if recv is None:  # posted before the send
            recv = conn.post_part_recv(self.seq, part, self._into if into is None else into)
        conn.send_part(self.seq, part, q, ready=ready, static=True)
        if self._into is not None:
            self._post_ahead(layer + 1)
        return StreamReply(self, layer, recv)

    def expect(self, layer: int) -> MailReply:
        """A pulling stream's layer: the node reads its query once it is posted; this
        is its reply, in the mailbox."""
        if not self.pull or layer not in self.layers or layer in self._sent:
            raise ValueError(f"layer {layer} is not an unanswered layer of a pulling stream")
        self._sent.add(layer)
        box, _, word, value = self.mailbox
        return MailReply(self, layer, box, word + layer - self.layers.start, value)

    def cancel(self) -> Pending:
        """Give the stream up: the node stops serving it and answers it (with an error)
        once what it has enqueued for it is done; nothing of it lands after that."""
        return self.client.call(Header("cancel", info={"stream": self.seq}))

    def send_unsent(self, q: torch.Tensor) -> None:
        """Send `q` for every layer not sent yet (a step given up on a mailbox stream:
        the node then answers every layer and acknowledges the stream, after which
        nothing of it lands in the mailbox any more). Errors are the ack's to report."""
        for layer in self.layers:
            if layer not in self._sent:
                self._sent.add(layer)
                try:
                    self.client.conn.send_part(self.seq, layer - self.layers.start + 1, q,
                                               ready=True, static=True)
                except Exception:  # noqa: BLE001 - the link is gone: the ack raises it
                    return

    def close(self) -> None:
        """Cancel the receives posted ahead for layers never sent (a step given up)."""
        for r in self._ahead.values():
            r.cancel()
        self._ahead.clear()

    def failed(self) -> bool:
        """The node answered the stream with an error (raised by `ack.result()`)."""
        if not self.ack.done:
            return False
        try:
            return self.ack._peek().header.op == "error"
        except Exception:  # noqa: BLE001 - the link failed: result() raises it
            return True


def _check_into(into: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    want = (shape[0], state_row_bytes(shape[1], shape[2], dtype))
    if tuple(into.shape) != want or into.dtype != torch.uint8:
        raise ValueError(f"into must be uint8 {list(want)}; got {into.dtype} {list(into.shape)}")


class StreamReply:
    """One layer's reply of an attend stream; `result()` as `Pending.result`."""

    def __init__(self, stream: AttendStream, layer: int, recv: Recv) -> None:
        self.stream, self.layer, self.recv = stream, layer, recv

    @property
    def done(self) -> bool:
        return self.recv.done or self.stream.failed()

    def cancel(self) -> None:
        if not self.recv.done:
            self.recv.cancel()

    def _arrived(self) -> bool:
        return self.recv.done

    def result(self, timeout: float | None = None) -> Message | None:
        client = self.stream.client
        t = client.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while not self.done:
            now = time.monotonic()
            if now > deadline:
                self.cancel()
                raise DeadlineExceeded(f"node {client.name} ({client.conn.peer}): no reply to "
                                       f"layer {self.layer} of stream {self.stream.seq} within "
                                       f"{t:.3g} s")
            client.transport.progress(min(deadline - now, 0.01))
        if not self._arrived():
            self.cancel()
            self.stream.ack.result(0.0)  # raises the node's refusal
        return self._message()

    def _message(self) -> Message | None:
        return self.recv.message()


class MailReply(StreamReply):
    """A layer's reply delivered into a mailbox: done once the node raised its doorbell
    word to the stream's value (`Mailbox.next_value`). `result()` returns None (the
    reply is in the mailbox) or raises the node's refusal."""

    def __init__(self, stream: AttendStream, layer: int, box, word: int, value: int) -> None:
        self.stream, self.layer, self.box, self.word, self.value = stream, layer, box, word, value

    @property
    def done(self) -> bool:
        return self._arrived() or self.stream.failed()

    def cancel(self) -> None:  # nothing posted: a late delivery is told apart by its value
        pass

    def _arrived(self) -> bool:
        return self.box.ready(self.word, self.value)

    def _message(self) -> None:
        return None

    def result(self, timeout: float | None = None) -> None:
        client = self.stream.client
        t = client.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while not self.done:  # a doorbell wakes no poll: look again and again
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"node {client.name} ({client.conn.peer}): no reply to "
                                       f"layer {self.layer} of stream {self.stream.seq} within "
                                       f"{t:.3g} s")
            client.transport.progress(0.0)
            time.sleep(0)
        if not self._arrived():
            self.stream.ack.result(0.0)  # raises the node's refusal
        return None


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
        self._mailboxes: dict[int, int] = {}  # id(Mailbox) -> the id the node knows it by
        self._mailbox_refs: list = []

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

    def open_stream(self, layers: range, epoch: int, requests: Sequence,
                    kv_len: Sequence[int], q_heads: int, head_dim: int,
                    dtype: torch.dtype, scale: float | None = None,
                    into: torch.Tensor | None = None,
                    mailbox: tuple | None = None, pull: tuple | None = None,
                    rows: int | None = None) -> AttendStream:
        """Open an attend stream: attention of `requests` over their first `kv_len`
        tokens at every layer of `layers` (at most MAX_PART), q `[b, q_heads, head_dim]`
        in `dtype` (module docstring). `into`: one reply buffer for every layer, whose
        receives are then posted ahead (`AttendStream`). `mailbox=(box, row, word)`: the
        replies go to rows `row ..` of a mailbox registered with this node, layer i's
        doorbell is word `word + i` (lowered here, before the node can raise it, to a
        value of this stream's own). `pull=(flag, stride, values)` (with a mailbox that
        has queries and flags): no query is sent; the node reads layer i's from the
        mailbox's query rows `row ..` once post flag `flag + i * stride` reaches
        `values[i]` (> 0; `AttendStream.expect`). `rows` (with a mailbox, >= b): the
        stream's place in it is rows `row .. row + rows`, which the node reads and writes
        whole (rows past the requests' are padding), so that its buffers and captured
        graphs for the place stay the same while the batch changes."""
        if mailbox is not None and into is not None:
            raise ValueError("give into or mailbox, not both")
        if rows is not None and mailbox is None:
            raise ValueError("rows needs a mailbox")
        b = len(requests)
        info = self._stream_info(layers, b if rows is None else rows, b, q_heads, head_dim,
                                 dtype, scale)
        shape = (info["rows"], int(q_heads), int(head_dim))  # each layer's q (padded)
        if into is not None:  # before the node opens the stream
            _check_into(into, shape, dtype)
        mail = None
        if mailbox is not None:
            box, row, word = mailbox
            info.update(self._mail_info(box, row, word, info["rows"], layers, q_heads,
                                        head_dim, dtype, pull))
            box.clear(word, word + len(layers))
            mail = (box, row, word, box.next_value())
            info["mailbox"].append(mail[3])
        elif pull is not None:
            raise ValueError("pull needs a mailbox")
        if rows is None:
            del info["rows"]
        h = Header("stream", layer=layers.start, epoch=epoch, requests=list(requests),
                   ints={"kv_len": list(kv_len)}, info=info)
        ack = self.call(h)
        return AttendStream(self, h.seq, layers, ack, shape, dtype, into, mail,
                            pull is not None)

    def prepare_stream(self, layers: range, rows: int, q_heads: int, head_dim: int,
                       dtype: torch.dtype, scale: float | None = None, *, mailbox: tuple,
                       pull: tuple | None = None) -> Pending:
        """Ask the node to capture now the graphs its streams on this mailbox place will
        replay (`open_stream` with the same `layers`, `rows`, heads, dtype, scale,
        `mailbox=(box, row, word)` and `pull=(flag, stride)`), so that the first of them
        runs at full speed. It holds the node ~0.5 ms a layer: for a node that takes no
        traffic yet (one joining). Its answer's info["captured"] counts the graphs."""
        info = self._stream_info(layers, rows, 0, q_heads, head_dim, dtype, scale)
        box, row, word = mailbox
        if pull is not None:
            pull = (*pull, [1] * len(layers))
        info.update(self._mail_info(box, row, word, rows, layers, q_heads, head_dim, dtype,
                                    pull))
        info["mailbox"].append(0)
        return self.call(Header("prepare", layer=layers.start, info=info))

    @staticmethod
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

    def _mail_info(self, box, row: int, word: int, rows: int, layers: range, q_heads: int,
                   head_dim: int, dtype: torch.dtype, pull: tuple | None) -> dict:
        """The mailbox (and pull) part of a stream's info, less the doorbell value."""
        box_id = self._mailboxes.get(id(box))
        if box_id is None:
            raise ValueError(f"node {self.name}: this mailbox was not registered with it")
        if box.row_bytes != state_row_bytes(q_heads, head_dim, dtype):
            raise ValueError(f"the mailbox's rows hold {box.row_bytes} bytes; this "
                             f"stream's replies {state_row_bytes(q_heads, head_dim, dtype)}")
        if row + rows > box.rows or word + len(layers) > box.words:
            raise ValueError("the stream's rows or words do not fit in the mailbox")
        info = {"mailbox": [box_id, row * box.row_bytes, word]}
        if pull is not None:
            flag, stride, values = pull
            values = [int(v) for v in values]
            if len(values) != len(layers) or min(values) <= 0:
                raise ValueError("pull needs one value > 0 per layer")
            qrow = int(q_heads) * int(head_dim) * torch.empty(0, dtype=dtype).element_size()
            if box.queries is None or box.flags is None or box.query_row_bytes != qrow:
                raise ValueError(f"pull needs a mailbox with query rows of {qrow} bytes "
                                 "and post flags")
            if flag + stride * (len(layers) - 1) >= box.flags.count:
                raise ValueError("the stream's post flags do not fit in the mailbox's")
            info["pull"] = [row * qrow, flag, stride, values]
        return info

    def register_mailbox(self, boxes: Sequence, wait: bool = True) -> Pending | None:
        """Let the node deliver stream replies into these mailboxes (`Mailbox`, this
        host); blocking, with the client's deadline. Raises RemoteError if the node
        cannot map them (another host, a GPU it cannot reach): keep receiving its
        replies as messages then. `wait=False`: returns the pending answer at once, and
        later messages may name the mailboxes already (the node handles them in order;
        if it refused, it refuses those too)."""
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

    def export_range(self, request, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.call(Header("export", requests=[request], ints={"start": [start],
                                                                "end": [end]})).result()
        return m.tensors[0], m.tensors[1]

    def import_range(self, request, start: int, k: torch.Tensor, v: torch.Tensor) -> Pending:
        p = self.call(Header("import", requests=[request], ints={"start": [start]}), [k, v])
        self.outstanding.append(p)
        return p

    def stats(self, reset_timings: bool = False, trace: int = 0) -> dict:
        """The node's state; with its serving times (medians over the attend messages
        and stream layers since the last reset: `attend_handle_us`, arrival to kernels
        launched, and `attend_reply_us`, launch to reply sent, or for a mailbox stream
        to its delivery enqueued behind the kernels). `trace=n` (<= 512): also
        the last n of them, `attend_trace`: `[seq, layer, seen, launched, sent]` in the
        node's `time.perf_counter()` seconds (one clock for all processes of a Linux
        host: comparable with the caller's)."""
        info = {"reset_timings": True} if reset_timings else {}
        if trace:
            info["trace"] = trace
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
