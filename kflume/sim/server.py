"""A decode server (a model replica, or a kflume weight node) advanced analytically.

Between two events a server's batch is fixed, so every step takes the same time `tau`
and the server's step counter grows linearly: `steps(t) = steps + (t - t0) / tau`. A
running request started decoding at step `start_step` and finishes at `end_step`, so
its progress is never updated one token at a time. Prefill is chunked: each step also
carries `budget` prompt tokens of the FIFO prefill queue (at most `chunk`; fewer when the
queue holds fewer, or when more would take the step past the TPOT target), drained as a
fluid, so a short prompt takes a fraction of a step's budget.

Live KV tokens of the running requests are `ctx_sum + n * steps - start_sum` (each
request adds one token a step), kept in O(1) per event.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

__all__ = ["EPS", "Request", "Server"]

EPS = 1e-6  # tokens and steps are whole numbers: a millionth is "done"


@dataclass(slots=True, eq=False)
class Request:
    """One call being served. Token counts are KV tokens; times are seconds.

    in_tokens     context when (last) admitted: the call's input, plus what it had
                  generated before a preemption.
    out_left      tokens still to generate.
    reuse         of in_tokens, those whose KV was kept (not prefilled again).
    prefill_left  prompt tokens still to prefill.
    """

    idx: int
    session: int
    arrival_s: float
    call_in: int
    call_out: int
    cached_prefix: int
    in_tokens: int = 0
    out_left: int = 0
    reuse: int = 0
    prefill_left: float = 0.0
    seq: int = 0
    start_step: float = 0.0
    end_step: float = 0.0
    admitted_s: float = -1.0
    first_token_s: float = -1.0
    finish_s: float = -1.0
    generated: int = 0
    preemptions: int = 0

    def __post_init__(self):
        if not self.in_tokens:
            self.in_tokens, self.out_left = self.call_in, self.call_out


@dataclass(slots=True, eq=False)
class Server:
    """A replica or weight node. kv_capacity: tokens of KV it may hold (inf for a weight
    node, whose KV lives on attention nodes); idle: LRU of sessions' KV kept between
    calls (a replica's prefix cache), session -> tokens."""

    name: str
    gpu: str
    gpus: int
    chunk: int
    max_batch: int
    kv_capacity: float = math.inf
    ready_s: float = 0.0
    billed_from: float = 0.0
    draining: bool = False
    steps: float = 0.0
    t: float = 0.0
    tau: float = math.inf
    budget: float = 0.0  # prefill tokens a step carries now (<= chunk)
    decode_tau: float = math.inf  # tau without this step's prefill chunk
    running: list = field(default_factory=list)  # heap of (end_step, seq, Request)
    prefill: deque = field(default_factory=deque)
    backlog: float = 0.0  # Σ prefill_left
    prefill_kv: int = 0  # KV of requests in the prefill queue (their whole context)
    ctx_sum: float = 0.0
    start_sum: float = 0.0
    idle: OrderedDict = field(default_factory=OrderedDict)
    idle_tokens: int = 0
    prefill_busy_s: float = 0.0  # time with a prefill backlog, since the last tick
    version: int = 0

    # -- state ----------------------------------------------------------------------

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def batch(self) -> int:
        return len(self.running) + len(self.prefill)

    def decode_kv(self) -> float:
        """KV tokens the running requests hold now (read by this step's attention)."""
        return self.ctx_sum + len(self.running) * self.steps - self.start_sum

    def live_kv(self) -> float:
        return self.decode_kv() + self.prefill_kv

    def chunk_now(self) -> float:
        return min(self.budget, self.backlog) if self.prefill else 0.0

    def chunk_ctx(self) -> float:
        """Context before the prefill head's next chunk."""
        if not self.prefill:
            return 0.0
        head = self.prefill[0]
        return head.in_tokens - head.prefill_left

    def takes_prefill(self, tokens: float) -> bool:
        """Room in the prefill queue: an empty one takes any prompt, a busy one up to
        4 chunks in all (later calls wait in the system's queue, for any server)."""
        return not self.prefill or self.backlog + tokens <= 4 * self.chunk

    def busy(self) -> bool:
        return bool(self.running) or bool(self.prefill)

    # -- time -------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Move the step counter (and the prefill queue) to time `now`."""
        dt = now - self.t
        self.t = now
        if dt <= 0 or self.tau == math.inf:
            return
        if self.prefill:
            self.prefill_busy_s += dt
        d = dt / self.tau
        self.steps += d
        drain = d * self.chunk_now()
        self.backlog = max(0.0, self.backlog - drain)
        for r in self.prefill:  # fluid FIFO: the head first, then the next
            if drain <= 0:
                break
            take = min(r.prefill_left, drain)
            r.prefill_left -= take
            drain -= take

    def steps_to_next(self, refresh_steps: float) -> float:
        """Steps until the next prefill or decode completion (or a refresh)."""
        n = refresh_steps if self.running else math.inf
        if self.running:
            n = min(n, self.running[0][0] - self.steps)
        if self.prefill:
            n = min(n, self.prefill[0].prefill_left / max(self.chunk_now(), EPS))
        return max(n, 0.0)

    def steps_to_full(self) -> float:
        """Steps until the running requests' KV growth fills the capacity."""
        if not self.running or self.kv_capacity == math.inf:
            return math.inf
        room = self.kv_capacity - self.live_kv() - self.idle_tokens
        return max(room, 0.0) / len(self.running)

    # -- the batch ----------------------------------------------------------------------

    def add_prefill(self, r: Request) -> None:
        self.prefill.append(r)
        self.backlog += r.prefill_left
        self.prefill_kv += r.in_tokens

    def pop_prefilled(self) -> Request | None:
        if self.prefill and self.prefill[0].prefill_left <= EPS:
            r = self.prefill.popleft()
            self.backlog = max(0.0, self.backlog - r.prefill_left)
            self.prefill_kv -= r.in_tokens
            r.prefill_left = 0.0
            return r
        return None

    def start_decode(self, r: Request, seq: int) -> None:
        """r has its first token; it decodes its other out_left tokens from now."""
        r.start_step, r.end_step = self.steps, self.steps + r.out_left
        self.ctx_sum += r.in_tokens
        self.start_sum += self.steps
        heapq.heappush(self.running, (r.end_step, seq, r))

    def pop_finished(self) -> Request | None:
        if self.running and self.running[0][0] <= self.steps + EPS:
            _, _, r = heapq.heappop(self.running)
            self._forget(r)
            return r
        return None

    def remove_running(self, r: Request) -> int:
        """Take r out mid-decode (preemption); returns the tokens it generated here."""
        done = min(r.out_left, int(self.steps - r.start_step + EPS))
        self.running = [e for e in self.running if e[2] is not r]
        heapq.heapify(self.running)
        self._forget(r)
        return done

    def remove_prefill(self, r: Request) -> None:
        self.prefill.remove(r)
        self.backlog = max(0.0, self.backlog - r.prefill_left)
        self.prefill_kv -= r.in_tokens

    def _forget(self, r: Request) -> None:
        self.ctx_sum -= r.in_tokens
        self.start_sum -= r.start_step
        if not self.running:  # no drift of the float sums
            self.ctx_sum = self.start_sum = 0.0

    # -- idle sessions (a replica's prefix cache) ---------------------------------------

    def keep_idle(self, session: int, tokens: int) -> None:
        self.drop_idle(session)
        self.idle[session] = tokens
        self.idle_tokens += tokens

    def drop_idle(self, session: int) -> int:
        tokens = self.idle.pop(session, 0)
        self.idle_tokens -= tokens
        return tokens

    def evict_lru(self) -> int | None:
        """Drop the least recently used idle session; returns it (None if none)."""
        if not self.idle:
            return None
        session, tokens = self.idle.popitem(last=False)
        self.idle_tokens -= tokens
        return session
