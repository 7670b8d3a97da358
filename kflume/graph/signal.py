"""GraphSignal: host-visible signals between a captured CUDA graph and a host thread.

A decode step can live in one CUDA graph while the transport runs on a host thread:
inside the graph, `post(point)` publishes "buffer ready" to pinned host memory once the
data it guards is written; the host thread sees it (`wait_posted`), moves the data
(sends q, receives out/lse into registered buffers) and calls `release(point)`; the
graph's `wait(point)` then lets the kernels after it run. Points are independent (one
per layer and micro-batch, say), each used once per replay.

On CUDA, two one-warp Triton kernels (kflume/graph/_signal_triton.py): the step's
sequence number lives on the device; `post` increments it and writes it to the host
word with a system-scope release (the guarded data is visible first); `wait` spins with
volatile loads until the host's release reaches it, then acquires. On CPU the same API
runs over plain memory (eager code, and the CPU path of a captured step).

Hazards handled: the host side never launches kernels while a graph waits (a module
loaded lazily waits for the GPU to drain, which a spinning wait never lets happen: the
kernels load at construction); every host wait has a deadline, and `abort()` releases
every point so that a stuck graph finishes (its outputs are then invalid).
`warm_and_capture` is the recipe for capturing a step that waits on the host.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

import torch

__all__ = ["GraphSignal", "SignalTimeout", "warm_and_capture"]


class SignalTimeout(TimeoutError):
    """A graph did not post, or a host thread did not release, within the deadline."""


class GraphSignal:
    """`points` independent post/wait pairs between device work and a host thread.

    Args:
        points: how many signal points one step (one graph replay) uses.
        device: the device whose streams post and wait ("cpu": host memory only).
        flag: the flag words to post to (int32 `[points]` host memory, pinned or
            registered with CUDA on a GPU), e.g. `SharedWords` that another process
            reads; default: pinned memory of this process.
    """

    def __init__(self, points: int, device: str | torch.device | None = None,
                 flag: torch.Tensor | None = None, *, mechanism: str | None = None) -> None:
        if isinstance(flag, str):  # the earlier signature's third argument
            flag, mechanism = None, flag
        if mechanism is not None:
            warnings.warn("GraphSignal(mechanism=...) has no effect: a GPU posts and waits "
                          "with Triton kernels, the CPU with plain memory",
                          DeprecationWarning, stacklevel=2)
        if points < 1:
            raise ValueError("points must be >= 1")
        self.points = points
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        if flag is not None and (flag.shape != (points,) or flag.dtype != torch.int32
                                 or flag.device.type != "cpu"):
            raise ValueError(f"flag must be int32 host memory of {points} words (pinned or "
                             "registered with CUDA on a GPU)")
        # host-visible words: flag (device -> host) and ack (host -> device), per point
        self.flag = (torch.zeros(points, dtype=torch.int32, pin_memory=self.cuda)
                     if flag is None else flag.zero_())
        self.ack = torch.zeros(points, dtype=torch.int32, pin_memory=self.cuda)
        self._flag_np, self._ack_np = self.flag.numpy(), self.ack.numpy()
        self.seen = [0] * points  # host: the last sequence number seen per point
        self.aborted = False
        if self.cuda:
            from ._signal_triton import post_kernel, wait_kernel

            self.seq = torch.zeros(points, dtype=torch.int32, device=self.device)
            # Load both kernels' modules now: a module loaded lazily while a spin kernel
            # runs would wait for the GPU to drain, which it never does.
            with torch.cuda.device(self.device):
                scratch = torch.zeros(2, dtype=torch.int32, device=self.device)
                post_kernel[(1,)](scratch, scratch[1:], 0, num_warps=1)
                wait_kernel[(1,)](self.seq, self.ack, 0, num_warps=1)  # seq 0: returns at once
                torch.cuda.synchronize(self.device)

    # ---- device side: enqueued on the current stream (capturable) -----------------------
    def post(self, point: int) -> None:
        """Publish "point is ready" after everything enqueued before it on this stream."""
        if not self.cuda:
            self._flag_np[point] += 1
            return
        from ._signal_triton import post_kernel

        post_kernel[(1,)](self.seq, self.flag, point, num_warps=1)

    def wait(self, point: int) -> None:
        """Hold the work enqueued after this until the host releases `point`.

        Outside graph capture (a warm-up step, eager code) the calling thread waits
        instead, after synchronising its stream: no spin kernel runs while kernels that
        come after it may still need their modules loaded."""
        if not self.cuda:
            self._host_wait(point)
        elif not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(self.device).synchronize()
            self._host_wait(point)
        else:
            from ._signal_triton import wait_kernel

            wait_kernel[(1,)](self.seq, self.ack, point, num_warps=1)

    def _host_wait(self, point: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._ack_np[point] < self._flag_np[point]:
            if time.monotonic() > deadline:
                raise SignalTimeout(f"point {point} was not released within {timeout} s")
            time.sleep(0)

    # ---- host side -------------------------------------------------------------------
    def wait_posted(self, point: int, timeout: float = 30.0) -> int:
        """Block until the device posts `point` (again); returns the step's sequence number."""
        deadline = time.monotonic() + timeout
        while True:
            v = int(self._flag_np[point])
            if v > self.seen[point]:
                self.seen[point] = v
                return v
            if self.aborted:
                raise SignalTimeout("signal aborted")
            if time.monotonic() > deadline:
                raise SignalTimeout(f"point {point} was not posted within {timeout} s (seen "
                                    f"{self.seen[point]})")

    def next_value(self, point: int) -> int:
        """The value the next post of `point` writes to its flag (a sequence number)."""
        return self.seen[point] + 1

    def posted(self, point: int) -> bool:
        """Non-blocking: has the device posted `point` since it was last seen?"""
        return int(self._flag_np[point]) > self.seen[point]

    def release(self, point: int) -> None:
        """Let the device's `wait(point)` go on."""
        self._ack_np[point] = self.seen[point]

    def abort(self) -> None:
        """Release every point so that a waiting graph can finish; its results are invalid."""
        self.aborted = True
        self._ack_np[:] = 2**31 - 1

    def reset(self) -> None:
        """After an abort, once the aborted replay has finished (its stream synchronised),
        make the signal usable again: every post of the aborted replay has run by then, so
        the flags hold the device's sequence numbers."""
        self._ack_np[:] = self._flag_np
        self.seen = [int(v) for v in self._flag_np]
        self.aborted = False


def warm_and_capture(step: Callable[[], object], stream: torch.cuda.Stream,
                     serve: Callable[[], object] | None = None,
                     timeout: float = 120.0) -> torch.cuda.CUDAGraph:
    """Run `step` once eagerly on `stream`, then capture it into a new CUDA graph.

    The eager run loads every kernel the step launches (a module loaded lazily while a
    graph waits on the host deadlocks it); its signal waits happen on the host, so
    `serve` (what answers them) runs on a thread of its own meanwhile. Raises
    SignalTimeout if serving does not end within `timeout` seconds."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            serve()
        except BaseException as e:  # noqa: BLE001 - raised in the caller below
            error.append(e)

    t = threading.Thread(target=run, name="kflume-warmup", daemon=True) if serve else None
    if t is not None:
        t.start()
    with torch.cuda.stream(stream):
        step()
    if t is not None:
        t.join(timeout)
        if t.is_alive():
            raise SignalTimeout(f"the warm-up step was not served within {timeout} s")
        if error:
            raise error[0]
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    return graph
