"""A workload trace as the simulator reads it: calls, grouped into sessions.

Every loader (kflume/sim/loaders.py) returns a `Trace`. A *call* is one LLM request: an
input context of `in_tokens`, of which the first `cached_prefix_tokens` repeat the
session's earlier context (so a system that kept the session's KV appends only the
rest), and `out_tokens` generated. Session traces (agentic) give times relative to the
session's start, and get synthetic session arrivals (kflume/sim/workload.py);
request-level traces give times from the trace's start, one session per call.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Call", "Trace"]


@dataclass(frozen=True, slots=True)
class Call:
    """One LLM call.

    group                 the unit that arrives together: an agentic session with its
                          sub-agents, or (request-level traces) the call itself.
    session               whose KV this call extends: calls with the same session share
                          context (a main agent or one sub-agent of a group).
    t_s                   seconds from the group's start (session traces) or from the
                          trace's start (request-level traces).
    in_tokens             input (context) tokens, >= 1.
    out_tokens            generated tokens, >= 0.
    cached_prefix_tokens  leading input tokens equal to the session's earlier context.
    """

    group: str
    session: str
    t_s: float
    in_tokens: int
    out_tokens: int
    cached_prefix_tokens: int = 0

    def __post_init__(self):
        if self.in_tokens < 1 or self.out_tokens < 0:
            raise ValueError(f"call of {self.session!r} at t={self.t_s}: need in_tokens >= 1 and "
                             f"out_tokens >= 0, got {self.in_tokens} and {self.out_tokens}")
        if not 0 <= self.cached_prefix_tokens <= self.in_tokens:
            raise ValueError(f"call of {self.session!r} at t={self.t_s}: cached_prefix_tokens "
                             f"must be in [0, in_tokens={self.in_tokens}], "
                             f"got {self.cached_prefix_tokens}")
        if not self.t_s >= 0:
            raise ValueError(f"call of {self.session!r}: t_s must be >= 0, got {self.t_s}")


@dataclass(frozen=True, slots=True)
class Trace:
    """name: file name; format: the detected format (see loaders.FORMATS); sessions: True
    when times are relative to each group's start (arrivals are synthesised); calls: in
    time order within each group."""

    name: str
    format: str
    sessions: bool
    calls: tuple[Call, ...]

    def __post_init__(self):
        if not self.calls:
            raise ValueError(f"trace {self.name!r} has no calls")

    @property
    def groups(self) -> int:
        return len({c.group for c in self.calls})

    @property
    def output_tokens(self) -> int:
        return sum(c.out_tokens for c in self.calls)
