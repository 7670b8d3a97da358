"""Replicas: each token on two nodes, so that losing one node recomputes nothing.

Plain Python, part of the router (kflume/router.py) like kflume/evacuate.py and
kflume/turns.py. With `TokenRangeRouter(replicas=2)`, the tokens a node P holds of a
request (P is a *primary* of the request: it attends over them) are all held again by one
other node, P's *replica* for that request (`_Request.pairs[P]`), in the same order. The
replica attends over none of them; every token written to P is written to it too: the
step's new tokens (`NodeWork.append_rows` names it), prompts, spans and restores
(`StepPlan.replicas`), ranges migrated to P. A node is a primary or a replica of a
request, never both, so a node's tokens of a request are all one role's and a primary
attends over all it holds, as without replicas.

- A primary lost or removed: its replica becomes the primary (nothing moves, nothing is
  recomputed); a replica lost or removed: its primary is left with one copy.
- At every token boundary, a primary with one copy gets a replica on a node that holds
  nothing of the request and has room for all of it, by a copy from the primary (a
  `Migration`). Without one it decodes on with a single copy: the plan names it once
  (`StepPlan.unreplicated`) and `replica_stats()` counts it, until room is found.
- New tokens go to a primary only where its replica has room too; a new primary is
  opened with a replica where a node is free for one.
- Both copies lost at once: the tokens are recomputed, as without replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .plan import Migration, TokenRange

if TYPE_CHECKING:
    from .router import TokenRangeRouter, _Boundary, _Request

__all__ = ["ReplicaStats", "promote", "rereplicate", "room", "stats"]


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What replicas cost and did (`TokenRangeRouter.replica_stats()`).

    copies: tokens held per token (2, or 1 without replicas). tokens_held: tokens the
    nodes hold, copies counted. unreplicated_requests / unreplicated_tokens: those with a
    single copy now. promoted_tokens: tokens whose replica became their primary (nodes
    lost or removed), since the router was made. copied_tokens: tokens copied to make a
    second copy again.
    """

    copies: int
    tokens_held: int
    unreplicated_requests: int
    unreplicated_tokens: int
    promoted_tokens: int
    copied_tokens: int


def own(router: TokenRangeRouter, node: str, req: _Request, taken: dict | None = None) -> int:
    """Tokens of `req` that `node` can take, by its own pages (less `taken` of them)."""
    s = router._nodes[node]
    left = s.capacity - s.used + (-req.held.get(node, 0)) % s.page_size
    return left - (taken or {}).get(node, 0)


def _roles(req: _Request) -> set[str]:
    return set(req.pairs) | {r for r in req.pairs.values() if r is not None}


def partner(router: TokenRangeRouter, req: _Request, node: str, tokens: int = 1,
            avoid: set = frozenset()) -> str | None:
    """The placeable node with the most free tokens that holds nothing of `req` and can
    take `tokens` of it, for a replica of `node`'s; None if there is none."""
    used = _roles(req) | {node} | avoid
    fits = [n for n in router._free if n not in used and own(router, n, req) >= tokens]
    return max(fits, key=router._free.__getitem__, default=None)


def keep_room(router: TokenRangeRouter, node: str, req: _Request,
              taken: dict | None = None) -> int:
    """Tokens of `req` that `node` can take as a primary, its replica's room counted
    (less `taken` on each); 0 where it is the request's replica."""
    r = req.pairs.get(node)
    if r is not None:
        return min(own(router, node, req, taken), own(router, r, req, taken))
    if node not in req.pairs and node in _roles(req):
        return 0
    return own(router, node, req, taken)


def room(router: TokenRangeRouter, node: str, req: _Request) -> int:
    """`TokenRangeRouter.room` with replicas: a node new to the request counts the room of
    its replica-to-be; where none can be had, it takes tokens only if the request's own
    primaries are full (then decoding goes on with a single copy)."""
    if node in _roles(req):
        return keep_room(router, node, req)
    mate = partner(router, req, node)
    if mate is not None:
        return min(own(router, node, req), own(router, mate, req))
    if any(keep_room(router, p, req) > 0 for p in req.pairs if p in router._free):
        return 0
    return own(router, node, req)


def follow(router: TokenRangeRouter, rid, req: _Request, node: str, tokens: int) -> None:
    """`tokens` more of `req` were placed on primary `node`: its replica (chosen now for
    a node new to the request) takes them too."""
    if node not in req.pairs:
        req.pairs[node] = partner(router, req, node, tokens)
        if req.pairs[node] is None:
            router._unpaired.setdefault(rid, False)
    if req.pairs[node] is not None:
        router._hold(req.pairs[node], req, tokens)


def mirror(router: TokenRangeRouter, req: _Request, node: str, tokens: int) -> None:
    """Primary `node` holds `tokens` more (fewer, < 0) of `req`: so does its replica."""
    r = req.pairs.get(node)
    if r is not None:
        router._hold(r, req, tokens)


def prune(req: _Request) -> None:
    """Forget the pairs of primaries that hold nothing of `req` any more."""
    primaries = {r.node for r in req.ranges}
    for p in [p for p in req.pairs if p not in primaries]:
        del req.pairs[p]


