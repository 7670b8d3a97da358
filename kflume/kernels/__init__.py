"""kflume kernels: split-KV attention over token ranges, LSE merge, KV append.

Conventions: docs/conventions.md. CUDA tensors run Triton kernels, CPU tensors the
pure-torch references in `kflume.kernels.reference`. The public ops are registered with
`torch.library` (namespace `kflume`) so `torch.compile` can trace code that calls them.

Calls check shapes, dtypes, devices and layouts (host metadata, no sync); checks of
values in device memory (ranges, page ids) run with `debug_checks=True` or with
`KFLUME_DEBUG_CHECKS=1` set when this package is imported. `SplitKVPlan` is split-KV
attention planned once per shape, whose `run` only launches (FlashInfer's plan/run).
"""

from .append import append_kv
from .merge import merge_attention_states, merge_new_token, merge_state_
from .split_kv import default_num_splits, split_kv_attention
from .split_kv_plan import SplitKVPlan

__all__ = [
    "SplitKVPlan",
    "append_kv",
    "default_num_splits",
    "merge_attention_states",
    "merge_new_token",
    "merge_state_",
    "split_kv_attention",
]
