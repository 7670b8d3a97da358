"""Model shapes: what a decode step reads (weights, KV) and computes (FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODELS", "ModelShape", "model"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A decoder-only transformer with GQA; bf16 weights and KV unless dtype_bytes says."""

    name: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    dtype_bytes: int = 2

    def __post_init__(self):
        for f in ("layers", "hidden", "q_heads", "kv_heads", "head_dim", "ffn", "vocab",
                  "dtype_bytes"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelShape {self.name!r}: {f} must be > 0")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"ModelShape {self.name!r}: q_heads must be a multiple of kv_heads")

    @property
    def params(self) -> int:
        """Parameters (projections, MLP, embedding and LM head; norms are negligible)."""
        q = self.q_heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn
        return self.layers * per_layer + 2 * self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_flops_per_token_pair(self) -> int:
        """FLOPs of one query token attending to one context token, all layers (q·k, p·v)."""
        return 4 * self.layers * self.q_heads * self.head_dim

    @property
    def query_bytes(self) -> int:
        """One token's q of one layer (sent to the attention nodes); the reply is as large."""
        return self.q_heads * self.head_dim * self.dtype_bytes


MODELS = {
    m.name: m
    for m in (
        ModelShape("llama-3.1-8b", layers=32, hidden=4096, q_heads=32, kv_heads=8,
                   head_dim=128, ffn=14336, vocab=128256),
        ModelShape("llama-3.1-70b", layers=80, hidden=8192, q_heads=64, kv_heads=8,
                   head_dim=128, ffn=28672, vocab=128256),
    )
}


def model(name: str) -> ModelShape:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
