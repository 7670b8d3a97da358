"""GraphSignal: host-visible signals between a captured CUDA graph and a host thread.

A decode step can live in one CUDA graph while the transport runs on a host thread:
inside the graph, `post(slot)` publishes "buffer ready" to pinned host memory once the
data it guards is written; the host thread sees it (`wait_posted`), moves the data
(e.g. sends q and receives out/lse into registered buffers) and calls `release(slot)`;
the graph's `wait(slot)` then lets the kernels after it run. Slots are independent
(one per layer and micro-batch, say), each used once per replay.

Mechanisms (chosen by `mechanism=`, measured by benchmarks/graph_signal.py):

- "memop": stream memory operations (`cuStreamWriteValue32` / `cuStreamWaitValue32`
  through cuda-bindings), captured as graph memop nodes: the wait polls in the GPU's
  front end and holds no SM. A replayed graph cannot take new host scalars, so the
  values are constants: post writes 1, the host consumes it (0), releases with 1, and
  the graph resets the release word to 0 after waiting.
- "kernel": two one-thread Triton kernels. The step's sequence number lives on the
  device: post increments it and writes it to the host word with a system-scope release;
  wait spins (system-scope acquire loads) until the host's release reaches it.
- "host": no GPU; the same API over plain memory, for code that runs on CPU (eager).

Hazards handled: the data a slot guards is visible before its flag (memops carry a
memory barrier, the kernel uses a system-scope release); the host side never launches
kernels while a graph waits (modules that load lazily would deadlock it: warm up first,
or set CUDA_MODULE_LOADING=EAGER); every host wait has a deadline, and `abort()` releases
every slot so that a stuck graph finishes (its outputs are then flagged invalid).
`warm_and_capture` is the recipe for capturing a step that waits on the host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

__all__ = ["GraphSignal", "SignalTimeout", "default_mechanism", "warm_and_capture"]


class SignalTimeout(TimeoutError):
    """A graph did not post, or a host thread did not release, within the deadline."""


def _driver():
    try:
        from cuda.bindings import driver, runtime
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("GraphSignal's memop mechanism needs cuda-bindings "
                          "(pip install cuda-bindings)") from e
    return driver, runtime


def _check(result, what: str):
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def stream_mem_ops_supported(device: torch.device) -> bool:
    """Whether the GPU runs stream memory operations natively (else the driver blocks the
    calling thread on a wait)."""
    d, _ = _driver()
    index = device.index if device.index is not None else torch.cuda.current_device()
    err, dev = d.cuDeviceGet(index)
    attr = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1
    err, value = d.cuDeviceGetAttribute(attr, dev)
    return int(err) == 0 and value == 1


def default_mechanism(device: str | torch.device | None) -> str:
    """The mechanism `GraphSignal(mechanism=None)` takes on `device`: memop on a CUDA
    device that runs stream memory operations natively, else kernel; host on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _best_mechanism(device) if device.type == "cuda" else "host"


def _best_mechanism(device: torch.device) -> str:
    try:
        return "memop" if stream_mem_ops_supported(device) else "kernel"
    except ImportError:
        return "kernel"


