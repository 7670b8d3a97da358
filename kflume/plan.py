"""One decode step's routing, as data: what the router hands the weight node.

`StepPlan` is immutable and built by `TokenRangeRouter.begin_step()` (kflume/router.py)
at a token boundary; RemoteAttention (eager) and CapturedRemoteAttention (graph buffers)
turn it into tensors. Positions and ranges follow docs/conventions.md.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["Migration", "NodeWork", "RequestId", "Restore", "Span", "StepPlan", "TokenRange"]

RequestId = Hashable


@dataclass(frozen=True, slots=True)
class TokenRange:
    """Tokens `[start, end)` of one request, held by `node`."""

    start: int
    end: int
    node: str

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Migration:
    """Move tokens `[start, end)` of `request` from node `src` to node `dst`."""

    request: RequestId
    start: int
    end: int
    src: str
    dst: str


@dataclass(frozen=True, slots=True)
class Restore:
    """Tokens `[start, end)` of `request` were on a node that was lost: recompute their KV
    onto node `dst`, in position order with the request's other lost spans (the ranges
    before `start` are intact, so a chunked prefill over the span gives its KV again)."""

    request: RequestId
    start: int
    end: int
    dst: str


@dataclass(frozen=True, slots=True)
class Span:
    """New tokens `[start, end)` of `request` that follow its history (a turn's new
    input, a speculation checked): the caller computes their KV in the step and writes
    it where the plan's routes name (`RemoteAttention.extend`)."""

    request: RequestId
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class NodeWork:
    """One node's share of a step.

    rows: batch rows (indices into `StepPlan.requests`) whose KV this node partly holds.
    kv_len: for each of those rows, how many history tokens the node holds.
    append_rows / append_offsets: rows whose new token goes to this node, and the
        node-local offset to write it at (its history count for that request).
    """

    node: str
    rows: tuple[int, ...]
    kv_len: tuple[int, ...]
    append_rows: tuple[int, ...]
    append_offsets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Everything one decode step needs to know about routing. Immutable.

    requests: the batch, in row order. positions: the position of each row's new token
    (= tokens of history). nodes: per-node work. routes: each request's ranges
    (history plus the slot reserved for this step's token), parked requests' too.
    prefill: requests added at this boundary whose prompt KV must be scattered (their
    ranges are in `routes`). migrations / freed / truncated: node-side moves, frees and
    truncations `(request, node, tokens kept)` to carry out before attending. spans:
    tokens to extend requests by in this step. parked: requests parked at this boundary
    (kflume/turns.py).
    """

    epoch: int
    requests: tuple[RequestId, ...]
    positions: tuple[int, ...]
    nodes: tuple[NodeWork, ...]
    routes: dict[RequestId, tuple[TokenRange, ...]]
    prefill: tuple[RequestId, ...] = ()
    migrations: tuple[Migration, ...] = ()
    freed: tuple[tuple[RequestId, str], ...] = ()
    removed_nodes: tuple[str, ...] = ()
    restores: tuple[Restore, ...] = ()
    lost_nodes: tuple[str, ...] = ()
    dropped: tuple[RequestId, ...] = ()
    spans: tuple[Span, ...] = ()
    truncated: tuple[tuple[RequestId, str, int], ...] = ()
    parked: tuple[RequestId, ...] = ()
    replicas: dict[RequestId, tuple[TokenRange, ...]] = field(default_factory=dict)
    unreplicated: tuple[RequestId, ...] = ()

    def node_work(self, node: str) -> NodeWork | None:
        for w in self.nodes:
            if w.node == node:
                return w
        return None

    def table(self) -> str:
        """The routing table as text, one request per line."""
        lines = [f"epoch {self.epoch}"]
        active = dict(zip(self.requests, self.positions))
        for rid, routes in self.routes.items():
            ranges = "  ".join(f"[{r.start}, {r.end}) -> {r.node}" for r in routes)
            state = f"{active[rid]} tokens" if rid in active else "parked"
            lines.append(f"  request {rid!s:>6} ({state}): {ranges}")
            if self.replicas.get(rid):
                copies = "  ".join(f"[{r.start}, {r.end}) -> {r.node}" for r in self.replicas[rid])
                lines.append(f"  {'copies':>15}: {copies}")
        return "\n".join(lines)
