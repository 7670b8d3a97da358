"""Session: the requests of one KflumeCache on a cluster, across generate() calls.

A session is one request per batch row. Every forward with its cache is one token
boundary of the cluster, of one of three kinds (chosen at layer 0 by the attention
function, kflume/hf/attention.py):

- `prefill`: the first forward, the prompt: the requests are added to the router and
  the prompt's KV, computed locally, is scattered to the nodes;
- `decode_step`: one token per row on top of the history: attention on the nodes;
- `extend`: several tokens on top of the history (a later turn's new input, a
  speculation being checked): each row's real tokens are a span (`TokenRangeRouter.extend`)
  that attends over the history on the nodes (`RemoteAttention.extend`).

Between `generate()` calls the requests are parked (`park`): their KV stays on the
nodes, nothing of it on the weight node, and the next call resumes them; with a time to
live, an idle session's KV is freed (kflume/weight/parking.py). `crop` drops a row's
last tokens (assisted decoding). The session keeps every token it was fed (`tokens`,
per row, without padding): a span of a lost node is recomputed from them by a forward
of the model (`recompute`).
"""

from __future__ import annotations

import itertools
import logging
import weakref

import torch

from ..weight.parking import Expired

__all__ = ["Session", "recompute"]

_ids = itertools.count()
_by_request: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
log = logging.getLogger("kflume.hf")


class Session:
    def __init__(self, cluster, num_layers: int, ttl: float | None = None) -> None:
        self.cluster, self.num_layers, self.ttl = cluster, num_layers, ttl
        self.id = next(_ids)
        self.requests: list[str] = []
        self.tokens: list[list[int]] = []  # per row: every real token fed, in order
        self.real: list[list[bool]] = []  # per row: per position fed, a real token or padding
        self.kind = ""  # this forward's: "prefill", "decode" or "extend" (set at layer 0)
        self.windows: dict[int, int | None] = {}  # per layer, its sliding window
        self.spans: dict[str, int] = {}  # request -> start of this forward's span (extend)
        self.decoding = False  # a decode step ran: its tokens are confirmed at the next one
        self.parked = False
        self.closed = False

    # ---- what the model is fed (kflume/hf/patch.py's forward hook) --------------------
    def record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """The rows' tokens of a forward, with which of them are padding."""
        s = input_ids.shape[1]
        mask = (attention_mask[:, -s:].bool().tolist() if attention_mask is not None
                else [[True] * s for _ in range(input_ids.shape[0])])
        if not self.tokens:
            self.tokens = [[] for _ in mask]
            self.real = [[] for _ in mask]
        for row, real, ids, keep in zip(self.tokens, self.real, input_ids.tolist(), mask):
            row.extend(t for t, m in zip(ids, keep) if m)
            real.extend(keep)

    # ---- boundaries ----------------------------------------------------------------------
    def prefill(self, lengths: list[int]) -> None:
        self.usable()
        self.requests = [f"s{self.id}-r{b}" for b in range(len(lengths))]
        for rid, n in zip(self.requests, lengths):
            self.cluster.router.add_request(rid, n)
            _by_request[rid] = self
        self._boundary()

    def decode_step(self) -> None:
        self.usable()
        if self.parked:
            self._resume([0] * len(self.requests))
        elif self.decoding:
            for rid in self.requests:
                self.cluster.router.advance(rid)
        plan = self._boundary()
        self.decoding = True
        window = self._window()
        if window is not None:  # every layer slides: what all windows passed is freed
            for rid, p in zip(plan.requests, plan.positions):
                if p - window + 1 > 0:
                    self.cluster.router.forget_before(rid, p - window + 1)

    def _window(self) -> int | None:
        """The widest window if every layer has one, else None."""
        w = list(self.windows.values())
        if len(w) < self.num_layers or None in w:
            return None
        return max(w)

    def extend(self, lengths: list[int]) -> None:
        """`lengths[i]` real tokens of row i follow its history in this forward."""
        self.usable()
        self._settle()
        if self.parked:
            self._resume(lengths)
        else:
            for rid, n in zip(self.requests, lengths):
                self.cluster.router.extend(rid, n)
        plan = self._boundary()
        self.spans = {s.request: s.start for s in plan.spans}

    def crop(self, tokens: int) -> None:
        """Drop the last `tokens` positions of every row (padding among them included)."""
        self.usable()
        self._settle()
        for i, rid in enumerate(self.requests):
            real = sum(self.real[i][-tokens:])
            del self.real[i][-tokens:]
            if real:
                del self.tokens[i][-real:]
            self.cluster.router.truncate(rid, len(self.tokens[i]))

    def park(self) -> None:
        """The end of a generate() call: the requests keep their KV on the nodes and leave
        the steps until the next call (or their time to live runs out)."""
        if self.closed or self.parked or not self.requests:
            return
        self._settle()
        self.cluster.end_step(wait=True)
        self.cluster.parking.park(self.requests, self.ttl)
        self.cluster.begin_step()
        self.cluster.end_step(wait=True)  # the nodes' truncations done when the call returns
        self.parked = True

    def _resume(self, lengths: list[int]) -> None:
        try:
            for rid, n in zip(self.requests, lengths):
                self.cluster.parking.resume(rid, n)
        except Expired as e:
            self.close()
            raise Expired(e.request, e.idle, e.ttl, what="this KflumeCache's session") from None
        self.parked = False

    def _settle(self) -> None:
        """Confirm the last decode step's tokens (they are history from now on)."""
        if self.decoding:
            for rid in self.requests:
                self.cluster.router.advance(rid)
            self.decoding = False

    def usable(self) -> None:
        if self.closed:
            raise RuntimeError("kflume: this KflumeCache is closed (its KV was freed); make a "
                               "new one")

    def _boundary(self):
        self.cluster.end_step()  # raise any refusal of the last step's appends
        plan = self.cluster.begin_step()
        if list(plan.requests) != self.requests:
            raise RuntimeError(
                "kflume: the cluster routes requests of another generation; run one "
                "generation per cluster at a time (others' caches may stay parked)")
        return plan

    # ---- recovery ---------------------------------------------------------------------------
    def recompute(self, restore, model) -> None:
        """Tokens `[restore.start, restore.end)` of a request lost with a node: `model`'s
        forward over them, on top of the history before them (kflume/hf/cache.py's
        restore cache), which writes their KV where the router placed them."""
        from .cache import cache_keyword, restore_cache

        row = self.requests.index(restore.request)
        ids = self.tokens[row][restore.start : restore.end]
        if len(ids) != restore.end - restore.start:
            raise RuntimeError(f"kflume: request {restore.request!r} has no tokens "
                               f"[{restore.start}, {restore.end}) to recompute from")
        dev = next(model.parameters()).device
        ids = torch.tensor([ids], device=dev)
        pos = torch.arange(restore.start, restore.end, device=dev)[None]
        cache = restore_cache(self, model.config, restore.request, restore.start)
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, use_cache=True,
                  **{cache_keyword(model): cache})

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
            expired = False
            try:
                self.cluster.parking.check(rid)
            except Expired:
                expired = True
            self.cluster.parking.finished(rid)
            if not expired and rid in self.cluster.router.requests():
                self.cluster.router.finish_request(rid)
        self.cluster.begin_step()


def recompute(model):
    """The cluster's recompute callback while `model` generates: the span of whichever
    session's request it is (a parked session's too)."""

    def run(restore) -> None:
        session = _by_request.get(restore.request)
        if session is None:
            raise RuntimeError(f"kflume: no session of this process holds request "
                               f"{restore.request!r}, so its lost tokens cannot be recomputed")
        session.recompute(restore, model)

    return run
