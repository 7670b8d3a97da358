"""TokenRangeRouter: which attention node holds which token range of each request.

Plain Python, no torch: the router keeps, per request, ordered ranges `[start, end)`
each owned by one node, covering `[0, length)`; the last (tail) range takes new tokens.
Edits (add/drain/remove a node, add/finish a request, advance a request by one token)
are queued and applied at the next token boundary, in `begin_step()`, which returns an
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

from collections.abc import Iterable
from dataclasses import dataclass, field

from .placement import (
    CapacityError,
    FillThenLeastLoaded,
    Placement,
    PlacementPolicy,
    RouterError,
)
from .plan import Migration, NodeWork, RequestId, StepPlan, TokenRange

__all__ = [
    "CapacityError",
    "FillThenLeastLoaded",
    "Migration",
    "NodeWork",
    "Placement",
    "PlacementPolicy",
    "RouterError",
    "StepPlan",
    "TokenRange",
    "TokenRangeRouter",
]


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


class TokenRangeRouter:
    """Per-request token ranges -> attention nodes; edits apply at token boundaries.

    Every edit is queued and takes effect in the next `begin_step()`. Costs: `advance`
    O(1); `add_request` O(ranges of the prompt); `begin_step` O(batch x nodes per
    request).
    """

    def __init__(self, policy: PlacementPolicy | None = None) -> None:
        self.policy: PlacementPolicy = policy or FillThenLeastLoaded()
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
        """Move the node's ranges to other nodes (as `Migration`s) and forget it."""
        self._pending.append(("remove_node", node))

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

    def least_loaded(self) -> str | None:
        """The placeable node with the most free tokens (ties: the one that joined first)."""
        return max(self._free, key=self._free.__getitem__, default=None)

    def is_draining(self, node: str) -> bool:
        return self._node(node).draining

    def room(self, node: str, request: RequestId) -> int:
        """Tokens of `request` that `node` can still take: its free pages, plus what is
        left of the request's last page there."""
        s = self._nodes[node]
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

    # ---- the boundary ---------------------------------------------------------------
    def begin_step(self) -> StepPlan:
        """Apply queued edits, reserve a slot for each request's next token, return the plan."""
        prefill: list[RequestId] = []
        migrations: list[Migration] = []
        freed: list[tuple[RequestId, str]] = []
        removed: list[str] = []
        # Advances confirm the previous plan's tokens: apply them before other edits, so
        # that a node removed in the same boundary migrates those tokens too.
        pending = [e for e in self._pending if e[0] == "advance"]
        pending += [e for e in self._pending if e[0] != "advance"]
        self._pending = []
        for i, edit in enumerate(pending):
            try:
                self._apply(edit, prefill, migrations, freed, removed)
            except RouterError:
                self._pending = pending[i + 1 :] + self._pending  # keep the rest queued
                raise
        self._epoch += 1
        # Reserve the slot of this step's token: position = history length.
        for rid, req in self._requests.items():
            if req.ranges and req.ranges[-1].end > req.length:
                continue  # already reserved by an earlier plan not yet advanced
            self._grow(rid, req, 1)
        self._last_plan = _make_plan(self, prefill, migrations, freed, removed)
        return self._last_plan

    # ---- internals --------------------------------------------------------------------
    def _request(self, request: RequestId) -> _Request:
        try:
            return self._requests[request]
        except KeyError:
            raise RouterError(f"unknown request {request!r}") from None

    def _apply(self, edit, prefill, migrations, freed, removed) -> None:
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
            self._remove_node(edit[1], migrations)
            removed.append(edit[1])
        elif op == "add_request":
            _, rid, tokens = edit
            if rid in self._requests:
                raise RouterError(f"request {rid!r} is already routed")
            req = self._requests[rid] = _Request([])
            self._grow(rid, req, tokens)
            req.length = tokens
            prefill.append(rid)
        elif op == "finish_request":
            req = self._request(edit[1])
            for node, n in list(req.held.items()):
                self._hold(node, req, -n)
                freed.append((edit[1], node))
            del self._requests[edit[1]]
        elif op == "advance":
            _, rid, tokens = edit
            req = self._request(rid)
            if req.length + tokens > req.ranges[-1].end:
                self._grow(rid, req, req.length + tokens - req.ranges[-1].end)
            req.length += tokens

    def _hold(self, node: str, req: _Request, n: int) -> None:
        """`req` holds `n` more tokens on `node` (n < 0: fewer); capacity is taken in pages."""
        ps = self._nodes[node].page_size
        old = req.held.get(node, 0)
        new = old + n
        pages = -(-new // ps) - -(-old // ps)
        self._nodes[node].used += pages * ps
        if node in self._free:
            self._free[node] -= pages * ps
        if new:
            req.held[node] = new
        else:
            req.held.pop(node, None)

    def _node(self, node: str) -> _Node:
        try:
            return self._nodes[node]
        except KeyError:
            raise RouterError(f"unknown node {node!r}") from None

    def _grow(self, rid: RequestId, req: _Request, tokens: int) -> None:
        """Extend the request's ranges by `tokens` at the end, as the policy places them."""
        while tokens > 0:
            tail = req.ranges[-1] if req.ranges else None
            node, n, extend = self.policy.place(self, rid, tail, tokens)
            self._node(node)
            room = self.room(node, rid)
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
                start = tail.end if tail else 0
                req.ranges.append(TokenRange(start, start + n, node))
            self._hold(node, req, n)
            tokens -= n

    def _remove_node(self, node: str, migrations: list[Migration]) -> None:
        self._node(node).draining = True
        self._free.pop(node, None)
        for rid, req in self._requests.items():
            if node not in req.held:
                continue
            new_ranges: list[TokenRange] = []
            for r in req.ranges:
                if r.node != node:
                    new_ranges.append(r)
                    continue
                need = len(r)
                dst = self.least_loaded()
                if dst is None or self.room(dst, rid) < need:
                    raise CapacityError(
                        f"cannot remove node {node!r}: no other node has room for tokens "
                        f"[{r.start}, {r.end}) of request {rid!r}"
                    )
                self._hold(dst, req, need)
                new_ranges.append(TokenRange(r.start, r.end, dst))
                migrations.append(Migration(rid, r.start, min(r.end, req.length), node, dst))
            self._hold(node, req, -req.held[node])
            req.ranges = _coalesce(new_ranges)
        del self._nodes[node]


def _history_per_node(ranges: Iterable[TokenRange], length: int) -> dict[str, int]:
    held: dict[str, int] = {}
    for r in ranges:
        if r.start >= length:
            break
        held[r.node] = held.get(r.node, 0) + min(r.end, length) - r.start
    return held


def _coalesce(ranges: list[TokenRange]) -> list[TokenRange]:
    out: list[TokenRange] = []
    for r in ranges:
        if out and out[-1].node == r.node and out[-1].end == r.start:
            out[-1] = TokenRange(out[-1].start, r.end, r.node)
        else:
            out.append(r)
    return out


def _make_plan(router: TokenRangeRouter, prefill, migrations, freed, removed) -> StepPlan:
    """The plan of the router's current state (module docstring)."""
    rows: dict[str, list[int]] = {n: [] for n in router._nodes}
    lens: dict[str, list[int]] = {n: [] for n in router._nodes}
    arows: dict[str, list[int]] = {n: [] for n in router._nodes}
    aoffs: dict[str, list[int]] = {n: [] for n in router._nodes}
    requests, positions, routes = [], [], {}
    for row, (rid, req) in enumerate(router._requests.items()):
        requests.append(rid)
        positions.append(req.length)
        routes[rid] = tuple(req.ranges)
        history = _history_per_node(req.ranges, req.length)
        for node, n in history.items():
            if n > 0:
                rows[node].append(row)
                lens[node].append(n)
        tail = req.ranges[-1].node
        arows[tail].append(row)
        aoffs[tail].append(history.get(tail, 0))
    work = tuple(
        NodeWork(n, tuple(rows[n]), tuple(lens[n]), tuple(arows[n]), tuple(aoffs[n]))
        for n in router._nodes
    )
    return StepPlan(router._epoch, tuple(requests), tuple(positions), work, routes,
                    tuple(prefill), tuple(migrations), tuple(freed), tuple(removed))
