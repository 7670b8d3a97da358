"""AttentionNode: the weightless server that holds token ranges of KV and attends over them.

For every layer a paged pool `[num_pages, page_size, Hkv, D]` (docs/conventions.md),
one page allocator for all layers (`PageTable`: a token takes the same page and slot in
every layer) and, per request, its pages and how many tokens it holds. A node does not
need to know which global positions it holds: attention over a set of tokens does not
depend on their order, so a request's tokens are its first `n` local positions. It
keeps the global segments anyway, to export a global range for migration.

`AttentionNode` is the state and the compute; `NodeServer` (kflume/node/server.py)
puts it behind a transport; `kflume node` (kflume/node/main.py) starts one as a process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..comm.wire import unpack_states
from ..config import NodeConfig
from ..kernels import append_kv
from . import checks
from .graphs import AttendGraphs, LayerHooks
from .pages import NodeCapacityError, PageTable, UnknownRequestError
from .segments import add_segment, locate

__all__ = ["AttentionNode", "NodeCapacityError", "NodeConfig", "UnknownRequestError"]


class AttentionNode:
    """Paged KV for token ranges of many requests, and attention over them.

    Every method checks its input and raises ValueError / TypeError /
    UnknownRequestError / NodeCapacityError naming the problem; a refused call leaves
    the node unchanged.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = c = config
        self.device = torch.device(c.device)
        self.dtype = c.torch_dtype
        shape = (c.layers, c.num_pages, c.page_size, c.kv_heads, c.head_dim)
        # Allocated up front: a node never runs out of memory mid-request, it refuses.
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # the same pools as one: page p of layer L is page L * num_pages + p there
        self._k_flat, self._v_flat = (p.view(-1, *shape[2:]) for p in (self.k_pool, self.v_pool))
        self.pages = PageTable(c.num_pages, c.page_size, c.layers, self.device)
        sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
               if self.device.type == "cuda" else 132)
        self.graphs = AttendGraphs(self.k_pool, self.v_pool, num_sms=sms,
                                   capture_while_serving=c.capture_while_serving)

    @property
    def requests(self) -> dict:
        """What the node holds, by request id (`RequestKV`)."""
        return self.pages.requests

    def stats(self) -> dict:
        c = self.config
        return {
            "pages_total": c.num_pages, "pages_free": len(self.pages.free_pages),
            "page_size": c.page_size, "capacity_tokens": c.num_pages * c.page_size,
            "tokens_held": sum(max(r.lengths) for r in self.requests.values()),
            "requests": len(self.requests), "layers": c.layers, "kv_heads": c.kv_heads,
            "head_dim": c.head_dim, "dtype": c.dtype, "device": str(self.device),
            "graphs_captured": self.graphs.captured,  # CUDA graphs captured so far
        }

    def open(self, requests: Sequence, tokens: Sequence[int]) -> None:
        """Reserve room for `tokens[i]` more tokens of `requests[i]` (created if new)."""
        if len(requests) != len(tokens):
            raise ValueError("open: requests and tokens differ in length")
        self.pages.reserve([(r, int(n) + self.pages.held(r)) for r, n in zip(requests, tokens)])

    def free(self, requests: Sequence) -> int:
        """Drop requests and return their pages; unknown ids are ignored. Returns tokens freed."""
        return self.pages.free(requests)

    def truncate(self, requests: Sequence, tokens: Sequence[int]) -> int:
        """Keep only the first `tokens[i]` tokens of `requests[i]` in every layer (its
        pages past them freed): a step given up, or a cache cropped. Returns the tokens
        dropped."""
        if len(requests) != len(tokens):
            raise ValueError("truncate: requests and tokens differ in length")
        for rid, n in zip(requests, tokens):
            if not 0 <= n <= self.pages.held(rid):
                raise ValueError(f"truncate request {rid!r} to {n} tokens: the node holds "
                                 f"{self.pages.held(rid)}")
        return sum(self.pages.truncate(rid, int(n)) for rid, n in zip(requests, tokens))

    # ---- appends ----------------------------------------------------------------------
    def append(self, layer: int, requests: Sequence, offsets: Sequence[int],
               positions: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write `k, v [b, T, Hkv, D]` of `layer` at local positions `offsets[i] ..` of
        each request. `positions[i]`: the global position of the first of those tokens
        (kept for export). An offset may rewrite tokens already written (a retried step)
        or extend the request by exactly the tokens given; a gap is refused."""
        checks.layer(self.config, layer)
        checks.kv(self, "k", k, len(requests), None)
        checks.kv(self, "v", v, len(requests), k.shape[1])
        self.append_layers(range(layer, layer + 1), requests, offsets, positions,
                           k.unsqueeze(1), v.unsqueeze(1))

    def append_layers(self, layers: range, requests: Sequence, offsets: Sequence[int],
                      positions: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """`append` for several layers at once: `k, v [b, L, T, Hkv, D]` hold the same
        tokens' KV in each of `layers` (a range of L layers), written by one kernel (a
        weight node sends a step's new tokens of every layer in one message)."""
        checks.append_layers(self, layers, requests, offsets, positions, k, v)
        t, a, z = k.shape[2], layers.start, layers.stop
        self.pages.reserve([(rid, off + t) for rid, off in zip(requests, offsets)])
        pt = self.pages.layer_rows(requests, layers)  # every layer's rows in the flat pools
        offs = self.pages.upload(list(offsets), torch.int32, repeat=len(layers))  # [b * L]
        append_kv(self._k_flat, self._v_flat, pt, offs,
                  k.to(self.device).flatten(0, 1), v.to(self.device).flatten(0, 1), check=False)
        for rid, off, pos in zip(requests, offsets, positions):
            req, end = self.requests[rid], off + t
            held = req.lengths[a:z]
            req.lengths[a:z] = ([end] * len(layers) if max(held) <= end  # (a decode step)
                                else [h if h > end else end for h in held])
            if a == 0:  # where global positions sit is the same in every layer
                add_segment(req.segments, int(pos), int(pos) + t, int(off))

    # ---- attention ----------------------------------------------------------------------
    def attend(self, layer: int, requests: Sequence, kv_len: Sequence[int], q: torch.Tensor,
               *, scale: float | None = None, out: torch.Tensor | None = None,
               packed: bool = False, kv_start: Sequence[int] | None = None,
               softcap: float | None = None):
        """Attention of `q [b, Hq, D]` over the first `kv_len[i]` tokens this node holds
        of each request (from its `kv_start[i]`-th on: a sliding window), in one kernel
        launch; `softcap`: scores capped (Gemma2). Returns `(out, lse)`, or with
        `packed=True` one uint8 tensor in the reply layout of kflume/comm/wire.py
        (written into `out` when given)."""
        c, b = self.config, len(requests)
        if q.dim() != 3 or q.shape[0] != b or q.shape[2] != c.head_dim:
            raise ValueError(f"q must be [{b}, Hq, {c.head_dim}]; got {list(q.shape)}")
        if q.dtype != self.dtype:
            raise TypeError(f"q has dtype {q.dtype}; this node holds {c.dtype} KV")
        checks.batch(self, range(layer, layer + 1), requests, kv_len, q.shape[1], kv_start)
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be > 0 or None; got {softcap!r}")
        batch = self.pages.batch(requests, kv_len, kv_start=kv_start)
        res = self.graphs.attend(layer, q.to(self.device), batch, self._scale(scale),
                                 out=out if packed else None, softcap=softcap)
        if packed:
            return res
        o, s = unpack_states(res, q.shape[1], c.head_dim, q.dtype)
        return o.contiguous(), s.contiguous()

    def attend_stream(self, layers: range, requests: Sequence, kv_len: Sequence[int],
                      q: torch.Tensor, out: torch.Tensor, *, scale: float | None = None,
                      hooks: LayerHooks | None = None) -> Callable[[int], None]:
        """Check once what `attend` checks, for every layer of `layers`, and return
        `run(i)`: layer `layers[i]`'s attention of `q[i]` into `out[i]`, in the reply
        layout, with no further checks. `q [len(layers), R, Hq, D]` and
        `out [len(layers), R, row]` (uint8) are a stream's buffers on this node's device,
        reused from stream to stream (on a GPU each layer replays a graph captured on
        them). R >= len(requests): rows past the requests' are padding, attention over
        no tokens (`(0, -inf)`), so that the buffers and graphs stay the same while the
        batch changes. `hooks`: work each layer runs around its kernels (a mailbox
        stream's query fetch and reply delivery). The requests' pages must stay put
        until the last layer ran."""
        checks.stream_buffers(self, layers, q, out, len(requests))
        checks.batch(self, layers, requests, kv_len, q.shape[2])
        batch = self.pages.batch(requests, kv_len, rows=q.shape[1])
        return self.graphs.stream(layers, q, out, batch, self._scale(scale), hooks)

    def capture_ahead(self, layers: range, q: torch.Tensor, out: torch.Tensor, *,
                      scale: float | None = None, hooks: LayerHooks | None = None,
                      now: bool = True) -> int:
        """Capture now every layer's graph that `attend_stream` would replay for streams
        on these buffers (same arguments, less the batch), so that the first such stream
        runs at full speed. Only the kernels run, on lengths of 0 (nothing is read or
        delivered). Each capture holds the node ~0.5 ms: for a node that takes no
        traffic yet. `now=False` (or a node that does not capture while serving) leaves
        them to `capture_pending`. Returns how many graphs were captured (0 on CPU)."""
        checks.stream_buffers(self, layers, q, out, 0)
        checks.layer(self.config, layers[-1])
        if q.shape[2] % self.config.kv_heads:
            raise ValueError(f"q must be [b, Hq, D] with Hq a multiple of the "
                             f"{self.config.kv_heads} KV heads; got Hq={q.shape[2]}")
        return self.graphs.capture_set(layers.start, q, out, self._scale(scale), hooks,
                                       now=now and self.config.capture_while_serving)

    def capture_pending(self, limit: int | None = 2) -> int:
        """Capture up to `limit` (None: all) graphs of shapes and stream layers served
        without one so far (kflume/node/graphs.py). A server calls this at a stream's
        end, an in-process node's owner between steps. Returns how many (0 on CPU)."""
        return self.graphs.capture_pending(limit)

    def _scale(self, scale: float | None) -> float:
        return float(self.config.head_dim**-0.5 if scale is None else scale)

    def warmup(self) -> None:
        """Run append and attend once on a scratch request, so that kernels are compiled
        and loaded before the node takes traffic (a node joining mid-run must not stall
        the step that first uses it). Query heads: `config.q_heads`, else the KV heads."""
        c = self.config
        hq = c.q_heads or c.kv_heads
        tokens = min(2 * c.page_size + 1, c.num_pages * c.page_size - 2)
        if tokens < 1:
            return
        k = torch.randn(1, tokens, c.kv_heads, c.head_dim).to(self.device, self.dtype)
        rid = ("kflume-warmup",)
        for t in (k.shape[1], 1):  # a prefill-sized append, then a decode-sized one
            off = self.pages.held(rid)
            for layer in range(c.layers):
                self.append(layer, [rid], [off], [off], k[:, :t], k[:, :t])
        # a step's tokens of every layer in one call, as a weight node sends them
        kl = k[:, None, :1].expand(1, c.layers, 1, c.kv_heads, c.head_dim).contiguous()
        self.append_layers(range(c.layers), [rid], [tokens + 1], [tokens + 1], kl, kl)
        q = torch.randn(1, hq, c.head_dim).to(self.device, self.dtype)
        self.attend(0, [rid], [tokens + 2], q)
        self.free([rid])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- migration ------------------------------------------------------------------------
    def export_range(self, rid, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of global positions `[start, end)` of a request, all layers:
        `k, v [layers, end - start, Hkv, D]`."""
        req = self.pages.get(rid)
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
        """Take KV `[layers, n, Hkv, D]` of global positions `[start, start + n)` of a
        request. A node keeps each request's tokens in position order (so that the
        tokens before any position are a prefix of its local positions): a range that
        goes before tokens it holds is merged in place, the request's KV rewritten in
        order (a restore or migration; rare)."""
        checks.imported(self, k, v)
        req = self.requests.get(rid)
        if req is not None and len(set(req.lengths)) != 1:
            raise ValueError(f"import into request {rid!r} while its layers hold different "
                             "token counts (a step is in flight)")
        spans = sorted((g0, g1) for g0, g1, _ in req.segments) if req is not None else []
        end = start + k.shape[1]
        if any(g0 < end and start < g1 for g0, g1 in spans):
            raise ValueError(f"import into request {rid!r}: positions [{start}, {end}) "
                             "overlap tokens this node holds")
        if not any(g0 >= end for g0, _ in spans):
            self._append_span(rid, start, k, v)  # after everything held: appended
            return
        parts = [(g0, *self.export_range(rid, g0, g1)) for g0, g1 in spans]
        parts.append((start, k.to(self.device, self.dtype), v.to(self.device, self.dtype)))
        self.free([rid])
        for pos, pk, pv in sorted(parts, key=lambda p: p[0]):
            self._append_span(rid, pos, pk, pv)

    def _append_span(self, rid, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """KV `[layers, n, Hkv, D]` of positions `[start, start + n)` after what the node
        holds of the request, every layer in one kernel."""
        c, n = self.config, k.shape[1]
        off = self.pages.held(rid)
        self.pages.reserve([(rid, off + n)])
        rows = self.pages.layer_rows([rid], range(c.layers))
        offs = self.pages.upload([off], torch.int32, repeat=c.layers)
        append_kv(self._k_flat, self._v_flat, rows, offs, k.to(self.device, self.dtype),
                  v.to(self.device, self.dtype), check=False)
        req = self.requests[rid]
        req.lengths = [off + n] * c.layers
        add_segment(req.segments, start, start + n, off)
