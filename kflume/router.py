"""TokenRangeRouter: which attention node holds which token range of each request.

Plain Python, no torch: the router keeps, per request, ordered ranges `[start, end)`
each owned by one node, covering `[0, length)`; the last (tail) range takes new tokens.
Edits (add/drain/remove a node, add/finish a request, advance a request by one token;
park, extend or truncate one between turns: kflume/turns.py) are queued and applied at
the next token boundary, in `begin_step()`, which returns an
immutable `StepPlan` (kflume/plan.py) with a new epoch. Tensors appear only when a plan
is materialised: small index tensors per step in kflume/weight/remote.py, fixed device
buffers rewritten in place for a captured step in kflume/graph/buffers.py. Where new
tokens go is the placement policy's choice (kflume/placement.py).

A decode step, as the weight node sees it:

    plan = router.begin_step()        # boundary: apply edits, place this step's tokens
    ... attend: node n gets q of plan.nodes[n].rows and attends over its kv_len tokens;
    ... append: each request's new k, v go to plan.append_node[row] at its offset
    for rid in plan.requests: router.advance(rid)   # confirmed at the next boundary
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import evacuate, replicas, turns
from .edit_order import order_edits
from .placement import (
    CapacityError,
    FillThenLeastLoaded,
    Placement,
    PlacementPolicy,
    RouterError,
)
from .plan import Migration, NodeWork, RequestId, Span, StepPlan, TokenRange

__all__ = ["CapacityError", "FillThenLeastLoaded", "Migration", "NodeWork", "Placement",
           "PlacementPolicy", "RouterError", "Span", "StepPlan", "TokenRange", "TokenRangeRouter"]

@dataclass(slots=True)
class _Node:
    capacity: int  # tokens, a multiple of page_size
    page_size: int = 1  # a request's tokens on a node take whole pages
    used: int = 0  # tokens of capacity taken, counted in whole pages per request
    draining: bool = False


@dataclass(slots=True)
class _Request:
    ranges: list[TokenRange]
    length: int = 0  # tokens whose KV the nodes hold (history)
    held: dict[str, int] = field(default_factory=dict)  # tokens per node
    parked: bool = False  # between turns: KV kept, no part in steps
    pairs: dict[str, str | None] = field(default_factory=dict)  # replicas: primary -> replica


@dataclass(slots=True)
class _Boundary:
    """What the edits of one boundary did, for its plan."""

    prefill: list = field(default_factory=list)
    migrations: list = field(default_factory=list)
    freed: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    restores: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    spans: list = field(default_factory=list)
    truncated: list = field(default_factory=list)
    parked: list = field(default_factory=list)
    unreplicated: list = field(default_factory=list)
    leaving: set = field(default_factory=set)  # nodes lost or removed at this boundary


class TokenRangeRouter:
    """Per-request token ranges -> attention nodes; edits apply at token boundaries.

    Every edit is queued and takes effect in the next `begin_step()`. Costs: `advance`
    O(1); `add_request` O(ranges of the prompt); `begin_step` O(batch x nodes per
    request). `replicas=2`: every token on two nodes, so that a node's loss recomputes
    nothing (kflume/replicas.py).
    """

    def __init__(self, policy: PlacementPolicy | None = None, replicas: int = 1) -> None:
        if replicas not in (1, 2):
            raise ValueError(f"replicas must be 1 or 2 (copies of each token); got {replicas}")
        self.policy: PlacementPolicy = policy or FillThenLeastLoaded()
        self.replicas = replicas
        self._unpaired: dict[RequestId, bool] = {}  # requests with one copy: named yet?
        self.replica_counts = {"promoted": 0, "copied": 0}
        self._nodes: dict[str, _Node] = {}
        self._free: dict[str, int] = {}  # free tokens of each placeable (not draining) node
        self._requests: dict[RequestId, _Request] = {}
        self._pending: list[tuple] = []
        self._epoch = 0
        self._last_plan: StepPlan | None = None

    # ---- edits: queued, applied at the next boundary -------------------------------
    def add_node(self, node: str, capacity_tokens: int, page_size: int = 1) -> None:
        """A node with room for `capacity_tokens` tokens, which it stores in pages of
        `page_size` tokens per request (so a request's last page on it may be part empty)."""
        if page_size < 1 or capacity_tokens < page_size:
            raise ValueError(f"capacity_tokens must be >= page_size >= 1; got "
                             f"{capacity_tokens} and {page_size}")
        self._pending.append(("add_node", node, capacity_tokens, page_size))

    def drain_node(self, node: str) -> None:
        """Place no new tokens on `node`; its ranges stay until it is removed."""
        self._pending.append(("drain_node", node))

    def remove_node(self, node: str) -> None:
        """Move the node's ranges to other nodes (as `Migration`s) and forget it; refused
        whole (CapacityError) if the others have no room for them."""
        self._pending.append(("remove_node", node))

    def lose_node(self, node: str) -> None:
        """The node is gone with its KV: place its ranges on other nodes, to be recomputed
        there (as `Restore`s); requests that no node has room for are dropped (the plan's
        `dropped`)."""
        self._pending.append(("lose_node", node))

    def add_request(self, request: RequestId, prompt_tokens: int) -> None:
        """A new request whose first `prompt_tokens` tokens' KV will be scattered."""
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0; got {prompt_tokens}")
        self._pending.append(("add_request", request, prompt_tokens))

    def finish_request(self, request: RequestId) -> None:
        self._pending.append(("finish_request", request))

    def advance(self, request: RequestId, tokens: int = 1) -> None:
        """The request's last planned token(s) were appended: they become history."""
        self._pending.append(("advance", request, tokens))

    def park(self, request: RequestId) -> None:
        """Between turns: keep the request's KV on the nodes, but leave it out of steps
        (no row, no reserved slot) until `extend` resumes it."""
        self._pending.append(("park", request))

    def extend(self, request: RequestId, tokens: int) -> None:
        """`tokens` new tokens follow the request's history as a span whose KV the caller
        writes in the step (`StepPlan.spans`); resumes a parked request (tokens may be 0)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0; got {tokens}")
        self._pending.append(("extend", request, tokens))

    def truncate(self, request: RequestId, length: int) -> None:
        """Keep the request's first `length` tokens (nodes told: `StepPlan.truncated`)."""
        self._pending.append(("truncate", request, length))

    def forget_before(self, request: RequestId, position: int) -> None:
        """Free the request's first ranges before `position` (out of every window)."""
        self._pending.append(("forget_before", request, position))

    # ---- read-only views (for policies and callers) --------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def last_plan(self) -> StepPlan | None:
        """The plan the last `begin_step()` returned."""
        return self._last_plan

    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    def placeable_nodes(self) -> tuple[str, ...]:
        return tuple(self._free)

    def least_loaded(self, request: RequestId | None = None) -> str | None:
        """The placeable node with the most free tokens (ties: the one that joined first);
        with replicas and a `request`, among the nodes with room for it."""
        nodes = self._free
        if request is not None and self.replicas > 1 and request in self._requests:
            nodes = [n for n in self._free if self.room(n, request) > 0]
        return max(nodes, key=self._free.__getitem__, default=None)

    def is_draining(self, node: str) -> bool:
        return self._node(node).draining

    def can_remove(self, node: str) -> bool:
        """Whether `remove_node(node)` would succeed now (a page to spare per request)."""
        return node in self._nodes and evacuate.fits(self, node)

    def room(self, node: str, request: RequestId) -> int:
        """Tokens of `request` that `node` can still take: its free pages, plus what is
        left of the request's last page there."""
        s = self._nodes[node]
        if self.replicas > 1 and request in self._requests:
            return replicas.room(self, node, self._requests[request])
        held = self._requests[request].held.get(node, 0) if request in self._requests else 0
        return s.capacity - s.used + (-held) % s.page_size

    def free_tokens(self, node: str) -> int:
        s = self._nodes[node]
        return s.capacity - s.used

    def node_load(self, node: str) -> int:
        return self._nodes[node].used

    def requests(self) -> tuple[RequestId, ...]:
        return tuple(self._requests)

    def ranges(self, request: RequestId) -> tuple[TokenRange, ...]:
        return tuple(self._request(request).ranges)

    def length(self, request: RequestId) -> int:
        return self._request(request).length

    def is_parked(self, request: RequestId) -> bool:
        return self._request(request).parked

    def replica_ranges(self, request: RequestId) -> tuple[TokenRange, ...]:
        """The request's second copies (empty without replicas): kflume/replicas.py."""
        return replicas.copies(self._request(request))

    def replica_stats(self) -> replicas.ReplicaStats:
        """Copies held, tokens with a single copy, tokens promoted and copied."""
        return replicas.stats(self)

    # ---- the boundary ---------------------------------------------------------------
    def begin_step(self, only: tuple[str, ...] | None = None) -> StepPlan:
        """Apply queued edits, reserve a place for each request's next token, return the
        plan. An edit the router cannot apply raises RouterError / CapacityError naming
        it, leaves the router as before that edit, and keeps the edits after it queued.
        `only`: apply only the edits of these kinds (e.g. `("lose_node",)` for a plan made
        in the middle of a step), the others stay queued."""
        b = _Boundary()
        chosen = [e for e in self._pending if only is None or e[0] in only]
        kept = [e for e in self._pending if only is not None and e[0] not in only]
        pending = order_edits(chosen)
        self._pending = kept
        evacuate.leaving(self, pending, b)
        for i, edit in enumerate(pending):
            try:
                self._apply(edit, b)
            except RouterError:
                self._pending = pending[i + 1 :] + self._pending  # keep the rest queued
                raise
        self._epoch += 1
        # Reserve the place of this step's token: position = history length.
        for rid, req in self._requests.items():
            if req.parked or (req.ranges and req.ranges[-1].end > req.length):
                continue  # parked, or reserved by an earlier plan not yet advanced
            self._grow(rid, req, 1)
        if self.replicas > 1 and only is None:
            replicas.rereplicate(self, b)
        self._last_plan = _make_plan(self, b)
        return self._last_plan

    # ---- internals --------------------------------------------------------------------
    def _request(self, request: RequestId) -> _Request:
        try:
            return self._requests[request]
        except KeyError:
            raise RouterError(f"unknown request {request!r}") from None

    def _apply(self, edit, b: _Boundary) -> None:
        op = edit[0]
        if op == "add_node":
            _, node, cap, page_size = edit
            if node in self._nodes:
                raise RouterError(f"node {node!r} is already in the routing table")
            cap -= cap % page_size
            self._nodes[node] = _Node(cap, page_size)
            self._free[node] = cap
        elif op == "drain_node":
            self._node(edit[1]).draining = True
            self._free.pop(edit[1], None)
        elif op == "remove_node":
            evacuate.remove(self, edit[1], b)
            b.removed.append(edit[1])
        elif op == "lose_node":
            evacuate.lose(self, edit[1], b)
            b.lost.append(edit[1])
        elif op == "add_request":
            _, rid, tokens = edit
            if rid in self._requests:
                raise RouterError(f"request {rid!r} is already routed")
            req = self._requests[rid] = _Request([])
            try:
                self._grow(rid, req, tokens)
            except RouterError:  # refused whole: its capacity given back
                self._release(rid)
                raise
            req.length = tokens
            b.prefill.append(rid)
        elif op == "finish_request":
            self._request(edit[1])
            b.freed += [(edit[1], node) for node in self._release(edit[1])]
        else:  # advance, park, extend, truncate, forget_before
            turns.apply(self, edit, b)

    def _release(self, rid: RequestId) -> list[str]:
        """Forget a request, giving its capacity back; the nodes that held some of it."""
        req = self._requests.pop(rid)
        nodes = list(req.held)
        for node, n in list(req.held.items()):
            self._hold(node, req, -n)
        return nodes

    def _hold(self, node: str, req: _Request, n: int) -> None:
        """`req` holds `n` more tokens on `node` (n < 0: fewer); capacity is taken in pages."""
        _hold(self, node, req, n)

    def _node(self, node: str) -> _Node:
        try:
            return self._nodes[node]
        except KeyError:
            raise RouterError(f"unknown node {node!r}") from None

    def _grow(self, rid: RequestId, req: _Request, tokens: int) -> None:
        """Extend the request's ranges by `tokens` at the end, as the policy places them."""
        _grow(self, rid, req, tokens)


def _hold(router: TokenRangeRouter, node: str, req: _Request, n: int) -> None:
    ps = router._nodes[node].page_size
    old = req.held.get(node, 0)
    new = old + n
    pages = -(-new // ps) - -(-old // ps)
    router._nodes[node].used += pages * ps
    if node in router._free:
        router._free[node] -= pages * ps
    if new:
        req.held[node] = new
    else:
        req.held.pop(node, None)


def _grow(router: TokenRangeRouter, rid: RequestId, req: _Request, tokens: int) -> None:
    while tokens > 0:
        tail = req.ranges[-1] if req.ranges else None
        node, n, extend = router.policy.place(router, rid, tail, tokens)
        router._node(node)
        room = router.room(node, rid)
        if not 1 <= n <= min(tokens, room):
            raise CapacityError(
                f"placement policy put {n} tokens of request {rid!r} on node {node!r}, "
                f"which has room for {room}"
            )
        if extend and (tail is None or node != tail.node):
            raise RouterError(f"placement policy extended a tail range that is not on {node!r}")
        if extend:
            req.ranges[-1] = TokenRange(tail.start, tail.end + n, node)
        else:
            start = tail.end if tail else req.length  # (0, or past forgotten tokens)
            req.ranges.append(TokenRange(start, start + n, node))
        router._hold(node, req, n)
        if router.replicas > 1:
            replicas.follow(router, rid, req, node, n)
        tokens -= n


def _make_plan(router: TokenRangeRouter, b: _Boundary) -> StepPlan:
    """The plan of the router's current state (module docstring)."""
    rows: dict[str, list[int]] = {n: [] for n in router._nodes}
    lens: dict[str, list[int]] = {n: [] for n in router._nodes}
    arows: dict[str, list[int]] = {n: [] for n in router._nodes}
    aoffs: dict[str, list[int]] = {n: [] for n in router._nodes}
    requests, positions, routes, copies = [], [], {}, {}
    for rid, req in router._requests.items():
        routes[rid] = tuple(req.ranges)
        if req.pairs:
            copies[rid] = replicas.copies(req)
        if req.parked:
            continue
        row = len(requests)
        requests.append(rid)
        positions.append(req.length)
        history = turns.written(req.ranges, req.length)
        for node, n in history.items():
            if n > 0:
                rows[node].append(row)
                lens[node].append(n)
        tail = req.ranges[-1].node
        for node in (tail, req.pairs.get(tail)):  # the tail's replica stores the token too
            if node is not None:
                arows[node].append(row)
                aoffs[node].append(history.get(tail, 0))
    work = tuple(
        NodeWork(n, tuple(rows[n]), tuple(lens[n]), tuple(arows[n]), tuple(aoffs[n]))
        for n in router._nodes
    )
    return StepPlan(router._epoch, tuple(requests), tuple(positions), work, routes,
                    tuple(b.prefill), tuple(b.migrations), tuple(b.freed), tuple(b.removed),
                    tuple(b.restores), tuple(b.lost), tuple(b.dropped), tuple(b.spans),
                    tuple(b.truncated), tuple(b.parked), copies, tuple(b.unreplicated))
