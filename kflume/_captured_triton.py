"""Triton code of CapturedRemoteAttention's device half (kflume/captured.py).

`dispatch_kernel` does what a slot's start needs before its post, and the post, in one
launch: program j < R copies q row `gather[j]` into send row j (every node slot's rows
at once), programs R.. copy the micro-batch's new k and v rows into the step's k, v
buffer, and the last program to finish posts the slot (`_graph_triton.post`). "Last" is
counted on a device word that it sets back to 0: each program releases its stores to
the counter (GPU scope), the last one acquires them all before its system-scope post, so
the host that sees the post sees every row. (Was three kernels and three launch gaps a
slot: index_select, stack, post.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._graph_triton import post


@triton.jit(do_not_specialize=["q_stride", "k_stride", "v_stride", "slot"])
def dispatch_kernel(Q, K, V, GATHER, SEND, KV, COUNT, SEQ, FLAG, slot,
                    q_stride, k_stride, v_stride, R, n,
                    QW: tl.constexpr, KW: tl.constexpr, QB: tl.constexpr, KB: tl.constexpr):
    j = tl.program_id(0)
    if j < R:  # a q row for the nodes
        src = tl.load(GATHER + j)
        offs = tl.arange(0, QB)
        m = offs < QW
        row = tl.load(Q + src * q_stride + offs, mask=m)
        tl.store(SEND + j.to(tl.int64) * QW + offs, row, mask=m)
    else:  # row j - R of the step's k, v: [row, k | v, Hkv * D]
        r = j - R
        offs = tl.arange(0, KB)
        m = offs < KW
        kk = tl.load(K + r * k_stride + offs, mask=m)
        vv = tl.load(V + r * v_stride + offs, mask=m)
        tl.store(KV + r.to(tl.int64) * 2 * KW + offs, kk, mask=m)
        tl.store(KV + r.to(tl.int64) * 2 * KW + KW + offs, vv, mask=m)
    tl.debug_barrier()  # the program's stores, then its count
    done = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")
    if done == R + n - 1:
        tl.store(COUNT, 0)
        post(SEQ, FLAG, slot)


def dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gather: torch.Tensor,
             send: torch.Tensor, kv: torch.Tensor, count: torch.Tensor,
             post_args: tuple) -> None:
    """send[j] = q[gather[j]] for every row j of `send` `[R, Hq, D]`; kv[r] = (k[r], v[r])
    for every row r of k, v `[n, Hkv, D]` (kv `[n, 2, Hkv, D]`); then post. q, k, v may
    have strided rows (views of a fused projection); each row itself contiguous."""
    seq, flag, slot = post_args
    R, n = send.shape[0], k.shape[0]
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
            raise ValueError("dispatch: q, k, v rows must be contiguous")
    if not (send.is_contiguous() and kv.is_contiguous()):
        raise ValueError("dispatch: send and kv must be contiguous")
    qw, kw = q.shape[1] * q.shape[2], k.shape[1] * k.shape[2]
    dispatch_kernel[(R + n,)](q, k, v, gather, send, kv, count, seq, flag, slot,
                              q.stride(0), k.stride(0), v.stride(0), R, n, QW=qw, KW=kw,
                              QB=triton.next_power_of_2(qw), KB=triton.next_power_of_2(kw),
                              num_warps=4)
