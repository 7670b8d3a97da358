"""The attention node: paged KV for token ranges, attention over them, and its server.

`AttentionNode` (node.py) holds the pools and computes; `PageTable` (pages.py) allocates
pages; `AttendGraphs` (graphs.py) replays its attention as CUDA graphs; `NodeServer`
(server.py, with ops.py and streams.py) serves it over a transport; `NodeProcess`
(process.py) starts `kflume node` (main.py) as a process. Nothing here imports the
weight node's side.
"""

from ..config import NodeConfig
from .node import AttentionNode
from .pages import NodeCapacityError, PageTable, UnknownRequestError
from .process import NodeProcess
from .server import NodeServer

__all__ = [
    "AttentionNode",
    "NodeCapacityError",
    "NodeConfig",
    "NodeProcess",
    "NodeServer",
    "PageTable",
    "UnknownRequestError",
]
