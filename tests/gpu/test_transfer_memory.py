"""Receive buffers never share memory with work still queued on a stream (GPU machine).

A transport writes CUDA memory outside stream order. The caching allocator gives a block
freed on a stream straight back to the next allocation on that stream, even while a
kernel queued earlier still reads it: a message received into that block would change
the kernel's input (a node once died of it, reading page ids that a message overwrote).
"""

from __future__ import annotations

import pytest
import torch

from kflume.comm.wire import transfer_empty

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def test_receive_buffers_never_take_a_block_a_queued_kernel_reads():
    dev = torch.device("cuda")
    n = 1 << 16
    x = torch.ones(n, device=dev)
    ptr = x.data_ptr()
    torch.cuda._sleep(200_000_000)  # keep the stream busy: the read below stays queued
    y = x * 2
    del x  # freed while the kernel reading it has not run
    plain = torch.empty(n, device=dev)
    assert plain.data_ptr() == ptr  # what an allocation on the same stream gets
    del plain
    bufs = [transfer_empty((n,), torch.float32, dev) for _ in range(4)]
    assert all(b.data_ptr() != ptr for b in bufs)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # what a transport does: write at once, out of order
        for b in bufs:
            b.fill_(float("nan"))
    torch.cuda.synchronize()
    assert (y == 2).all()
