"""Hugging Face models with their KV on attention nodes: `kflume.patch(model, cluster)`.

patch.py puts the model's core attention on the cluster through transformers' public
extension points; attention.py is the attention and mask functions; cache.py the
`KflumeCache`; session.py a generation's requests, boundaries and recovery.
"""

from .attention import kflume_attention, kflume_padding_mask
from .cache import KflumeCache
from .patch import patch, unpatch

__all__ = ["KflumeCache", "kflume_attention", "kflume_padding_mask", "patch", "unpatch"]