def promote(router: TokenRangeRouter, node: str, b: _Boundary) -> None:
    """`node` leaves (lost or removed): where it is a primary with a live replica, the
    replica becomes the primary; where it is a replica, its primary keeps one copy. Its
    primaries without a replica stay on it (kflume/evacuate.py moves or restores them)."""
    for rid, req in router._requests.items():
        if node not in req.held:
            continue
        mate = req.pairs.get(node)
        if node in req.pairs and mate is not None and mate not in b.leaving:
            del req.pairs[node]
            req.pairs[mate] = None
            req.ranges = [TokenRange(r.start, r.end, mate) if r.node == node else r
                          for r in req.ranges]
            router._hold(node, req, -req.held[node])
            router.replica_counts["promoted"] += req.held[mate]
            router._unpaired.setdefault(rid, False)
        elif node in req.pairs:
            req.pairs[node] = None  # its replica leaves too: restored as one copy
        else:
            for p, r in req.pairs.items():
                if r == node:
                    req.pairs[p] = None
                    router._hold(node, req, -req.held[node])
                    router._unpaired.setdefault(rid, False)
                    break


def moved(router: TokenRangeRouter, rid, req: _Request, r: TokenRange, dst: str,
          migrations: list | None) -> None:
    """Range `r` of a leaving node was placed on primary `dst`: its replica takes it too
    (from `migrations`' source, where the range is migrated rather than restored)."""
    if dst not in req.pairs:
        req.pairs[dst] = None
        router._unpaired.setdefault(rid, False)
    mate = req.pairs[dst]
    if mate is None:
        return
    router._hold(mate, req, len(r))
    if migrations is not None and r.start < req.length:
        migrations.append(Migration(rid, r.start, min(r.end, req.length), r.node, mate))


def rereplicate(router: TokenRangeRouter, b: _Boundary) -> None:
    """Give primaries with a single copy a replica where a node has room: a copy of
    their tokens (`b.migrations`). Requests whose KV this step writes (prompts, spans,
    restores) wait for the next boundary. Those that find none are named once
    (`b.unreplicated`)."""
    busy = set(b.prefill) | {s.request for s in b.spans} | {r.request for r in b.restores}
    sources: set[str] = set()  # nodes a request moves off (freed after the copies)
    for rid, named in list(router._unpaired.items()):
        req = router._requests.get(rid)
        if req is None:
            del router._unpaired[rid]
            continue
        if rid in busy:
            continue
        for p, mate in list(req.pairs.items()):
            if mate is not None:
                continue
            n = req.held.get(p, 0)
            if mate := partner(router, req, p, n, sources):
                req.pairs[p] = mate
                router._hold(mate, req, n)
                _copy(router, rid, req, p, (mate,), b)
            elif (p2 := _pair_with_room(router, req, n, sources)) is not None:
                _merge(router, rid, req, p, p2, b)
                sources.add(p)
        if all(m is not None for m in req.pairs.values()):
            del router._unpaired[rid]
        elif not named:
            router._unpaired[rid] = True
            b.unreplicated.append(rid)


def _copy(router: TokenRangeRouter, rid, req: _Request, src: str, dsts: tuple,
          b: _Boundary) -> None:
    """Copy the written tokens `src` holds of `req` to `dsts` (`b.migrations`)."""
    for r in req.ranges:
        if r.node == src and r.start < req.length:
            end = min(r.end, req.length)
            for dst in dsts:
                b.migrations.append(Migration(rid, r.start, end, src, dst))
                router.replica_counts["copied"] += end - r.start


def _pair_with_room(router: TokenRangeRouter, req: _Request, tokens: int,
                    sources: set) -> str | None:
    """A primary of `req` with a replica, both with room for `tokens` more of it."""
    fits = [p for p, r in req.pairs.items() if r is not None and p in router._free
            and r in router._free and not {p, r} & sources
            and keep_room(router, p, req) >= tokens]
    return max(fits, key=router._free.__getitem__, default=None)


def _merge(router: TokenRangeRouter, rid, req: _Request, src: str, dst: str,
           b: _Boundary) -> None:
    """Move the tokens `src` holds of `req` (with one copy) to primary `dst` and its
    replica: no node is free to be `src`'s replica, but a pair has room. `src` drops the
    request once they are copied (`boundary.carry_out` frees a migration's source after
    it)."""
    n, mate = req.held[src], req.pairs[dst]
    _copy(router, rid, req, src, (dst, mate), b)
    for node in (dst, mate):
        router._hold(node, req, n)
    router._hold(src, req, -n)
    del req.pairs[src]
    from .evacuate import _coalesce  # (evacuate imports this module)

    req.ranges = _coalesce([TokenRange(r.start, r.end, dst) if r.node == src else r
                            for r in req.ranges])
    b.freed.append((rid, src))


def copies(req: _Request) -> tuple[TokenRange, ...]:
    """The request's replica ranges (the plan's `replicas`)."""
    return tuple(TokenRange(r.start, r.end, req.pairs[r.node]) for r in req.ranges
                 if req.pairs.get(r.node) is not None)


def stats(router: TokenRangeRouter) -> ReplicaStats:
    reqs, tokens = 0, 0
    for rid in router._unpaired:
        req = router._requests.get(rid)
        if req is None:
            continue
        n = sum(req.held.get(p, 0) for p, r in req.pairs.items() if r is None)
        reqs += n > 0
        tokens += n
    held = sum(sum(req.held.values()) for req in router._requests.values())
    return ReplicaStats(router.replicas, held, reqs, tokens, router.replica_counts["promoted"],
                        router.replica_counts["copied"])
