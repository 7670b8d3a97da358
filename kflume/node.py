"""AttentionNode: the weightless server that holds token ranges of KV and attends over them.

For every layer a paged pool `[num_pages, page_size, Hkv, D]` (docs/conventions.md); a
page allocator shared by all layers (a token takes one slot in every layer); per request
the list of its pages and how many tokens it holds. A node does not need to know which
global positions it holds: attention over a set of tokens does not depend on their
order, so a request's tokens on a node are simply its first `n` local slots. It keeps
the global segments anyway, to export a global range for migration.

`AttentionNode` is the state and the compute; `NodeServer` (kflume/server.py) puts it
behind a transport; `kflume node` (kflume/launch.py) starts one as a process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .comm.wire import pack_states, state_row_bytes, unpack_states
from .kernels import append_kv, split_kv_attention
from .kernels.split_kv import default_num_splits
from .node_graph import AttendGraphs
from .segments import add_segment, locate

_NP = {torch.int32: np.int32, torch.long: np.int64}  # what `_upload` takes

__all__ = ["AttentionNode", "NodeCapacityError", "NodeConfig", "UnknownRequestError"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class NodeCapacityError(RuntimeError):
    """The node has no free pages for what was asked (the router should have prevented it)."""


class UnknownRequestError(KeyError):
    """A request this node holds nothing of."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


