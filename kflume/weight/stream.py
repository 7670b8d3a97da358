"""AttendStream: the weight node's side of an attend stream (`NodeClient.open_stream`).

An attend stream is attention of one batch at every layer of a step: one header says
the batch once; then, for a node answering with messages, each layer's q goes alone and
its reply comes back alone (`Connection.send_part`), with the receives posted ahead on
both sides: one message each way per layer, nothing decoded. For a node of this host
that took this weight node's mailboxes (kflume/comm/mailbox.py), nothing is sent per
layer at all: the node reads each layer's q from the mailbox once its post flag is up,
and delivers the reply there with a doorbell (`expect`). The node answers the stream's
header once every layer is answered, or with an error as soon as it refuses (the
layers not yet answered then raise it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..comm.base import DeadlineExceeded, Message, Recv
from ..comm.mailbox import Mailbox
from ..comm.wire import state_row_bytes

__all__ = ["AttendStream", "MailPlace", "MailReply", "StreamReply"]


@dataclass(frozen=True, slots=True)
class MailPlace:
    """A mailbox stream's place: its replies in `box`'s rows from `row`, layer i's
    doorbell word `word + i` raised to `value`."""

    box: Mailbox
    row: int
    word: int
    value: int


def check_into(into: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    want = (shape[0], state_row_bytes(shape[1], shape[2], dtype))
    if tuple(into.shape) != want or into.dtype != torch.uint8:
        raise ValueError(f"into must be uint8 {list(want)}; got {into.dtype} {list(into.shape)}")


class AttendStream:
    """One stream; `ack` is the node's answer to the whole stream (check it once every
    layer is answered). Every layer must be sent (or expected): the node waits for each
    until its stream deadline. Open a connection's next stream of the same shape only
    once this one's replies are in: the node answers it from the same buffers.

    Message streams: `attend(layer, q, into)` once per layer, in any order; or, opened
    with `into` (one reply buffer for every layer), `attend(layer, q)` in order, each
    reply read before the next query is sent (the receives are posted ahead: a layer's
    send is the send alone). Mailbox streams: `expect(layer)`.
    """

    def __init__(self, client, seq: int, layers: range, ack, shape: tuple[int, int, int],
                 dtype: torch.dtype, into: torch.Tensor | None = None,
                 mail: MailPlace | None = None) -> None:
        self.client, self.seq, self.layers, self.ack = client, seq, layers, ack
        self.shape, self.dtype = shape, dtype
        self.mail = mail
        self._sent: set[int] = set()
        self._into = into
        self._ahead: dict[int, Recv] = {}  # pre-posted reply receives, by layer
        if into is not None:
            check_into(into, shape, dtype)
            self._post_ahead(layers.start)

    def _post_ahead(self, layer: int) -> None:
        if layer in self.layers and layer not in self._sent and layer not in self._ahead:
            self._ahead[layer] = self.client.conn.post_part_recv(
                self.seq, layer - self.layers.start + 1, self._into)

    def attend(self, layer: int, q: torch.Tensor, into: torch.Tensor | None = None,
               ready: bool = False) -> StreamReply:
        """Send `layer`'s q `[b, Hq, D]`; its reply (uint8 `[b, row]`, the layout of
        kflume/comm/wire.py) lands in `into` (or the stream's). `ready` as in
        `NodeClient.attend`; q and `into` should be buffers reused from step to step (the
        transport keeps their registration)."""
        if self.mail is not None:
            raise ValueError("the node reads this stream's queries itself: expect(layer)")
        if layer not in self.layers or layer in self._sent:
            raise ValueError(f"layer {layer} is not an unsent layer of the stream {self.layers}")
        if tuple(q.shape) != self.shape or q.dtype != self.dtype:
            raise ValueError(f"q must be {self.dtype} {list(self.shape)}; got {q.dtype} "
                             f"{list(q.shape)}")
        if (into is None) == (self._into is None):
            raise ValueError("give into for each layer, or once to open_stream")
        if into is not None:
            check_into(into, self.shape, self.dtype)
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
        """A mailbox stream's layer: the node reads its query once it is posted; this is
        its reply, in the mailbox."""
        if self.mail is None or layer not in self.layers or layer in self._sent:
            raise ValueError(f"layer {layer} is not an unanswered layer of a mailbox stream")
        self._sent.add(layer)
        m = self.mail
        return MailReply(self, layer, m.box, m.word + layer - self.layers.start, m.value)

    def cancel(self):
        """Give the stream up: the node stops serving it and answers it (with an error)
        once what it has enqueued for it is done; nothing of it lands after that."""
        from ..comm.wire import Header

        return self.client.call(Header("cancel", info={"stream": self.seq}))

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
            return self.ack.peek().header.op == "error"
        except Exception:  # noqa: BLE001 - the link failed: result() raises it
            return True


class StreamReply:
    """One layer's reply of a message stream; `result()` as `Pending.result`."""

    def __init__(self, stream: AttendStream, layer: int, recv: Recv | None) -> None:
        self.stream, self.layer, self.recv = stream, layer, recv

    @property
    def done(self) -> bool:
        return self._arrived() or self.stream.failed()

    def cancel(self) -> None:
        if not self.recv.done:
            self.recv.cancel()

    def _arrived(self) -> bool:
        return self.recv.done

    def _message(self) -> Message | None:
        return self.recv.message()

    def _timeout(self, t: float) -> DeadlineExceeded:
        c = self.stream.client
        return DeadlineExceeded(f"node {c.name} ({c.conn.peer}): no reply to layer "
                                f"{self.layer} of stream {self.stream.seq} within {t:.3g} s")

    def result(self, timeout: float | None = None) -> Message | None:
        client = self.stream.client
        t = client.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while not self.done:
            now = time.monotonic()
            if now > deadline:
                self.cancel()
                raise self._timeout(t)
            self._wait(client, min(deadline - now, 0.01))
        if not self._arrived():
            self.cancel()
            self.stream.ack.result(0.0)  # raises the node's refusal
        return self._message()

    def _wait(self, client, seconds: float) -> None:
        client.transport.progress(seconds)


class MailReply(StreamReply):
    """A layer's reply delivered into a mailbox: done once the node raised its doorbell
    word to the stream's value (`Mailbox.next_value`). `result()` returns None (the
    reply is in the mailbox) or raises the node's refusal."""

    def __init__(self, stream: AttendStream, layer: int, box: Mailbox, word: int,
                 value: int) -> None:
        super().__init__(stream, layer, None)
        self.box, self.word, self.value = box, word, value

    def cancel(self) -> None:  # nothing posted: a late delivery is told apart by its value
        pass

    def _arrived(self) -> bool:
        return self.box.ready(self.word, self.value)

    def _message(self) -> None:
        return None

    def _wait(self, client, seconds: float) -> None:  # a doorbell wakes no poll: look again
        client.transport.progress(0.0)
        time.sleep(0)
