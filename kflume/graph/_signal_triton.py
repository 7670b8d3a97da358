"""Triton code of GraphSignal's post and wait on a GPU (kflume/graph/signal.py).

One program, one warp each. `post_kernel` bumps the point's device-resident sequence
number and writes it to the host-visible flag with a system-scope release (everything
the stream wrote before is visible first). `wait_kernel` spins on the host-visible
release word with volatile loads until it reaches the sequence number, then acquires.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def post_kernel(SEQ, FLAG, point):
    s = tl.load(SEQ + point) + 1
    tl.store(SEQ + point, s)
    tl.atomic_xchg(FLAG + point, s, sem="release", scope="sys")


@triton.jit
def wait_kernel(SEQ, ACK, point):
    s = tl.load(SEQ + point)
    a = tl.load(ACK + point, volatile=True)  # plain reads while spinning: no PCIe atomics
    while a < s:
        a = tl.load(ACK + point, volatile=True)
    tl.atomic_add(ACK + point, 0, sem="acquire", scope="sys")  # order the reads that follow
