"""Serving a captured step's replay from the host, and the thread that does it.

`Serving.serve` answers every signal point of one replay of a `CapturedRemoteAttention`:
it opens one attend stream per (node, micro-batch) before the first point is posted,
then has each point's queries answered as soon as the graph posts it (so a node can
work on the next micro-batch while the last one's reply travels), and releases the
points in order. After a micro-batch's last layer it sends each tail node the step's new
tokens. It returns once the nodes have acknowledged the appends and the streams. On any
error every point is released (the graph finishes, its results invalid) and the error
is raised; `reset()` then makes the graph usable again.

`StepServer` runs `serve` on a thread of its own: launching a large graph can block the
launching thread until the GPU has room for it, and the GPU makes room only once the
host releases the points it waits on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..weight.client import Pending
from .signal import SignalTimeout

__all__ = ["LayerTrace", "Serving", "StepServer", "StepTrace"]


@dataclass(frozen=True, slots=True)
class LayerTrace:
    """One served point: how long from posted to sent, sent to answered, answered to
    released (seconds); when it was sent and answered (time.perf_counter()); its layer
    and the sequence numbers of its micro-batch's streams (to match a node's
    `stats(trace=n)`)."""

    point: int
    send_s: float
    remote_s: float
    release_s: float
    sent_at: float
    answered_at: float
    layer: int
    streams: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepTrace:
    """One served step (time.perf_counter()): serving began, its last point released,
    its appends and streams acknowledged (the step's wait for acknowledgements)."""

    began: float
    last_release: float
    acked: float


class Serving:
    """The host half of one `CapturedRemoteAttention` (`cap`) during replays."""

    def __init__(self, cap) -> None:
        self.cap = cap
        self.streams: dict[tuple[int, int], object] = {}  # (lane, micro-batch) -> stream
        self._queries: list[list[tuple]] = []  # [micro-batch] (stream, its q buffer)
        self.settling: list = []  # given-up mailbox streams, which reset() waits for
        self.steps = 0
        self.trace: list[LayerTrace] = []  # the last `trace_steps` steps' points
        self.step_trace: list[StepTrace] = []
        self.trace_steps = 0  # 0: no tracing
        self.unanswered: set[str] = set()  # nodes a failed step was waiting for

    def _open_streams(self) -> list[Pending]:
        """One attend stream per (node, micro-batch) with rows; their acknowledgements."""
        cap, r = self.cap, self.cap.remote
        self.streams.clear()
        self._queries = [[] for _ in cap.micro]
        for lane, name in enumerate(cap.lanes.names):
            for m, mb in enumerate(cap.micro):
                share = mb.shares[lane]
                if not name or share is None or not share.requests:
                    continue
                b = len(share.requests)
                if cap.delivers(name):
                    # covers the lane's whole part (rows past the requests' are padding):
                    # the node keeps one set of buffers and graphs for it
                    where = cap.place(lane, m)
                    where["pull"] = (*where["pull"], [cap.signal.next_value(
                        layer * len(cap.micro) + m) for layer in range(cap.num_layers)])
                    where["rows"] = mb.size
                else:
                    where = dict(into=mb.recv[lane][:b])
                st = self.streams[lane, m] = r.clients[name].open_stream(
                    range(cap.num_layers), cap.epoch, share.requests, share.kv_len, r.hq,
                    r.d, cap.dtype, r.scale, **where)
                self._queries[m].append((st, mb.send[lane][:b]))
        return [st.ack for st in self.streams.values()]

    def _send(self, point: int, appends: list[Pending]) -> list:
        """Queries of this point to every node holding its rows (a mailbox stream's node
        reads them itself). After a micro-batch's last layer, also its new k, v of
        every layer to their tail nodes (into `appends`)."""
        cap = self.cap
        layer, m = divmod(point, len(cap.micro))
        pend = [st.expect(layer) if st.mail is not None else st.attend(layer, q, ready=True)
                for st, q in self._queries[m]]
        if layer == cap.num_layers - 1:
            mb = cap.micro[m]
            for lane, name in enumerate(cap.lanes.names):
                share = mb.shares[lane]
                if name and share is not None and share.append_requests:
                    a = len(share.append_requests)
                    appends.append(cap.remote.clients[name].append(
                        0, share.append_requests, share.append_offsets, share.positions,
                        mb.kv[lane][0][:a], mb.kv[lane][1][:a], ready=True))
        return pend

    def serve(self, timeout: float = 30.0) -> None:
        cap = self.cap
        signal, total = cap.signal, cap.signal.points
        deadline = time.monotonic() + timeout
        inflight: dict[int, list] = {}
        sent = released = 0
        transport = next(iter(cap.remote.clients.values())).transport
        tr = self.trace_steps > 0
        began = last = time.perf_counter() if tr else 0.0
        times: dict[int, list[float]] = {}
        appends: list[Pending] = []
        acks: list[Pending] = []
        try:
            acks = self._open_streams()
            while released < total or not all(p.done for p in appends + acks):
                if sent < total and signal.posted(sent):
                    t0 = time.perf_counter() if tr else 0.0
                    signal.wait_posted(sent, 0.0)
                    inflight[sent] = self._send(sent, appends)
                    if tr:
                        times[sent] = [t0, time.perf_counter()]
                    sent += 1
                elif released < sent and all(p.done for p in inflight[released]):
                    answered = time.perf_counter() if tr else 0.0
                    for p in inflight.pop(released):
                        p.result(0.0)  # raises a node's refusal
                    signal.release(released)
                    if tr:
                        last = self._traced(released, *times.pop(released), answered)
                    released += 1
                else:
                    transport.progress(0.0)
                    cap.yield_()  # hand the GIL over: the launching thread may need it
                    if signal.aborted:
                        raise SignalTimeout("the step was given up while being served")
                    if time.monotonic() > deadline:
                        raise SignalTimeout(
                            f"step not served within {timeout} s ({sent} of {total} points "
                            f"sent, {released} released, {sum(p.done for p in appends + acks)}"
                            f" of {len(appends + acks)} appends and streams acknowledged)")
            for p in acks:
                p.result(0.0)  # a stream refused after its last reply (appends: check())
        except BaseException:
            self._give_up(inflight, appends + acks)
            raise
        self.steps += 1
        if tr:
            self.trace = self.trace[-self.trace_steps * total:]
            self.step_trace.append(StepTrace(began, last, time.perf_counter()))
            del self.step_trace[: -self.trace_steps]

    def _traced(self, point: int, posted: float, sent: float, answered: float) -> float:
        layer, m = divmod(point, len(self.cap.micro))
        seqs = tuple(st.seq for (_, mm), st in self.streams.items() if mm == m)
        now = time.perf_counter()
        self.trace.append(LayerTrace(point, sent - posted, answered - sent, now - answered,
                                     sent, answered, layer, seqs))
        return now

    def _give_up(self, inflight: dict[int, list], waiting: list) -> None:
        """A failed step: every point released, no reply may land later in the buffers
        the next step uses (receives cancelled; mailbox streams cancelled at the node,
        which `reset` waits for)."""
        self.cap.signal.abort()
        self.unanswered = {p.stream.client.name if hasattr(p, "stream") else p.client.name
                           for pend in [*inflight.values(), waiting] for p in pend if not p.done}
        for pend in inflight.values():
            for p in pend:
                p.cancel()
        for st in self.streams.values():
            st.close()
            if st.mail is None:
                continue
            try:
                st.cancel()
            except Exception:  # noqa: BLE001 - the link is gone: the ack says so
                pass
            self.settling.append(st)

    def reset(self) -> None:
        """After `serve` raised and the failed replay has finished (its stream
        synchronised): release the signal's abort so that the next step can run. Waits
        (each with the client's deadline) for the nodes to acknowledge the failed step's
        mailbox streams, after which nothing of it lands in the reply buffers; raises
        RuntimeError if a node does not answer. The failed step's new k, v may not have
        reached every node: re-plan (and re-run the step) before the next replay."""
        self.cap.signal.reset()
        settling, self.settling = self.settling, []
        for st in settling:  # until acknowledged, a node may still deliver into the rows
            if not st.client.conn.alive:
                continue  # gone: it delivers nothing more
            try:
                st.ack.result()
            except Exception as e:  # noqa: BLE001 - answered (with an error): settled
                if not st.ack.done:  # no answer: the rows cannot be trusted
                    raise RuntimeError(
                        f"node {st.client.name} did not acknowledge a given-up stream; its "
                        "deliveries may still land in this graph's reply buffers: build a "
                        "new CapturedRemoteAttention") from e
        self.streams.clear()


class StepServer:
    """A host thread that serves replays of `cap`'s graph: `begin()` before launching the
    replay, `end()` after it (waits, with a deadline, and raises what serving raised)."""

    def __init__(self, cap, timeout: float = 30.0) -> None:
        self.cap, self.timeout = cap, timeout
        self._go, self._done = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kflume-serve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            if self._closed:
                return
            try:
                self.cap.serve_step(self.timeout)
            except BaseException as e:  # noqa: BLE001 - handed to end()
                self._error = e
            self._done.set()

    def begin(self) -> None:
        if self._closed:
            raise RuntimeError("StepServer is closed")
        self._done.clear()
        self._go.set()

    def end(self) -> None:
        if not self._done.wait(self.timeout + 5.0):
            raise SignalTimeout(f"the step was not served within {self.timeout + 5.0} s")
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def close(self) -> None:
        self._closed = True
        self._go.set()
        self._thread.join(5.0)

    def __enter__(self) -> StepServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
