"""Types both sides of the wire share: an attention node's geometry and the KV dtypes.

The weight node builds a `NodeConfig` to start nodes or to check the ones it connects
to; the node builds its pools from one. Neither side owns this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "NodeConfig", "kv_dtype"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def kv_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KV dtype name ("bfloat16", "float16", "float32")."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {name!r}") from None


@dataclass(slots=True)
class NodeConfig:
    """Geometry and capacity of an attention node (must match the model it serves).

    layers, kv_heads, head_dim: the model's KV geometry. capacity_tokens: tokens of KV
    (in every layer) the node holds at most, in pages of `page_size` tokens. dtype: KV
    dtype name. device: where the pools live ("cpu", "cuda", "cuda:N"). q_heads: the
    model's query heads, used to compile the kernels before the node serves (optional).
    capture_while_serving: False for a node in the process of a captured weight step
    that waits on the thread serving it (`Cluster.in_process` on CUDA sets it): such a
    node captures no CUDA graph while serving (the driver may synchronise the device
    while it instantiates one, and the waiting step would never end); new batch shapes
    run uncaptured until its owner calls `capture_pending()` between steps.
    """

    layers: int
    kv_heads: int
    head_dim: int
    capacity_tokens: int
    dtype: str = "bfloat16"
    device: str = "cpu"
    page_size: int = 16
    q_heads: int | None = None
    capture_while_serving: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "capacity_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        kv_dtype(self.dtype)
        if self.q_heads is not None and (self.q_heads < 1 or self.q_heads % self.kv_heads):
            raise ValueError(f"q_heads must be a positive multiple of kv_heads "
                             f"({self.kv_heads}); got {self.q_heads}")

    @property
    def num_pages(self) -> int:
        return -(-self.capacity_tokens // self.page_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
