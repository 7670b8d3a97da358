"""Attend streams on the node: one batch's attention at every layer of a weight node's step.

A stream is checked once, when its header comes (op "stream", kflume/weight/stream.py).
Then, either:

- **messages**: the receives of all its layers' queries are posted at once, into buffers
  reused from one of the peer's streams to its next; each layer runs as soon as its
  query lands, and its reply goes back as a header-less part once its kernels are done;
- **mailbox** (a weight node of this host that registered its `Mailbox`es, op
  "mailbox"): the node reads each layer's query from the weight node's memory once the
  layer's post flag is up, and delivers the reply there with a doorbell, both captured
  with the layer's kernels (one replay a layer). Such a stream covers its place's rows
  (`rows`: the rows past its requests are padding), so that its buffers and graphs stay
  the same while the batch changes, and a weight node may have the node capture them
  before any stream comes (op "capture").

Either way the stream is acknowledged once every layer is answered. A stream the node
refuses, or that fails midway, is answered with an error at once (its remaining queries
are still received and dropped); one whose queries stop coming is given up after
`stream_deadline` seconds.
"""

from __future__ import annotations

import logging
import time

import torch

from ..comm.base import MAX_PART
from ..comm.mailbox import MailboxView
from ..comm.wire import DTYPES, Header, state_row_bytes, transfer_empty
from . import checks
from .graphs import LayerHooks
from .pages import UnknownRequestError
from .peer import MailTarget, Peer, PullSpec, ServedStream, StreamBuffers, StreamSpec

__all__ = ["Streams", "check_mailbox", "parse_spec"]

log = logging.getLogger("kflume.node")

MAX_MAILBOXES = 64  # a peer's registered at once


def _ints(x, n: int | None = None) -> bool:
    return (isinstance(x, list) and (n is None or len(x) == n)
            and all(type(v) is int for v in x))


def parse_spec(h: Header, b: int) -> StreamSpec:
    """A stream's (or a capture's) info, checked; its rows: `b`, or info["rows"] (>= b,
    with a mailbox)."""
    layers, hq, d = (h.info.get(k) for k in ("layers", "heads", "head_dim"))
    dtype, rows = DTYPES.get(h.info.get("dtype")), h.info.get("rows", b)
    if not (all(type(x) is int for x in (layers, hq, d, rows)) and 1 <= layers <= MAX_PART
            and 0 < hq <= 1024 and 0 < d <= 1024 and max(b, 1) <= rows <= 65536
            and dtype is not None and dtype.is_floating_point):
        raise ValueError(f"{h.op}: info must give layers (1..{MAX_PART}), heads, head_dim and "
                         f"a float dtype, for 1..65536 rows (>= {b} requests); got {h.info}")
    scale = h.info.get("scale")
    if scale is not None and not (isinstance(scale, float) and 0 < scale < 1e6):
        raise ValueError(f"{h.op}: scale must be a positive float; got {scale!r}")
    mail, pull = h.info.get("mailbox"), h.info.get("pull")
    if mail is not None and not (_ints(mail, 4) and min(mail) >= 0 and mail[3] < 2**63):
        raise ValueError(f"{h.op}: mailbox must be [id, offset, word, value]; got {mail!r}")
    if (mail is None) != (pull is None):
        raise ValueError(f"{h.op}: a mailbox stream names its mailbox and where to pull its "
                         "queries from, both or neither")
    spec_pull = None
    if pull is not None:
        if not (isinstance(pull, list) and len(pull) == 4 and _ints(pull[:3])
                and min(pull[:3]) >= 0 and pull[2] > 0 and _ints(pull[3], layers)
                and all(0 < v < 2**31 for v in pull[3])):
            raise ValueError(f"{h.op}: pull must be [query offset, flag, stride > 0, [a value "
                             f"> 0 per layer]]; got {pull!r}")
        spec_pull = PullSpec(pull[0], pull[1], pull[2], tuple(pull[3]))
    if rows != b and mail is None:
        raise ValueError(f"{h.op}: padding rows (rows={rows} for {b} requests) need a mailbox")
    return StreamSpec(layers, rows, hq, d, dtype, scale, mail, spec_pull)


