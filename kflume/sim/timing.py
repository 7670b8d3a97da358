"""The time of one decode step, from the calibrated model of docs/simulation.md.

A step of `batch` requests holding `kv_tokens` of context, plus (chunked prefill)
`chunk` prompt tokens whose queries attend `chunk_ctx` tokens of their own context:

- weight side: the weights streamed once (at the measured rate) or, for many tokens,
  the GEMMs' FLOPs (at `prefill_mfu` of peak), whichever is longer; split over `tp`
  GPUs with two all-reduces a layer;
- attention: the KV bytes over the measured kernel read rate (and the prefill chunk's
  attention FLOPs);
- colocated: the two in series plus a fitted fixed cost;
- kflume: per layer the weight node's work, the remote attention on the attention
  nodes and a measured round trip (plus the q/reply bytes over the link); pipelined
  with two micro-batches when that is faster (each reads the weights once more, and the
  remote attention of one overlaps the other's local work); plus a fitted fixed cost
  per step (the token boundary and the wait for the nodes' acknowledgements).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .hardware import Calibration, GpuProfile
from .models import ModelShape

__all__ = ["StepModel"]


@dataclass(frozen=True, slots=True)
class StepModel:
    """Step times for `model` served by `tp` GPUs of class `gpu` (a replica, or a kflume
    weight node). All times in seconds."""

    model: ModelShape
    gpu: GpuProfile
    tp: int
    cal: Calibration
    # derived once (the event loop asks for step times ~10^5 times)
    _stream_s: float = field(init=False, repr=False)
    _token_s: float = field(init=False, repr=False)
    _allreduce_s: float = field(init=False, repr=False)

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        m, g, c = self.model, self.gpu, self.cal
        set_ = object.__setattr__
        set_(self, "_stream_s", m.weight_bytes / (self.tp * g.weight_read_bps))
        set_(self, "_token_s", 2.0 * m.params / (self.tp * g.flops * c.prefill_mfu))
        set_(self, "_allreduce_s", 2 * m.layers * c.tp_allreduce_s if self.tp > 1 else 0.0)

    def dense_s(self, tokens: float) -> float:
        """Projections, MLP and LM head for `tokens` tokens (decode rows + prefill chunk):
        the weights streamed once, or the GEMMs' FLOPs, whichever is longer."""
        return max(self._stream_s, self._token_s * tokens) + self._allreduce_s

    def prefill_attention_flops(self, chunk: float, chunk_ctx: float) -> float:
        """Attention FLOPs of `chunk` new tokens after `chunk_ctx` tokens of context."""
        return self.model.attention_flops_per_token_pair * chunk * (chunk_ctx + 0.5 * chunk)

    def colocated_s(self, batch: int, kv_tokens: float, chunk: float = 0.0,
                    chunk_ctx: float = 0.0) -> float:
        """A colocated replica's step: weights, then attention over its own KV."""
        g, c = self.gpu, self.cal
        attn = kv_tokens * self.model.kv_bytes_per_token / (self.tp * g.colocated_read_bps)
        if chunk:
            attn += self.prefill_attention_flops(chunk, chunk_ctx) / (
                self.tp * g.flops * c.prefill_mfu)
        return self.dense_s(batch + chunk) + attn + c.colocated_step_s

    def colocated_kv_limit(self, batch: int, step_s: float) -> float:
        """KV tokens a replica's `batch` decode rows may hold for a step of `step_s`."""
        room = step_s - self.dense_s(batch) - self.cal.colocated_step_s
        rate = self.tp * self.gpu.colocated_read_bps
        return max(0.0, room) * rate / self.model.kv_bytes_per_token

    def kflume_s(self, batch: int, kv_tokens: float, pool_read_bps: float, pool_flops: float,
                 chunk: float = 0.0, chunk_ctx: float = 0.0) -> float:
        """A weight node's step, its batch's KV read on attention nodes at `pool_read_bps`
        (bytes/s the nodes give this batch) and prefill attention at `pool_flops`."""
        m, c = self.model, self.cal
        layers = m.layers
        attn = kv_tokens * m.kv_bytes_per_token / pool_read_bps
        if chunk:
            attn += self.prefill_attention_flops(chunk, chunk_ctx) / (pool_flops * c.prefill_mfu)
        a = attn / layers  # one layer, the whole batch
        rows = batch + chunk
        link = 2.0 * rows * m.query_bytes / c.link_bps
        local = self.dense_s(rows) / layers + c.layer_extra_s
        serial = layers * (local + a + c.layer_round_trip_s + link) + c.kflume_step_s
        if rows < 2:
            return serial
        # Two micro-batches: each reads the weights; one's remote attention runs while the
        # other's local work does; the attention nodes serve both in turn.
        half = self.dense_s(rows / 2) / layers + c.layer_extra_s
        remote = 0.5 * a + c.layer_round_trip_s + 0.5 * link
        period = max(2.0 * half, half + remote, a)
        return min(serial, layers * period + c.kflume_pipelined_step_s)
