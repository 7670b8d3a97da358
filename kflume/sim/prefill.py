"""What prefill costs: its time on a server, and when keeping a session's KV stops
paying for itself against prefilling it again."""

from __future__ import annotations

from .hardware import GpuProfile, PriceTable
from .timing import StepModel

__all__ = ["break_even_ttl_s", "prefill_s"]


def prefill_s(step: StepModel, new: int, reuse: int, attention_flops: float) -> float:
    """Seconds to prefill `new` tokens after `reuse` kept ones: the dense part on the
    server of `step`, the attention at `attention_flops` (peak FLOP/s of the GPUs that
    hold the context)."""
    attn = step.prefill_attention_flops(new, reuse) / (attention_flops * step.cal.prefill_mfu)
    return step.dense_s(new) + attn


def break_even_ttl_s(step: StepModel, attn: GpuProfile, node_capacity: int, prices: PriceTable,
                     tokens: int) -> float:
    """How long `tokens` of an idle session's KV may sit on attention nodes of class
    `attn` (`node_capacity` tokens each) before holding them has cost what prefilling
    them again would: the dense part on a weight node, the attention on one node."""
    dense_usd = step.dense_s(tokens) * step.tp * prices[step.gpu.name]
    attn_s = step.prefill_attention_flops(tokens, 0) / (attn.flops * step.cal.prefill_mfu)
    hold_usd_per_s = tokens / node_capacity * prices[attn.name]
    return (dense_usd + attn_s * prices[attn.name]) / max(hold_usd_per_s, 1e-12)
