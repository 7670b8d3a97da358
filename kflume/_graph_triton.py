"""Triton code of GraphSignal's "kernel" mechanism (kflume/graph.py).

One program, one warp each. `post_kernel` bumps the slot's device-resident sequence
number and writes it to the host-visible flag with a system-scope release (everything
the stream wrote before is visible first). `wait_kernel` spins on the host-visible
release word with volatile loads until it reaches the sequence number, then acquires.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def post_kernel(SEQ, FLAG, slot):
    s = tl.load(SEQ + slot) + 1
    tl.store(SEQ + slot, s)
    tl.atomic_xchg(FLAG + slot, s, sem="release", scope="sys")


@triton.jit
def wait_kernel(SEQ, ACK, slot):
    s = tl.load(SEQ + slot)
    a = tl.load(ACK + slot, volatile=True)  # plain reads while spinning: no PCIe atomics
    while a < s:
        a = tl.load(ACK + slot, volatile=True)
    tl.atomic_add(ACK + slot, 0, sem="acquire", scope="sys")  # order the reads that follow