@dataclass(slots=True)
class NodeConfig:
    """Geometry and capacity of an attention node (must match the model it serves)."""

    layers: int
    kv_heads: int
    head_dim: int
    capacity_tokens: int
    dtype: str = "bfloat16"
    device: str = "cpu"
    page_size: int = 16
    q_heads: int | None = None  # informational; checked per request by GQA rules
    # CUDA nodes replay their attention as captured graphs (kflume/node_graph.py); False
    # launches the kernels from Python every message (slower; kept to compare against).
    graphs: bool = True
    # With graphs, an attend stream's layers replay graphs captured on the stream's own
    # buffers (captured a few at a time at a stream's end); False: one graph per batch
    # shape, copying q in and the reply out (Cluster.in_process on CUDA).
    stream_graphs: bool = True
    # False: capture nothing while serving; shapes first seen then run uncaptured until
    # `capture_pending()`, which the node's owner calls between steps. For a node in the
    # process whose captured step waits on the thread serving it (Cluster.in_process on
    # CUDA): the driver may synchronise the device while it instantiates a graph, and
    # that step then never ends (kflume/node_graph.py).
    capture_while_serving: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "capacity_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")

    @property
    def num_pages(self) -> int:
        return -(-self.capacity_tokens // self.page_size)


@dataclass(slots=True)
class _Request:
    slot: int  # row of the node's page-table tensor
    lengths: list[int]  # per layer: tokens written (local slots 0..n-1)
    pages: list[int] = field(default_factory=list)
    stamp: int = 0  # the node's `_stamp` when this row last changed (device-row cache key)
    segments: list[list[int]] = field(default_factory=list)  # [global_start, global_end, local]

    @property
    def length(self) -> int:
        """Tokens held in every layer."""
        return min(self.lengths)


class AttentionNode:
    """Paged KV for token ranges of many requests, and attention over them.

    All methods check their input and raise ValueError / UnknownRequestError /
    NodeCapacityError naming the problem; a refused call leaves the node unchanged.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = c = config
        self.device = torch.device(c.device)
        self.dtype = DTYPES[c.dtype]
        shape = (c.layers, c.num_pages, c.page_size, c.kv_heads, c.head_dim)
        # Allocated up front: a node never runs out of memory mid-request, it refuses.
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # The same pools as one: page p of layer L is page L * num_pages + p there.
        self._k_flat, self._v_flat = (p.view(-1, *shape[2:]) for p in (self.k_pool, self.v_pool))
        self._layer_base = torch.arange(c.layers, dtype=torch.int32,
                                        device=self.device) * c.num_pages
        self.free_pages: list[int] = list(range(c.num_pages - 1, -1, -1))
        self.requests: dict[object, _Request] = {}
        self._free_slots: list[int] = []
        self._pt = torch.zeros(8, 8, dtype=torch.int32, device=self.device)  # [slots, pages]
        # Cached device rows (`_batch`, `_layer_rows`) are keyed by the table's epoch
        # (bumped when it is reallocated) and each request's stamp (a fresh value of the
        # counter whenever its row changes, so a freed id that comes back with the same
        # slot and page count is still a new key): a page taken by one request leaves the
        # others' rows cached.
        self._pt_epoch = 0
        self._stamp = 0
        self._batches: dict[tuple, tuple] = {}  # device index tensors of recent batches
        self._sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                     if self.device.type == "cuda" else 132)
        self._graphs = (AttendGraphs(self.k_pool, self.v_pool, num_sms=self._sms,
                                     capture_while_serving=c.capture_while_serving)
                        if c.graphs and self.device.type == "cuda" else None)

    # ---- bookkeeping ----------------------------------------------------------------
    def stats(self) -> dict:
        c = self.config
        return {
            "pages_total": c.num_pages,
            "pages_free": len(self.free_pages),
            "page_size": c.page_size,
            "tokens_held": sum(max(r.lengths) for r in self.requests.values()),
            "capacity_tokens": c.num_pages * c.page_size,
            "requests": len(self.requests),
            "layers": c.layers,
            "kv_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "dtype": c.dtype,
            "device": str(self.device),
            # CUDA graphs captured so far: per batch shape, and per stream layer
            "graphs_captured": self._graphs.captured if self._graphs is not None else 0,
        }

    def _req(self, rid) -> _Request:
        try:
            return self.requests[rid]
        except KeyError:
            raise UnknownRequestError(f"unknown request {rid!r} on this node") from None

    def _new_request(self, rid) -> _Request:
        slot = self._free_slots.pop() if self._free_slots else len(self.requests)
        if slot >= self._pt.shape[0]:
            self._grow_table(rows=max(2 * self._pt.shape[0], slot + 1))
        self._stamp += 1
        req = self.requests[rid] = _Request(slot, [0] * self.config.layers, stamp=self._stamp)
        return req

    def _grow_table(self, rows: int | None = None, cols: int | None = None) -> None:
        r0, c0 = self._pt.shape
        pt = torch.zeros(rows or r0, cols or c0, dtype=torch.int32, device=self.device)
        pt[:r0, :c0] = self._pt
        self._pt = pt
        self._pt_epoch += 1

    def _batch(self, requests: Sequence, ints: Sequence[int],
               rows: int | None = None) -> tuple[torch.Tensor, ...]:
        """(page table rows, int32 values) of a batch on the device, cached: every layer of
        a step sends the same requests, so the host-to-device copies happen once a step.
        `rows` (>= len(requests)): padded with zero rows and values up to that many."""
        rows = len(requests) if rows is None else rows

        def make():
            pad = rows - len(requests)
            vals = self._upload(list(ints) + [0] * pad, torch.int32)
            pt = self._rows(requests)
            if pad:
                pt = torch.cat((pt, pt.new_zeros(pad, pt.shape[1])))
            return pt, vals, torch.zeros_like(vals)

        return self._cached((self._rows_key(requests), tuple(ints), rows), make)

    def _layer_rows(self, requests: Sequence, layers: range) -> torch.Tensor:
        """The requests' page-table rows in each of `layers`, shifted to that layer's pages
        in the flattened pools: `[b * L, pages]`, request-major (an append's page table),
        cached until the table changes (a new page every page_size tokens), so that a
        step's append uploads only its offsets."""
        return self._cached(
            ("layers", self._rows_key(requests), layers.start, layers.stop),
            lambda: (self._rows(requests)[:, None, :]
                     + self._layer_base[layers.start : layers.stop, None]).flatten(0, 1))

    def _rows_key(self, requests: Sequence) -> tuple:
        """What the requests' device rows depend on (the table's epoch, their stamps)."""
        held = self.requests
        return (self._pt_epoch, tuple(requests), tuple(held[r].stamp for r in requests))

    def _rows(self, requests: Sequence) -> torch.Tensor:
        slots = self._upload([self.requests[r].slot for r in requests], torch.long)
        return self._pt.index_select(0, slots)

    def _cached(self, key: tuple, make: Callable[[], object]):
        """Device index tensors of the recent batches (the last 16 keys made)."""
        hit = self._batches.get(key)
        if hit is None:
            hit = make()
            if len(self._batches) >= 16:
                self._batches.pop(next(iter(self._batches)))
            self._batches[key] = hit
        return hit

    def _upload(self, values: list[int], dtype: torch.dtype,
                repeat: int = 1) -> torch.Tensor:
        """A few host ints (each `repeat` times in a row) on this node's device, without
        the host waiting for the GPU. A copy from pageable host memory waits for every
        kernel queued on the stream before it (CUDA's rule), so the node's host would sit
        behind the attention it queued for another micro-batch while handling an append;
        from pinned memory the copy is queued like a kernel (torch keeps the pinned block
        until it ran)."""
        a = np.asarray(values, dtype=_NP[dtype])  # (numpy: a few us where torch takes 10+)
        t = torch.from_numpy(np.repeat(a, repeat) if repeat > 1 else a)
        if self.device.type == "cpu":
            return t
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _reserve(self, reqs: Sequence[tuple[object, int]]) -> None:
        """Make sure each (request, tokens) has pages for `tokens` local slots; all or none."""
        ps, held = self.config.page_size, self.requests
        need, known = 0, True
        for rid, tokens in reqs:
            req = held.get(rid)
            known = known and req is not None
            need += max(0, -(-tokens // ps) - (len(req.pages) if req is not None else 0))
        if need == 0 and known:  # (a decode step's append, 15 times in 16)
            return
        if need > len(self.free_pages):
            raise NodeCapacityError(
                f"node is full: {need} more pages needed, {len(self.free_pages)} free of "
                f"{self.config.num_pages} ({self.config.page_size} tokens each)"
            )
        for rid, tokens in reqs:
            req = self.requests.get(rid) or self._new_request(rid)
            want = -(-tokens // ps)
            if want > self._pt.shape[1]:
                self._grow_table(cols=max(2 * self._pt.shape[1], want))
            new = [self.free_pages.pop() for _ in range(want - len(req.pages))]
            if new:
                col = len(req.pages)
                req.pages.extend(new)
                self._pt[req.slot, col : col + len(new)] = self._upload(new, torch.int32)
                self._stamp += 1
                req.stamp = self._stamp

    def open(self, requests: Sequence, tokens: Sequence[int]) -> None:
        """Reserve room for `tokens[i]` tokens of `requests[i]` (creating it if new)."""
        if len(requests) != len(tokens):
            raise ValueError("open: requests and tokens differ in length")
        self._reserve([(r, int(n) + (max(self.requests[r].lengths) if r in self.requests else 0))
                       for r, n in zip(requests, tokens)])

    def free(self, requests: Sequence) -> int:
        """Drop requests and return their pages; unknown ids are ignored. Returns tokens freed."""
        freed = 0
        for rid in requests:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            freed += max(req.lengths)
            self.free_pages.extend(reversed(req.pages))
            self._free_slots.append(req.slot)  # (a request made there gets a new stamp)
        return freed

    # ---- data path ----------------------------------------------------------------------
    def _check_kv(self, name: str, t: torch.Tensor, rows: int, tokens: int | None) -> None:
        c = self.config
        want = (rows, tokens, c.kv_heads, c.head_dim) if tokens is not None else None
        if t.dim() != 4 or (want and tuple(t.shape) != want) or tuple(t.shape[2:]) != (
            c.kv_heads, c.head_dim
        ):
            raise ValueError(f"{name} must be [{rows}, T, {c.kv_heads}, {c.head_dim}]; got "
                             f"{list(t.shape)}")
        if t.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; this node holds {self.config.dtype} KV")

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.config.layers:
            raise ValueError(f"layer {layer} out of range: this node holds {self.config.layers} "
                             "layers")

    def append(self, layer: int, requests: Sequence, offsets: Sequence[int],
               positions: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write `k, v [b, T, Hkv, D]` of `layer` at local slots `offsets[i] ..` of each
        request.

        `positions[i]` is the global position of the first of those tokens (kept for
        export). An offset may rewrite slots already written (a retried step) or extend
        the request by exactly the tokens given; a gap is refused.
        """
        self._check_layer(layer)
        self._check_kv("k", k, len(requests), None)
        self._check_kv("v", v, len(requests), k.shape[1])
        self.append_layers(range(layer, layer + 1), requests, offsets, positions,
                           k.unsqueeze(1), v.unsqueeze(1))

    def append_layers(self, layers: range, requests: Sequence, offsets: Sequence[int],
                      positions: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """`append` for several layers at once: `k, v [b, L, T, Hkv, D]` hold the same
        tokens' KV in each of `layers` (a range of L layers), written by one kernel launch
        (a weight node sends a step's new tokens of every layer in one message)."""
        c = self.config
        if not isinstance(layers, range) or layers.step != 1 or not layers:
            raise ValueError(f"layers must be a non-empty range of consecutive layers; got "
                             f"{layers!r}")
        self._check_layer(layers.start)
        self._check_layer(layers.stop - 1)
        b, n_layers = len(requests), len(layers)
        if not (len(offsets) == len(positions) == b):
            raise ValueError("append: requests, offsets and positions differ in length")
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 5 or tuple(t.shape[:2]) != (b, n_layers) or tuple(t.shape[3:]) != (
                c.kv_heads, c.head_dim
            ) or t.shape[2] != k.shape[2]:
                raise ValueError(f"{name} must be [{b}, {n_layers}, T, {c.kv_heads}, "
                                 f"{c.head_dim}]; got {list(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}; this node holds {c.dtype} KV")
        t, a, z = k.shape[2], layers.start, layers.stop
        for rid, off in zip(requests, offsets):  # (per request, not per layer: host time)
            held = self.requests[rid].lengths[a:z] if rid in self.requests else [0] * n_layers
            if not 0 <= off <= min(held):
                i = next(i for i, h in enumerate(held) if not 0 <= off <= h)
                raise ValueError(f"append offset {off} for request {rid!r} leaves a gap in "
                                 f"layer {a + i}: the node holds {held[i]} of its tokens")
        self._reserve([(rid, off + t) for rid, off in zip(requests, offsets)])
        pt = self._layer_rows(requests, layers)  # rows of every layer in the flattened pools
        offs = self._upload(list(offsets), torch.int32, repeat=n_layers)  # [b * L]
        append_kv(self._k_flat, self._v_flat, pt, offs,
                  k.to(self.device).flatten(0, 1), v.to(self.device).flatten(0, 1), check=False)
        for rid, off, pos in zip(requests, offsets, positions):
            req, end = self.requests[rid], off + t
            held = req.lengths[a:z]
            req.lengths[a:z] = ([end] * n_layers if max(held) <= end  # (a decode step)
                                else [h if h > end else end for h in held])
            if layers.start == 0:  # where global positions sit is the same in every layer
                add_segment(req.segments, int(pos), int(pos) + t, int(off))

    def attend(self, layer: int, requests: Sequence, kv_len: Sequence[int],
               q: torch.Tensor, *, scale: float | None = None,
               out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
               packed: bool = False):
        """Attention of `q [b, Hq, D]` over the first `kv_len[i]` tokens this node holds of
        each request, all requests in one kernel launch. Returns `(out, lse)`, or with
        `packed=True` both in one uint8 tensor, the reply layout of kflume/comm/wire.py
        (written into `out` when given)."""
        c = self.config
        b = len(requests)
        if q.dim() != 3 or q.shape[0] != b or q.shape[2] != c.head_dim:
            raise ValueError(f"q must be [{b}, Hq, {c.head_dim}]; got {list(q.shape)}")
        if q.dtype != self.dtype:
            raise TypeError(f"q has dtype {q.dtype}; this node holds {c.dtype} KV")
        self._check_batch(range(layer, layer + 1), requests, kv_len, q.shape[1])
        return self._launch(layer, q.to(self.device), self._batch(requests, kv_len), scale,
                            out=out, lse=lse, packed=packed)

    def attend_batch(self, layers: range, requests: Sequence, kv_len: Sequence[int],
                     q: torch.Tensor, out: torch.Tensor, *, scale: float | None = None,
                     around: tuple | None = None) -> Callable[[int], None]:
        """Check once what `attend` checks, for every layer of `layers`, and return
        `run(i)`: layer `layers[i]`'s attention of `q[i]` into `out[i]`, as
        `attend(layers[i], requests, kv_len, q[i], packed=True, out=out[i])` with no
        further checks. `q [len(layers), R, Hq, D]` and `out [len(layers), R, row]`
        (uint8, the reply layout) are the stream's buffers on this node's device; on a GPU
        each layer replays a graph captured for them, so they should be reused from
        stream to stream. R >= len(requests): rows past the requests' are padding,
        attention over no tokens (`(0, -inf)`), so that a stream's buffers, and the
        graphs captured on them, can stay the same while its batch changes.

        `around = (key, before, after)`: work enqueued ahead of and behind each layer's
        kernels, captured into its graph (`AttendGraphs.stream`); the server fetches a
        pulled query and delivers the reply into a mailbox this way.

        For a stream of one batch's layers (kflume/server.py). It attends over the
        requests' pages as they are now: freeing or moving them before the last layer ran
        is the caller's mistake to avoid."""
        self._check_stream_buffers(layers, q, out, len(requests))
        self._check_batch(layers, requests, kv_len, q.shape[2])
        batch = self._batch(requests, kv_len, rows=q.shape[1])
        scale = self._scale(scale)
        if self._graphs is not None and self.config.stream_graphs:
            return self._graphs.stream(layers, q, out, batch[0], batch[1], scale, around)
        before, after = around[1:] if around is not None else (None, None)

        def run(i: int) -> None:
            if before is not None:
                before(i)
            self._launch(layers[i], q[i], batch, scale, out=out[i], packed=True)
            if after is not None:
                after(i)
        return run

    def prepare_batch(self, layers: range, q: torch.Tensor, out: torch.Tensor, *,
                      scale: float | None = None, around: tuple | None = None,
                      now: bool = True) -> int:
        """Capture now every layer's graph that `attend_batch` would replay for streams on
        these buffers (same arguments, less the batch), so that the first such stream
        replays at once instead of running uncaptured while its graphs are captured a
        few at a time between steps. Only the kernels run, once each on lengths of 0 (no
        KV read, no `around` work: nothing is delivered). A node about to take traffic
        calls this (kflume/server.py, "prepare"): each capture holds the node for
        ~0.5 ms. `now=False` leaves them to `capture_pending` instead (a node serving
        others; always, with `capture_while_serving=False`). Returns how many graphs
        were captured (0 on CPU, or without stream graphs)."""
        self._check_stream_buffers(layers, q, out, 0)
        self._check_layer(layers.start)
        self._check_layer(layers[-1])
        if q.shape[2] % self.config.kv_heads:
            raise ValueError(f"q must be [b, Hq, D] with Hq a multiple of the "
                             f"{self.config.kv_heads} KV heads; got Hq={q.shape[2]}")
        if self._graphs is None or not self.config.stream_graphs:
            return 0
        return self._graphs.prepare(layers.start, q, out, self._scale(scale), around,
                                    now=now and self.config.capture_while_serving)

    def _check_stream_buffers(self, layers: range, q: torch.Tensor, out: torch.Tensor,
                              b: int) -> None:
        c, n = self.config, len(layers)
        if q.dim() != 4 or tuple(q.shape[::3]) != (n, c.head_dim) or q.shape[1] < max(b, 1):
            raise ValueError(f"q must be [{n}, R >= {max(b, 1)}, Hq, {c.head_dim}]; got "
                             f"{list(q.shape)}")
        if q.dtype != self.dtype or not self._here(q):
            raise TypeError(f"q must be {c.dtype} on {self.device}; got {q.dtype} on {q.device}")
        rows = (n, q.shape[1], state_row_bytes(q.shape[2], c.head_dim, q.dtype))
        if tuple(out.shape) != rows or out.dtype != torch.uint8 or not self._here(out):
            raise ValueError(f"out must be uint8 {list(rows)} on {self.device}; got "
                             f"{out.dtype} {list(out.shape)} on {out.device}")

    def _scale(self, scale: float | None) -> float:
        return float(self.config.head_dim**-0.5 if scale is None else scale)

    def capture_pending(self, limit: int | None = 2) -> int:
        """Capture up to `limit` (None: all) of the graphs that batches were served
        without (stream layers; with `capture_while_serving=False`, new batch shapes too:
        kflume/node_graph.py). A server calls this at a peer's stream's end, an
        in-process node's owner between steps. Returns how many were captured (0 on
        CPU or without graphs)."""
        if self._graphs is None:
            return 0
        return self._graphs.capture_pending(limit)

    def _here(self, t: torch.Tensor) -> bool:
        d = self.device
        return t.device.type == d.type and d.index in (None, t.device.index)

    def _check_batch(self, layers: range, requests: Sequence, kv_len: Sequence[int],
                     q_heads: int) -> None:
        c = self.config
        if len(layers) == 0:
            raise ValueError("no layers to attend")
        self._check_layer(layers.start)
        self._check_layer(layers[-1])
        if q_heads <= 0 or q_heads % c.kv_heads:
            raise ValueError(f"q must be [b, Hq, D] with Hq a multiple of the {c.kv_heads} KV "
                             f"heads; got Hq={q_heads}")
        if len(kv_len) != len(requests):
            raise ValueError("attend: requests and kv_len differ in length")
        for rid, n in zip(requests, kv_len):
            have = min(self._req(rid).lengths[layers.start : layers.stop])
            if not 0 <= n <= have:
                raise ValueError(f"kv_len {n} for request {rid!r}: the node holds {have} tokens")

    def _launch(self, layer: int, q: torch.Tensor, batch: tuple, scale: float | None, *,
                out=None, lse=None, packed: bool = False):
        c = self.config
        pt, lens, start = batch
        scale = float(c.head_dim**-0.5 if scale is None else scale)
        if self._graphs is not None:
            return self._graphs.attend(layer, q, pt, lens, scale, out=out, lse=lse,
                                       packed=packed)
        into = out if packed else None  # packed: out is the reply layout, or None
        if into is not None:  # the kernel writes through its views
            out, lse = unpack_states(into, q.shape[1], c.head_dim, q.dtype)
        elif packed:
            out = lse = None
        splits = default_num_splits(len(q), c.kv_heads, pt.shape[1] * c.page_size, self._sms)
        res = split_kv_attention(q, self.k_pool[layer], self.v_pool[layer], pt, start, lens,
                                 scale=scale, num_splits=splits, out=out, lse=lse, check=False)
        if not packed:
            return res
        return into if into is not None else pack_states(*res)

    def warmup(self) -> None:
        """Run append and attend once on a scratch request, so that kernels are compiled and
        loaded before the node takes traffic (a node joining mid-run must not stall the
        step that first uses it). Query heads: `config.q_heads`, else the KV heads."""
        c = self.config
        hq = c.q_heads or c.kv_heads
        tokens = min(2 * c.page_size + 1, c.num_pages * c.page_size - 2)
        if tokens < 1:
            return
        k = torch.randn(1, tokens, c.kv_heads, c.head_dim).to(self.device, self.dtype)
        rid = ("kflume-warmup",)
        for t in (k.shape[1], 1):  # a prefill-sized append, then a decode-sized one
            off = self.requests[rid].length if rid in self.requests else 0
            for layer in range(c.layers):
                self.append(layer, [rid], [off], [off], k[:, :t], k[:, :t])
        # and a step's tokens of every layer in one call, as a weight node sends them: its
        # own torch ops (seen: 10.5 ms of a joining node's first such append on a GPU shared
        # under MPS, 0.6 ms for the next)
        kl = k[:, None, :1].expand(1, c.layers, 1, c.kv_heads, c.head_dim).contiguous()
        self.append_layers(range(c.layers), [rid], [k.shape[1] + 1], [k.shape[1] + 1], kl, kl)
        q = torch.randn(1, hq, c.head_dim).to(self.device, self.dtype)
        self.attend(0, [rid], [k.shape[1] + 2], q)
        self.free([rid])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def export_range(self, rid, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of global positions `[start, end)` of a request, all layers:
        `k, v [layers, end - start, Hkv, D]`."""
        req = self._req(rid)
        local = locate(req.segments, start, end, rid)
        if local and max(local) >= req.length:
            raise ValueError(f"request {rid!r}: positions [{start}, {end}) are not yet written "
                             "in every layer")
        idx = torch.tensor(local, dtype=torch.long, device=self.device)
        ps = self.config.page_size
        pages = torch.tensor(req.pages, dtype=torch.long, device=self.device)[idx // ps]
        slots = idx % ps
        return self.k_pool[:, pages, slots].clone(), self.v_pool[:, pages, slots].clone()

    def import_range(self, rid, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Take KV `[layers, n, Hkv, D]` of global positions `[start, start + n)` of a request."""
        c = self.config
        if k.dim() != 4 or k.shape[0] != c.layers or tuple(k.shape[2:]) != (c.kv_heads,
                                                                              c.head_dim):
            raise ValueError(f"import: k must be [{c.layers}, n, {c.kv_heads}, {c.head_dim}]; "
                             f"got {list(k.shape)}")
        if v.shape != k.shape:
            raise ValueError("import: v must have k's shape")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"import: k, v must be {c.dtype}")
        n = k.shape[1]
        if rid in self.requests and len(set(self.requests[rid].lengths)) != 1:
            raise ValueError(f"import into request {rid!r} while its layers hold different "
                             "token counts (a step is in flight)")
        off = self.requests[rid].length if rid in self.requests else 0
        self._reserve([(rid, off + n)])
        req = self.requests[rid]
        for layer in range(c.layers):
            pt = self._pt[req.slot : req.slot + 1]
            offs = torch.tensor([off], dtype=torch.int32, device=self.device)
            append_kv(self.k_pool[layer], self.v_pool[layer], pt, offs,
                      k[layer : layer + 1].to(self.device, self.dtype),
                      v[layer : layer + 1].to(self.device, self.dtype), check=False)
        req.lengths = [off + n] * c.layers
        add_segment(req.segments, start, start + n, off)
