"""Model replicas, each holding its requests' KV: a fixed count ('colocated') or
autoscaled whole instances in the style of ServerlessLLM ('instance').

A replica admits a call when its context fits beside the running requests' KV (idle
sessions' KV is a prefix cache: kept while there is room, dropped oldest first) and its
decode step would stay within the TPOT target (an empty replica admits any call that
fits); a call prefers the replica that holds its session's cache. As running requests
grow, a full replica drops idle sessions, then preempts its newest request, whose KV is
recomputed when it is admitted again.

The instance system asks the same `kflume.scale` policy as kflume, with replicas as its
nodes and idle KV counted as evictable, and keeps enough replicas that each spends at
most `prefill_utilization` of its time with prefill waiting (as kflume does with weight
nodes). A drained replica takes no new calls and is released when its last one
finishes; a new one starts warm (warm_start_s) on a host released within keep_warm_s,
else cold.
"""

from __future__ import annotations

import math
from collections import deque

from ..scale import ClusterState, NodeState, ScaleDecision
from .engine import READY, HostPool, System
from .server import Request, Server
from .timing import StepModel

__all__ = ["ReplicaSystem"]


class ReplicaSystem(System):
    """fixed: replica count of the colocated system; None autoscales with `policy`."""

    def __init__(self, name, cfg, workload, step: StepModel, kv_capacity: int,
                 fixed: int | None = None, policy=None):
        super().__init__(name, cfg, workload, policy if fixed is None else None)
        self.step, self.kv_capacity, self.fixed = step, kv_capacity, fixed
        self.servers: list[Server] = []
        self.queue: deque[Request] = deque()
        self.home: dict[int, Server] = {}  # session -> replica holding its idle KV
        self.hosts = HostPool(cfg.warm_start_s, cfg.cold_start_s, cfg.keep_warm_s)
        self._names = 0
        self._slo_s = cfg.slo_tpot_ms / 1e3

    # -- nodes ------------------------------------------------------------------------

    def _new_server(self, ready_s: float) -> Server:
        s = Server(name=f"r{self._names}", gpu=self.step.gpu.name, gpus=self.step.tp,
                   chunk=self.cfg.chunk_tokens, max_batch=self.cfg.max_batch,
                   kv_capacity=self.kv_capacity, ready_s=ready_s, billed_from=self.now,
                   t=self.now)
        self._names += 1
        self.servers.append(s)
        self.bill_start("replica", s.gpus)
        return s

    def start(self) -> None:
        for _ in range(self.fixed or max(1, self.cfg.min_nodes)):
            self._new_server(self.now)

    def stop(self) -> None:
        for s in list(self.servers):
            self._release(s)

    def _release(self, s: Server) -> None:
        for session in list(s.idle):
            self.home.pop(session, None)
        self.servers.remove(s)
        self.bill_end(s.name, "replica", s.gpu, s.gpus, s.billed_from)
        self.hosts.release(self.now)

    def decoders(self) -> list[Server]:
        return self.servers

    def on_ready(self, s: Server) -> None:
        s.t = self.now
        self.admit()

    # -- admission ----------------------------------------------------------------------

    def _fits(self, s: Server, r: Request) -> bool:
        if s.ready_s > self.now or s.draining or s.batch >= s.max_batch:
            return False
        if not s.takes_prefill(r.in_tokens - min(r.cached_prefix, s.idle.get(r.session, 0))):
            return False
        s.advance(self.now)  # its KV as of now (the batch is unchanged: tau holds)
        kv = s.live_kv() + r.in_tokens
        if kv > s.kv_capacity:
            return False
        return not s.batch or kv <= self.step.colocated_kv_limit(s.batch + 1, self._slo_s)

    def _choose(self, r: Request) -> Server | None:
        home = self.home.get(r.session)
        if home is not None and home in self.servers and self._fits(home, r):
            return home
        best, load = None, math.inf
        for s in self.servers:
            if self._fits(s, r):
                x = s.live_kv() / s.kv_capacity + s.batch / s.max_batch
                if x < load:
                    best, load = s, x
        return best

    def admit(self) -> None:
        q = self.queue
        while q:
            r = q[0]
            if r.in_tokens > self.kv_capacity:
                q.popleft()
                self.reject(r)  # the context does not fit an empty replica
                continue
            s = self._choose(r)
            if s is None:
                return
            q.popleft()
            self._place(r, s)

    def _place(self, r: Request, s: Server) -> None:
        s.advance(self.now)
        home = self.home.pop(r.session, None)
        held = home.drop_idle(r.session) if home is not None else 0
        first = r.admitted_s < 0
        r.reuse = min(r.cached_prefix, held) if (home is s and first) else 0
        r.prefill_left = float(r.in_tokens - r.reuse)
        self.note_admit(r, r.in_tokens - r.reuse)
        self.home[r.session] = s
        s.add_prefill(r)
        while s.live_kv() + s.idle_tokens > s.kv_capacity and self._evict(s):
            pass
        self.reschedule(s)

    def _evict(self, s: Server) -> bool:
        session = s.evict_lru()
        if session is None:
            return False
        if self.home.get(session) is s:
            del self.home[session]
        self.rec.evictions += 1
        return True

    def on_arrival(self, r: Request) -> None:
        self.queue.append(r)
        self.admit()

    # -- serving ------------------------------------------------------------------------

    def step_time(self, s: Server, chunk: float) -> float:
        return self.step.colocated_s(s.n_running, s.decode_kv(), chunk, s.chunk_ctx())

    def on_server(self, s: Server) -> None:
        s.advance(self.now)
        while (r := s.pop_prefilled()) is not None:
            self.first_token(r)
            if r.out_left == 0:
                self._finish(r, s)
            else:
                s.start_decode(r, r.seq)
        while (r := s.pop_finished()) is not None:
            r.generated += r.out_left
            r.out_left = 0
            self._finish(r, s)
        while s.running and s.live_kv() + s.idle_tokens >= s.kv_capacity - 1e-6:
            if not self._evict(s) and not self._preempt(s):  # room for the next step's tokens
                break
        if s.draining and not s.busy():
            self._release(s)
        else:
            self.reschedule(s)
        self.admit()

    def _finish(self, r: Request, s: Server) -> None:
        self.finish_call(r)
        if not s.draining:
            s.keep_idle(r.session, r.call_in + r.call_out)
            self.home[r.session] = s
        elif self.home.get(r.session) is s:
            del self.home[r.session]

    def _preempt(self, s: Server) -> bool:
        """Take the newest request off a full replica; it is recomputed later."""
        if s.running:
            victim = max(s.running, key=lambda e: e[1])[2]
            done = s.remove_running(victim)
            victim.generated += done
            victim.out_left -= done
            victim.in_tokens += done + 1
        elif s.prefill:
            victim = s.prefill[-1]
            s.remove_prefill(victim)
        else:
            return False
        victim.preemptions += 1
        victim.reuse = 0
        self.rec.preemptions += 1
        if self.home.get(victim.session) is s:
            del self.home[victim.session]
        self.queue.appendleft(victim)
        return True

    # -- autoscaling (instance system) -----------------------------------------------------

    def needed_tokens(self) -> float:
        return sum(s.live_kv() for s in self.servers) + sum(r.in_tokens for r in self.queue)

    def cluster_state(self) -> ClusterState:
        nodes = []
        for s in self.servers:
            cap = int(s.kv_capacity)
            live = min(cap, int(math.ceil(s.live_kv())))
            idle = min(cap - live, s.idle_tokens)
            nodes.append(NodeState(s.name, cap, cap - live - idle, idle, s.draining,
                                   s.ready_s > self.now))
        p50, p99 = self.recent_tpot_ms(self.servers)
        start_s = self.cfg.warm_start_s if self.hosts.released else self.cfg.cold_start_s
        return ClusterState(
            now_s=self.now, nodes=tuple(nodes), growth_tokens_per_s=self.growth,
            queued_requests=len(self.queue), queued_tokens=sum(r.in_tokens for r in self.queue),
            tpot_p50_ms=p50, tpot_p99_ms=p99, node_start_s=start_s,
            new_node_capacity_tokens=self.kv_capacity, last_scale_up_s=self.last_up,
            last_scale_down_s=self.last_down)

    def apply(self, d: ScaleDecision) -> bool:
        """The policy's decision, kept above the replicas the prefill load needs."""
        serving = sum(not s.draining for s in self.servers)
        floor = min(self.prefill_nodes(), self.cfg.max_nodes)
        if d.add or serving + d.add < floor:
            d = ScaleDecision(add=max(d.add, floor - serving), reason=d.reason)
        elif d.drain:
            d = ScaleDecision(drain=d.drain[:max(0, serving - floor)], reason=d.reason)
        for _ in range(d.add):
            start_s, warm = self.hosts.start(self.now)
            self.rec.warm_starts += warm
            self.rec.cold_starts += not warm
            s = self._new_server(self.now + start_s)
            self.push(s.ready_s, READY, s)
        by_name = {s.name: s for s in self.servers}
        for name in d.drain:
            s = by_name[name]
            s.draining = True
            for session in list(s.idle):
                s.drop_idle(session)
                if self.home.get(session) is s:
                    del self.home[session]
            if not s.busy():
                self._release(s)
        return not d.noop
