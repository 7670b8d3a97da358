"""PageTable: an attention node's page allocator and the page lists of its requests.

Every layer has a pool of `num_pages` pages of `page_size` tokens; a token takes the
same page and slot in every layer, so one allocator serves all layers. A request's
tokens on a node are its first `n` local positions (attention does not depend on
order); local position `t` lives in page `pages[t // page_size]` at slot
`t % page_size` (docs/conventions.md).

The page lists also live on the device, one row per request in an int32 table
`[rows, max_pages]` that the kernels read. Device index tensors of recent batches are
cached, keyed by the table's epoch (bumped when the table is reallocated) and each
request's stamp (a fresh counter value whenever its row changes, so a freed id that
comes back in its old row is still a new key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["DeviceBatch", "NodeCapacityError", "PageTable", "RequestKV", "UnknownRequestError"]

_NP = {torch.int32: np.int32, torch.long: np.int64}


class NodeCapacityError(RuntimeError):
    """The node has no free pages for what was asked (the router should have prevented it)."""


class UnknownRequestError(KeyError):
    """A request this node holds nothing of."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


@dataclass(slots=True)
class RequestKV:
    """What a node holds of one request."""

    row: int  # its row of the device page table
    lengths: list[int]  # per layer: tokens written (local positions 0..n-1)
    pages: list[int] = field(default_factory=list)
    stamp: int = 0  # the table's counter when this row last changed (cache key)
    segments: list[list[int]] = field(default_factory=list)  # [global_start, global_end, local]

    @property
    def length(self) -> int:
        """Tokens held in every layer."""
        return min(self.lengths)


@dataclass(frozen=True, slots=True)
class DeviceBatch:
    """A batch's page-table rows and per-request ints on the device (kernel inputs)."""

    page_table: torch.Tensor  # int32 [rows, pages]
    kv_len: torch.Tensor  # int32 [rows]: tokens attended from kv_start on
    kv_start: torch.Tensor  # int32 [rows]: the first local position attended (0 but in windows)


