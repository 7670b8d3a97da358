"""The captured decode step: a whole step in one CUDA graph, the transport on the host.

`GraphSignal` (signal.py) posts and waits between a graph and a host thread;
`CapturedRemoteAttention` (captured.py) is remote attention inside the graph, over fixed
buffers (buffers.py) with a lane per node (lanes.py), served from the host (serve.py:
`StepServer`); `CapturedStep` (step.py) composes them with the model's layers and
`LayerPipeline` into the step users call.
"""

from .captured import CapturedRemoteAttention
from .serve import LayerTrace, StepServer, StepTrace
from .signal import GraphSignal, SignalTimeout, warm_and_capture
from .step import CapturedStep

__all__ = [
    "CapturedRemoteAttention",
    "CapturedStep",
    "GraphSignal",
    "LayerTrace",
    "SignalTimeout",
    "StepServer",
    "StepTrace",
    "warm_and_capture",
]
