"""AttendGraphs: a node's attention replayed as captured CUDA graphs.

Launching the split-KV kernel and its merge from Python costs a node about as much host
time per layer as the attention takes on the GPU, and a node's loop is single-threaded:
that time would sit on every layer's critical path. A graph replays both from one launch.

Two kinds of graph:

- **per batch shape** (`attend`): the pools of all layers viewed as one pool
  `[layers * pages, page_size, Hkv, D]` (they are one allocation; page `p` of layer `L`
  is page `L * pages + p`). A call writes its page-table rows, shifted by `L * pages`,
  into the graph's static page table, copies `kv_len` in when the batch changed and `q`
  in, replays, and hands back the reply (kflume/comm/wire.py's layout). Keyed by
  (batch, query heads, page-table width, dtype, scale, softcap): few shapes exist.
- **per stream layer** (`stream`): an attend stream (kflume/node/streams.py) brings its
  own query and reply buffers, reused from stream to stream; each layer's graph reads
  the query where it lands and writes the reply where it is sent from, over that
  layer's pool, with the batch's rows in one page table all the layers' graphs read (as
  wide as a layer's pages, so it fits however long the requests grow). A stream into a
  mailbox also captures, around each layer's kernels, the fetch of its query from the
  weight node's memory and the delivery of its reply there (`LayerHooks`): a layer is
  one replay. A layer without its graph yet goes through the per-shape graph.

Captures are kept off the serving path: stream layers are captured by
`capture_pending()`, a few at a time, which a server calls when a stream ends (between
the peer's steps: a capture holds a node ~0.5 ms), or all at once by `capture_set()`
before any stream comes, for a node that does not serve yet (one joining). A node in
the process whose captured step waits on the thread serving it
(`capture_while_serving=False`, docs/conventions.md) captures nothing while serving:
new shapes run uncaptured and wait for its owner's `capture_pending()`.

Graphs share one memory pool (they replay one after another on one stream); capture
uses thread-local mode (UCX's threads may call CUDA meanwhile) and does not synchronise
the device. On CPU the same buffers and arithmetic run eagerly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..comm.wire import state_row_bytes, unpack_states
from ..kernels import split_kv_attention
from ..kernels.split_kv import default_num_splits
from .pages import DeviceBatch

__all__ = ["AttendGraphs", "LayerHooks"]


@dataclass(frozen=True, slots=True)
class LayerHooks:
    """Work a stream layer's graph runs ahead of its kernels (`before(i)`: a pulled
    query's fetch) and behind them (`after(i)`: the reply's delivery). Captured, so
    they must launch the same kernels on the same memory every time (a value that
    changes lives in device memory); `key` names them among the graph sets."""

    key: Hashable
    before: Callable[[int], None] | None
    after: Callable[[int], None] | None


@dataclass(slots=True)
class _ShapeGraph:
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
class _StreamSet:
    """One graph per layer of one stream buffer set."""

    q: torch.Tensor  # [L, b, Hq, D]: layer i's query lands in q[i]
    result: torch.Tensor  # [L, b, row]: layer i's reply, in the reply layout
    page_table: torch.Tensor  # [b, pages]: the batch's rows, read by every layer's graph
    first: int  # the stream's first layer: graph i attends over layer first + i
    start: torch.Tensor
    kv_len: torch.Tensor
    scale: float
    splits: int
    runs: list  # [L] a captured graph's replay (the eager launch on CPU), or None
    used: list  # [L] served without its graph since the last capture_pending() (None:
    # its capture was tried and failed, or is not possible: it stays on the shape graph)
    hooks: LayerHooks | None = None
    kv_len_src: torch.Tensor | None = None


def capture(launch: Callable[[], None], device: torch.device, pool) -> Callable[[], None]:
    """`launch` captured into a graph of memory pool `pool`; returns its replay. What
    torch.cuda.graph does, less its device sync, gc and cache flush (which would stall a
    serving node for milliseconds at a new shape). The kernels must be loaded already."""
    with torch.cuda.device(device):
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                launch()
            finally:
                graph.capture_end()
        main.wait_stream(side)
    return graph.replay  # (the bound method keeps the graph alive)


class AttendGraphs:
    """Attention over a node's pools `k_pool, v_pool [layers, pages, page_size, Hkv, D]`
    through captured graphs (eagerly on CPU)."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, *, num_sms: int = 132,
                 max_graphs: int = 32, max_streams: int = 8,
                 capture_while_serving: bool = True) -> None:
        layers, pages, page_size, hkv, d = k_pool.shape
        if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
            raise ValueError("AttendGraphs needs contiguous pools (one allocation per pool)")
        self.k = k_pool.view(layers * pages, page_size, hkv, d)
        self.v = v_pool.view(layers * pages, page_size, hkv, d)
        self.k_layers, self.v_layers = k_pool, v_pool  # [layer]: that layer's pool
        self.pages, self.page_size, self.kv_heads = pages, page_size, hkv
        self.device = k_pool.device
        self.capturing = k_pool.is_cuda
        self.num_sms, self.max_graphs, self.max_streams = num_sms, max_graphs, max_streams
        self.capture_while_serving = capture_while_serving
        self._shapes: OrderedDict[tuple, _ShapeGraph] = OrderedDict()
        self._sets: OrderedDict[tuple, _StreamSet] = OrderedDict()
        self._retired: list[tuple] = []  # (evicted set, its replays' end event)
        self._pool = torch.cuda.graph_pool_handle() if self.capturing else None
        self._uncaptured: dict[tuple, None] = {}  # shape graphs that run uncaptured
        self.captured = 0  # graphs captured so far (for tests and logs)

    def attend(self, layer: int, q: torch.Tensor, batch: DeviceBatch, scale: float,
               out: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
        """`split_kv_attention(q, k_pool[layer], v_pool[layer], ...)` over `batch`, as
        the reply layout (one uint8 tensor `[b, row]`, written into `out` if given).
        No checks: the node checked `layer`, `q` and the ranges."""
        b, hq, _ = q.shape
        key = (b, hq, batch.page_table.shape[1], q.dtype, float(scale), softcap)
        g = self._shapes.get(key)
        if g is None:
            g = self._shape_graph(key, q)
        else:
            self._shapes.move_to_end(key)
        torch.add(batch.page_table, layer * self.pages, out=g.page_table)
        if g.kv_len_src is not batch.kv_len:
            g.kv_len.copy_(batch.kv_len)
            g.start.copy_(batch.kv_start)
            g.kv_len_src = batch.kv_len
        g.q.copy_(q)
        g.run()
        return g.result.clone() if out is None else out.copy_(g.result)

    def stream(self, layers: range, q: torch.Tensor, result: torch.Tensor,
               batch: DeviceBatch, scale: float,
               hooks: LayerHooks | None = None) -> Callable[[int], None]:
        """Attention for a stream of `layers` over one batch: returns `run(i)`, which
        computes layer `layers[i]` from `q[i]` (`q [len(layers), b, Hq, D]`) into
        `result[i]` (`[len(layers), b, row]` uint8), ordered on the current stream. The
        buffers must stay the same tensors from stream to stream (the graphs read and
        write them). No checks: the node checked the batch."""
        s = self._set(layers.start, q, result, scale, hooks)
        w = min(batch.page_table.shape[1], self.pages)  # (columns past a layer's pages
        s.page_table[:, :w].copy_(batch.page_table[:, :w])  # are never used)
        if s.kv_len_src is not batch.kv_len:
            s.kv_len.copy_(batch.kv_len)
            s.kv_len_src = batch.kv_len

        def run(i: int) -> None:
            r = s.runs[i]
            if r is not None:
                r()
                return
            if s.used[i] is not None:  # not captured yet: the shape graph meanwhile
                s.used[i] = True
            if hooks is not None and hooks.before is not None:
                hooks.before(i)
            self.attend(layers[i], q[i], batch, scale, out=result[i])
            if hooks is not None and hooks.after is not None:
                hooks.after(i)
        return run

    def capture_set(self, first: int, q: torch.Tensor, result: torch.Tensor, scale: float,
                    hooks: LayerHooks | None = None, now: bool = True) -> int:
        """Capture every layer of the stream set `stream()` would use for these buffers
        and a stream from layer `first`: now (the kernels run once first, on lengths of
        0, so that they are loaded; `hooks`' kernels must be loaded already), or, with
        `now=False`, mark them for `capture_pending`. Returns how many were captured."""
        s = self._set(first, q, result, scale, hooks)
        if not now:
            s.used = [None if u is None else (u or r is None) for u, r in zip(s.used, s.runs)]
            return 0
        todo = [i for i, r in enumerate(s.runs) if r is None and s.used[i] is not None]
        if not todo or not self.capturing:
            return 0
        out, lse = unpack_states(result[todo[0]], q.shape[2], q.shape[3], q.dtype)
        layer = first + todo[0]
        on_gpu = self.device.type == "cuda"
        with torch.cuda.device(self.device) if on_gpu else nullcontext():  # kernels loaded
            split_kv_attention(q[todo[0]], self.k_layers[layer], self.v_layers[layer],
                               s.page_table, s.start, torch.zeros_like(s.kv_len), scale=s.scale,
                               num_splits=s.splits, out=out, lse=lse, check=False)
        done = 0
        for i in todo:
            s.used[i] = None  # tried: never again for this set, if it fails
            done += self._capture_layer(s, i)
        return done

    def capture_pending(self, limit: int | None = 2) -> int:
        """Capture up to `limit` (None: all) graphs of batch shapes and stream layers
        served so far without one (shapes first, then the most recently used sets).
        Nothing runs: no buffer is written. Returns how many were captured."""
        done = 0
        limit = float("inf") if limit is None else limit
        while self._uncaptured and done < limit:
            g = self._shapes[self._uncaptured.popitem()[0]]  # (evicting drops a key)
            g.run = self._capture(g.run)  # (its kernels ran: loaded)
            done += 1
        if not self.capture_while_serving:
            self._evict()
        for s in reversed(self._sets.values()):
            for i, used in enumerate(s.used):
                if done >= limit:
                    return done
                if used and s.runs[i] is None:
                    s.used[i] = None  # tried: never again for this set, if it fails
                    done += self._capture_layer(s, i)
        return done

    # ---- internals ----------------------------------------------------------------------
    def _set(self, first: int, q: torch.Tensor, result: torch.Tensor, scale: float,
             hooks: LayerHooks | None) -> _StreamSet:
        """The stream set of these buffers from layer `first` (made if new; now the most
        recently used)."""
        n, b, hq, d = q.shape
        key = (q.data_ptr(), result.data_ptr(), first, n, b, hq, d, q.dtype, float(scale),
               None if hooks is None else hooks.key)
        s = self._sets.get(key)
        if s is not None:
            self._sets.move_to_end(key)
            return s
        zeros = torch.zeros(b, dtype=torch.int32, device=self.device)
        s = _StreamSet(q=q, result=result, scale=float(scale), first=first,
                       page_table=torch.zeros(b, self.pages, dtype=torch.int32,
                                              device=self.device),
                       start=zeros, kv_len=zeros.clone(), runs=[None] * n, used=[False] * n,
                       hooks=hooks, splits=default_num_splits(
                           b, self.kv_heads, self.pages * self.page_size, self.num_sms))
        if not self.capturing:  # CPU: every layer runs eagerly on the buffers at once
            for i in range(n):
                self._capture_layer(s, i)
        if len(self._sets) >= self.max_streams:
            # Kept until its last replays ran (no sync here: a stream's open is on the
            # critical path) and a capture came after it (the shared pool is released,
            # and may not be captured into again, once no graph uses it).
            old = self._sets.popitem(last=False)[1]
            done = torch.cuda.Event() if self.capturing else None
            if done is not None:
                done.record(torch.cuda.current_stream(self.device))
            self._retired.append((old, done))
        self._sets[key] = s
        return s

    def _capture_layer(self, s: _StreamSet, i: int) -> bool:
        """Layer i's run of a stream set: a graph captured without running it (the shape
        graph loaded the kernels), or the eager launch on CPU. False: not captured (a
        buffer aligned unlike the shape graph's could need another compile of the
        kernels; the shape graph keeps serving that layer)."""
        out, lse = unpack_states(s.result[i], s.q.shape[2], s.q.shape[3], s.q.dtype)
        q, layer, hooks = s.q[i], s.first + i, s.hooks

        def launch() -> None:
            if hooks is not None and hooks.before is not None:
                hooks.before(i)
            split_kv_attention(q, self.k_layers[layer], self.v_layers[layer], s.page_table,
                               s.start, s.kv_len, scale=s.scale, num_splits=s.splits,
                               out=out, lse=lse, check=False)
            if hooks is not None and hooks.after is not None:
                hooks.after(i)

        if not self.capturing:
            s.runs[i] = launch
            return True
        if any(t.data_ptr() % 16 for t in (q, out, lse, s.page_table)):
            return False
        s.runs[i] = self._capture(launch)
        return True

    def _capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        replay = capture(launch, self.device, self._pool)
        self._retired = [(r, e) for r, e in self._retired if e is not None and not e.query()]
        self.captured += 1
        return replay

    def _shape_graph(self, key: tuple, q: torch.Tensor) -> _ShapeGraph:
        b, hq, width, dtype, scale, softcap = key
        dev, d = self.device, q.shape[2]
        result = torch.zeros(b, state_row_bytes(hq, d, dtype), dtype=torch.uint8, device=dev)
        out, lse = unpack_states(result, hq, d, dtype)
        zeros = torch.zeros(b, dtype=torch.int32, device=dev)
        g = _ShapeGraph(q=torch.zeros_like(q), start=zeros, kv_len=zeros.clone(),
                        page_table=torch.zeros(b, width, dtype=torch.int32, device=dev),
                        result=result, out=out, lse=lse)
        splits = default_num_splits(b, self.kv_heads, width * self.page_size, self.num_sms)

        def launch() -> None:
            split_kv_attention(g.q, self.k, self.v, g.page_table, g.start, g.kv_len,
                               scale=scale, num_splits=splits, out=g.out, lse=g.lse,
                               check=False, softcap=softcap)

        g.run = launch
        if self.capturing and self.capture_while_serving:
            launch()  # loads the kernels, ordered as a replay would be
            g.run = self._capture(launch)
        elif self.capturing:
            self._uncaptured[key] = None
        self._shapes[key] = g
        if self.capture_while_serving:
            self._evict()
        return g

    def _evict(self) -> None:
        """Drop the least recently used shape graphs past `max_graphs`. Its last replay
        may still run: while serving, the serving stream is waited for; between steps
        (`capture_while_serving=False`), the device."""
        while len(self._shapes) > self.max_graphs:
            if self.capturing and self.capture_while_serving:
                torch.cuda.current_stream(self.device).synchronize()
            elif self.capturing:
                torch.cuda.synchronize(self.device)
            key, _ = self._shapes.popitem(last=False)
            self._uncaptured.pop(key, None)
