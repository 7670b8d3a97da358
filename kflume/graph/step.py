"""CapturedStep: a whole decode step over attention nodes in one CUDA graph.

Give it the model's per-layer halves (the callables `LayerPipeline` takes) and a
cluster; then each call is one token for every request the cluster routes:

    step = kflume.CapturedStep(cluster, num_layers=L, before=before, after=after,
                               embed=embed, head=head, microbatches=2)
    for _ in range(n):
        ids = step(ids, pos)          # one token boundary, then one replay
        pos += 1

- `embed(*inputs) -> state` (optional, default: the inputs themselves) and
  `head(state) -> outputs` (optional, default: the final state) run in the graph
  around the layers; a state is a tensor or a tuple of tensors whose first dimension is
  the batch (rows in the order of the cluster's plan), split into micro-batches by rows;
- `before(layer, state) -> (q, k, v)` and `after(layer, state, out) -> state` as in
  kflume/weight/pipeline.py, run per micro-batch, interleaved so that one micro-batch's
  remote attention overlaps another's local work.

A call is a token boundary first (`cluster.begin_step()`: nodes that became ready join,
routing edits apply; `boundary()` makes it ahead and returns the plan, whose requests
are the rows of the inputs), then the step. The first call for a batch size runs the step once
eagerly (it loads every kernel; its signal waits happen on the host), returns its
outputs and captures the graph; later calls copy the inputs into the graph's buffers and
replay it while a host thread (`StepServer`) drives the transport. A new batch size
(requests added or finished) gets a graph of its own; the last `max_graphs` are kept. On
CPU the same step runs eagerly, served the same way. After a step the cluster's
requests have advanced by one token (their appends acknowledged). A node lost during a
step (its link broken, or silent past the deadline) is forgotten, what it held is
recomputed through the cluster's recompute callback (kflume/weight/recovery.py), and the
step runs again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..comm.base import DeadlineExceeded, TransportError
from ..weight.pipeline import LayerPipeline, split_rows
from .captured import CapturedRemoteAttention
from .serve import StepServer
from .signal import SignalTimeout, warm_and_capture

__all__ = ["CapturedStep"]

log = logging.getLogger("kflume.graph")


@dataclass(slots=True)
class _Shape:
    """Everything captured for one batch size."""

    cap: CapturedRemoteAttention
    server: StepServer
    run: Callable[[], None]  # the step on the static inputs (eager)
    inputs: list[torch.Tensor]
    outputs: list  # [the step's outputs], set by the last run (or the capture)
    graph: torch.cuda.CUDAGraph | None = None
    stream: torch.cuda.Stream | None = None
    kept: object = None  # the eager first run's outputs

    def close(self) -> None:
        self.server.close()
        self.cap.close()


def _split(state, rows: slice):
    return tuple(t[rows] for t in state) if isinstance(state, tuple) else state[rows]


def _join(states: list):
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*states))
    return torch.cat(states)


class CapturedStep:
    """One decode step of every request of `cluster`, captured (module docstring).

    Args:
        cluster: the attention nodes and router (a `kflume.Cluster`).
        num_layers: decoder layers.
        before, after: the per-layer halves of one micro-batch.
        embed, head: what runs before the first layer and after the last (optional).
        microbatches: how many micro-batches interleave (1: none).
        max_nodes: attention nodes a step can use at once (lanes of its buffers).
        dtype: of q, k, v (default: the cluster's KV dtype).
        device: the weight node's device (default: cuda if the cluster's nodes' KV dtype
            is not float32 and a GPU is there, else cpu).
        capture: capture CUDA graphs (default: on a CUDA device).
        timeout: deadline in seconds for serving one step.
        max_graphs: batch sizes whose graphs are kept.
    """

    def __init__(self, cluster, *, num_layers: int, before: Callable, after: Callable,
                 embed: Callable | None = None, head: Callable | None = None,
                 microbatches: int = 1, max_nodes: int = 4, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, capture: bool | None = None,
                 timeout: float = 30.0, max_graphs: int = 4) -> None:
        if num_layers < 1 or microbatches < 1 or max_graphs < 1:
            raise ValueError("num_layers, microbatches and max_graphs must be >= 1")
        self.cluster, self.num_layers = cluster, num_layers
        self.before, self.after = before, after
        self.embed = embed or (lambda *xs: xs[0] if len(xs) == 1 else xs)
        self.head = head or (lambda state: state)
        self.microbatches, self.max_nodes, self.timeout = microbatches, max_nodes, timeout
        self.max_graphs = max_graphs
        self.dtype = dtype or cluster.geometry.torch_dtype
        if device is None:
            device = cluster._remote.device if cluster._remote is not None else "cpu"
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("capture=True needs a CUDA device")
        q_heads = cluster.geometry.q_heads
        self.remote = (cluster._remote if cluster._remote is not None or q_heads is None
                       else cluster.attention(num_q_heads=q_heads, device=self.device))
        if self.remote is None:
            raise ValueError("the cluster does not know the model's query heads: build it with "
                             "q_heads=..., or call cluster.attention(num_q_heads=...) first")
        if self.remote.device != self.device:
            raise ValueError(f"the cluster's RemoteAttention is on {self.remote.device}; this "
                             f"step runs on {self.device}")
        self._shapes: OrderedDict[int, _Shape] = OrderedDict()
        self._plan = None  # a boundary made ahead of the next call
        self._closed = False

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes whose graphs (buffers, on CPU) are kept, oldest first."""
        return tuple(self._shapes)

    @property
    def captured(self) -> CapturedRemoteAttention | None:
        """The CapturedRemoteAttention of the last batch size served (for diagnostics:
        its `serving.trace`, `lanes`, ...)."""
        return next(reversed(self._shapes.values())).cap if self._shapes else None

    def boundary(self):
        """The token boundary before the next step (`cluster.begin_step()`): returns its
        plan, whose `requests` give the rows the next call's inputs must have, in order.
        A call made without it makes its own."""
        if self._plan is None:
            self.cluster.end_step()  # raises a refusal of the last step's appends
            self._plan = self.cluster.begin_step()
        return self._plan

    def __call__(self, *inputs: torch.Tensor):
        """One token boundary (unless `boundary()` made it), then one step; returns
        `head`'s outputs (fresh tensors)."""
        if self._closed:
            raise RuntimeError("this CapturedStep is closed")
        plan, self._plan = self.boundary(), None
        batch = len(plan.requests)
        if batch == 0:
            raise ValueError("the cluster routes no requests: add some (router.add_request) "
                             "and prefill their KV before stepping")
        for x in inputs:
            if x.shape[0] != batch:
                raise ValueError(f"inputs must have the plan's {batch} rows first; got "
                                 f"{list(x.shape)}")
        for attempt in range(4):
            try:
                out = self._step(plan, inputs)
                break
            except (TransportError, DeadlineExceeded, SignalTimeout) as e:
                # nodes lost during the step: forgotten, their spans recomputed at a new
                # boundary, and the step run again on its plan (nothing was advanced)
                if not self._lose(e) or attempt == 3:
                    raise
                plan = self.cluster.begin_step()
                if len(plan.requests) != batch:
                    raise
        for rid in plan.requests:  # the step's tokens are history from the next boundary
            self.cluster.router.advance(rid)
        return _clone(out)

    def _step(self, plan, inputs):
        shape = self._shapes.get(len(plan.requests))
        if shape is None:
            shape, out = self._first(plan, inputs)
            return out
        self._shapes.move_to_end(len(plan.requests))
        shape.cap.load(plan)
        for dst, src in zip(shape.inputs, inputs):
            dst.copy_(src)
        self._replay(shape)
        return shape.outputs[0]

    def _lose(self, e: BaseException) -> bool:
        """Lose the nodes a failed step points at (their link gone, or, past a deadline,
        silent); False if none (the failure is not a node's loss) or nothing can be
        recomputed."""
        c = self.cluster
        dead = [n for n, cl in c.clients.items() if not cl.conn.alive]
        cap = self.captured
        silent = [] if dead or cap is None or isinstance(e, TransportError) else sorted(
            cap.serving.unanswered & set(c.clients))
        if c.recompute is None or not (dead or silent):
            return False
        for name in dead:
            c.recovery.lose(name, "its link broke during a step")
        for name in silent:
            c.recovery.lose(name, "it did not answer a step within the deadline")
        return True

    def _first(self, plan, inputs) -> tuple[_Shape, object]:
        """A batch size seen first: its buffers, one eager step (this call's), then the
        capture (CUDA)."""
        batch = len(plan.requests)
        rows = split_rows(batch, self.microbatches)
        cap = CapturedRemoteAttention(self.remote, batch=batch, num_layers=self.num_layers,
                                      row_ranges=rows, max_nodes=self.max_nodes,
                                      dtype=self.dtype)
        pipe = LayerPipeline(self.num_layers, self.before, self.after, cap, len(rows))
        static = [x.clone() for x in inputs]
        outputs: list = [None]

        def run() -> None:
            state = self.embed(*static)
            final = pipe([_split(state, r) for r in rows], rows)
            outputs[0] = self.head(_join(final))

        shape = _Shape(cap, StepServer(cap, self.timeout), run, static, outputs)
        try:
            cap.load(plan)
            if self.capture:
                shape.stream = torch.cuda.Stream(self.device)
                shape.graph = warm_and_capture(self._eager_then_keep(shape), shape.stream,
                                               serve=lambda: cap.serve_step(self.timeout),
                                               timeout=self.timeout + 60)
                out = shape.kept
            else:
                self._replay(shape)
                out = outputs[0]
        except BaseException:
            cap.signal.abort()  # a serving thread still waiting gives up at once
            shape.close()
            raise
        self._shapes[batch] = shape
        while len(self._shapes) > self.max_graphs:
            self._shapes.popitem(last=False)[1].close()
        return shape, out

    @staticmethod
    def _eager_then_keep(shape: _Shape) -> Callable[[], None]:
        """The step for `warm_and_capture`: its first (eager) run's outputs are kept
        (that run is this call's step); the second run is the capture."""
        runs = [0]

        def step() -> None:
            shape.run()
            if runs[0] == 0:
                shape.kept = _clone(shape.outputs[0])
            runs[0] += 1
        return step

    def _replay(self, shape: _Shape) -> None:
        """One run of the step, served from the server thread. On failure (serving or
        the step itself) every signal point is released, the run is let finish, the
        signal is reset, and the error raised."""
        shape.server.begin()
        failed: BaseException | None = None
        try:
            if shape.graph is not None:
                with torch.cuda.stream(shape.stream):
                    shape.graph.replay()
            else:
                shape.run()
        except BaseException as e:  # noqa: BLE001 - raised below, once served
            failed = e
            shape.cap.signal.abort()  # the server gives up at once
        try:
            shape.server.end()
        except BaseException as e:  # noqa: BLE001
            failed = failed or e
        if shape.stream is not None:
            shape.stream.synchronize()
        if failed is not None:
            shape.cap.reset()
            raise failed

    def close(self) -> None:
        """Stop the serving threads and give the buffers' shared memory back."""
        self._closed = True
        while self._shapes:
            self._shapes.popitem()[1].close()

    def __enter__(self) -> CapturedStep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clone(out):
    if isinstance(out, tuple):
        return tuple(_clone(t) for t in out)
    return out.clone() if isinstance(out, torch.Tensor) else out
