"""AttendGraphs: a node's attention replayed as captured CUDA graphs, one per batch shape.

Launching the split-KV kernel and its merge from Python cost a node about 170 us of host
time per attend message on an H200 (docs/benchmarks.md), as long as the attention itself
takes on the GPU; the node's loop is single-threaded, so that time sits on every
layer's critical path. A graph replays both kernels from one launch.

How one graph serves every layer and every step of a batch shape:

- The pools of all layers are viewed as one pool `[layers * pages, page_size, Hkv, D]`
  (they are one allocation): page `p` of layer `L` is page `L * pages + p`. A message
  writes its page-table rows, shifted by `L * pages`, into the graph's static page table.
- `kv_len` is copied into the graph's static lengths when the batch's tensor changes
  (once a step: every layer of a step sends the same batch, cached by the node).
- `q` is copied in; `(out, lse)` are written into one static buffer in the reply layout
  (kflume/comm/wire.py: per row, out then lse), which is cloned for the caller, since
  the next replay may run before the last reply has been sent.

So a message costs four small launches and a replay. A graph is keyed by (batch, query
heads, page-table width, dtype, scale); the page table's width doubles as requests grow,
so few shapes ever exist.

An attend stream (kflume/server.py) brings its own buffers, one query and one reply per
layer, reused from stream to stream: `stream()` serves each layer with a graph captured
on them, which reads the layer's query where it lands and writes the reply where it is
sent from, over that layer's pool, with the batch's page-table rows in one table all the
layers' graphs read (filled once a stream): one replay a layer and nothing else (the
node's host time per layer is on the step's critical path). A stream into a mailbox also
captures, around each layer's kernels, the fetch of its query from the weight node's GPU
(pulling) and the delivery of its reply there (`around`), so that a layer is still one
replay. A layer without its graph yet goes through the per-shape graph (copies in and
out). Graphs are captured by `capture_pending()`, a few at a time, which a server calls
when a stream ends (between the peer's steps): a capture costs a node a fraction of a
millisecond, and 32 of them in one step would stall that step (seen: a 79 ms step right
after a node joined). Or all at once by `prepare()`, before any stream comes, for a node
that does not serve yet (one joining: kflume/cluster.py). Sets are kept while they stay
among the `max_streams` most recently used.

A node in the process whose captured step waits on the thread serving it (an in-process
node on the weight node's GPU: kflume/cluster.py) must not capture while serving: the
driver may synchronise the device while it instantiates a graph, and the step's graph
then waits forever for a release that thread would send (seen on an H200: a hang in
`capture_end` at replay ~600 of tests/gpu/test_graph.py's 1,000-replay test, run after
another test in the same process). `capture_while_serving=False` runs a new shape's
kernels uncaptured on its static buffers and leaves its capture, and any eviction, to
`capture_pending()`, which such a node's owner calls between steps.

Graphs share one memory pool: they replay one after another on one stream. Capture
uses thread-local mode, so that UCX's threads may call CUDA meanwhile, runs the kernels
once first, so that no module loads during capture, and does not synchronise the
device, so a new shape costs a serving node under a millisecond (676–769 us on an H200,
benchmarks/node_host.py).

On CPU the same buffers and the same arithmetic run eagerly (what the tests check
without a GPU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .comm.wire import state_row_bytes, unpack_states
from .kernels import split_kv_attention
from .kernels.split_kv import default_num_splits

__all__ = ["AttendGraphs"]


@dataclass(slots=True)
class _Graph:
    q: torch.Tensor
    page_table: torch.Tensor
    start: torch.Tensor
    kv_len: torch.Tensor
    result: torch.Tensor  # [b, row] bytes: the reply layout
    out: torch.Tensor  # views of `result`, written by the kernels
    lse: torch.Tensor
    run: Callable[[], None] | None = None
    kv_len_src: torch.Tensor | None = None  # the batch tensor last copied in


@dataclass(slots=True)
class _StreamGraphs:
    """One graph per layer of one stream buffer set (module docstring)."""

    q: torch.Tensor  # [L, b, Hq, D]: layer i's query lands in q[i]
    result: torch.Tensor  # [L, b, row]: layer i's reply, in the reply layout
    page_table: torch.Tensor  # [b, pages]: the batch's rows, read by every layer's graph
    # with that layer's pool (as wide as a layer's pages: it fits however wide the
    # node's table grows)
    first: int  # the stream's first layer: graph i attends over layer first + i
    start: torch.Tensor
    kv_len: torch.Tensor
    scale: float
    splits: int
    runs: list  # [L] a captured graph's replay (or the eager launch on CPU), or None
    used: list  # [L] served without its graph since the last capture_pending() (None:
    # its capture was tried and failed, or its buffers are not aligned as the kernels'
    # per-shape graph: it stays on that graph)
    kv_len_src: torch.Tensor | None = None
    before: Callable[[int], None] | None = None  # launched ahead of layer i's kernels,
    after: Callable[[int], None] | None = None  # and behind them, in its graph


class AttendGraphs:
    """Attention over a node's pools `k_pool, v_pool [layers, pages, page_size, Hkv, D]`,
    through one captured graph per batch shape (eagerly on CPU)."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, *, num_sms: int = 132,
                 max_graphs: int = 32, max_streams: int = 8,
                 capture_while_serving: bool = True) -> None:
        layers, pages, page_size, hkv, d = k_pool.shape
        if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
            raise ValueError("AttendGraphs needs contiguous pools (one allocation per pool)")
        self.k = k_pool.view(layers * pages, page_size, hkv, d)
        self.v = v_pool.view(layers * pages, page_size, hkv, d)
        self.k_layers, self.v_layers = k_pool, v_pool  # [layer]: that layer's pool
        self.layers, self.pages, self.page_size, self.kv_heads = layers, pages, page_size, hkv
        self.device = k_pool.device
        self.capture = k_pool.is_cuda
        self.num_sms, self.max_graphs, self.max_streams = num_sms, max_graphs, max_streams
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._streams: OrderedDict[tuple, _StreamGraphs] = OrderedDict()
        self._retired: list[tuple] = []  # (evicted set, its replays' end event)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.captured = 0  # graphs captured so far (a counter for tests and logs)
        self.capture_while_serving = capture_while_serving  # False: new shapes run
        # uncaptured until capture_pending() (module docstring)
        self._uncaptured: dict[tuple, None] = {}  # per-shape graphs that run uncaptured

    def attend(self, layer: int, q: torch.Tensor, page_table: torch.Tensor,
               kv_len: torch.Tensor, scale: float, out: torch.Tensor | None = None,
               lse: torch.Tensor | None = None, packed: bool = False):
        """Like `split_kv_attention(q, k_pool[layer], v_pool[layer], page_table, 0, kv_len)`.
        `packed=True` returns the reply layout (one uint8 tensor, written into `out` when
        given) instead of `(out, lse)`.
        No checks: the node checked `layer`, `q` and the lengths."""
        b, hq, d = q.shape
        key = (b, hq, page_table.shape[1], q.dtype, float(scale))
        g = self._graphs.get(key)
        if g is None:
            g = self._build(key, q)
        else:
            self._graphs.move_to_end(key)
        torch.add(page_table, layer * self.pages, out=g.page_table)
        if g.kv_len_src is not kv_len:
            g.kv_len.copy_(kv_len)
            g.kv_len_src = kv_len
        g.q.copy_(q)
        g.run()
        if packed:
            return g.result.clone() if out is None else out.copy_(g.result)
        dense = torch.contiguous_format
        return (g.out.clone(memory_format=dense) if out is None else out.copy_(g.out),
                g.lse.clone(memory_format=dense) if lse is None else lse.copy_(g.lse))

    def stream(self, layers: range, q: torch.Tensor, result: torch.Tensor,
               page_table: torch.Tensor, kv_len: torch.Tensor, scale: float,
               around: tuple | None = None) -> Callable[[int], None]:
        """Attention for a stream of `layers` over one batch: returns `run(i)`, which
        computes layer `layers[i]` from `q[i]` (`q [len(layers), b, Hq, D]`) into
        `result[i]` (`result [len(layers), b, row]` uint8, the reply layout), ordered on
        the current stream. No checks: the node checked the batch. The buffers must stay
        the same tensors from stream to stream (they are what the graphs read and write).

        `around = (key, before, after)`: `before(i)` and `after(i)` enqueue work that
        layer i's graph runs ahead of its kernels and behind them (a node fetching the
        query and delivering the reply: one replay a layer). They are captured, so they
        must launch the same kernels on the same memory every time (a value that changes
        goes in device memory); `key` (hashable) names them among the graph sets."""
        s = self._set(layers.start, q, result, scale, around)
        # (a node's table may be wider than a layer's pages, as it doubles: the columns
        # past them are never used, a request holding at most that many pages)
        w = min(page_table.shape[1], self.pages)
        s.page_table[:, :w].copy_(page_table[:, :w])
        if s.kv_len_src is not kv_len:
            s.kv_len.copy_(kv_len)
            s.kv_len_src = kv_len

        def run(i: int) -> None:
            r = s.runs[i]
            if r is not None:
                r()
            else:  # not captured yet: the per-shape graph, q copied in, the reply out
                if s.used[i] is not None:  # None: not capturable
                    s.used[i] = True
                if s.before is not None:
                    s.before(i)
                self.attend(layers[i], q[i], page_table, kv_len, scale, out=result[i],
                            packed=True)
                if s.after is not None:
                    s.after(i)
        return run

    def prepare(self, first: int, q: torch.Tensor, result: torch.Tensor, scale: float,
                around: tuple | None = None, now: bool = True) -> int:
        """Capture every layer of the stream set that `stream()` would use for these
        buffers and a stream from layer `first`, now (its kernels run once first, on
        lengths of 0, so that they are
        loaded; `around`'s kernels must be loaded already). Returns how many graphs were
        captured. `now=False`: make the set and leave its layers to `capture_pending`
        (a node serving other peers, whose steps a burst of captures would stall)."""
        s = self._set(first, q, result, scale, around)
        if not now:
            s.used = [None if u is None else (u or r is None) for u, r in zip(s.used, s.runs)]
            return 0
        todo = [i for i, r in enumerate(s.runs) if r is None and s.used[i] is not None]
        if not todo or not self.capture:
            return 0
        hq, d = q.shape[2], q.shape[3]
        out, lse = unpack_states(result[todo[0]], hq, d, q.dtype)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            # the kernels loaded (lengths of 0: nothing is read)
            layer = first + todo[0]
            split_kv_attention(q[todo[0]], self.k_layers[layer], self.v_layers[layer],
                               s.page_table, s.start, torch.zeros_like(s.kv_len), scale=s.scale,
                               num_splits=s.splits, out=out, lse=lse, check=False)
        done = 0
        for i in todo:
            s.used[i] = None  # tried: never again for this set, if it fails
            done += self._stream_layer(s, i)
        return done

    def _set(self, first: int, q: torch.Tensor, result: torch.Tensor, scale: float,
             around: tuple | None) -> _StreamGraphs:
        """The stream set of these buffers from layer `first` (made if new; the most
        recently used)."""
        n, b, hq, d = q.shape
        key = (q.data_ptr(), result.data_ptr(), first, n, b, hq, d, q.dtype, float(scale),
               None if around is None else around[0])
        s = self._streams.get(key)
        if s is None:
            return self._stream_set(key, q, result, *(around[1:] if around else (None, None)))
        self._streams.move_to_end(key)
        return s

    def capture_pending(self, limit: int | None = 2) -> int:
        """Capture up to `limit` (None: all) graphs of per-shape batches and stream
        layers served so far without one (the per-shape ones first, then the most
        recently used stream sets). Nothing runs: no buffer is written. Returns how
        many."""
        done = 0
        limit = float("inf") if limit is None else limit
        while self._uncaptured and done < limit:
            g = self._graphs[self._uncaptured.popitem()[0]]  # (evicting drops a key)
            g.run = self._captured(g.run, warm=False)  # (its kernels ran: loaded)
            done += 1
        if not self.capture_while_serving:
            self._evict()
        for s in reversed(self._streams.values()):
            for i, used in enumerate(s.used):
                if done >= limit:
                    return done
                if used and s.runs[i] is None:
                    s.used[i] = None  # tried: never again for this set, if it fails
                    if self._stream_layer(s, i):
                        done += 1
        return done

    def _stream_set(self, key: tuple, q: torch.Tensor, result: torch.Tensor,
                    before: Callable | None, after: Callable | None) -> _StreamGraphs:
        first, n, b, hq, d, dtype, scale = key[2:9]
        dev = self.device
        zeros = torch.zeros(b, dtype=torch.int32, device=dev)
        s = _StreamGraphs(q=q, result=result, scale=scale, first=first,
                          page_table=torch.zeros(b, self.pages, dtype=torch.int32, device=dev),
                          start=zeros, kv_len=zeros.clone(), runs=[None] * n,
                          used=[False] * n, before=before, after=after,
                          splits=default_num_splits(b, self.kv_heads,
                                                    self.pages * self.page_size,
                                                    self.num_sms))
        if not self.capture:  # CPU: every layer runs eagerly on the buffers at once
            for i in range(n):
                self._stream_layer(s, i)
        if len(self._streams) >= self.max_streams:
            # Kept until its last replays have run (no sync here: this is a stream's
            # open, on the critical path) and a capture came after it (the shared pool is
            # released, and may not be captured into again, once no graph uses it).
            old = self._streams.popitem(last=False)[1]
            done = torch.cuda.Event() if self.capture else None
            if done is not None:
                done.record(torch.cuda.current_stream(dev))
            self._retired.append((old, done))
        self._streams[key] = s
        return s

    def _stream_layer(self, s: _StreamGraphs, i: int) -> bool:
        """Layer i's run of a stream set: a graph captured without running it (the
        per-shape graph loaded the kernels), or eager on CPU. False: not captured (a
        buffer whose alignment differs from the per-shape graph's could need another
        compile of the kernels; the per-shape path keeps serving that layer)."""
        hq, d = s.q.shape[2], s.q.shape[3]
        out, lse = unpack_states(s.result[i], hq, d, s.q.dtype)
        q, pt, layer = s.q[i], s.page_table, s.first + i
        k, v = self.k_layers[layer], self.v_layers[layer]

        def launch() -> None:
            if s.before is not None:
                s.before(i)
            split_kv_attention(q, k, v, pt, s.start, s.kv_len, scale=s.scale,
                               num_splits=s.splits, out=out, lse=lse, check=False)
            if s.after is not None:
                s.after(i)

        if not self.capture:
            s.runs[i] = launch
            return True
        if any(t.data_ptr() % 16 for t in (q, out, lse, pt)):
            return False
        s.runs[i] = self._captured(launch, warm=False)
        return True

    def _captured(self, launch: Callable[[], None], warm: bool = True) -> Callable[[], None]:
        """`launch` captured into a graph of the shared pool; returns its replay.
        What torch.cuda.graph does, less its device sync, gc and cache flush (which would
        stall a serving node for milliseconds at a new shape). `warm`: run it once first,
        so that every kernel is compiled and loaded before the capture."""
        with torch.cuda.device(self.device):
            if warm:
                launch()  # ordered as a replay would be
            main, side = torch.cuda.current_stream(), torch.cuda.Stream()
            side.wait_stream(main)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    launch()
                finally:
                    graph.capture_end()
            main.wait_stream(side)
        self._retired = [(r, e) for r, e in self._retired if e is not None and not e.query()]
        self.captured += 1
        return graph.replay  # (the bound method keeps the graph alive)

    def _build(self, key: tuple, q: torch.Tensor) -> _Graph:
        b, hq, width, dtype, scale = key
        dev, d = self.device, q.shape[2]
        result = torch.zeros(b, state_row_bytes(hq, d, dtype), dtype=torch.uint8, device=dev)
        out, lse = unpack_states(result, hq, d, dtype)
        zeros = torch.zeros(b, dtype=torch.int32, device=dev)
        g = _Graph(q=torch.zeros_like(q), page_table=torch.zeros(b, width, dtype=torch.int32,
                                                                  device=dev),
                   start=zeros, kv_len=zeros.clone(), result=result, out=out, lse=lse)
        splits = default_num_splits(b, self.kv_heads, width * self.page_size, self.num_sms)

        def launch() -> None:
            split_kv_attention(g.q, self.k, self.v, g.page_table, g.start, g.kv_len,
                               scale=scale, num_splits=splits, out=g.out, lse=g.lse,
                               check=False)

        if self.capture and self.capture_while_serving:
            g.run = self._captured(launch)
        else:
            g.run = launch
            if self.capture:
                self._uncaptured[key] = None
        self._graphs[key] = g
        if self.capture_while_serving:
            self._evict()
        return g

    def _evict(self) -> None:
        """Drop the least recently used per-shape graphs past `max_graphs`. Its last
        replay may still run: while serving, the serving stream (where it ran) is
        waited for; between steps (`capture_while_serving=False`), the device, since
        this runs on whichever stream the owner has current."""
        while len(self._graphs) > self.max_graphs:
            if self.capture and self.capture_while_serving:
                torch.cuda.current_stream(self.device).synchronize()
            elif self.capture:
                torch.cuda.synchronize(self.device)
            key, _ = self._graphs.popitem(last=False)
            self._uncaptured.pop(key, None)
