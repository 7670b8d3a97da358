"""Triton code of `MailboxView.deliver` (kflume/comm/mailbox.py).

Programs copy the reply's bytes (as 32-bit words, BLOCK a program) to the mailbox, which
may be another GPU's memory mapped into this one; each then counts itself done on a
device word with a system-scope release, and the last to count sets the word back to 0
and raises the doorbell with a system-scope release: whoever sees the doorbell sees the
bytes. Many programs, so that a layer's reply (tens to hundreds of KiB) leaves in a few
microseconds: the node's next kernels wait behind it in its stream (one program took
~10 µs for 130 KiB, which showed at B=32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # 32-bit words a program moves (4 KiB)


@triton.jit(do_not_specialize=["n", "dst_offset", "word", "value"])
def deliver_kernel(SRC, DST, BELLS, COUNT, n, dst_offset, word, value, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(DST + dst_offset.to(tl.int64) + offs, tl.load(SRC + offs, mask=m), mask=m)
    tl.debug_barrier()  # every thread's stores, then the program's count
    done = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="sys")
    if done == tl.num_programs(0) - 1:
        tl.store(COUNT, 0)
        tl.atomic_xchg(BELLS + word, value.to(tl.int64), sem="release", scope="sys")


def deliver(src: torch.Tensor, buffer: torch.Tensor, offset: int, bells: torch.Tensor,
            word: int, value: int, count: torch.Tensor) -> None:
    """Copy `src`'s bytes to `buffer` (uint8) from byte `offset`, then set `bells[word]`
    (int64) to `value`, on the current stream. `count`: an int32 device word at 0, left
    at 0 (deliveries that share it must be ordered, e.g. on one stream)."""
    if not src.is_contiguous():
        raise ValueError("deliver: src must be contiguous")
    nbytes = src.numel() * src.element_size()
    if nbytes % 4 or offset % 4 or src.data_ptr() % 4 or buffer.data_ptr() % 4:
        raise ValueError(f"deliver: bytes ({nbytes}) and offset ({offset}) must be multiples "
                         "of 4, and both buffers 4-byte aligned")
    n = nbytes // 4
    deliver_kernel[(max(triton.cdiv(n, BLOCK), 1),)](
        src.view(-1).view(torch.uint8).view(torch.int32), buffer.view(torch.int32), bells,
        count, n, offset // 4, word, value, BLOCK=BLOCK, num_warps=4)