class GraphSignal:
    """`slots` independent post/wait pairs between device work and a host thread.

    Args:
        slots: how many signal points one step (one graph replay) uses.
        device: the CUDA device whose streams post and wait (None: host only).
        mechanism: "memop", "kernel" or "host" (default: memop on a CUDA device that runs
            stream memory operations natively, else kernel; host on CPU).
        flag: the flag words to post to (int32 `[slots]` host memory, pinned or
            registered for a GPU mechanism), e.g. `SharedWords` that another process
            reads; default: pinned memory of this process.
    """

    def __init__(self, slots: int, device: str | torch.device | None = None,
                 mechanism: str | None = None, flag: torch.Tensor | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        cuda = self.device.type == "cuda"
        self.mechanism = mechanism or (_best_mechanism(self.device) if cuda else "host")
        if self.mechanism not in ("memop", "kernel", "host"):
            raise ValueError(f"mechanism must be memop, kernel or host; got {self.mechanism}")
        if self.mechanism != "host" and not cuda:
            raise ValueError(f"mechanism {self.mechanism!r} needs a CUDA device")
        if self.mechanism == "memop" and not stream_mem_ops_supported(self.device):
            raise ValueError(
                "this GPU/driver reports CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS = 0: "
                "stream memory operations would block the calling host thread (and deadlock a "
                "host-driven signal); use mechanism='kernel'")
        # Host-visible words: flag (device -> host) and ack (host -> device), per slot.
        pin = self.mechanism != "host"
        if flag is not None and (flag.shape != (slots,) or flag.dtype != torch.int32
                                 or flag.device.type != "cpu"):
            raise ValueError(f"flag must be int32 host memory of {slots} words (pinned or "
                             "registered for a GPU mechanism)")
        self.flag = torch.zeros(slots, dtype=torch.int32, pin_memory=pin) if flag is None \
            else flag.zero_()
        self.ack = torch.zeros(slots, dtype=torch.int32, pin_memory=pin)
        self._flag_np, self._ack_np = self.flag.numpy(), self.ack.numpy()
        self.seen = [0] * slots  # host: the last sequence number seen per slot
        self.aborted = False
        if self.mechanism == "memop":
            self._driver, runtime = _driver()
            self._flag_dev = self._dev_ptr(runtime, self.flag)
            self._ack_dev = self._dev_ptr(runtime, self.ack)
        elif self.mechanism == "kernel":
            from ._graph_triton import post_kernel, wait_kernel

            self.seq = torch.zeros(slots, dtype=torch.int32, device=self.device)
            # Load both kernels' modules now: a module loaded lazily while a spin kernel
            # runs would wait for the GPU to drain, which it never does.
            with torch.cuda.device(self.device):
                scratch = torch.zeros(2, dtype=torch.int32, device=self.device)
                post_kernel[(1,)](scratch, scratch[1:], 0, num_warps=1)
                wait_kernel[(1,)](self.seq, self.ack, 0, num_warps=1)  # seq 0: returns at once
                torch.cuda.synchronize(self.device)

    @staticmethod
    def _dev_ptr(runtime, t: torch.Tensor) -> int:
        """Device address of pinned host memory (the same address under UVA)."""
        res = runtime.cudaHostGetDevicePointer(t.data_ptr(), 0)
        if int(res[0]) != 0:
            return t.data_ptr()
        return int(res[1])

    # ---- device side: enqueue on the current stream (capturable) ---------------------
    def post(self, slot: int) -> None:
        """Publish "slot is ready" after everything enqueued before it on this stream."""
        if self.mechanism == "host":
            self._flag_np[slot] += 1
        elif self.mechanism == "memop":
            if not torch.cuda.is_current_stream_capturing():  # eager: the same, on the host
                torch.cuda.current_stream(self.device).synchronize()
                self._flag_np[slot] = 1
                return
            d = self._driver
            _check(d.cuStreamWriteValue32(
                d.CUstream(torch.cuda.current_stream(self.device).cuda_stream),
                d.CUdeviceptr(self._flag_dev + 4 * slot), 1,
                d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32")
        else:
            from ._graph_triton import post_kernel

            post_kernel[(1,)](self.seq, self.flag, slot, num_warps=1)

    def wait(self, slot: int) -> None:
        """Hold the work enqueued after this until the host releases `slot`.

        Outside graph capture (a warm-up step, eager code) the calling thread waits
        instead, after synchronising its stream: no spin kernel runs while kernels that
        come after it may still need their modules loaded.
        """
        if self.mechanism == "host":
            self._host_wait(slot)
        elif not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(self.device).synchronize()
            self._host_wait(slot)
            if self.mechanism == "memop":
                self._ack_np[slot] = 0
        elif self.mechanism == "memop":
            d = self._driver
            stream = d.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
            ack = d.CUdeviceptr(self._ack_dev + 4 * slot)
            _check(d.cuStreamWaitValue32(stream, ack, 1,
                                         d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ),
                   "cuStreamWaitValue32")
            _check(d.cuStreamWriteValue32(stream, ack, 0,
                                          d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT),
                   "cuStreamWriteValue32")
        else:
            from ._graph_triton import wait_kernel

            wait_kernel[(1,)](self.seq, self.ack, slot, num_warps=1)

    def _host_wait(self, slot: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        done = (lambda: self._ack_np[slot] == 1) if self.mechanism == "memop" else (
            lambda: self._ack_np[slot] >= self._flag_np[slot])
        while not done():
            if time.monotonic() > deadline:
                raise SignalTimeout(f"slot {slot} was not released within {timeout} s")
            time.sleep(0)

    # ---- host side ----------------------------------------------------------------------
    def wait_posted(self, slot: int, timeout: float = 30.0) -> int:
        """Block until the device posts `slot` (again); returns the step's sequence number."""
        deadline = time.monotonic() + timeout
        flag = self._flag_np
        while True:
            v = int(flag[slot])
            if self.mechanism == "memop":
                if v == 1:
                    flag[slot] = 0  # consume: the next replay writes 1 again
                    self.seen[slot] += 1
                    return self.seen[slot]
            elif v > self.seen[slot]:
                self.seen[slot] = v
                return v
            if self.aborted:
                raise SignalTimeout("signal aborted")
            if time.monotonic() > deadline:
                raise SignalTimeout(f"slot {slot} was not posted within {timeout} s (seen "
                                    f"{self.seen[slot]})")

    def next_value(self, slot: int) -> int:
        """The value the next post of `slot` writes to its flag (kernel and host
        mechanisms: a sequence number; memop posts write 1)."""
        return 1 if self.mechanism == "memop" else self.seen[slot] + 1

    def posted(self, slot: int) -> bool:
        """Non-blocking: has the device posted `slot` since it was last consumed?"""
        v = int(self._flag_np[slot])
        return v == 1 if self.mechanism == "memop" else v > self.seen[slot]

    def release(self, slot: int) -> None:
        """Let the device's `wait(slot)` go on."""
        if self.mechanism == "memop":
            self._ack_np[slot] = 1
        else:
            self._ack_np[slot] = self.seen[slot]

    def abort(self) -> None:
        """Release every slot so that a waiting graph can finish; its results are invalid."""
        self.aborted = True
        if self.mechanism == "memop":
            self._ack_np[:] = 1
        else:
            self._ack_np[:] = 2**31 - 1

    def reset(self) -> None:
        """After an abort, once the aborted replay has finished (its stream synchronised),
        make the signal usable again: the next replay's posts and waits pair up as before.
        Every post of the aborted replay has run by then, so the flags hold the device's
        sequence numbers (kernel, host) or a post nobody consumed (memop)."""
        if self.mechanism == "memop":
            self._flag_np[:] = 0
            self._ack_np[:] = 0  # waits that passed before the abort kept the abort's 1
        else:
            self._ack_np[:] = self._flag_np
            self.seen = [int(v) for v in self._flag_np]
        self.aborted = False


def warm_and_capture(step: Callable[[], object], stream: torch.cuda.Stream,
                     serve: Callable[[], object] | None = None,
                     timeout: float = 120.0) -> torch.cuda.CUDAGraph:
    """Run `step` once eagerly on `stream`, then capture it into a new CUDA graph.

    The eager run loads every kernel the step launches (a module loaded lazily while a
    graph waits on the host deadlocks it); its signal waits happen on the host, so
    `serve` (what answers them: `CapturedRemoteAttention.serve_step`, say) runs on a
    thread of its own meanwhile. Raises SignalTimeout if serving does not end within
    `timeout` seconds.
    """
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
