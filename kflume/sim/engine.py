"""The discrete-event loop every simulated system shares.

Events: call arrivals (read in order from the workload, never queued), a server's next
completion (SERVER; stale ones are skipped by version), a node becoming ready (READY),
a node's billing ending after a drain (RELEASE) and the autoscaler's TICK. Nothing is
simulated token by token: a server's batch is constant between two of its events, and
its progress in between is computed (kflume/sim/server.py).

A session's calls are sent one after another: a call that arrives while the same
session's previous call is still being served waits for it, and counts as arriving when
it is sent (its TTFT and queue delay start then).

Ticks come every `policy_interval_s` while the policy acts or calls wait for capacity,
and back off (doubling, up to MAX_TICK_GAP_S) while it decides nothing; a call that has
to wait brings them back at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque

from ..scale import ScaleDecision, ScalePolicy
from .config import SimConfig
from .metrics import NodeRecord, Recorder
from .server import Request, Server
from .workload import Workload

__all__ = ["HostPool", "System"]

SERVER, READY, TICK, RELEASE = range(4)
MIN_CHUNK = 64  # prefill tokens a step carries at least, whatever the TPOT target
MAX_TICK_GAP_S = 16.0
LOAD_WINDOW_S = 120.0  # prefill load is averaged over this long
STUCK_S = 7 * 86400.0  # no call finished for a simulated week: a bug, not a workload


class HostPool:
    """Start times of replicas and weight nodes: warm (checkpoint still in a released
    host's memory, released less than keep_warm_s ago) or cold."""

    def __init__(self, warm_s: float, cold_s: float, keep_warm_s: float):
        self.warm_s, self.cold_s, self.keep_warm_s = warm_s, cold_s, keep_warm_s
        self.released: deque[float] = deque()

    def start(self, now: float) -> tuple[float, bool]:
        while self.released and now - self.released[0] > self.keep_warm_s:
            self.released.popleft()
        if self.released:
            self.released.pop()
            return self.warm_s, True
        return self.cold_s, False

    def release(self, now: float) -> None:
        self.released.append(now)


class System:
    """Base of the simulated systems: the loop, ticks, billing. Subclasses implement
    start, stop, on_arrival, on_server, on_ready, on_release, decoders, step_time and,
    when autoscaled, needed_tokens, cluster_state, expire_idle and apply."""

    def __init__(self, name: str, cfg: SimConfig, workload: Workload,
                 policy: ScalePolicy | None = None):
        self.name, self.cfg, self.workload, self.policy = name, cfg, workload, policy
        self.rec = Recorder(len(workload))
        self.now = 0.0
        self.done = 0
        self._heap: list = []
        self._seq = itertools.count()
        self.admit_seq = itertools.count()
        self.gpus: dict[str, int] = {}  # role -> GPUs billed now
        self.last_up: float | None = None
        self.last_down: float | None = None
        self.growth = 0.0
        self._prev_need: tuple[float, float] | None = None
        self._tick_version = 0
        self._tick_at = math.inf
        self._tick_gap = cfg.policy_interval_s
        self._last_done_s = 0.0
        self._sessions: dict[int, deque] = {}  # session with a call in service -> waiting calls
        self._sent: list[Request] = []  # calls whose predecessor just finished
        self.prefill_load = 0.0  # servers' worth of time with prefill waiting, smoothed
        self._load_at = 0.0

    # -- the loop ---------------------------------------------------------------------

    def push(self, t: float, kind: int, obj=None, version: int = 0) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, obj, version))

    def run(self, progress=None) -> Recorder:
        """Serve the whole workload; progress(calls_done) is called now and then."""
        w = self.workload
        arrivals, n, i = w.arrival_s, len(w), 0
        heap, events = self._heap, 0
        self.start()
        if self.policy is not None:
            self._schedule_tick(self.cfg.policy_interval_s)
        while self.done < n:
            if i < n and (not heap or arrivals[i] <= heap[0][0]):
                self.now = arrivals[i]
                self._arrive(Request(i, w.session[i], arrivals[i], w.in_tokens[i],
                                     w.out_tokens[i], w.cached_prefix_tokens[i]))
                i += 1
                if (self.policy is not None and self.waiting()
                        and self._tick_at - self.now > 1.5 * self.cfg.policy_interval_s):
                    self._tick_gap = self.cfg.policy_interval_s
                    self._schedule_tick(self._tick_gap)
            elif heap:
                t, _, kind, obj, version = heapq.heappop(heap)
                self.now = t
                if kind == SERVER:
                    if version == obj.version:
                        self.on_server(obj)
                elif kind == TICK:
                    if version == self._tick_version:
                        self._tick()
                elif kind == READY:
                    self.on_ready(obj)
                else:
                    self.on_release(obj)
            else:
                raise RuntimeError(f"{self.name}: {n - self.done} calls can never be served "
                                   "(no event left)")
            while self._sent:
                r = self._sent.pop()
                r.arrival_s = self.rec.arrival_s[r.idx] = self.now
                self.on_arrival(r)
            events += 1
            if progress is not None and not events & 4095:
                progress(self.done)
        self.stop()
        if progress is not None:
            progress(self.done)
        return self.rec

    def _arrive(self, r: Request) -> None:
        self.rec.arrival_s[r.idx] = r.arrival_s
        waiting = self._sessions.get(r.session)
        if waiting is not None:
            waiting.append(r)
            return
        self._sessions[r.session] = deque()
        self.on_arrival(r)

    def call_done(self, r: Request) -> None:
        self.done += 1
        self._last_done_s = self.now
        waiting = self._sessions[r.session]
        if waiting:
            self._sent.append(waiting.popleft())
        else:
            del self._sessions[r.session]

    # -- autoscaling --------------------------------------------------------------------

    def _schedule_tick(self, gap: float) -> None:
        self._tick_version += 1
        self._tick_at = self.now + gap
        self.push(self._tick_at, TICK, None, self._tick_version)

    def _tick(self) -> None:
        if self.now - self._last_done_s > STUCK_S:
            raise RuntimeError(f"{self.name}: no call finished for {STUCK_S:.0f} simulated s; "
                               "calls wait for capacity that never comes (check max_nodes)")
        self.expire_idle()
        state = self.cluster_state()
        need = self.needed_tokens()
        if self._prev_need is not None:
            t0, n0 = self._prev_need
            dt = self.now - t0
            if dt > 0:
                a = dt / (dt + 30.0)  # smoothed over ~30 s
                self.growth = (1 - a) * self.growth + a * (need - n0) / dt
        self._prev_need = (self.now, need)
        dt = self.now - self._load_at
        if dt > 0:
            busy = 0.0
            for s in self.decoders():
                s.advance(self.now)
                busy, s.prefill_busy_s = busy + s.prefill_busy_s, 0.0
            a = dt / (dt + LOAD_WINDOW_S)
            self.prefill_load = (1 - a) * self.prefill_load + a * busy / dt
            self._load_at = self.now
        decision = self.policy.decide(state) if self.policy else ScaleDecision()
        if decision.add:
            self.last_up = self.now
        if decision.drain:
            self.last_down = self.now
        changed = self.apply(decision)
        quiet = decision.noop and not changed and not self.waiting()
        self._tick_gap = min(self._tick_gap * 2, MAX_TICK_GAP_S) if quiet else \
            self.cfg.policy_interval_s
        if self.done < len(self.workload):
            self._schedule_tick(self._tick_gap)

    # -- billing ----------------------------------------------------------------------

    def bill_start(self, role: str, gpus: int) -> None:
        self.gpus[role] = self.gpus.get(role, 0) + gpus
        self.rec.timeline.append((self.now, dict(self.gpus)))

    def bill_end(self, name: str, role: str, gpu: str, gpus: int, start_s: float) -> None:
        self.rec.nodes.append(NodeRecord(name, role, gpu, gpus, start_s, self.now))
        self.gpus[role] -= gpus
        self.rec.timeline.append((self.now, dict(self.gpus)))

    # -- shared helpers -----------------------------------------------------------------

    def reschedule(self, s: Server) -> None:
        """After s changed: its step time now, and its next event. A step carries up to
        `chunk` prefill tokens, fewer when more would take it past 0.9 x the TPOT target
        (a token budget, as in Sarathi-Serve), but at least MIN_CHUNK."""
        s.version += 1
        if not s.busy():
            s.tau = math.inf
            return
        s.budget = s.chunk
        s.tau = s.decode_tau = self.step_time(s, s.chunk_now())
        if s.prefill:
            s.decode_tau = self.step_time(s, 0.0)
            target = 0.9e-3 * self.cfg.slo_tpot_ms
            if s.tau > target and s.tau > s.decode_tau:
                full = s.chunk_now()
                room = (target - s.decode_tau) / (s.tau - s.decode_tau)
                s.budget = max(MIN_CHUNK, full * room if room > 0 else 0.0)
                s.tau = self.step_time(s, s.chunk_now())
        steps = min(s.steps_to_next(self.cfg.refresh_steps), s.steps_to_full())
        self.push(self.now + steps * s.tau, SERVER, s, s.version)

    def first_token(self, r: Request) -> None:
        if r.first_token_s < 0:
            r.first_token_s = self.now
            self.rec.first_token_s[r.idx] = self.now
        if r.out_left > 0:
            r.out_left -= 1
            r.generated += 1

    def finish_call(self, r: Request) -> None:
        r.finish_s = self.now
        rec = self.rec
        rec.finish_s[r.idx] = self.now
        rec.generated[r.idx] = r.generated
        if r.call_out >= 2:
            rec.tpot_s[r.idx] = (self.now - r.first_token_s) / (r.call_out - 1)
        self.call_done(r)

    def reject(self, r: Request) -> None:
        self.rec.rejected[r.idx] = True
        self.call_done(r)

    def prefill_nodes(self) -> int:
        """Replicas or weight nodes that keep the time with prefill waiting under
        cfg.prefill_utilization of theirs."""
        return math.ceil(self.prefill_load / self.cfg.prefill_utilization - 1e-9)

    def note_admit(self, r: Request, new_tokens: int) -> None:
        """r admitted now, prefilling new_tokens; counts what is recomputed."""
        if r.admitted_s < 0:
            r.admitted_s = self.now
            self.rec.admitted_s[r.idx] = self.now
        r.seq = next(self.admit_seq)
        self.rec.prefilled_tokens += new_tokens
        fresh = r.call_in - r.cached_prefix if not r.preemptions else 0
        self.rec.recomputed_tokens += max(0, new_tokens - fresh)

    def recent_tpot_ms(self, servers) -> tuple[float | None, float | None]:
        """p50 and p99 of the current time per output token over running requests, of
        decode steps (without a prefill chunk: scaling does not shorten those)."""
        pts = sorted((s.decode_tau, s.n_running) for s in servers if s.running)
        total = sum(n for _, n in pts)
        if not total:
            return None, None
        out, acc, targets = [], 0, [0.5 * total, 0.99 * total]
        for tau, n in pts:
            acc += n
            while targets and acc >= targets[0]:
                out.append(tau * 1e3)
                targets.pop(0)
        while len(out) < 2:
            out.append(pts[-1][0] * 1e3)
        return out[0], out[1]

    # -- what subclasses provide ---------------------------------------------------------

    def decoders(self) -> list[Server]:
        """The replicas or weight nodes."""
        return []

    def waiting(self) -> int:
        """Calls waiting for capacity."""
        return len(self.queue)

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def on_arrival(self, r: Request) -> None: ...
    def on_server(self, s: Server) -> None: ...
    def on_ready(self, obj) -> None: ...
    def on_release(self, obj) -> None: ...
    def expire_idle(self) -> None: ...
    def needed_tokens(self) -> float: return 0.0
    def cluster_state(self): return None
    def apply(self, decision: ScaleDecision) -> bool: return False
    def step_time(self, s: Server, chunk: float) -> float:
        """Seconds of s's next step, carrying `chunk` prefill tokens."""
        raise NotImplementedError
