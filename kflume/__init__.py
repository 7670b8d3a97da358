"""kflume: composable primitives for elastic core-attention disaggregation in LLM decoding.

A weight node runs projections and the FFN and owns the decode loop; weightless
attention nodes hold token ranges of each request's KV and compute core attention over
them; partial outputs are merged by their log-sum-exp. Conventions: docs/conventions.md.

The package is laid out by side: `kflume.node` (the attention node), `kflume.weight`
(the weight node: clients, remote attention, cluster, pipeline), `kflume.graph` (the
captured step), `kflume.comm` (transports, shared by both sides), `kflume.kernels`;
`kflume.router` and `kflume.plan` are plain Python. Imports work without a GPU, UCX or
transformers: those are loaded where used.
"""

from . import _compat, kernels
from .config import NodeConfig
from .graph import CapturedRemoteAttention, CapturedStep, GraphSignal, StepServer
from .hf import KflumeCache, patch, unpatch
from .kernels import append_kv, merge_attention_states, merge_state_, split_kv_attention
from .node import AttentionNode
from .plan import StepPlan, TokenRange
from .router import FillThenLeastLoaded, TokenRangeRouter
from .weight import Cluster, LayerPipeline, RemoteAttention

_compat.install()

__version__ = "0.1.0"

__all__ = [
    "AttentionNode",
    "CapturedRemoteAttention",
    "CapturedStep",
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
