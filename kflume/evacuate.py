"""Moving a node's ranges off it at a token boundary: a node removed (its KV migrates to
the others) or a node lost (its KV is gone and is recomputed on the others). With
replicas, the ranges it holds with a second copy elsewhere are promoted there instead
(kflume/replicas.py), and only the others move.

Plain Python, part of the router (kflume/router.py): each function takes the router and
changes its state whole or not at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import replicas
from .placement import CapacityError
from .plan import Migration, Restore, TokenRange

if TYPE_CHECKING:
    from .router import TokenRangeRouter

__all__ = ["fits", "lose", "remove"]


def remove(router: TokenRangeRouter, node: str, b) -> None:
    """Every range of `node` to the least-loaded others, as migrations (`b.migrations`),
    or to its replica; refused whole (CapacityError naming the range) if one does not fit."""
    router._node(node)
    moves = _placements(router, node, _promoted(router, node, b.leaving))
    for rid, r, dst in moves:
        if dst is None:
            raise CapacityError(f"cannot remove node {node!r}: no other node has room for "
                                f"tokens [{r.start}, {r.end}) of request {rid!r}")
    router._node(node).draining = True
    router._free.pop(node, None)
    if router.replicas > 1:
        replicas.promote(router, node, b)
    for rid, r, dst in moves:
        req = router._requests[rid]
        b.migrations.append(Migration(rid, r.start, min(r.end, req.length), node, dst))
    _apply(router, node, moves, b.migrations)


def leaving(router: TokenRangeRouter, edits: list, b) -> None:
    """The nodes this boundary's edits lose or remove (`b.leaving`); the lost ones take
    no tokens from the edits applied before theirs."""
    for e in edits:
        if e[0] in ("lose_node", "remove_node") and e[1] in router._nodes:
            b.leaving.add(e[1])
            if e[0] == "lose_node":
                router._free.pop(e[1], None)


def fits(router: TokenRangeRouter, node: str) -> bool:
    """Whether `node`'s ranges fit on the placeable others as `remove` would place them,
    with a page left per request for its next token. Nothing changes."""
    moved = _placements(router, node, _promoted(router, node, ()))
    if any(dst is None for _, _, dst in moved):
        return False
    left = sum(f for n, f in router._free.items() if n != node)
    for _, r, dst in moved:
        ps = router._nodes[dst].page_size
        left -= -(-len(r) // ps) * ps
    page = max((s.page_size for s in router._nodes.values()), default=1)
    return left >= len(router._requests) * page


def lose(router: TokenRangeRouter, node: str, b) -> None:
    """`node` is gone: its ranges placed on the others, each as a span to recompute
    (`b.restores`, in position order per request); a request whose ranges do not all fit,
    or whose first tokens were forgotten (`forget_before`: a recomputation would need
    them), is dropped whole (`b.dropped`, its capacity given back)."""
    router._node(node)
    router._node(node).draining = True
    router._free.pop(node, None)
    if router.replicas > 1:
        replicas.promote(router, node, b)
    while True:  # drop requests that do not fit, the one with most lost tokens first
        moves = _placements(router, node)
        need: dict = {}
        for rid, r, dst in moves:
            # no room; or tokens before it forgotten (out of a window), whose KV a
            # recomputation of this range would attend over
            if dst is None or router._requests[rid].ranges[0].start > 0:
                need[rid] = need.get(rid, 0) + len(r)
        if not need:
            break
        rid = max(need, key=need.__getitem__)
        for other in router._release(rid):
            if other != node:
                b.freed.append((rid, other))
        b.dropped.append(rid)
    for rid, r, dst in moves:
        length = router._requests[rid].length
        if r.start < length:
            b.restores.append(Restore(rid, r.start, min(r.end, length), dst))
    _apply(router, node, moves, None)


def _promoted(router: TokenRangeRouter, node: str, leaving) -> set:
    """The requests whose ranges on `node` its replica would take (kflume/replicas.py)."""
    if router.replicas == 1:
        return set()
    return {rid for rid, req in router._requests.items()
            if req.pairs.get(node) is not None and req.pairs[node] not in leaving}


def _placements(router: TokenRangeRouter, node: str, skip=frozenset()) -> list[tuple]:
    """(request, range, destination or None) for every range on `node` (of requests not
    in `skip`), each placed on the least-loaded other node with room, counting the ones
    placed before it (with replicas, on a destination's replica too). Nothing changes."""
    out, taken = [], {}  # tokens taken on each node so far, in whole pages
    for rid, req in router._requests.items():
        if node not in req.held or rid in skip:
            continue
        for r in req.ranges:
            if r.node != node:
                continue
            free = {n: f - taken.get(n, 0) for n, f in router._free.items() if n != node}
            if router.replicas > 1:
                fits = [n for n in free if replicas.keep_room(router, n, req, taken) >= len(r)]
            else:
                fits = [n for n in free if router.room(n, rid) - taken.get(n, 0) >= len(r)]
            dst = max(fits, key=free.__getitem__, default=None)
            for n in (dst, req.pairs.get(dst)):
                if n is not None:
                    ps = router._nodes[n].page_size
                    taken[n] = taken.get(n, 0) + -(-len(r) // ps) * ps
            out.append((rid, r, dst))
    return out


def _apply(router: TokenRangeRouter, node: str, moves: list[tuple], migrations) -> None:
    """Moves made (`migrations`: the list a removal's copies to replicas join)."""
    for rid, r, dst in moves:
        req = router._requests[rid]
        router._hold(dst, req, len(r))
        if router.replicas > 1:
            replicas.moved(router, rid, req, r, dst, migrations)
        req.ranges = [TokenRange(r.start, r.end, dst) if x == r else x for x in req.ranges]
    for req in router._requests.values():
        if node in req.held:
            router._hold(node, req, -req.held[node])
        req.ranges = _coalesce(req.ranges)
        replicas.prune(req)
    del router._nodes[node]


def _coalesce(ranges: list[TokenRange]) -> list[TokenRange]:
    out: list[TokenRange] = []
    for r in ranges:
        if out and out[-1].node == r.node and out[-1].end == r.start:
            out[-1] = TokenRange(out[-1].start, r.end, r.node)
        else:
            out.append(r)
    return out
