"""A request's edits between and within turns: park, extend, truncate, forget a prefix.

Plain Python, part of the router (kflume/router.py), like kflume/evacuate.py: each
function takes the router and the boundary being applied, and changes the request whole
or not at all (a refusal raises RouterError / CapacityError and leaves it as it was).

- park: the request keeps its ranges (its KV stays on the nodes) but takes no part in
  steps: no row in plans, no slot reserved for a next token. Parked requests still
  appear in `StepPlan.routes`, and a lost node's ranges of theirs are restored like any.
- extend: `tokens` new tokens follow the history as a span (`StepPlan.spans`) whose KV
  the caller writes in the step (`RemoteAttention.extend`); a parked request resumes.
- truncate: keep the first `length` tokens (a cache cropped, a speculation rejected);
  each node that held more keeps what it held before `length` (`StepPlan.truncated`).
- forget_before: the first ranges, wholly before `position`, that no layer attends any
  more (every layer slides) are freed, where their node holds nothing later.

With replicas (kflume/replicas.py), each edit does the same to the second copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import replicas
from .placement import RouterError
from .plan import Span, TokenRange

if TYPE_CHECKING:
    from .router import TokenRangeRouter, _Boundary, _Request

__all__ = ["apply", "written"]


def written(ranges, length: int) -> dict[str, int]:
    """Per node, how many of the tokens before `length` it holds (node-local order is
    position order, so these are the node's first ones)."""
    held: dict[str, int] = {}
    for r in ranges:
        if r.start >= length:
            break
        held[r.node] = held.get(r.node, 0) + min(r.end, length) - r.start
    return held


def apply(router: TokenRangeRouter, edit: tuple, b: _Boundary) -> None:
    op, rid = edit[0], edit[1]
    req = router._request(rid)
    if op == "advance":  # the last planned token(s) were appended: history now
        grow_to(router, rid, req, req.length + edit[2])
        req.length += edit[2]
    elif op == "park":
        req.parked = True
        shrink(router, req, req.length)  # the reserved slot goes back
        b.parked.append(rid)
    elif op == "extend":
        _extend(router, rid, req, edit[2], b)
    elif op == "truncate":
        _truncate(req, rid, edit[2], router, b)
    elif op == "forget_before":
        _forget_before(router, rid, req, edit[2], b)
    else:  # pragma: no cover - the router only queues the ops above
        raise RouterError(f"unknown edit {op!r}")


def grow_to(router: TokenRangeRouter, rid, req: _Request, end: int) -> None:
    """Extend the request's ranges to cover `[.., end)`; refused whole."""
    have = req.ranges[-1].end if req.ranges else req.length
    if end > have:
        try:
            router._grow(rid, req, end - have)
        except RouterError:  # the tokens placed so far go back
            shrink(router, req, have)
            raise


def _extend(router: TokenRangeRouter, rid, req: _Request, tokens: int, b: _Boundary) -> None:
    start = req.length
    grow_to(router, rid, req, start + tokens)
    req.length = start + tokens
    req.parked = False
    if tokens:
        b.spans.append(Span(rid, start, start + tokens))


def _truncate(req: _Request, rid, length: int, router: TokenRangeRouter, b: _Boundary) -> None:
    if not 0 <= length <= req.length:
        raise RouterError(f"cannot truncate request {rid!r} to {length} tokens: it has "
                          f"{req.length}")
    if req.ranges and length < req.ranges[0].start:
        raise RouterError(f"cannot truncate request {rid!r} to {length} tokens: its tokens "
                          f"before {req.ranges[0].start} were forgotten (out of every window)")
    before, after = written(req.ranges, req.length), written(req.ranges, length)
    for node, n in before.items():
        if after.get(node, 0) < n:
            for holder in (node, req.pairs.get(node)):
                if holder is not None:
                    b.truncated.append((rid, holder, after.get(node, 0)))
    shrink(router, req, length)
    req.length = length


def _forget_before(router: TokenRangeRouter, rid, req: _Request, position: int,
                   b: _Boundary) -> None:
    """Drop ranges from the front while one ends by `position` and its node holds none
    of the request's later tokens (a node drops a request whole, not a prefix of it)."""
    while len(req.ranges) > 1 and req.ranges[0].end <= position:
        node = req.ranges[0].node
        if any(r.node == node for r in req.ranges[1:]):
            break
        for holder in (node, req.pairs.pop(node, None)):
            if holder is not None:
                router._hold(holder, req, -req.held.get(holder, 0))
                b.freed.append((rid, holder))
        req.ranges.pop(0)


def shrink(router: TokenRangeRouter, req: _Request, end: int) -> None:
    """Cut the request's ranges at position `end`, giving the capacity past it back."""
    out: list[TokenRange] = []
    for r in req.ranges:
        if r.start >= end:
            router._hold(r.node, req, -len(r))
            replicas.mirror(router, req, r.node, -len(r))
        elif r.end > end:
            router._hold(r.node, req, end - r.end)
            replicas.mirror(router, req, r.node, end - r.end)
            out.append(TokenRange(r.start, end, r.node))
        else:
            out.append(r)
    req.ranges = out
    replicas.prune(req)
