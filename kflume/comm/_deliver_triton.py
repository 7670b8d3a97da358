"""Triton code of `MailboxView.deliver` (kflume/comm/mailbox.py).

One program copies the reply's bytes (as 32-bit words) to the mailbox, which may be
another GPU's memory mapped into this one, synchronises its threads, and raises the
doorbell word with a system-scope release: whoever sees the value sees the bytes. One
program is enough: a layer's reply is tens to hundreds of KiB, whose stores do not wait.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # 32-bit words a program moves per iteration (16 KiB)


@triton.jit(do_not_specialize=["n", "dst_offset", "word", "value"])
def deliver_kernel(SRC, DST, BELLS, n, dst_offset, word, value, BLOCK: tl.constexpr):
    dst = DST + dst_offset.to(tl.int64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(SRC + offs, mask=m), mask=m)
    tl.debug_barrier()  # every thread's stores before the release below
    tl.atomic_xchg(BELLS + word, value.to(tl.int64), sem="release", scope="sys")


def deliver(src: torch.Tensor, buffer: torch.Tensor, offset: int, bells: torch.Tensor,
            word: int, value: int) -> None:
    """Copy `src`'s bytes to `buffer` (uint8) from byte `offset`, then set `bells[word]`
    (int64) to `value`, on the current stream."""
    if not src.is_contiguous():
        raise ValueError("deliver: src must be contiguous")
    nbytes = src.numel() * src.element_size()
    if nbytes % 4 or offset % 4 or src.data_ptr() % 4 or buffer.data_ptr() % 4:
        raise ValueError(f"deliver: bytes ({nbytes}) and offset ({offset}) must be multiples "
                         "of 4, and both buffers 4-byte aligned")
    deliver_kernel[(1,)](src.view(-1).view(torch.uint8).view(torch.int32),
                         buffer.view(torch.int32), bells, nbytes // 4, offset // 4, word,
                         value, BLOCK=BLOCK, num_warps=8)
