"""The weight node's side: clients of the attention nodes, remote attention, the cluster.

`NodeClient` (client.py, streams in stream.py) talks to one node; `RemoteAttention`
(remote.py) is one layer's query-first dispatch and LSE merge over a step's plan, cut
per node by rows.py; `Cluster` (cluster.py, joining.py, boundary.py) owns the nodes and
the router; `LayerPipeline` (pipeline.py) interleaves micro-batches. Nothing here
imports the attention node's side.
"""

from .client import NodeClient, Pending, wait_all
from .cluster import Cluster
from .pipeline import LayerPipeline, split_rows
from .remote import RemoteAttention
from .rows import NodeRows, node_rows
from .stream import AttendStream

__all__ = [
    "AttendStream",
    "Cluster",
    "LayerPipeline",
    "NodeClient",
    "NodeRows",
    "Pending",
    "RemoteAttention",
    "node_rows",
    "split_rows",
    "wait_all",
]
