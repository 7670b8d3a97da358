"""kflume: composable primitives for elastic core-attention disaggregation in LLM decoding.

A weight node runs projections and the FFN and owns the decode loop; weightless
attention nodes hold token ranges of each request's KV and compute core attention over
them; partial outputs are merged by their log-sum-exp. Conventions: docs/conventions.md.

Imports work without a GPU, UCX or transformers: those are loaded where used.
"""

from . import kernels
from .captured import CapturedRemoteAttention, StepServer
from .cluster import Cluster
from .graph import GraphSignal
from .kernels import append_kv, merge_attention_states, merge_state_, split_kv_attention
from .node import AttentionNode, NodeConfig
from .patch import KflumeCache, patch, unpatch
from .pipeline import LayerPipeline
from .plan import StepPlan, TokenRange
from .remote import RemoteAttention
from .router import FillThenLeastLoaded, TokenRangeRouter

__version__ = "0.1.0"

__all__ = [
    "AttentionNode",
    "CapturedRemoteAttention",
    "Cluster",
    "FillThenLeastLoaded",
    "GraphSignal",
    "KflumeCache",
    "LayerPipeline",
    "NodeConfig",
    "RemoteAttention",
    "StepPlan",
    "StepServer",
    "TokenRange",
    "TokenRangeRouter",
    "append_kv",
    "kernels",
    "merge_attention_states",
    "merge_state_",
    "patch",
    "split_kv_attention",
    "unpatch",
]
