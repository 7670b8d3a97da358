"""When keeping an idle session's KV stops paying for itself against prefilling it again."""

from __future__ import annotations

from .hardware import GpuProfile, PriceTable
from .timing import StepModel

__all__ = ["break_even_ttl_s"]


def break_even_ttl_s(step: StepModel, attn: GpuProfile, node_capacity: int, prices: PriceTable,
                     tokens: int) -> float:
    """How long `tokens` of an idle session's KV may sit on attention nodes of class
    `attn` (`node_capacity` tokens each) before holding them has cost what prefilling
    them again would: the dense part on a weight node, the attention on one node."""
    dense_usd = step.dense_s(tokens) * step.tp * prices[step.gpu.name]
    attn_s = step.prefill_attention_flops(tokens, 0) / (attn.flops * step.cal.prefill_mfu)
    hold_usd_per_s = tokens / node_capacity * prices[attn.name]
    return (dense_usd + attn_s * prices[attn.name]) / max(hold_usd_per_s, 1e-12)