def check_mailbox(peer: Peer, op: str, spec: StreamSpec) -> MailboxView:
    """A mailbox stream's registered box, checked against the stream's rows, flags
    and doorbell value."""
    box_id, offset, word, value = spec.mailbox
    if op == "stream" and value == 0:
        raise ValueError("stream: the mailbox's doorbell value must be > 0")
    box = peer.mailboxes.get(box_id)
    if box is None:
        raise ValueError(f"{op}: mailbox {box_id} was not registered")
    box.check(offset, spec.rows * state_row_bytes(spec.heads, spec.head_dim, spec.dtype),
              word, spec.layers)
    pull = spec.pull
    box.check_pull(pull.offset, spec.rows * spec.heads * spec.head_dim
                   * spec.dtype.itemsize, pull.flag + pull.stride * (spec.layers - 1))
    return box


class Streams:
    """The attend streams of a `NodeServer`'s peers."""

    def __init__(self, server, stream_deadline: float, captures_per_stream: int) -> None:
        self.server, self.node = server, server.node
        self.stream_deadline = stream_deadline
        self.captures_per_stream = captures_per_stream
        self.served = 0  # streams acknowledged

    # ---- ops -------------------------------------------------------------------------
    def open(self, peer: Peer, h: Header) -> None:
        """Op "stream": check the header, post its queries' receives (or note where to
        pull them from); answered once its layers are. Everything that bounds its
        buffers is checked before they exist; a stream refused then has its queries
        discarded as they come."""
        b = len(h.requests)
        try:
            spec = parse_spec(h, b)
            checks.stream(self.node, "stream", spec, h.layer)
            if spec.mailbox is not None:
                check_mailbox(peer, "stream", spec)
            if b > len(peer.requests):  # before allocating buffers for it
                raise UnknownRequestError(f"stream names {b} requests; this node holds "
                                          f"{len(peer.requests)} of this peer's")
        except Exception:
            layers = h.info.get("layers")
            if type(layers) is int and 0 < layers <= MAX_PART and "mailbox" not in h.info:
                peer.conn.discard_parts(h.seq, layers)
            raise
        keys = peer.scope(h.requests)
        bufs = self._buffers(peer, spec)
        peer.last_stream = time.monotonic()
        st = ServedStream(h.seq, range(h.layer, h.layer + spec.layers), bufs, spec.key,
                          peer.last_stream + self.stream_deadline)
        if spec.mailbox is None:
            st.recvs = [peer.conn.post_part_recv(h.seq, i + 1, q)
                        for i, q in enumerate(bufs.q_layers)]
        peer.streams.append(st)  # received from now on, whatever the checks below say
        hooks = None
        if spec.mailbox is not None:
            box, hooks = self._mailbox_hooks(peer, "stream", spec, bufs)
            st.pull = spec.pull
            st.mail = MailTarget(box, spec.mailbox[1], spec.mailbox[2], spec.mailbox[3])
            bufs.bell.fill_(spec.mailbox[3])  # ordered before the layers' deliveries
        st.run = self.node.attend_stream(st.layers, keys, self.server.ints(h, "kv_len", b),
                                         bufs.q, bufs.result, scale=spec.scale, hooks=hooks)

    def capture(self, peer: Peer, h: Header) -> Header:
        """Op "capture": capture the graphs of a mailbox place's streams before any comes
        (info: a stream's, with no requests, `rows`, a mailbox with doorbell value 0 and
        the pull place). Their buffers go to the place's pool, where its first stream
        takes them. It holds this loop ~0.5 ms a layer, so a node that served another
        peer's stream in the last second leaves them to `capture_pending` instead."""
        if h.requests or "rows" not in h.info or "mailbox" not in h.info:
            raise ValueError("capture: give info rows, mailbox and pull, and no requests")
        spec = parse_spec(h, 0)
        checks.stream(self.node, "capture", spec, h.layer)
        check_mailbox(peer, "capture", spec)
        bufs = self._buffers(peer, spec)
        try:
            _, hooks = self._mailbox_hooks(peer, "capture", spec, bufs)
            busy = any(p is not peer and time.monotonic() - p.last_stream < 1.0
                       for p in self.server.peers)
            n = self.node.capture_ahead(range(h.layer, h.layer + spec.layers), bufs.q,
                                        bufs.result, scale=spec.scale, hooks=hooks, now=not busy)
        finally:
            peer.stream_bufs.setdefault(spec.key, []).append(bufs)
        return Header("ok", info={"captured": n})

    def cancel(self, peer: Peer, h: Header) -> None:
        """Op "cancel": the peer gives a stream up; it is answered with an error once
        what was enqueued for it is done, and not served further."""
        seq = h.info.get("stream")
        if type(seq) is not int:
            raise ValueError("cancel: info['stream'] must be a stream's sequence number")
        for st in peer.streams:
            if st.seq == seq:
                self.failed(peer, st, TimeoutError(f"stream {seq}: given up by the peer"))

    def register_mailboxes(self, peer: Peer, h: Header) -> None:
        """Op "mailbox": map the peer's mailboxes (info["mailboxes"]: [[id, description],
        ...]); refused as a whole, naming why, if any cannot be (the peer then takes
        replies as messages)."""
        boxes = h.info.get("mailboxes")
        if not (isinstance(boxes, list) and len(boxes) <= 64 and all(
                isinstance(e, list) and len(e) == 2 and type(e[0]) is int and 0 <= e[0] < 2**31
                and isinstance(e[1], dict) for e in boxes)):
            raise ValueError("mailbox: info['mailboxes'] must list [id, description] pairs")
        if len(set(peer.mailboxes) | {k for k, _ in boxes}) > MAX_MAILBOXES:
            raise ValueError(f"mailbox: a peer registers at most {MAX_MAILBOXES} mailboxes")
        opened: dict[int, MailboxView] = {}
        try:
            for k, desc in boxes:
                opened[k] = MailboxView(desc, self.node.device)
        except BaseException:
            for box in opened.values():
                box.close()
            raise
        if any(k in peer.mailboxes for k in opened) and self.node.device.type == "cuda":
            torch.cuda.synchronize(self.node.device)  # no delivery still on its way there
        for k, box in opened.items():
            old = peer.mailboxes.pop(k, None)
            if old is not None:
                old.close()
            peer.mailboxes[k] = box
        log.info("%s: mailboxes %s registered", peer.conn.peer, sorted(opened))

    # ---- serving -------------------------------------------------------------------------
    def serve(self, peer: Peer) -> int:
        """Run each layer whose query has landed (or is posted); finish streams that are
        done or given up. Returns how many layers ran."""
        handled = 0
        for st in list(peer.streams):
            if st.pull is not None:
                handled += self._serve_pulled(peer, st)
                continue
            while st.next < len(st.recvs) and st.recvs[st.next].done:
                i = st.next
                recv, st.recvs[i] = st.recvs[i], None
                st.next += 1
                t0 = time.perf_counter()
                try:
                    recv.message()  # raises what went wrong (a truncated part, ...)
                    if st.run is None:
                        continue  # drained
                    st.run(i)
                except Exception as e:  # noqa: BLE001 - refuse the stream, keep serving
                    if not peer.conn.alive:
                        self.server.drop(peer, str(e))
                        return handled
                    self.failed(peer, st, e)
                    continue
                handled += 1
                res = st.bufs.result_layers[i]
                self.server.defer(
                    lambda s=st.seq, p=i + 1, r=res: peer.conn.send_part(
                        s, p, r, ready=True, static=True),
                    peer, keep=None, timing=(t0, time.perf_counter(), st.seq, st.layers[i]),
                    event=st.bufs.events[i])
            if st.next == len(st.recvs):
                self._finish(peer, st)
            elif time.monotonic() > st.deadline:
                peer.streams.remove(st)
                for r in st.recvs:
                    if r is not None:
                        r.cancel()  # its buffers are not reused: a late part may land there
                log.warning("%s: stream %d got %d of %d queries in %.0f s; given up",
                            peer.conn.peer, st.seq, st.next, len(st.recvs), self.stream_deadline)
                self.failed(peer, st, TimeoutError(
                    f"stream {st.seq}: {len(st.recvs) - st.next} queries never came"))
        return handled

    def _serve_pulled(self, peer: Peer, st: ServedStream) -> int:
        """A mailbox stream: each layer once its post flag is up, in order."""
        box, pull = st.mail.box, st.pull
        handled = 0
        while st.run is not None and st.next < len(st.layers):
            i = st.next
            try:
                if not box.posted(pull.flag + i * pull.stride, pull.values[i]):
                    break
                st.next += 1
                t0 = time.perf_counter()
                st.run(i)  # fetch, attend, deliver: one replay once captured
            except Exception as e:  # noqa: BLE001 - refuse the stream, keep serving
                self.failed(peer, st, e)
                break
            t1 = time.perf_counter()
            self.server.record(t0, t1, t1, st.seq, st.layers[i])
            handled += 1
        if st.run is not None and st.next < len(st.layers) and time.monotonic() > st.deadline:
            log.warning("%s: stream %d saw %d of %d queries posted in %.0f s; given up",
                        peer.conn.peer, st.seq, st.next, len(st.layers), self.stream_deadline)
            self.failed(peer, st, TimeoutError(
                f"stream {st.seq}: {len(st.layers) - st.next} queries never posted"))
        if st.run is None or st.next == len(st.layers):
            self._finish(peer, st)
        return handled

    def _finish(self, peer: Peer, st: ServedStream) -> None:
        """Acknowledged (if not failed) and pooled once the kernels enqueued are done."""
        peer.streams.remove(st)
        t = time.perf_counter()  # (op trace: its last layer launched, then the ack sent)
        self.server.defer(lambda: self._done(peer, st), peer, timing=(t, t, st.seq, "stream"))

    def failed(self, peer: Peer, st: ServedStream, e: BaseException) -> None:
        if st.run is None:
            return  # already answered
        st.run = None
        if self.server.error_kind(e) == "internal":
            log.error("%s: stream %d failed", peer.conn.peer, st.seq, exc_info=e)
        else:
            log.info("%s: refused stream %d: %s", peer.conn.peer, st.seq, e)
        answer = lambda: self.server.reply_error(peer, Header("stream", seq=st.seq), e)  # noqa
        if st.mail is not None:  # answered once the deliveries enqueued are done: after
            self.server.defer(answer, peer)  # the answer nothing lands in the mailbox
        else:
            answer()

    def _done(self, peer: Peer, st: ServedStream) -> None:
        """Every layer answered and the kernels done with the buffers: acknowledge the
        stream and pool its buffers; then capture a few of the graphs served without."""
        if st.run is not None:
            peer.conn.send(Header("ok", seq=st.seq))
            self.served += 1
        free = peer.stream_bufs.setdefault(st.key, [])
        if len(free) < 4:
            free.append(st.bufs)
        if len(peer.stream_bufs) > 8:
            peer.stream_bufs.pop(next(iter(peer.stream_bufs)))
        if not self.node.config.capture_while_serving:
            return  # its owner captures between steps
        try:
            self.node.capture_pending(self.captures_per_stream)
        except Exception:  # noqa: BLE001 - those layers stay on the shape graphs
            log.exception("capturing stream graphs failed; those layers stay uncaptured")

    def busy(self) -> bool:
        """A stream waits on post flags, which wake nothing: the loop must poll."""
        return any(st.pull is not None for p in self.server.peers for st in p.streams)

    # ---- helpers -------------------------------------------------------------------------
    def _buffers(self, peer: Peer, spec: StreamSpec) -> StreamBuffers:
        free = peer.stream_bufs.get(spec.key)
        if free:
            return free.pop()
        dev, layers, rows = self.node.device, spec.layers, spec.rows
        q = transfer_empty((layers, rows, spec.heads, spec.head_dim), spec.dtype, dev)
        res = transfer_empty((layers, rows, state_row_bytes(spec.heads, spec.head_dim,
                                                            spec.dtype)), torch.uint8, dev)
        events = [torch.cuda.Event() if dev.type == "cuda" else None for _ in range(layers)]
        return StreamBuffers(q, res, list(q.unbind(0)), list(res.unbind(0)), events,
                             torch.zeros(1, dtype=torch.int64, device=dev))

    def _mailbox_hooks(self, peer: Peer, op: str, spec: StreamSpec,
                       bufs: StreamBuffers) -> tuple[MailboxView, LayerHooks]:
        """What a mailbox stream's layers run around their kernels: the query fetched
        from the mailbox, the reply delivered with the doorbell value of whichever
        stream replays it (`bufs.bell`)."""
        box = check_mailbox(peer, op, spec)
        box_id, offset, word, _ = spec.mailbox
        pull = spec.pull
        qs, results, bell = bufs.q_layers, bufs.result_layers, bufs.bell
        hooks = LayerHooks((box_id, offset, word, pull.offset),
                           lambda i: box.pull(qs[i], pull.offset),
                           lambda i: box.deliver(results[i], offset, word + i, bell))
        return box, hooks
