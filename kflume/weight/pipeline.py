"""LayerPipeline: micro-batches interleaved across layers, so that remote attention of one
overlaps local projection and FFN work of another.

With two micro-batches A and B, layer after layer:

    A: before(l) start(l) |                          | finish(l) after(l) before(l+1) ...
    B:                    | after(l-1) before(l)     |
                          |           start(l)       |

While A's queries are at the attention nodes, the weight node computes B's projections
and FFN; then it waits for A (whose attention had that long to finish), and so on.

The pipeline only orders calls; it takes per-layer callables, so it composes into hand
written decode loops, patched models, eager code and captured CUDA graphs alike:

- `before(layer, state) -> (q, k, v)`: norm, projections, RoPE of one micro-batch;
- `after(layer, state, out) -> state`: output projection, residual, FFN;
- `attention.start(layer, q, k, v, rows) -> handle` and `attention.finish(handle) -> out`:
  `RemoteAttention` (eager), or `CapturedRemoteAttention` inside a graph (what
  `kflume.CapturedStep` composes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["LayerPipeline", "split_rows"]


def split_rows(batch: int, microbatches: int) -> list[slice]:
    """Row ranges of `microbatches` micro-batches of `batch` rows: contiguous, sizes
    differing by at most one (fewer micro-batches than asked when the batch is smaller)."""
    n = min(microbatches, max(batch, 1))
    bounds = [batch * i // n for i in range(n + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(n)]


class LayerPipeline:
    """Run `num_layers` layers over micro-batches of the batch rows.

    Args:
        num_layers: layers of the model.
        before, after: the per-layer callables (see module docstring).
        attention: an object with `start(layer, q, k, v, rows)` and `finish(handle)`.
        microbatches: how many micro-batches (>= 1; 1 is plain sequential execution).
    """

    def __init__(self, num_layers: int, before: Callable, after: Callable, attention,
                 microbatches: int = 2) -> None:
        if num_layers < 1 or microbatches < 1:
            raise ValueError("num_layers and microbatches must be >= 1")
        self.num_layers, self.before, self.after = num_layers, before, after
        self.attention, self.microbatches = attention, microbatches

    def split(self, batch: int) -> list[slice]:
        """Row ranges of the micro-batches: contiguous, sizes differing by at most one."""
        return split_rows(batch, self.microbatches)

    def __call__(self, states: Sequence, rows: Sequence[slice]) -> list:
        """Run every layer; `states[m]` is micro-batch m's state (covering plan rows
        `rows[m]`). Returns the final states."""
        states = list(states)
        if len(states) != len(rows):
            raise ValueError("one state per micro-batch")
        handles: list = [None] * len(states)
        for layer in range(self.num_layers):
            for m, r in enumerate(rows):
                if layer > 0:  # finish micro-batch m's previous layer, its attention had
                    # the other micro-batches' work to complete
                    states[m] = self.after(layer - 1, states[m],
                                           self.attention.finish(handles[m]))
                q, k, v = self.before(layer, states[m])
                handles[m] = self.attention.start(layer, q, k, v, r)
        last = self.num_layers - 1
        return [self.after(last, s, self.attention.finish(h)) for s, h in zip(states, handles)]
