"""Session: one generation's requests on a cluster, as kflume.patch runs it.

A session is one request per batch row. Its first forward (the prompt) adds the
requests to the router and scatters the prompt's KV; each decode step is one token
boundary. It keeps every token it was fed (`tokens`, per row, without padding): a span
of a lost node is recomputed from them (`recompute`, the cluster's recompute callback
while `generate()` runs) by a forward of the model over the span, whose attention goes
through `RemoteAttention.extend`.
"""

from __future__ import annotations

import itertools
import logging

import torch

__all__ = ["Session"]

_ids = itertools.count()
log = logging.getLogger("kflume.hf")


class Session:
    def __init__(self, cluster, num_layers: int) -> None:
        self.cluster, self.num_layers = cluster, num_layers
        self.id = next(_ids)
        self.requests: list[str] = []
        self.tokens: list[list[int]] = []  # per row: every token fed so far, no padding
        self.model = None  # the model generating (set while generate() runs)
        self.decoding = False  # a decode step ran: its tokens are confirmed at the next one
        self.closed = False

    # ---- what the model is fed (kflume/hf/patch.py's forward hook) --------------------
    def record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """The rows' tokens of a forward: the prompt (its padding left out), or each
        row's next token."""
        ids = input_ids.tolist()
        if not self.tokens:
            s = input_ids.shape[1]
            mask = (attention_mask[:, -s:].bool().tolist() if attention_mask is not None
                    else [[True] * s for _ in ids])
            self.tokens = [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]
        else:
            for row, new in zip(self.tokens, ids):
                row.extend(new)

    # ---- boundaries ----------------------------------------------------------------------
    def prefill(self, lengths: list[int]) -> None:
        if self.requests:
            raise NotImplementedError(
                "kflume: a multi-token forward on top of a history (chunked prefill, assisted "
                "decoding, a continued conversation) is not supported; start a new generation")
        self.requests = [f"s{self.id}-r{b}" for b in range(len(lengths))]
        for rid, n in zip(self.requests, lengths):
            self.cluster.router.add_request(rid, n)
        self._boundary()

    def decode_step(self) -> None:
        if not self.requests:
            raise RuntimeError("kflume: decode step before the prompt was prefilled")
        if self.decoding:
            for rid in self.requests:
                self.cluster.router.advance(rid)
        self._boundary()
        self.decoding = True

    def _boundary(self) -> None:
        self.cluster.end_step()  # raise any refusal of the last step's appends
        plan = self.cluster.begin_step()
        if list(plan.requests) != self.requests:
            raise RuntimeError(
                "kflume: the cluster routes requests of another generation; run one "
                "generation per cluster at a time (or close the other's KflumeCache)")

    # ---- recovery ---------------------------------------------------------------------------
    def recompute(self, restore) -> None:
        """Tokens `[restore.start, restore.end)` of a request lost with a node: the
        model's forward over them, on top of the history before them (kflume/hf/cache.py's
        restore cache), which writes their KV where the router placed them."""
        from .cache import cache_keyword, restore_cache

        if self.model is None or restore.request not in self.requests:
            raise RuntimeError(f"kflume: no generation of this session can recompute "
                               f"request {restore.request!r}")
        row = self.requests.index(restore.request)
        ids = self.tokens[row][restore.start : restore.end]
        if len(ids) != restore.end - restore.start:
            raise RuntimeError(f"kflume: request {restore.request!r} has no tokens "
                               f"[{restore.start}, {restore.end}) to recompute from")
        dev = next(self.model.parameters()).device
        ids = torch.tensor([ids], device=dev)
        pos = torch.arange(restore.start, restore.end, device=dev)[None]
        cache = restore_cache(self, self.model.config, restore.request, restore.start)
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=pos, use_cache=True,
                       **{cache_keyword(self.model): cache})

    def close(self) -> None:
        """Free the session's KV on the nodes (at a boundary of its own)."""
        if self.closed or not self.requests:
            self.closed = True
            return
        self.closed = True
        try:
            self.cluster.end_step(wait=True)
        except Exception as e:  # noqa: BLE001 - a node gone or refusing: free the rest
            log.warning("closing session %d: %s", self.id, e)
        for rid in self.requests:
            self.cluster.router.finish_request(rid)
        self.cluster.begin_step()
