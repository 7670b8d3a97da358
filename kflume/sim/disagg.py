"""kflume: weight nodes that hold no KV, and attention nodes scaled by `kflume.scale`.

A call needs a weight node with a free batch slot and room on the attention nodes for
its new tokens and its output (its session's earlier KV is still there: only the tokens
after the cached prefix are prefilled). The policy adds and drains attention nodes; a
drained node's KV moves to the others (billed until it has), and an idle session is
dropped after `session_ttl_s` (by default once holding it has cost what recomputing it
would), or oldest first when room is needed (at the ceiling, or always when the policy
does not reserve room for idle sessions). Weight nodes follow the batch and the prefill
load (kflume/sim/weights.py), plus one while a call has waited over STARVED_S for a
weight node and none is starting; a drained one takes no new calls and is released
when empty; they start warm or cold like replicas. A call goes to the weight node with
the least prefill waiting.

A weight node's step reads its batch's KV on the attention nodes at the pool's
effective rate; the pool also bounds every step from below by the time it takes to
read all running requests' KV once (weight nodes share it).
"""

from __future__ import annotations

import itertools
import math
from collections import deque

from ..scale import ClusterState, NodeState, ScaleDecision
from .engine import READY, RELEASE, HostPool, System
from .hardware import GpuProfile, PriceTable
from .pool import AttentionNode, AttentionPool
from .retention import break_even_ttl_s
from .server import Request, Server
from .timing import StepModel
from .weights import WeightNodeRule

__all__ = ["KflumeSystem"]

STARVED_S = 2.0  # a call waiting this long for a weight node brings one more


