"""Triton code of `MailboxView.deliver` (kflume/comm/mailbox.py).

Programs copy the reply's bytes (as 32-bit words, BLOCK a program) to the mailbox, which
may be another GPU's memory mapped into this one; each then counts itself done on a
device word with a system-scope release, and the last to count sets the word back to 0
and raises the doorbell with a system-scope release: whoever sees the doorbell sees the
bytes. Many programs, so that a layer's reply (tens to hundreds of KiB) leaves in a few
microseconds: the node's next kernels wait behind it in its stream (one program took
~10 µs for 130 KiB, which showed at B=32).

`fetch` is the other direction: a node reading a layer's query from the weight node's
mapped buffer as a kernel (which a graph can capture, where a copy between devices
could not be), 4 KiB a program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # 32-bit words a program moves (4 KiB)


@triton.jit(do_not_specialize=["n", "dst_offset", "word", "value"])
def deliver_kernel(SRC, DST, BELLS, COUNT, VALUE, n, dst_offset, word, value,
                   BLOCK: tl.constexpr, VALUE_IN_MEMORY: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(DST + dst_offset.to(tl.int64) + offs, tl.load(SRC + offs, mask=m), mask=m)
    tl.debug_barrier()  # every thread's stores, then the program's count
    done = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="sys")
    if done == tl.num_programs(0) - 1:
        tl.store(COUNT, 0)
        if VALUE_IN_MEMORY:  # read when it runs: a captured graph's delivery
            v = tl.load(VALUE)
        else:
            v = value.to(tl.int64)
        tl.atomic_xchg(BELLS + word, v, sem="release", scope="sys")


@triton.jit(do_not_specialize=["n", "src_offset"])
def fetch_kernel(SRC, DST, n, src_offset, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(DST + offs, tl.load(SRC + src_offset.to(tl.int64) + offs, mask=m), mask=m)


def _words(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    nbytes = t.numel() * t.element_size()
    if nbytes % 4 or t.data_ptr() % 4:
        raise ValueError(f"{what} holds {nbytes} bytes from address {t.data_ptr():#x}; a "
                         "multiple of 4 bytes, 4-byte aligned, expected")
    return t.view(-1).view(torch.uint8).view(torch.int32)


def deliver(src: torch.Tensor, buffer: torch.Tensor, offset: int, bells: torch.Tensor,
            word: int, value: int | torch.Tensor, count: torch.Tensor) -> None:
    """Copy `src`'s bytes to `buffer` (uint8) from byte `offset`, then set `bells[word]`
    (int64) to `value`, on the current stream. `value`: an int, or a one-element int64
    device tensor read when the kernel runs (so that a captured graph delivers the
    value of whichever stream replays it). `count`: an int32 device word at 0, left at 0
    (deliveries that share it must be ordered, e.g. on one stream)."""
    words = _words(src, "deliver: src")
    if offset % 4 or buffer.data_ptr() % 4:
        raise ValueError(f"deliver: offset ({offset}) must be a multiple of 4, and the "
                         "mailbox 4-byte aligned")
    n = words.numel()
    in_memory = isinstance(value, torch.Tensor)
    deliver_kernel[(max(triton.cdiv(n, BLOCK), 1),)](
        words, buffer.view(torch.int32), bells, count, value if in_memory else bells,
        n, offset // 4, word, 0 if in_memory else value, BLOCK=BLOCK,
        VALUE_IN_MEMORY=in_memory, num_warps=4)


def fetch(dst: torch.Tensor, buffer: torch.Tensor, offset: int) -> None:
    """Copy `dst.nbytes` bytes of `buffer` (uint8, another GPU's memory mapped here, say)
    from byte `offset` into `dst`, on the current stream: a kernel, so that it can be
    captured into a graph of this device."""
    words = _words(dst, "fetch: dst")
    if offset % 4 or buffer.data_ptr() % 4:
        raise ValueError(f"fetch: offset ({offset}) must be a multiple of 4, and the "
                         "mailbox 4-byte aligned")
    n = words.numel()
    fetch_kernel[(max(triton.cdiv(n, BLOCK), 1),)](buffer.view(torch.int32), words, n,
                                                   offset // 4, BLOCK=BLOCK, num_warps=4)
