"""From a trace to a workload: every call with its absolute arrival time.

Session traces carry no arrival process between sessions (kv-cache-tester and TraceLab
remove absolute times), so groups (sessions with their sub-agents) start as a Poisson
process of `session_rate` per second, in the trace's order, and each call arrives at
its group's start plus its own offset. Request-level traces keep their own arrival
times, optionally rescaled to a mean `request_rate`.

A finite set of sessions replayed this way ramps up, holds, and then leaves a long tail
in which the last long sessions trickle on alone (kv-cache-tester sessions last up to
five days). A service sees new sessions all the while; `until_s="last-start"` drops the
calls made after every session has started, so that a run measures the loaded period, not
a tail that no steady workload has. By default every call is replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .trace import Trace

__all__ = ["Workload", "build_workload"]


@dataclass(frozen=True, slots=True)
class Workload:
    """Calls in arrival order; parallel tuples (plain Python numbers: the event loop
    reads them one at a time). session: an index into `session_names`."""

    trace: str
    arrival_s: tuple[float, ...]
    session: tuple[int, ...]
    in_tokens: tuple[int, ...]
    out_tokens: tuple[int, ...]
    cached_prefix_tokens: tuple[int, ...]
    session_names: tuple[str, ...]

    def __post_init__(self):
        n = len(self.arrival_s)
        for f in ("session", "in_tokens", "out_tokens", "cached_prefix_tokens"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"Workload.{f} has {len(getattr(self, f))} entries, not {n}")
        if any(b < a for a, b in zip(self.arrival_s, self.arrival_s[1:])):
            raise ValueError("Workload.arrival_s must be sorted")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def output_tokens(self) -> int:
        return sum(self.out_tokens)


def build_workload(trace: Trace, session_rate: float = 0.05, request_rate: float | None = None,
                   max_groups: int | None = None, until_s: float | str | None = None,
                   seed: int = 0) -> Workload:
    """session_rate: groups started per second (session traces); request_rate: mean
    requests per second to rescale a request-level trace to (None keeps its times);
    max_groups: keep the first N groups; until_s: drop calls arriving later, in seconds,
    or "last-start" (session traces: when the last group starts; None keeps every call);
    seed: of the session arrivals."""
    if session_rate <= 0:
        raise ValueError(f"session_rate must be > 0, got {session_rate}")
    if request_rate is not None and request_rate <= 0:
        raise ValueError(f"request_rate must be > 0 or None, got {request_rate}")
    if max_groups is not None and max_groups < 1:
        raise ValueError(f"max_groups must be >= 1 or None, got {max_groups}")
    if until_s is not None and until_s != "last-start" and not (
            isinstance(until_s, (int, float)) and until_s > 0):
        raise ValueError(f"until_s must be > 0, 'last-start' or None, got {until_s!r}")
    order: dict[str, int] = {}
    for c in trace.calls:
        order.setdefault(c.group, len(order))
    keep = [c for c in trace.calls if max_groups is None or order[c.group] < max_groups]
    if trace.sessions:
        rng = random.Random(seed)
        start, t = {}, 0.0
        for g in order:
            if max_groups is not None and order[g] >= max_groups:
                break
            start[g] = t
            t += rng.expovariate(session_rate)
        times = [start[c.group] + c.t_s for c in keep]
        if until_s == "last-start":
            until_s = max(start.values())
    else:
        if until_s == "last-start":
            until_s = None  # request-level traces: every call is its own session
        t0 = min(c.t_s for c in keep)
        times = [c.t_s - t0 for c in keep]
        span = max(times)
        if request_rate is not None and span > 0:
            scale = (len(keep) / span) / request_rate
            times = [t * scale for t in times]
    idx = [i for i in range(len(keep)) if until_s is None or times[i] <= until_s]
    if not idx:
        raise ValueError(f"no call of {trace.name} arrives before until_s={until_s}")
    idx.sort(key=lambda i: (times[i], i))
    names: dict[str, int] = {}
    sess = [names.setdefault(keep[i].session, len(names)) for i in idx]
    return Workload(
        trace=trace.name,
        arrival_s=tuple(times[i] for i in idx),
        session=tuple(sess),
        in_tokens=tuple(keep[i].in_tokens for i in idx),
        out_tokens=tuple(keep[i].out_tokens for i in idx),
        cached_prefix_tokens=tuple(keep[i].cached_prefix_tokens for i in idx),
        session_names=tuple(names),
    )
