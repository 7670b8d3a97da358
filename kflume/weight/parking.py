"""Requests parked between turns, and their time to live.

An agentic session calls the model, waits seconds to minutes for a tool, and calls
again. Between calls its requests are parked (`TokenRangeRouter.park`): their KV stays
on the attention nodes and they take no part in steps. A parked request may be given a
time to live: once it has been idle that long, the cluster frees its KV at the next token
boundary, and resuming it raises `Expired`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ..plan import RequestId

__all__ = ["Expired", "Parking"]


class Expired(RuntimeError):
    """A parked request outlived its time to live: its KV is freed."""

    def __init__(self, request, idle: float, ttl: float, what: str | None = None) -> None:
        self.request, self.idle, self.ttl = request, idle, ttl
        super().__init__(f"{what or f'request {request!r}'} was idle {idle:.1f} s, past its "
                         f"time to live of {ttl:g} s, and its KV on the attention nodes was "
                         "freed; start again from its tokens")


class Parking:
    """The parked requests of a cluster's router, with their deadlines."""

    def __init__(self, router, clock=time.monotonic) -> None:
        self.router, self.clock = router, clock
        self._parked: dict[RequestId, tuple[float, float | None]] = {}  # since, ttl
        self._expired: dict[RequestId, Expired] = {}

    def park(self, requests: Iterable[RequestId], ttl: float | None = None) -> None:
        """Park `requests` at the next boundary; with `ttl` (seconds), free their KV once
        they have been idle that long."""
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds or None; got {ttl!r}")
        now = self.clock()
        for rid in requests:
            self.router.park(rid)
            self._parked[rid] = (now, ttl)

    def resume(self, request: RequestId, tokens: int = 0) -> None:
        """Resume `request` with `tokens` new tokens at the next boundary (a span to write:
        `StepPlan.spans`). Raises `Expired` if its time to live ran out."""
        self.check(request)
        self._parked.pop(request, None)
        self.router.extend(request, tokens)

    def check(self, request: RequestId) -> None:
        """Raise `Expired` if `request` was freed for outliving its time to live."""
        self.expire()
        if request in self._expired:
            raise self._expired[request]

    def finished(self, request: RequestId) -> None:
        """`request` is done with (its KV freed): forget it."""
        self._parked.pop(request, None)
        self._expired.pop(request, None)

    def expire(self) -> list[RequestId]:
        """Finish the parked requests past their time to live (their KV is freed at the
        next boundary); returns them."""
        now, out = self.clock(), []
        for rid, (since, ttl) in list(self._parked.items()):
            if ttl is not None and now - since >= ttl:
                del self._parked[rid]
                self.router.finish_request(rid)
                self._expired[rid] = Expired(rid, now - since, ttl)
                out.append(rid)
        return out

    def is_parked(self, request: RequestId) -> bool:
        return request in self._parked