class PageTable:
    """Pages of `num_pages` shared by `layers` layers, and each request's page list."""

    def __init__(self, num_pages: int, page_size: int, layers: int,
                 device: torch.device) -> None:
        self.num_pages, self.page_size, self.layers = num_pages, page_size, layers
        self.device = device
        # a request holds pages, but one without tokens yet holds none: bounded apart
        self.max_requests = num_pages + 1024
        self.free_pages: list[int] = list(range(num_pages - 1, -1, -1))
        self.requests: dict[object, RequestKV] = {}
        self._free_rows: list[int] = []
        self.table = torch.zeros(8, 8, dtype=torch.int32, device=device)  # [rows, pages]
        self._epoch = 0
        self._stamp = 0
        self._cache: dict[tuple, object] = {}  # device index tensors of recent batches
        # page p of layer L in the pools viewed as one: L * num_pages + p
        self._layer_base = torch.arange(layers, dtype=torch.int32, device=device) * num_pages

    def get(self, rid) -> RequestKV:
        try:
            return self.requests[rid]
        except KeyError:
            raise UnknownRequestError(f"unknown request {rid!r} on this node") from None

    def held(self, rid) -> int:
        """Tokens of `rid` in its fullest layer (0 for an unknown request)."""
        req = self.requests.get(rid)
        return max(req.lengths) if req is not None else 0

    # ---- allocation -------------------------------------------------------------------
    def reserve(self, wants: Sequence[tuple[object, int]]) -> None:
        """Give each (request, tokens) pages for `tokens` local positions (creating the
        request if new); all or none."""
        ps, held = self.page_size, self.requests
        need, known = 0, True
        for rid, tokens in wants:
            req = held.get(rid)
            known = known and req is not None
            need += max(0, -(-tokens // ps) - (len(req.pages) if req is not None else 0))
        if need == 0 and known:  # (a decode step's append, 15 times in 16)
            return
        if not known:
            new = len({rid for rid, _ in wants if rid not in held})
            if len(held) + new > self.max_requests:
                raise NodeCapacityError(f"node is full: it holds {len(held)} requests, at most "
                                        f"{self.max_requests}; {new} more asked")
        if need > len(self.free_pages):
            raise NodeCapacityError(
                f"node is full: {need} more pages needed, {len(self.free_pages)} free of "
                f"{self.num_pages} ({ps} tokens each)")
        for rid, tokens in wants:
            req = held.get(rid) or self._new_request(rid)
            want = -(-tokens // ps)
            if want > self.table.shape[1]:
                self._grow(cols=max(2 * self.table.shape[1], want))
            new = [self.free_pages.pop() for _ in range(want - len(req.pages))]
            if new:
                col = len(req.pages)
                req.pages.extend(new)
                self.table[req.row, col : col + len(new)] = self.upload(new, torch.int32)
                self._stamp += 1
                req.stamp = self._stamp

    def free(self, requests: Sequence) -> int:
        """Drop requests and return their pages; unknown ids are ignored. Returns the
        tokens freed."""
        freed = 0
        for rid in requests:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            freed += max(req.lengths)
            self.free_pages.extend(reversed(req.pages))
            self._free_rows.append(req.row)  # (a request made there gets a new stamp)
        return freed

    def truncate(self, rid, n: int) -> int:
        """Keep the request's first `n` local positions in every layer; its pages past
        them go back (its segments end at `n`). Returns the tokens dropped."""
        req = self.requests.get(rid)
        if req is None:
            return 0
        dropped = max(req.lengths) - n
        req.lengths = [min(h, n) for h in req.lengths]
        keep = -(-n // self.page_size)
        if keep < len(req.pages):
            self.free_pages.extend(reversed(req.pages[keep:]))
            del req.pages[keep:]
            self._stamp += 1
            req.stamp = self._stamp
        segs = []
        for g0, g1, local in req.segments:
            if local < n:
                segs.append([g0, min(g1, g0 + n - local), local])
        req.segments[:] = segs
        return max(dropped, 0)

    def _new_request(self, rid) -> RequestKV:
        row = self._free_rows.pop() if self._free_rows else len(self.requests)
        if row >= self.table.shape[0]:
            self._grow(rows=max(2 * self.table.shape[0], row + 1))
        self._stamp += 1
        req = self.requests[rid] = RequestKV(row, [0] * self.layers, stamp=self._stamp)
        return req

    def _grow(self, rows: int | None = None, cols: int | None = None) -> None:
        r0, c0 = self.table.shape
        table = torch.zeros(rows or r0, cols or c0, dtype=torch.int32, device=self.device)
        table[:r0, :c0] = self.table
        self.table = table
        self._epoch += 1

    # ---- device rows --------------------------------------------------------------------
    def batch(self, requests: Sequence, kv_len: Sequence[int], rows: int | None = None,
              kv_start: Sequence[int] | None = None) -> DeviceBatch:
        """The batch's page-table rows and ranges on the device, cached: every layer of
        a step names the same batch, so the uploads happen once a step. A request's range
        is its local positions `[kv_start[i], kv_len[i])` (kv_start: 0 by default). `rows`
        (>= len(requests)): padded with zero rows and lengths up to that many."""
        rows = len(requests) if rows is None else rows
        starts = tuple(kv_start) if kv_start is not None else None

        def make():
            pad = [0] * (rows - len(requests))
            first = list(starts) if starts is not None else [0] * len(requests)
            lens = self.upload([n - a for n, a in zip(kv_len, first)] + pad, torch.int32)
            pt = self.rows(requests)
            if pad:
                pt = torch.cat((pt, pt.new_zeros(len(pad), pt.shape[1])))
            start = (self.upload(first + pad, torch.int32) if starts is not None
                     else torch.zeros_like(lens))
            return DeviceBatch(pt, lens, start)

        return self._cached((self._key(requests), tuple(kv_len), rows, starts), make)

    def layer_rows(self, requests: Sequence, layers: range) -> torch.Tensor:
        """The requests' rows in each of `layers`, shifted to that layer's pages in the
        pools viewed as one: `[b * L, pages]`, request-major (an append's page table),
        cached until a row changes (a new page every page_size tokens)."""
        return self._cached(
            ("layers", self._key(requests), layers.start, layers.stop),
            lambda: (self.rows(requests)[:, None, :]
                     + self._layer_base[layers.start : layers.stop, None]).flatten(0, 1))

    def rows(self, requests: Sequence) -> torch.Tensor:
        """The requests' rows of the device table, in order: int32 `[b, pages]`."""
        index = self.upload([self.requests[r].row for r in requests], torch.long)
        return self.table.index_select(0, index)

    def _key(self, requests: Sequence) -> tuple:
        held = self.requests
        return (self._epoch, tuple(requests), tuple(held[r].stamp for r in requests))

    def _cached(self, key: tuple, make: Callable[[], object]):
        """The device tensors of the last 16 keys made."""
        hit = self._cache.get(key)
        if hit is None:
            hit = make()
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = hit
        return hit

    def upload(self, values: list[int], dtype: torch.dtype, repeat: int = 1) -> torch.Tensor:
        """A few host ints (each `repeat` times in a row) on the device, without the host
        waiting for the GPU: a copy from pageable memory waits for every kernel queued on
        the stream before it (CUDA's rule), so a node handling an append would sit behind
        the attention it queued for another micro-batch; from pinned memory the copy is
        queued like a kernel (torch keeps the pinned block until it ran)."""
        a = np.asarray(values, dtype=_NP[dtype])  # (numpy: a few us where torch takes 10+)
        t = torch.from_numpy(np.repeat(a, repeat) if repeat > 1 else a)
        if self.device.type == "cpu":
            return t
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)
