"""kflume's attention nodes as the simulator keeps them: which node holds how many KV
tokens of which session.

A session's KV stays on the nodes between its calls (idle) and grows by each call's
new tokens, placed as kflume's router places them (`FillThenLeastLoaded`): ranges of
up to RANGE_TOKENS, each on the serving node with the most free tokens, so a long
context spreads over many nodes, whose attention then runs in parallel. A call
reserves its output tokens when it is admitted, so growth never overfills a node. A
draining node's tokens move to the others; idle sessions are dropped oldest first when
room is needed, and after a TTL.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import attrgetter

__all__ = ["RANGE_TOKENS", "AttentionNode", "AttentionPool"]

RANGE_TOKENS = 4096  # FillThenLeastLoaded's default range_tokens
_FREE = attrgetter("free")


@dataclass(slots=True, eq=False)
class AttentionNode:
    """One attention node: capacity, used and free (= capacity - used) in KV tokens, idle
    ⊆ used; read_bps and flops: its attention kernel's KV read rate and its dense peak."""

    name: str
    gpu: str
    capacity: int
    read_bps: float
    flops: float
    ready_s: float
    billed_from: float
    used: int = 0
    free: int = -1  # set from capacity
    idle: int = 0
    draining: bool = False
    sessions: dict = field(default_factory=dict)  # session -> tokens held here

    def __post_init__(self):
        self.free = self.capacity - self.used


class AttentionPool:
    """The attention nodes and the sessions' token placement."""

    def __init__(self):
        self.nodes: list[AttentionNode] = []
        self.held: dict[int, dict[AttentionNode, int]] = {}  # session -> node -> tokens
        self.idle: OrderedDict[int, float] = OrderedDict()  # idle session -> since (LRU)
        self._expiry: list = []  # heap of (drop at, session, idle since)
        self.read_bps = 0.0  # rate a batch spread like the stored KV is read at

    # -- views ------------------------------------------------------------------------

    def serving(self, now: float) -> list[AttentionNode]:
        return [n for n in self.nodes if n.ready_s <= now and not n.draining]

    def free(self, now: float) -> int:
        return sum(n.free for n in self.nodes if n.ready_s <= now and not n.draining)

    def used(self) -> int:
        return sum(n.used for n in self.nodes)

    def at_ceiling(self, now: float, max_nodes: int) -> bool:
        """No node is starting and no more may: room can come only from idle sessions."""
        starting = any(n.ready_s > now for n in self.nodes)
        return not starting and sum(not n.draining for n in self.nodes) >= max_nodes

    def tokens(self, session: int) -> int:
        return sum(self.held.get(session, {}).values())

    def node_count(self, session: int) -> int:
        return len(self.held.get(session, ()))

    def refresh_rates(self, now: float) -> bool:
        """Effective read rate: the busiest node (its share of stored tokens over its
        read rate) finishes a batch's attention last. True if it moved by over 1 %."""
        nodes = [n for n in self.nodes if n.ready_s <= now]
        total = sum(n.used for n in nodes)
        old = self.read_bps
        if not nodes:
            self.read_bps = 0.0
        elif total == 0:
            self.read_bps = sum(n.read_bps for n in nodes if not n.draining)
        else:
            self.read_bps = 1.0 / max(n.used / total / n.read_bps for n in nodes)
        return abs(self.read_bps - old) > 0.01 * max(old, self.read_bps)

    # -- placement --------------------------------------------------------------------

    def allocate(self, session: int, tokens: int, now: float) -> None:
        """Place `tokens` more of the session (the caller checked that they fit)."""
        place = self.held.setdefault(session, {})
        serving = self.serving(now)
        while tokens > 0:
            node = max(serving, key=_FREE)
            take = min(tokens, node.free, RANGE_TOKENS)
            if take <= 0:
                raise RuntimeError("attention pool over capacity: allocate() without room")
            self._add(node, session, take, place)
            tokens -= take

    def truncate(self, session: int, keep: int) -> None:
        """Keep the first `keep` tokens of the session (its context was compacted)."""
        place = self.held.get(session, {})
        extra = sum(place.values()) - keep
        for node in reversed(list(place)):
            if extra <= 0:
                break
            take = min(extra, place[node])
            self._add(node, session, -take, place)
            extra -= take

    def release(self, session: int) -> None:
        self.set_active(session)
        place = self.held.pop(session, {})
        for node, t in place.items():
            node.used -= t
            node.free += t
            del node.sessions[session]

    def set_idle(self, session: int, now: float, ttl_s: float) -> None:
        """The session's call finished: its KV stays, to be dropped after ttl_s idle."""
        for node, t in self.held.get(session, {}).items():
            node.idle += t
        self.idle[session] = now
        heapq.heappush(self._expiry, (now + ttl_s, session, now))

    def expire(self, now: float) -> int:
        """Drop the idle sessions whose time is up; returns how many."""
        n, heap = 0, self._expiry
        while heap and heap[0][0] <= now:
            _, session, since = heapq.heappop(heap)
            if self.idle.get(session) == since:
                self.release(session)
                n += 1
        return n

    def evict(self, tokens: int, keep: int) -> tuple[int, int]:
        """Drop idle sessions, oldest first (not `keep`), until `tokens` are free;
        returns (tokens freed, sessions dropped)."""
        freed = n = 0
        for session in list(self.idle):
            if freed >= tokens:
                break
            if session != keep:
                freed += self.tokens(session)
                self.release(session)
                n += 1
        return freed, n

    def set_active(self, session: int) -> None:
        if self.idle.pop(session, None) is not None:
            for node, t in self.held.get(session, {}).items():
                node.idle -= t

    def _add(self, node: AttentionNode, session: int, t: int, place: dict) -> None:
        node.used += t
        node.free -= t
        left = node.sessions.get(session, 0) + t
        if left:
            node.sessions[session] = place[node] = left
        else:
            del node.sessions[session], place[node]
        if session in self.idle:
            node.idle += t

    # -- scaling ----------------------------------------------------------------------

    def drain(self, node: AttentionNode, now: float) -> bool:
        """Move the node's tokens to the other serving nodes; False (nothing done) when
        they lack the room."""
        others = [n for n in self.serving(now) if n is not node]
        if sum(n.free for n in others) < node.used:
            return False
        node.draining = True
        for session, t in list(node.sessions.items()):
            place = self.held[session]
            self._add(node, session, -t, place)
            while t > 0:
                dest = max(others, key=_FREE)
                take = min(t, dest.free)
                self._add(dest, session, take, place)
                t -= take
        return True