class KflumeSystem(System):
    """The 'kflume' and 'kflume-<gpu>' systems: weight nodes of `step`'s GPU class,
    attention nodes of class `attn` holding `node_capacity` tokens each."""

    def __init__(self, name, cfg, workload, step: StepModel, attn: GpuProfile,
                 node_capacity: int, policy, prices: PriceTable):
        super().__init__(name, cfg, workload, policy)
        self.step, self.attn, self.node_capacity = step, attn, node_capacity
        self.prices = prices
        self.kv_bytes = step.model.kv_bytes_per_token
        self.weights: list[Server] = []
        self.pool = AttentionPool()
        self.queue: deque[Request] = deque()
        self.hosts = HostPool(cfg.warm_start_s, cfg.cold_start_s, cfg.keep_warm_s)
        self._ids = itertools.count(1)
        self._weight_change = -math.inf
        self._pool_bound = 0.0
        self._starved = False  # the queue's head waits for a weight node
        self.weight_rule = WeightNodeRule(cfg.weight_target_batch, cfg.prefill_utilization,
                                          cfg.min_nodes, cfg.max_nodes)

    # -- nodes ------------------------------------------------------------------------

    def _new_weight(self, ready_s: float) -> Server:
        w = Server(name=f"w{next(self._ids)}", gpu=self.step.gpu.name, gpus=self.step.tp,
                   chunk=self.cfg.chunk_tokens, max_batch=self.cfg.max_batch,
                   ready_s=ready_s, billed_from=self.now, t=self.now)
        self.weights.append(w)
        self.bill_start("weight", w.gpus)
        return w

    def _new_node(self, ready_s: float) -> AttentionNode:
        n = AttentionNode(f"a{next(self._ids)}", self.attn.name, self.node_capacity,
                          self.attn.kflume_read_bps, self.attn.flops, ready_s, self.now)
        self.pool.nodes.append(n)
        self.bill_start("attention", 1)
        return n

    def start(self) -> None:
        for _ in range(max(1, self.cfg.min_nodes)):
            self._new_weight(self.now)
        for _ in range(max(1, self.cfg.min_nodes)):
            self._new_node(self.now)
        self.pool.refresh_rates(self.now)

    def stop(self) -> None:
        for w in list(self.weights):
            self._release_weight(w)
        for session in list(self.pool.held):
            self.pool.release(session)
        for n in list(self.pool.nodes):
            self.on_release(n)

    def _release_weight(self, w: Server) -> None:
        self.weights.remove(w)
        self.bill_end(w.name, "weight", w.gpu, w.gpus, w.billed_from)
        self.hosts.release(self.now)

    def decoders(self) -> list[Server]:
        return self.weights

    def on_ready(self, obj) -> None:
        if isinstance(obj, AttentionNode):
            self.pool.refresh_rates(self.now)
            self._refresh(every=True)
        else:
            obj.t = self.now
        self.admit()

    def on_release(self, node: AttentionNode) -> None:
        self.pool.nodes.remove(node)
        self.bill_end(node.name, "attention", node.gpu, 1, node.billed_from)

    # -- admission ----------------------------------------------------------------------

    def on_arrival(self, r: Request) -> None:
        self.queue.append(r)
        self.admit()

    def _weight_for(self, prefill: int) -> Server | None:
        """The ready weight node with the least prefill waiting that takes this call."""
        best, key, now = None, None, self.now
        for w in self.weights:
            if w.draining or w.ready_s > now or not w.takes_prefill(prefill):
                continue
            batch = len(w.running) + len(w.prefill)
            if batch < w.max_batch and (key is None or (w.backlog, batch) < key):
                best, key = w, (w.backlog, batch)
        return best

    def _need(self, r: Request) -> tuple[int, int]:
        """(tokens kept of the session's KV, new tokens to place) if admitted now."""
        held = self.pool.tokens(r.session)
        reuse = min(r.cached_prefix, held) if r.admitted_s < 0 else 0
        return reuse, r.in_tokens - reuse + r.out_left

    def admit(self) -> None:
        pool, q = self.pool, self.queue
        touched = set()
        while q:
            r = q[0]
            reuse, new = self._need(r)
            w = self._weight_for(r.in_tokens - reuse)
            self._starved = w is None
            if w is None:
                break
            if reuse + new > self.cfg.max_nodes * self.node_capacity:
                q.popleft()
                self.reject(r)
                continue
            room = pool.free(self.now) + pool.tokens(r.session) - reuse
            if new > room and (pool.at_ceiling(self.now, self.cfg.max_nodes)
                               or not self.policy.keep_idle):
                freed, dropped = pool.evict(new - room, keep=r.session)
                room += freed
                self.rec.evictions += dropped
            if new > room:
                break
            q.popleft()
            pool.set_active(r.session)
            pool.truncate(r.session, reuse)
            pool.allocate(r.session, new, self.now)
            r.reuse = reuse
            r.prefill_left = float(r.in_tokens - reuse)
            self.note_admit(r, r.in_tokens - reuse)
            w.advance(self.now)
            w.add_prefill(r)
            touched.add(w)
        if touched:
            self._refresh(touched)

    def ttl_s(self, tokens: int) -> float:
        """How long an idle session of `tokens` is kept: session_ttl_s, or by default until
        holding it has cost what recomputing it would (its prefill on a weight node, its
        attention on an attention node)."""
        if self.cfg.session_ttl_s is not None:
            return self.cfg.session_ttl_s
        return break_even_ttl_s(self.step, self.attn, self.node_capacity, self.prices, tokens)

    def expire_idle(self) -> None:
        self.rec.expirations += self.pool.expire(self.now)
        if self.pool.refresh_rates(self.now):
            self._refresh(every=True)

    # -- serving ------------------------------------------------------------------------

    def step_time(self, w: Server, chunk: float) -> float:
        """The prefill chunk's attention runs on the nodes holding its session's ranges."""
        flops = 1.0
        if chunk:
            flops = self.attn.flops * max(1, self.pool.node_count(w.prefill[0].session))
        t = self.step.kflume_s(w.n_running, w.decode_kv(), self.pool.read_bps, flops, chunk,
                               w.chunk_ctx())
        return max(t, self._pool_bound)

    def _refresh(self, touched=(), every: bool = False) -> None:
        """Step times after a change: of `touched` (or of every weight node), and, once
        the attention pool's bound has moved by 3 %, of those whose step it sets (they
        share the attention nodes)."""
        kv = 0.0
        for w in self.weights:
            if w.running:
                kv += w.decode_kv()
        old = self._pool_bound
        read = self.pool.read_bps
        self._pool_bound = bound = (kv * self.kv_bytes / read + self.step.cal.kflume_step_s
                                    if kv > 0 else 0.0)
        binding = 1.01 * max(old, bound) if abs(bound - old) > 0.03 * max(old, bound) else 0.0
        for w in self.weights:
            if w in touched or (w.busy() and (every or w.tau <= binding)):
                w.advance(self.now)
                self.reschedule(w)

    def on_server(self, w: Server) -> None:
        w.advance(self.now)
        while (r := w.pop_prefilled()) is not None:
            self.first_token(r)
            if r.out_left == 0:
                self._finish(r)
            else:
                w.start_decode(r, r.seq)
        while (r := w.pop_finished()) is not None:
            r.generated += r.out_left
            r.out_left = 0
            self._finish(r)
        if w.draining and not w.busy():
            self._release_weight(w)
        self._refresh((w,))
        self.admit()

    def _finish(self, r: Request) -> None:
        self.finish_call(r)
        self.pool.set_idle(r.session, self.now, self.ttl_s(self.pool.tokens(r.session)))

    # -- autoscaling --------------------------------------------------------------------

    def needed_tokens(self) -> float:
        return self.pool.used() + sum(self._need(r)[1] for r in self.queue)

    def cluster_state(self) -> ClusterState:
        nodes = tuple(NodeState(n.name, n.capacity, n.free, n.idle, n.draining,
                                n.ready_s > self.now) for n in self.pool.nodes)
        p50, p99 = self.recent_tpot_ms(self.weights)
        return ClusterState(
            now_s=self.now, nodes=nodes, growth_tokens_per_s=self.growth,
            queued_requests=len(self.queue),
            queued_tokens=sum(self._need(r)[1] for r in self.queue),
            tpot_p50_ms=p50, tpot_p99_ms=p99, node_start_s=self.cfg.attention_start_s,
            new_node_capacity_tokens=self.node_capacity, last_scale_up_s=self.last_up,
            last_scale_down_s=self.last_down)

    def apply(self, d: ScaleDecision) -> bool:
        for _ in range(d.add):
            n = self._new_node(self.now + self.cfg.attention_start_s)
            self.push(n.ready_s, READY, n)
        by_name = {n.name: n for n in self.pool.nodes}
        for name in d.drain:
            node = by_name[name]
            moved = node.used
            if self.pool.drain(node, self.now):
                self.push(self.now + moved * self.kv_bytes / (self.cfg.migrate_gbs * 1e9),
                          RELEASE, node)
        if not d.noop:
            self.pool.refresh_rates(self.now)
            self._refresh(every=True)
        return self._scale_weights() or not d.noop

    def _scale_weights(self) -> bool:
        live = [w for w in self.weights if not w.draining]
        requests = sum(w.batch for w in self.weights) + len(self.queue)
        n = self.weight_rule.change(len(live), requests, self.prefill_load,
                                    self.now - self._weight_change)
        if (n <= 0 and self._starved and self.queue and all(w.ready_s <= self.now for w in live)
                and self.now - self.queue[0].arrival_s > STARVED_S):
            n = 1  # a call waits for a weight node and none is on its way
        for _ in range(n):
            start_s, warm = self.hosts.start(self.now)
            self.rec.warm_starts += warm
            self.rec.cold_starts += not warm
            self.push(self.now + start_s, READY, self._new_weight(self.now + start_s))
        ready = [w for w in live if w.ready_s <= self.now]
        if n < 0 and ready:
            w = min(ready, key=lambda w: (w.batch, w.backlog))
            w.draining = True
            if not w.busy():
                self._release_weight(w)
        if n:
            self._weight_change = self.now
        return n != 0
