"""kflume: composable primitives for elastic core-attention disaggregation in LLM decoding.

A weight node runs projections and the FFN and owns the decode loop; weightless
attention nodes hold token ranges of each request's KV and compute core attention over
them; partial outputs are merged by their log-sum-exp. See docs/ and DESIGN.md.
"""

from . import kernels
from .kernels import append_kv, merge_attention_states, merge_state_, split_kv_attention

__version__ = "0.1.0"

__all__ = [
    "append_kv",
    "kernels",
    "merge_attention_states",
    "merge_state_",
    "split_kv_attention",
]
